"""Argument checks for every call, whatever the backend: written once, here.

Each error names the argument and what was expected (DESIGN section 3).
"""

from __future__ import annotations

import torch

from .config import BlockConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Does ``shape`` broadcast to exactly ``target`` (right-aligned, sizes 1 or equal)?"""
    if len(shape) > len(target):
        return False
    aligned = target[len(target) - len(shape):]
    return all(size in (1, want) for size, want in zip(shape, aligned, strict=True))


def validate_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor,
    config: BlockConfig,
) -> None:
    """Raise TypeError/ValueError if the tensors do not fit the block's contract."""
    for name, tensor in (("x", x), ("weight", weight), ("multiplier", multiplier)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")

    if x.dim() != 5:
        raise ValueError(
            f"x must be a 5-D tensor (N, C_in, D, H, W), got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if weight.dim() != 5:
        raise ValueError(
            "weight must be a 5-D ConvTranspose3d weight (C_in, C_out, kD, kH, kW), "
            f"got {weight.dim()}-D shape {tuple(weight.shape)}"
        )
    in_channels, out_channels = weight.shape[0], weight.shape[1]
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects C_in={in_channels} "
            f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})"
        )
    if out_channels < 1 or in_channels < 1:
        raise ValueError(f"weight must have C_in >= 1 and C_out >= 1, got {tuple(weight.shape)}")
    if tuple(weight.shape[2:]) != config.kernel_size:
        raise ValueError(
            f"weight kernel shape {tuple(weight.shape[2:])} does not match "
            f"kernel_size {config.kernel_size}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(
            f"bias must have shape ({out_channels},) to match weight's C_out, "
            f"got {tuple(bias.shape)}"
        )
    expected = (out_channels, 1, 1, 1)
    if not _broadcasts_to(tuple(multiplier.shape), expected):
        raise ValueError(
            f"multiplier must broadcast to (C_out, 1, 1, 1) = {expected}, "
            f"got shape {tuple(multiplier.shape)}"
        )

    named = [("x", x), ("weight", weight), ("multiplier", multiplier)]
    if bias is not None:
        named.append(("bias", bias))
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; supported dtypes are "
            + ", ".join(str(d) for d in SUPPORTED_DTYPES)
        )
    for name, tensor in named[1:]:
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but x has {x.dtype}: mixed dtypes are not "
                "supported (cast the module or the input so all match)"
            )
        if tensor.device != x.device:
            raise ValueError(
                f"{name} is on {tensor.device} but x is on {x.device}: all tensors must be "
                "on one device"
            )

    for axis, size in enumerate(x.shape[2:]):
        if size < 1:
            raise ValueError(f"x must have spatial sizes >= 1, got shape {tuple(x.shape)}")
        conv = config.conv_shape(tuple(x.shape[2:]))[axis]
        if conv < 1:
            raise ValueError(
                f"the ConvTranspose3d output would be empty on axis {axis} ({conv}): "
                f"padding {config.padding} is too large for input size {tuple(x.shape[2:])} "
                f"and kernel {config.kernel_size}"
            )
        if conv < 2:
            # torch.nn.MaxPool3d(2) refuses an empty output; the fused block does the same.
            raise ValueError(
                f"the ConvTranspose3d output has size {conv} on axis {axis}, but "
                f"MaxPool3d(2) needs at least 2 (x spatial size {tuple(x.shape[2:])})"
            )
