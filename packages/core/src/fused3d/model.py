"""The block as modules: the plain PyTorch ``Model`` and the fused ``FusedModel``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import DEFAULT_NEGATIVE_SLOPE
from .functional import fused_block


class Model(nn.Module):
    """The block exactly as given (DESIGN section 1), in plain PyTorch.

    ConvTranspose3d -> LeakyReLU(0.2) -> * multiplier -> LeakyReLU(0.2) -> MaxPool3d(2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int],
        output_padding: int | Sequence[int],
        multiplier_shape: Sequence[int],
    ) -> None:
        super().__init__()
        self.conv_transpose = nn.ConvTranspose3d(
            in_channels, out_channels, kernel_size,
            stride=stride, padding=padding, output_padding=output_padding,
        )
        self.multiplier = nn.Parameter(torch.randn(multiplier_shape))
        self.leaky_relu = nn.LeakyReLU(negative_slope=DEFAULT_NEGATIVE_SLOPE)
        self.max_pool = nn.MaxPool3d(kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_transpose(x)
        x = self.leaky_relu(x)
        x = x * self.multiplier
        x = self.leaky_relu(x)
        return self.max_pool(x)


class FusedModel(Model):
    """:class:`Model` with its forward and backward run by a fused3d backend.

    Same constructor, parameters and state_dict keys (``conv_transpose.weight``,
    ``conv_transpose.bias``, ``multiplier``), so the two load each other's weights.

    Args:
        backend: backend name, or None to use :func:`fused3d.use_backend`, the
            ``FUSED3D_BACKEND`` environment variable, or ``auto``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int],
        output_padding: int | Sequence[int],
        multiplier_shape: Sequence[int],
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding,
            multiplier_shape,
        )
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv_transpose
        return fused_block(
            x, conv.weight, conv.bias, self.multiplier,
            conv.stride, conv.padding, conv.output_padding,
            self.leaky_relu.negative_slope,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
