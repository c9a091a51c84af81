"""KernelBench entry points for the benchmark problem (DESIGN section 1).

KernelBench's harness builds ``Model(*get_init_inputs())`` and ``ModelNew(*get_init_inputs())``
and feeds both ``get_inputs()``; ``ModelNew`` is the fused block on the ``auto`` backend.
"""

from __future__ import annotations

import torch

from .model import FusedModel
from .model import Model as Model

batch_size = 16
in_channels = 16
out_channels = 32
depth, height, width = 16, 32, 32
kernel_size = 3
stride = 2
padding = 1
output_padding = 1
multiplier_shape = (out_channels, 1, 1, 1)


class ModelNew(FusedModel):
    """The fused block under KernelBench's name for a solution."""


def get_inputs() -> list[torch.Tensor]:
    return [torch.rand(batch_size, in_channels, depth, height, width)]


def get_init_inputs() -> list:
    return [in_channels, out_channels, kernel_size, stride, padding, output_padding,
            multiplier_shape]
