"""The only training loop and the only scoring loop in fedfraud."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from common.model import FraudNet

SCORE_BATCH = 8192  # scoring has no gradients; large batches are just faster
# SGD's momentum with ``local-optimizer = "sgd"``: the usual 0.9 (no other was tried).
SGD_MOMENTUM = 0.9
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Privacy:
    """DP-SGD settings for one bank's training (Opacus): Poisson-sampled batches,
    per-transaction clipping to ``max_grad_norm``, Gaussian noise of
    ``noise_multiplier`` x that norm."""

    noise_multiplier: float
    max_grad_norm: float


def train(
    model: FraudNet, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
    learning_rate: float, pos_weight: float, seed: int, proximal_mu: float = 0.0,
    privacy: Privacy | None = None, local_optimizer: str = "adam",
    logit_offset: float = 0.0,
) -> float:
    """Train in place with a fresh Adam (``local_optimizer`` "adam") or SGD with
    momentum ("sgd"); return the mean loss of the last epoch.

    ``logit_offset`` is added to every logit in the loss (logit adjustment: a bank's
    ``fraud_log_odds``, so that the model learns how transactions rank apart from how
    common fraud is at that bank; README, "Banks with most of the fraud").

    ``proximal_mu`` adds FedProx's term mu/2 * ||w - w_start||^2 (w_start: the weights
    the model came with, i.e. the global model). ``privacy`` trains with DP-SGD.
    Shuffling, sampling, noise and dropout follow ``seed`` alone, so a bank's update is
    the same in any process (simulation actor or a bank executor's task).
    """
    features, labels = torch.from_numpy(x), torch.tensor(y, dtype=torch.float32)
    untraced_torch_optim()  # before the optimizer: its constructor is wrapped too
    if local_optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=learning_rate, momentum=SGD_MOMENTUM)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    start = [p.detach().clone() for p in model.parameters()]
    model.train()
    epoch_loss = float("nan")
    with torch.random.fork_rng():  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        if privacy is None:
            module, batches = model, shuffled(features, labels, batch_size)
        else:
            module, optimizer, batches = private(model, optimizer, features, labels,
                                                 batch_size, privacy, seed)
        for _ in range(epochs):
            total, rows = 0.0, 0
            for x_batch, y_batch in batches():
                if not len(y_batch):  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad()
                loss = criterion(module(x_batch) + logit_offset, y_batch)
                if proximal_mu:
                    loss = loss + proximal_mu / 2 * sum(
                        (p - p0).pow(2).sum() for p, p0 in zip(model.parameters(), start))
                loss.backward()
                step(optimizer)
                total += loss.item() * len(y_batch)
                rows += len(y_batch)
            epoch_loss = total / max(rows, 1)
    return epoch_loss


# torch.optim and torch.compile: torch.optim wraps ``Optimizer.add_param_group``,
# ``zero_grad`` and Adam's update in ``torch._disable_dynamo`` ("never trace this with
# torch.compile") and Adam's and SGD's ``step`` in ``torch._dynamo.graph_break()``
# calls. Both import ``torch._dynamo`` (sympy, torch.fx, torch.distributed: ~800
# modules, ~70 MB and ~1 s of CPU) on first use, in every process that trains. fedfraud
# never compiles: ``untraced_torch_optim`` marks each wrapped function as its own
# untraced version (what ``_disable_dynamo`` would look up and keep as
# ``__dynamo_disable``) and ``untraced_step`` returns an optimizer's step without its
# wrappers. ``tests/test_data.py`` fails if a torch upgrade imports ``torch._dynamo`` in
# training anyway, or steps differently.
UNTRACED = (torch.optim.Adam, torch.optim.SGD)  # the optimizers ``step`` unwraps


def fraud_log_odds(frauds: float, rows: float) -> float:
    """log(frauds / legitimate rows), each count plus 0.5: finite with no fraud, or
    nothing but fraud."""
    return math.log((frauds + 0.5) / (rows - frauds + 0.5))


@cache
def untraced_torch_optim() -> None:
    """Mark ``Optimizer``'s and Adam's ``_disable_dynamo`` functions as their own
    untraced versions (once: the marks stay)."""
    from torch.optim import adam

    for wrapper in [*vars(torch.optim.Optimizer).values(), adam.adam]:
        _untraced_is_itself(wrapper)


@cache
def untraced_step(kind: type[torch.optim.Optimizer]) -> Callable[[Any], Any]:
    """``kind.step`` without torch's wrappers (graph breaks, the profiler's step
    hooks: fedfraud registers none)."""
    import inspect

    untraced_torch_optim()
    return inspect.unwrap(kind.step)


def _untraced_is_itself(wrapper: object) -> None:
    """Mark the function ``torch._disable_dynamo`` wrapped in ``wrapper`` (or in its
    closure) as its own untraced version."""
    code = getattr(wrapper, "__code__", None)
    if code is None:
        return
    cells = dict(zip(code.co_freevars, getattr(wrapper, "__closure__", None) or ()))
    if code.co_qualname == "_disable_dynamo.<locals>.inner":
        wrapped = cells["fn"].cell_contents
        setattr(wrapped, "__dynamo_disable", wrapped)
        return
    for cell in cells.values():
        if getattr(cell.cell_contents, "__code__", None) is not None and \
                cell.cell_contents is not wrapper:
            _untraced_is_itself(cell.cell_contents)


def step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``: plain Adam's or SGD's through ``untraced_step``, under
    ``no_grad`` as its wrapper runs it; Opacus's DP optimizer's as it ships."""
    if type(optimizer) in UNTRACED and not optimizer.defaults["differentiable"]:
        with torch.no_grad():
            untraced_step(type(optimizer))(optimizer)
    else:
        optimizer.step()


def shuffled(features: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Batches:
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(labels))
        for begin in range(0, len(order), batch_size):
            batch = order[begin : begin + batch_size]
            yield features[batch], labels[batch]

    return batches


def private(model: FraudNet, optimizer: torch.optim.Optimizer, features: torch.Tensor,
            labels: torch.Tensor, batch_size: int, privacy: Privacy,
            seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Batches]:
    """Opacus's DP-SGD: per-sample gradients, clipping, noise, Poisson batches."""
    import warnings

    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(features, labels), batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():  # "secure_mode=False": fine for a simulation seed
        warnings.simplefilter("ignore")
        module, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed))
    return module, optimizer, lambda: loader


@torch.no_grad()
def score(model: FraudNet, x: np.ndarray) -> np.ndarray:
    """Logits for every row of ``x`` (eval mode: no dropout)."""
    model.eval()
    features = torch.from_numpy(x)
    chunks = [model(features[i : i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)]
    return torch.cat(chunks).numpy() if chunks else np.empty(0, np.float32)
