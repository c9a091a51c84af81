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

from fused3d.testing import (
    activated,
    oracle_forward,
    oracle_gradients,
    pool_with_window_index,
    relative_error,
)

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

    def op_args(self) -> tuple:
        return self.stride, self.padding, self.output_padding, self.negative_slope

    def tensors(self) -> tuple:
        return self.x, self.weight, self.bias, self.multiplier


def eager_window_index(block: BlockTensors) -> torch.Tensor:
    """The winners eager PyTorch picks in the block's own dtype (what its backward uses)."""
    with torch.no_grad():
        return pool_with_window_index(activated(*block.tensors(), *block.op_args()))[1]


class Float64Oracle:
    """Float64 output and routed gradients for one set of (dtype-rounded) inputs."""

    def __init__(self, block: BlockTensors) -> None:
        self.block = block
        with torch.no_grad():
            self.output = oracle_forward(*block.tensors(), *block.op_args())[0]

    def forward_error(self, output: torch.Tensor) -> float:
        return relative_error(output, self.output)

    def gradient_errors(self, grads: list, grad_y: torch.Tensor,
                        window_index: torch.Tensor) -> dict[str, float]:
        """Normwise error of each gradient the implementation produced."""
        expected = oracle_gradients(*self.block.tensors(), *self.block.op_args(), grad_y,
                                    window_index)
        errors = {}
        for name, actual, wanted in zip(GRADIENT_NAMES, grads, expected, strict=True):
            if wanted is None:
                continue
            if actual is None:
                errors[name] = float("inf")
                continue
            errors[name] = relative_error(actual.reshape(wanted.shape), wanted)
        return errors
