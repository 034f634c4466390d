"""Reference skinny linear: ``y = x @ W^T + b`` in fp32, the contract of every backend.

bf16 weights take ``x`` rounded to bf16, as a bf16 model's linear takes its input: every product is then of
two bf16 values (exact in fp32), accumulated in fp32, so backends that multiply bf16 pairs in hardware
(AVX512-BF16's ``vdpbf16ps``) and those that widen to fp32 compute the same sums, up to their order.
"""

from __future__ import annotations

import torch


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer on a few rows.

    Args:
        x: ``[M, I]`` input rows (float); weight: ``[O, I]`` (fp32 or bf16); bias: ``[O]`` or None.

    Returns:
        ``[M, O]`` in ``x.dtype``; with a bf16 ``weight``, ``x`` is rounded to bf16 first.
    """
    x32 = x.bfloat16().float() if weight.dtype == torch.bfloat16 else x.float()
    y = x32 @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
