"""FraudNet: the tutorial's small MLP, rebuilt from a few saved numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# The exported model's files in a run folder (written by server/export.py).
TORCHSCRIPT_FILE, STATE_DICT_FILE = "model.ts", "model.pt"
CARD_JSON_FILE, CARD_MD_FILE = "model_card.json", "model_card.md"


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    hidden: tuple[int, ...] = (64, 32)  # the tutorial's 30 -> 64 -> 32 -> 1
    dropout: float = 0.1

    def as_dict(self) -> dict:
        return asdict(self)


class FraudNet(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.in_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (batch, features) -> (batch,) logits
