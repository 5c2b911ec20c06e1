"""The paper's projector: [pixel shuffle k] -> Linear(k^2 d_vision, d_text) -> GELU -> Linear(d_text, d_text).

Pixel shuffle (SmolVLM / Idefics3) merges each k x k block of neighbouring patches into one token of k^2 times the
width, dividing the image tokens by k^2; k = 1 (the default) is the paper's 2-layer MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN


def pixel_shuffle(features: torch.Tensor, k: int) -> torch.Tensor:
    """[N, s*s, D] patch features (row-major grid) -> [N, (s/k)^2, k*k*D]; token (i, j) of the coarse grid holds
    the patches of block rows i*k.. and columns j*k.., in the order (row offset, column offset)."""
    if k == 1:
        return features
    n, p, d = features.shape
    s = math.isqrt(p)
    if s * s != p:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {p} patch tokens")
    if s % k:
        raise ValueError(
            f"model.pixel_shuffle={k} does not divide the {s} x {s} patch grid; choose a divisor of {s}"
        )
    x = features.reshape(n, s // k, k, s // k, k, d).permute(0, 1, 3, 2, 4, 5)  # [N, s/k, s/k, k, k, D]
    return x.reshape(n, (s // k) ** 2, k * k * d)


class Projector(nn.Module):
    """Maps vision features [N, P, d_vision] to the LM's embedding space [N, P / k^2, d_text]."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu", pixel_shuffle: int = 1) -> None:
        super().__init__()
        if pixel_shuffle < 1:
            raise ValueError(f"model.pixel_shuffle must be >= 1, got {pixel_shuffle}")
        self.vision_dim, self.text_dim, self.act_name = vision_dim, text_dim, act
        self.pixel_shuffle = pixel_shuffle
        # Names match transformers' LlavaMultiModalProjector so weights map one to one on export.
        self.linear_1 = nn.Linear(vision_dim * pixel_shuffle * pixel_shuffle, text_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        merged = pixel_shuffle(features, self.pixel_shuffle)
        return self.linear_2(self.act(self.linear_1(merged)))
