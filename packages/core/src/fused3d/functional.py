"""The differentiable functional form of the block."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DEFAULT_NEGATIVE_SLOPE, BlockConfig
from .ops import call_forward
from .registry import resolve_namespace
from .validation import validate_inputs

#: Calls already validated: what the checks read (tensor types, shapes, dtypes, devices and
#: the configuration) -> the BlockConfig. A repeated call (every training step) then costs a
#: dict lookup instead of ~20 us of Python checks on the host.
_validated: dict[tuple, BlockConfig] = {}


def _plain(value) -> bool:
    """An int or a tuple of ints (exactly: True == 1 must not hit a cached int's entry)."""
    return type(value) is int or (type(value) is tuple and all(type(v) is int for v in value))


def _tensor_key(tensor) -> tuple:
    return (type(tensor), tensor.shape, tensor.dtype, tensor.device)


def _validated_config(x, weight, bias, multiplier, stride, padding, output_padding,
                      negative_slope) -> BlockConfig:
    """The call's BlockConfig, after :func:`validate_inputs` (skipped for a call that has
    passed before with the same tensor metadata and arguments)."""
    key = None
    if (type(x) is torch.Tensor and type(weight) is torch.Tensor
            and type(multiplier) is torch.Tensor and (bias is None or type(bias) is torch.Tensor)
            and _plain(stride) and _plain(padding) and _plain(output_padding)
            and type(negative_slope) is float and not torch.compiler.is_compiling()):
        key = (_tensor_key(x), _tensor_key(weight), None if bias is None else _tensor_key(bias),
               _tensor_key(multiplier), stride, padding, output_padding, negative_slope)
        config = _validated.get(key)
        if config is not None:
            return config
    config = BlockConfig.from_args(
        tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) and weight.dim() == 5 else 1,
        stride,
        padding,
        output_padding,
        negative_slope,
    )
    validate_inputs(x, weight, bias, multiplier, config)
    if key is not None:
        if len(_validated) >= 256:
            _validated.clear()
        _validated[key] = config
    return config


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
    config = _validated_config(x, weight, bias, multiplier, stride, padding, output_padding,
                               negative_slope)
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
