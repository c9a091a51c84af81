"""The differentiable functional form of the block."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DEFAULT_NEGATIVE_SLOPE, BlockConfig
from .ops import call_forward
from .registry import resolve_namespace
from .validation import validate_inputs


def fused_block_with_index(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`fused_block`, also returning the uint8 window index (0..7) per output.

    The index of a window position is ``dd * 4 + dh * 2 + dw`` (d, then h, then w).
    """
    config = BlockConfig.from_args(
        tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) and weight.dim() == 5 else 1,
        stride,
        padding,
        output_padding,
        negative_slope,
    )
    validate_inputs(x, weight, bias, multiplier, config)
    namespace = resolve_namespace(backend, x.device.type, x.dtype)
    # The kernels read dense row-major tensors; .contiguous() is free when they already are
    # and differentiable when they are not (channels_last_3d, slices).
    return call_forward(
        namespace,
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        multiplier.contiguous(),
        *config.as_op_args(),
        torch.backends.cudnn.allow_tf32,
    )


def fused_block(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """ConvTranspose3d -> LeakyReLU -> * multiplier -> LeakyReLU -> MaxPool3d(2), fused.

    Args:
        x: input ``(N, C_in, D, H, W)``.
        weight: ConvTranspose3d weight ``(C_in, C_out, kD, kH, kW)``.
        bias: ``(C_out,)`` or None.
        multiplier: learnable scale of any shape that broadcasts to ``(C_out, 1, 1, 1)``.
        stride, padding, output_padding: ints or 3-tuples, as for ``nn.ConvTranspose3d``.
        negative_slope: slope of both LeakyReLUs.
        backend: backend name; None uses :func:`fused3d.use_backend` / ``FUSED3D_BACKEND`` /
            ``auto``.

    Returns:
        The pooled output ``(N, C_out, Dp, Hp, Wp)`` in x's dtype. Differentiable in x, weight,
        bias and multiplier. fp32 conv math uses TF32 when
        ``torch.backends.cudnn.allow_tf32`` is True.
    """
    y, _ = fused_block_with_index(
        x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
        backend=backend,
    )
    return y
