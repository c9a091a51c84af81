"""Float64 correctness checks run before anything is timed.

The oracle is eager PyTorch in float64 on the same device, fed the very inputs and parameters
the implementation gets (already rounded to its dtype), so only the arithmetic differs.

Forward: normwise error of the output against the float64 output (``relative_error``), within
the forward tolerance of ``fused3d.testing.tolerance_for``.

Gradients: where two values of a pool window are closer than the implementation's rounding,
either may legitimately win, and the whole gradient of that window moves with it (with bf16,
that alone puts dx ~8% off a float64 reference that routes by its own winners). So, as in the
shared test suite, the float64 gradients are routed through the implementation's own window
index: a fused backend returns it (``fused_block_with_index``); eager PyTorch's is the index of
its own ``max_pool3d`` in its dtype. torch.compile keeps its winners inside generated code, so it
is checked against eager's winners and, as rounding near ties may differ, not gated on that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fused3d.config import POOL, WINDOW_SIZE
from fused3d.testing import relative_error

GRADIENT_NAMES = ("dx", "dweight", "dbias", "dmultiplier")


@dataclass
class BlockTensors:
    """The block's inputs and parameters (bias may be None), all one dtype and device."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    multiplier: torch.Tensor
    stride: tuple
    padding: tuple
    output_padding: tuple
    negative_slope: float

    @classmethod
    def of_model(cls, model: torch.nn.Module, x: torch.Tensor) -> BlockTensors:
        conv = model.conv_transpose
        return cls(x.detach(), conv.weight.detach(), None if conv.bias is None
                   else conv.bias.detach(), model.multiplier.detach(), tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.output_padding),
                   float(model.leaky_relu.negative_slope))

    def to(self, dtype: torch.dtype) -> BlockTensors:
        def cast(t):
            return None if t is None else t.detach().to(dtype)
        return BlockTensors(cast(self.x), cast(self.weight), cast(self.bias),
                            cast(self.multiplier), self.stride, self.padding,
                            self.output_padding, self.negative_slope)

    def activated(self, x, weight, bias, multiplier) -> torch.Tensor:
        """leaky(m * leaky(conv_transpose3d(x))), the values the pool scans."""
        conv = F.conv_transpose3d(x, weight, bias, stride=self.stride, padding=self.padding,
                                  output_padding=self.output_padding)
        slope = self.negative_slope
        return F.leaky_relu(F.leaky_relu(conv, slope) * multiplier.reshape(-1, 1, 1, 1), slope)


def window_index_of_pool(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled values, uint8 window index dd*4 + dh*2 + dw) from PyTorch's own max_pool3d."""
    pooled, flat = F.max_pool3d(values, kernel_size=POOL, return_indices=True)
    height, width = values.shape[-2:]
    d, h, w = flat // (height * width), (flat // width) % height, flat % width
    return pooled, ((d % 2) * 4 + (h % 2) * 2 + (w % 2)).to(torch.uint8)


def window_values(values: torch.Tensor) -> torch.Tensor:
    """All 8 values of each pool window, shape (N, C, Dp, Hp, Wp, 8), in index order."""
    n, c, d, h, w = values.shape
    dp, hp, wp = d // POOL, h // POOL, w // POOL
    cropped = values[:, :, : dp * POOL, : hp * POOL, : wp * POOL]
    return (cropped.reshape(n, c, dp, POOL, hp, POOL, wp, POOL)
            .permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(n, c, dp, hp, wp, WINDOW_SIZE))


def eager_window_index(block: BlockTensors) -> torch.Tensor:
    """The winners eager PyTorch picks in the block's own dtype (what its backward uses)."""
    with torch.no_grad():
        values = block.activated(block.x, block.weight, block.bias, block.multiplier)
        return window_index_of_pool(values)[1]


class Float64Oracle:
    """Float64 output and routed gradients for one set of (dtype-rounded) inputs."""

    def __init__(self, block: BlockTensors) -> None:
        self.block = block.to(torch.float64)
        with torch.no_grad():
            b = self.block
            values = b.activated(b.x, b.weight, b.bias, b.multiplier)
            self.output = window_index_of_pool(values)[0]

    def forward_error(self, output: torch.Tensor) -> float:
        return relative_error(output, self.output)

    def gradients(self, grad_y: torch.Tensor, window_index: torch.Tensor) -> list:
        """float64 (dx, dweight, dbias, dmultiplier) with each window's gradient sent to
        ``window_index``; dbias is None without bias."""
        b = self.block
        leaves = [None if t is None else t.clone().requires_grad_()
                  for t in (b.x, b.weight, b.bias, b.multiplier)]
        with torch.enable_grad():
            values = b.activated(*leaves)
            picked = torch.gather(window_values(values), -1,
                                  window_index.to(torch.long).unsqueeze(-1)).squeeze(-1)
            wanted = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(picked, wanted, grad_y.to(torch.float64)))
        return [None if t is None else next(grads) for t in leaves]

    def gradient_errors(self, grads: list, grad_y: torch.Tensor,
                        window_index: torch.Tensor) -> dict[str, float]:
        """Normwise error of each gradient the implementation produced."""
        expected = self.gradients(grad_y, window_index)
        errors = {}
        for name, actual, wanted in zip(GRADIENT_NAMES, grads, expected, strict=True):
            if wanted is None:
                continue
            if actual is None:
                errors[name] = float("inf")
                continue
            errors[name] = relative_error(actual.reshape(wanted.shape), wanted)
        return errors
