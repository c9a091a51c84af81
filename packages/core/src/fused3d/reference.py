"""The ``reference`` backend: plain PyTorch ops implementing DESIGN section 3.

It is the CPU path and the readable statement of the semantics every kernel meets. It is not
memory-lean (it materialises the conv output while it runs) but, like every backend, it keeps
only x, weight, bias, multiplier and the uint8 window index between forward and backward:
its backward recomputes the conv output from those, which proves the saved-state contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import BackendBase
from .config import POOL, WINDOW_SIZE
from .ops import define_python_ops, finish_channel_grad, skipped_grad

NAMESPACE = "fused3d_reference"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 accumulate in float32, like the fused kernels (DESIGN section 3).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _leaky(t: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(t > 0, t, t * slope)


def _leaky_slope(t: torch.Tensor, slope: float) -> torch.Tensor:
    # d leaky / dt, with PyTorch's choice at t == 0 (the negative side).
    return torch.where(t > 0, torch.ones_like(t), torch.full_like(t, slope))


def _conv(x, weight, bias, stride, padding, output_padding, allow_tf32):
    compute = _compute_dtype(x.dtype)
    args = (x.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    with torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=allow_tf32,
    ):
        return F.conv_transpose3d(*args, stride=stride, padding=padding,
                                  output_padding=output_padding)


def _windows(conv: torch.Tensor) -> torch.Tensor:
    """View the conv output as ``(N, C, Dp, Hp, Wp, 8)`` pool windows, cropping odd edges.

    The last axis is ordered d, then h, then w: index ``dd*4 + dh*2 + dw``.
    """
    n, c, d, h, w = conv.shape
    dp, hp, wp = d // POOL, h // POOL, w // POOL
    cropped = conv[:, :, : dp * POOL, : hp * POOL, : wp * POOL]
    split = cropped.reshape(n, c, dp, POOL, hp, POOL, wp, POOL)
    return split.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(n, c, dp, hp, wp, WINDOW_SIZE)


def _channel_view(multiplier: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return multiplier.to(dtype).reshape(-1, 1, 1, 1)


def reference_forward(x, weight, bias, multiplier, stride, padding, output_padding,
                      negative_slope, allow_tf32):
    conv = _conv(x, weight, bias, stride, padding, output_padding, allow_tf32)
    m = _channel_view(multiplier, conv.dtype)
    activated = _leaky(m * _leaky(conv, negative_slope), negative_slope)
    windows = _windows(activated)
    # PyTorch's max_pool3d scan: update when `best < v or isnan(v)`. The first maximum wins a
    # tie; the last NaN wins and makes the output NaN.
    best = windows[..., 0]
    window_index = torch.zeros(best.shape, dtype=torch.uint8, device=x.device)
    for position in range(1, WINDOW_SIZE):
        value = windows[..., position]
        update = (best < value) | torch.isnan(value)
        best = torch.where(update, value, best)
        window_index = torch.where(update, torch.full_like(window_index, position), window_index)
    return best.to(x.dtype).contiguous(), window_index.contiguous()


def reference_backward(grad_y, y, window_index, x, weight, bias, multiplier, stride, padding,
                       output_padding, negative_slope, allow_tf32, output_mask):
    # y is not read (this backend registers without saves_output): z is recomputed below.
    want_x, want_weight, want_bias, want_multiplier = output_mask
    want_bias = want_bias and bias is not None
    conv = _conv(x, weight, bias, stride, padding, output_padding, allow_tf32)
    compute = conv.dtype
    index = window_index.long().unsqueeze(-1)
    z = torch.gather(_windows(conv), -1, index).squeeze(-1)  # conv value at each winner
    m = _channel_view(multiplier, compute)
    g = grad_y.to(compute)
    inner = _leaky(z, negative_slope)
    outer_slope = _leaky_slope(m * inner, negative_slope)
    # y = leaky(m * leaky(z)):  dy/dz = leaky'(m u) * m * leaky'(z),  dy/dm = leaky'(m u) * u
    grad_z_winner = g * outer_slope * m * _leaky_slope(z, negative_slope)

    per_channel_dims = (0, 2, 3, 4)
    dmultiplier = skipped_grad(multiplier)
    if want_multiplier:
        dmultiplier = finish_channel_grad(
            (g * outer_slope * inner).sum(dim=per_channel_dims), multiplier
        )

    dx, dweight = skipped_grad(x), skipped_grad(weight)
    dbias = skipped_grad(bias if bias is not None else x)
    if want_x or want_weight or want_bias:
        # Scatter the one gradient per window back to its winner; everything else is zero.
        grad_windows = torch.zeros(
            (*grad_z_winner.shape, WINDOW_SIZE), dtype=compute, device=x.device
        ).scatter_(-1, index, grad_z_winner.unsqueeze(-1))
        n, c, dp, hp, wp, _ = grad_windows.shape
        grad_conv = torch.zeros_like(conv)
        grad_conv[:, :, : dp * POOL, : hp * POOL, : wp * POOL] = (
            grad_windows.reshape(n, c, dp, hp, wp, POOL, POOL, POOL)
            .permute(0, 1, 2, 5, 3, 6, 4, 7)
            .reshape(n, c, dp * POOL, hp * POOL, wp * POOL)
        )
        x_c, w_c = x.to(compute), weight.to(compute)
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=allow_tf32,
        ):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_conv, x_c, w_c, [weight.shape[1]] if want_bias else None,
                stride, padding, [1, 1, 1], True, output_padding, 1,
                [want_x, want_weight, want_bias],
            )
        if want_x:
            dx = gx.to(x.dtype).contiguous()
        if want_weight:
            dweight = gw.to(weight.dtype).contiguous()
        if want_bias:
            dbias = gb.to(bias.dtype).contiguous()
    return dx, dweight, dbias, dmultiplier


class ReferenceBackend(BackendBase):
    name = "reference"
    namespace = NAMESPACE
    auto_priority = 0
    description = "plain PyTorch ops (the oracle's twin and the CPU path); not fused"
    device_types = ("cpu", "cuda")

    def _define_ops(self) -> None:
        define_python_ops(NAMESPACE, reference_forward, reference_backward)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}


backend = ReferenceBackend()
