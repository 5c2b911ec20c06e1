"""The paper's projector: Linear(d_vision, d_text) -> GELU -> Linear(d_text, d_text)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class Projector(nn.Module):
    """Maps vision features [N, P, d_vision] to the LM's embedding space [N, P, d_text]."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.vision_dim, self.text_dim, self.act_name = vision_dim, text_dim, act
        # Names match transformers' LlavaMultiModalProjector so weights map one to one on export.
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
