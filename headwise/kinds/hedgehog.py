"""Hedgehog feature map: ``phi(x) = [softmax(x W), softmax(-x W)]`` (Zhang et al., 2024).

Positive features whose dot products can imitate the spiky, monotone softmax kernel; ``W`` is
fitted per head (``headwise fit lightning``, ``headwise fit hybrid``).
"""

from __future__ import annotations

import torch


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Feature map of ``x``.

    Args:
        x: ``[B, H, T, D]`` queries or keys (post-RoPE), any float dtype.
        weight: ``[H, D, F/2]`` one projection per head.

    Returns:
        ``[B, H, T, F]`` fp32 features, each half summing to 1 per token.
    """
    proj = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)
