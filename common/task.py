"""The only training loop and the only scoring loop in fedfraud."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.model import FraudNet

SCORE_BATCH = 8192  # scoring has no gradients; large batches are just faster


def train(
    model: FraudNet, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
    learning_rate: float, pos_weight: float, seed: int,
) -> float:
    """Train in place with a fresh Adam; return the mean loss of the last epoch.

    Shuffling and dropout follow ``seed`` alone, so a bank's update is the same in
    any process (simulation actor, ClientApp process or warm worker).
    """
    features, labels = torch.from_numpy(x), torch.from_numpy(y).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    model.train()
    epoch_loss = float("nan")
    with torch.random.fork_rng():  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(labels))
            total = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad()
                loss = criterion(model(features[batch]), labels[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            epoch_loss = total / len(order)
    return epoch_loss


@torch.no_grad()
def score(model: FraudNet, x: np.ndarray) -> np.ndarray:
    """Logits for every row of ``x`` (eval mode: no dropout)."""
    model.eval()
    features = torch.from_numpy(x)
    chunks = [model(features[i : i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)]
    return torch.cat(chunks).numpy() if chunks else np.empty(0, np.float32)
