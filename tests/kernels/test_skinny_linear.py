"""``skinny_linear`` native kernel against the fp32 reference over rows, widths and dtypes."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels.skinny_linear import native, skinny_linear
from tests.grids import label, listed

pytestmark = pytest.mark.usefixtures("all_threads")      # the native kernels' OpenMP loops

SHAPES = [(1, 576, 576), (3, 576, 192), (4, 1536, 576), (8, 100, 37), (16, 65, 1000), (5, 7, 3)]


def test_native_kernel_builds_here():
    assert native.available()


@pytest.mark.parametrize(*listed(["rows", "inputs", "outputs"], SHAPES,
                                 {"wdtype": [torch.float32, torch.bfloat16], "bias": [False, True]},
                                 labels={"rows": "m", "inputs": "i", "outputs": "o", "wdtype": lambda d: "w-" + label("", d),
                                         "bias": lambda b: "bias" if b else "nobias"}))
def test_native_matches_reference(rows, inputs, outputs, wdtype, bias):
    g = torch.Generator().manual_seed(rows * 1000 + inputs)
    x = torch.randn(1, rows, inputs, generator=g)
    w = torch.randn(outputs, inputs, generator=g).to(wdtype)
    b = torch.randn(outputs, generator=g) if bias else None
    expected = skinny_linear(x, w, b, backend="naive")
    got = skinny_linear(x, w, b, backend="native")
    assert got.shape == (1, rows, outputs)
    torch.testing.assert_close(got, expected, atol=1e-4 * inputs ** 0.5, rtol=1e-4)


def test_bf16_rows_and_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).bfloat16()
    w = torch.randn(40, 64, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16()
    got = skinny_linear(x, w, b, backend="native")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, skinny_linear(x, w, b, backend="naive"), atol=2e-2, rtol=2e-2)


def test_too_many_rows_is_refused():
    with pytest.raises(ValueError, match="1 to 16 rows"):
        native.skinny_linear(torch.randn(17, 8), torch.randn(4, 8))
