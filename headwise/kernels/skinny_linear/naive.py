"""Reference skinny linear: ``y = x @ W^T + b`` in fp32, the contract of every backend."""

from __future__ import annotations

import torch


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer on a few rows.

    Args:
        x: ``[M, I]`` input rows (float); weight: ``[O, I]`` (fp32 or bf16); bias: ``[O]`` or None.

    Returns:
        ``[M, O]`` in ``x.dtype``.
    """
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
