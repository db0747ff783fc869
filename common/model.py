"""FraudNet: the tutorial's small MLP, rebuilt from a few saved numbers."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from flwr.app import Array

# The exported model's files in a run folder (written by server/export.py).
TORCHSCRIPT_FILE, STATE_DICT_FILE = "model.ts", "model.pt"
CARD_JSON_FILE, CARD_MD_FILE = "model_card.json", "model_card.md"


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    hidden: tuple[int, ...] = (64, 32)  # the tutorial's 30 -> 64 -> 32 -> 1
    dropout: float = 0.1
    activation: str = "relu"  # or "tanh" (common.config.ACTIVATIONS); older files: relu

    def as_dict(self) -> dict:
        return asdict(self)


ACTIVATION: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class FraudNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.in_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), ACTIVATION[spec.activation](),
                       nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (batch, features) -> (batch,) logits


class FraudProbability(nn.Module):
    """FraudNet with a sigmoid: (batch, features) -> (batch,) probabilities."""

    def __init__(self, net: FraudNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # what weights may travel as
# No trained FraudNet weight comes near this; weights of ~1e13 overflow its float32
# activations (NaN scores), and FedAdam's squared updates overflow from ~1e19.
MAX_WEIGHT = 1e6
MOST_WEIGHTS = 10**8  # far above any FraudNet (~4,000 weights for 30 features)


def weights_of(array: Array, most: int = MOST_WEIGHTS) -> np.ndarray:
    """A travelling Array of weights as numpy; ValueError unless it is numpy-serialized
    float32 or float64 with at most ``most`` values, all of them there."""
    from flwr.common.constant import SType

    if array.stype != SType.NUMPY:
        raise ValueError("an array that is not numpy-serialized")
    return npy_array(array.data, most, FLOATS, "weights that are not float32 or float64 "
                                               "numbers")


def npy_array(data: bytes, most: int, dtypes: Collection[np.dtype],
              not_those: str) -> np.ndarray:
    """npy bytes a sender chose as numpy: ValueError (``not_those`` if the dtype is not
    one of ``dtypes``) unless they hold at most ``most`` values, all of them there. The
    header is read first: ``np.load`` allocates whatever shape a header claims. The
    error texts quote nothing the sender chose."""
    from numpy.lib import format as npy

    stream = BytesIO(data)
    try:
        version = npy.read_magic(stream)
        read_header = (npy.read_array_header_1_0 if version == (1, 0)
                       else npy.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
    except (ValueError, EOFError):
        raise ValueError("an array whose npy header does not parse") from None
    if dtype not in dtypes:
        raise ValueError(not_those)
    # numpy takes True for 1 and (2**64, 0) for 0 values, then fails to load them.
    if not all(type(length) is int and 0 <= length <= most for length in shape):
        raise ValueError("an array whose npy header has a shape no model has")
    size = math.prod(shape)
    if size > most or len(data) - stream.tell() != size * dtype.itemsize:
        raise ValueError(f"an array of another size than the model's ({most} weights at "
                         "most) or with missing bytes")
    try:
        return np.load(BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - whatever numpy makes of bytes a sender chose
        raise ValueError("an array numpy cannot load") from None


def implausible(weights: np.ndarray | torch.Tensor) -> bool:
    """Whether weights are NaN, infinite or beyond ±MAX_WEIGHT once in the model's
    float32 (1e300 in float64 is finite, and inf in the average)."""
    values = torch.as_tensor(np.asarray(weights)).to(torch.float32)
    return not bool(torch.isfinite(values).all()) or bool(values.abs().max() > MAX_WEIGHT)


def packed(state: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
    """A model's weights as the one vector they travel as (``keys.WEIGHTS``)."""
    return np.concatenate([np.asarray(weights).ravel() for weights in state.values()])


def shifted_output(weights: np.ndarray, shift: float) -> np.ndarray:
    """``packed`` FraudNet weights whose logits are all ``shift`` higher: the vector
    ends with the output layer's one bias (FraudNet's last module is its Linear(., 1);
    a test checks it)."""
    shifted = np.array(weights, copy=True)
    shifted[-1] += shift
    return shifted


def unpacked(weights: np.ndarray, model: nn.Module) -> dict[str, torch.Tensor]:
    """``packed``'s vector as ``model``'s state_dict, in the model's own dtypes (an
    average may come back as float64); ValueError unless it holds exactly that model's
    number of weights."""
    state = model.state_dict()
    sizes = [tensor.numel() for tensor in state.values()]
    if weights.ndim != 1 or weights.size != sum(sizes):
        raise ValueError(f"{weights.size} weights in shape {weights.shape}, for a model "
                         f"of {sum(sizes)}")
    parts = np.split(weights, np.cumsum(sizes)[:-1])
    return {name: torch.tensor(part, dtype=tensor.dtype).reshape(tensor.shape)
            for (name, tensor), part in zip(state.items(), parts)}


def load_model(path: Path, features: list[str]) -> FraudNet:
    """A model ``save_model`` wrote (its ``model.pt``), rebuilt as FraudNet in eval
    mode, if it was trained on ``features``: tensors and plain values only
    (``weights_only``; a crafted file runs no code, whereas a TorchScript file is a
    program). Anything else is one BankDataError naming the file."""
    from common.schema import BankDataError

    try:
        saved = torch.load(path, weights_only=True)
        spec, state = dict(saved["spec"]), dict(saved["state_dict"])
        if list(saved["features"]) != list(features):
            raise ValueError(f"trained on other features than {features}")
        hidden = tuple(int(width) for width in spec["hidden"])
        if len(state) != 2 * (len(hidden) + 1):  # a weight and a bias per layer
            raise ValueError(f"{len(hidden)} hidden layers named, {len(state)} tensors held")
        # Built without memory (meta device) and given the file's own tensors: a spec
        # naming layers far wider than the file's weights allocates nothing.
        with torch.device("meta"):
            net = FraudNet(ModelSpec(in_features=len(features), hidden=hidden,
                                     dropout=float(spec["dropout"]),
                                     activation=str(spec.get("activation", "relu"))))
        net.load_state_dict(state, strict=True, assign=True)
        tensors = net.state_dict().values()
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("weights that are not float32 on the CPU")
    except Exception as err:  # noqa: BLE001 - any unusable file gets the same answer
        first_line = (str(err).splitlines() or [""])[0]
        raise BankDataError(f"{path}: not a usable fedfraud model "
                            f"({type(err).__name__}: {first_line})") from None
    if not all(torch.isfinite(tensor).all() for tensor in tensors):
        raise BankDataError(f"{path}: the model holds non-finite weights")
    return net.eval()


def save_model(folder: Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec,
               features: list[str], threshold: float) -> None:
    """``model.pt`` (state dict + spec) and ``model.ts`` (TorchScript: standardized
    features in, probability out) in ``folder``: the run's global model (the server's
    export) and a bank's personalized one are saved the same way."""
    net = FraudNet(spec)
    net.load_state_dict(state_dict)
    net.eval()
    torch.save({"state_dict": state_dict, "spec": spec.as_dict(), "features": features,
                "threshold": threshold}, folder / STATE_DICT_FILE)
    # No check_trace: its output comparison (torch.testing) imports torch.distributed
    # and sympy (~0.7 s of CPU in each bank's final task); tests/test_export_score.py
    # compares the outputs.
    scripted = torch.jit.trace(FraudProbability(net), torch.zeros(2, spec.in_features),
                               check_trace=False)
    scripted.save(str(folder / TORCHSCRIPT_FILE))
