"""The two op bodies (forward, backward): pick a kernel, launch it on torch's stream.

Every tensor crosses into CuPy zero-copy through DLPack; every output and temporary comes from
torch's allocator (so CUDA-graph capture and torch's memory accounting see them); launches go
to torch's current stream of the inputs' device, with no host synchronisation.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch

from fused3d.config import BlockConfig
from fused3d.ops import config_from_op_args, empty_outputs, finish_channel_grad, skipped_grad

from ._modules import get_kernel

#: (kernel scalar type, accumulation type) per torch dtype; halves travel as raw 16-bit words.
KERNEL_TYPES = {
    torch.float32: ("float", "float"),
    torch.float64: ("double", "double"),
    torch.float16: ("half_t", "float"),
    torch.bfloat16: ("bf16_t", "float"),
}
#: Output channels per thread of the exact parity kernel (4 * this per block).
_EXACT_CHANNELS = {torch.float64: 4}
#: Depth rows of the exact parity kernel's tile (1: two blocks per SM overlap staging and
#: arithmetic; 2: one block of 8 warps with less halo).
EXACT_ROWS = int(os.environ.get("FUSED3D_CUPY_EXACT_ROWS", "1"))
#: Opt-in, not yet measured on a GPU: stage tiles with cp.async (all copies in flight) instead of
#: load-then-store loops; the TF32 kernels then truncate x to TF32 instead of rounding it.
ASYNC_STAGING = os.environ.get("FUSED3D_CUPY_ASYNC_STAGING", "0") == "1"
_THREADS = 256
#: The TF32 fast path keeps every input channel's weights in registers: C_in <= 16.
TF32_MAX_IN_CHANNELS = 16
#: Its dx kernel stages grad_z of all output channels in shared memory: C_out <= 64.
TF32_MAX_OUT_CHANNELS_BACKWARD = 64


@cache
def _cupy():
    import cupy

    return cupy


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _i32(*values: int):
    import numpy

    return tuple(numpy.int32(v) for v in values)


def _f64(value: float):
    import numpy

    return numpy.float64(value)


#: How tensors reach the kernels. "dlpack" (default): ``cupy.from_dlpack`` zero-copy views.
#: "pointer": the raw device address (``data_ptr()``, passed as a 64-bit value, same bits as a
#: pointer parameter); also zero-copy, with less host work per call.
ARGUMENT_MODE = os.environ.get("FUSED3D_CUPY_ARGUMENTS", "dlpack")


def _as_cupy(tensor: torch.Tensor):
    """Zero-copy CuPy view of a (detached) torch tensor; halves as int16 words."""
    if ARGUMENT_MODE == "pointer":
        return tensor.data_ptr()
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return _cupy().from_dlpack(tensor)


_streams: dict[tuple[int, int], object] = {}
_devices: dict[int, object] = {}


def _cupy_stream(torch_stream: torch.cuda.Stream, index: int):
    """CuPy's handle for torch's stream (cached: a stream object only wraps the pointer)."""
    key = (index, torch_stream.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        cupy = _cupy()
        try:
            stream = cupy.cuda.Stream.from_external(torch_stream)
        except Exception:  # a CuPy or torch without the __cuda_stream__ protocol
            stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, index)
        _streams[key] = stream
    return stream


class _OnTorchStream:
    """CuPy's current device and stream set to the tensor's device and torch's stream there."""

    def __init__(self, device: torch.device) -> None:
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._device = _devices.get(self.index)
        if self._device is None:
            self._device = _devices[self.index] = _cupy().cuda.Device(self.index)
        self._stream = _cupy_stream(torch.cuda.current_stream(self.index), self.index)

    def __enter__(self) -> _OnTorchStream:
        self._device.__enter__()
        self._stream.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)


def _blocks(total: int, device_index: int, per_sm: int = 8) -> int:
    return max(1, min(math.ceil(total / _THREADS), _sm_count(device_index) * per_sm))


def _general_shape(x: torch.Tensor, weight: torch.Tensor, config: BlockConfig, pooled) -> tuple:
    n, c_in, d, h, w = x.shape
    return _i32(n, c_in, weight.shape[1], d, h, w, *pooled, *config.kernel_size, *config.stride,
                *config.padding)


def _multiplier_stride(multiplier: torch.Tensor) -> int:
    return 0 if multiplier.numel() == 1 else 1


def uses_tf32_path(x: torch.Tensor, config: BlockConfig, allow_tf32: bool) -> bool:
    return (
        config.is_parity_fast_path
        and x.dtype == torch.float32
        and allow_tf32
        and x.shape[1] <= TF32_MAX_IN_CHANNELS
    )


# --------------------------------------------------------------------------- forward


def forward_impl(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
                 allow_tf32):
    y, window_index = empty_outputs(x, weight, stride, padding, output_padding)
    if y.numel() == 0:
        return y, window_index
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    scalar, acc = KERNEL_TYPES[x.dtype]
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    has_bias = bias is not None
    with _OnTorchStream(x.device) as launch:
        xc, wc, mc = _as_cupy(x), _as_cupy(weight), _as_cupy(multiplier)
        bc = _as_cupy(bias) if has_bias else wc  # never read when has_bias == 0
        yc, ic = _as_cupy(y), _as_cupy(window_index)
        tail = (*_i32(_multiplier_stride(multiplier), int(has_bias)), _f64(negative_slope))
        if uses_tf32_path(x, config, allow_tf32):
            ksteps = 1 if c_in <= 8 else 2
            kernel = get_kernel("parity_forward.cu", f"parity_tf32<{ksteps}, false>",
                                launch.index)
            tiles = (math.ceil(d / 2), math.ceil(h / 4), math.ceil(w / 32))
            grid_x = min(n * math.prod(tiles), 2 * _sm_count(launch.index))
            kernel((grid_x, math.ceil(c_out / 32)), (128,),
                   (xc, wc, bc, mc, yc, ic, yc, yc, yc, yc, *_i32(n, c_in, c_out, d, h, w),
                    *tail, *_i32(*tiles, ASYNC_STAGING)))
        elif config.is_parity_fast_path:
            channels = _EXACT_CHANNELS.get(x.dtype, 8)
            rows = EXACT_ROWS
            kernel = get_kernel(
                "parity_forward.cu",
                f"parity_forward_exact<{scalar}, {acc}, {channels}, {rows}>",
                launch.index,
            )
            tiles = (math.ceil(d / rows), math.ceil(h / 2), math.ceil(w / 32))
            kernel((n * math.prod(tiles), math.ceil(c_out / (4 * channels))), (128 * rows,),
                   (xc, wc, bc, mc, yc, ic, *_i32(n, c_in, c_out, d, h, w), *tail,
                    *_i32(*tiles, ASYNC_STAGING)))
        else:
            kernel = get_kernel("general.cu", f"general_forward<{scalar}, {acc}>", launch.index)
            shape = _general_shape(x, weight, config, y.shape[2:])
            kernel((_blocks(y.numel(), launch.index),), (_THREADS,),
                   (xc, wc, bc, mc, yc, ic, *shape, *tail))
    return y, window_index


# --------------------------------------------------------------------------- backward


def _zero_grads(x, weight, bias, multiplier, wanted):
    want_x, want_weight, want_bias, want_multiplier = wanted
    return (
        torch.zeros_like(x) if want_x else skipped_grad(x),
        torch.zeros_like(weight) if want_weight else skipped_grad(weight),
        torch.zeros_like(bias) if want_bias else skipped_grad(bias if bias is not None else x),
        torch.zeros_like(multiplier) if want_multiplier else skipped_grad(multiplier),
    )


def backward_impl(grad_y, window_index, x, weight, bias, multiplier, stride, padding,
                  output_padding, negative_slope, allow_tf32, output_mask):
    want_x, want_weight, want_bias, want_multiplier = (bool(v) for v in output_mask)
    want_bias = want_bias and bias is not None
    wanted = (want_x, want_weight, want_bias, want_multiplier)
    if grad_y.numel() == 0 or x.numel() == 0:
        return _zero_grads(x, weight, bias, multiplier, wanted)
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    if (uses_tf32_path(x, config, allow_tf32)
            and weight.shape[1] <= TF32_MAX_OUT_CHANNELS_BACKWARD):
        return _backward_parity_tf32(grad_y, window_index, x, weight, bias, multiplier,
                                     negative_slope, wanted)
    return _backward_general(grad_y, window_index, x, weight, bias, multiplier, config, wanted)


def _finish(dbias_acc, dmult_acc, bias, multiplier, wanted, x, dx, dweight, weight):
    want_x, want_weight, want_bias, want_multiplier = wanted
    dbias = finish_channel_grad(dbias_acc, bias) if want_bias else skipped_grad(
        bias if bias is not None else x)
    dmultiplier = (finish_channel_grad(dmult_acc, multiplier) if want_multiplier
                   else skipped_grad(multiplier))
    return (
        dx if want_x else skipped_grad(x),
        dweight if want_weight else skipped_grad(weight),
        dbias,
        dmultiplier,
    )


def _backward_general(grad_y, window_index, x, weight, bias, multiplier, config, wanted):
    want_x, want_weight, want_bias, want_multiplier = wanted
    scalar, acc = KERNEL_TYPES[x.dtype]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_out = weight.shape[1]
    planes = grad_y.shape[0] * c_out
    plane_size = math.prod(grad_y.shape[2:])
    chunks = max(1, min(math.ceil(plane_size / _THREADS), 64))
    grad_z = torch.empty(grad_y.shape, dtype=acc_dtype, device=x.device)
    partial_bias = torch.empty(planes * chunks, dtype=acc_dtype, device=x.device)
    partial_multiplier = torch.empty_like(partial_bias)
    dbias_acc = torch.empty(c_out, dtype=acc_dtype, device=x.device)
    dmult_acc = torch.empty_like(dbias_acc)
    dx = torch.empty_like(x) if want_x else None
    dweight = torch.empty_like(weight) if want_weight else None
    has_bias = bias is not None
    with _OnTorchStream(x.device) as launch:
        xc, wc, mc = _as_cupy(x), _as_cupy(weight), _as_cupy(multiplier)
        bc = _as_cupy(bias) if has_bias else wc
        shape = _general_shape(x, weight, config, grad_y.shape[2:])
        zc = _as_cupy(grad_z)
        ic = _as_cupy(window_index)
        get_kernel("general.cu", f"general_grad_z<{scalar}, {acc}>", launch.index)(
            (chunks, min(planes, 65535)), (_THREADS,),
            (_as_cupy(grad_y), ic, xc, wc, bc, mc, zc, _as_cupy(partial_bias),
             _as_cupy(partial_multiplier), *shape,
             *_i32(_multiplier_stride(multiplier), int(has_bias)), _f64(config.negative_slope)))
        if want_bias or want_multiplier:
            get_kernel("general.cu", f"channel_reduce<{acc}>", launch.index)(
                (min(c_out, 65535),), (_THREADS,),
                (_as_cupy(partial_bias), _as_cupy(partial_multiplier), _as_cupy(dbias_acc),
                 _as_cupy(dmult_acc), *_i32(grad_y.shape[0], c_out, chunks)))
        if want_x:
            get_kernel("general.cu", f"general_grad_x<{scalar}, {acc}>", launch.index)(
                (_blocks(x.numel(), launch.index),), (_THREADS,),
                (zc, ic, wc, _as_cupy(dx), *shape))
        if want_weight:
            get_kernel("general.cu", f"general_grad_weight<{scalar}, {acc}>", launch.index)(
                (min(weight.numel(), 65535 * 16),), (_THREADS,),
                (zc, ic, xc, _as_cupy(dweight), *shape))
    return _finish(dbias_acc, dmult_acc, bias, multiplier, wanted, x, dx, dweight, weight)


def _backward_parity_tf32(grad_y, window_index, x, weight, bias, multiplier, negative_slope,
                          wanted):
    want_x, want_weight, want_bias, want_multiplier = wanted
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    device = x.device
    has_bias = bias is not None
    grad_z_packed = torch.empty(grad_y.shape, dtype=torch.int32, device=device)
    with _OnTorchStream(device) as launch:
        sms = _sm_count(launch.index)
        xc, wc, mc = _as_cupy(x), _as_cupy(weight), _as_cupy(multiplier)
        bc = _as_cupy(bias) if has_bias else wc
        zc = _as_cupy(grad_z_packed)
        dims = _i32(n, c_in, c_out, d, h, w)

        # 1. grad_z at the winners (same TF32 arithmetic as the forward) + channel partials.
        tiles = (math.ceil(d / 2), math.ceil(h / 4), math.ceil(w / 32))
        grid_z = min(n * math.prod(tiles), 2 * sms)
        partial_bias = torch.empty((grid_z, c_out), dtype=torch.float32, device=device)
        partial_multiplier = torch.empty_like(partial_bias)
        ksteps_in = 1 if c_in <= 8 else 2
        yc = _as_cupy(grad_y)
        get_kernel("parity_forward.cu", f"parity_tf32<{ksteps_in}, true>", launch.index)(
            (grid_z, math.ceil(c_out / 32)), (128,),
            (xc, wc, bc, mc, yc, _as_cupy(window_index), yc, zc, _as_cupy(partial_bias),
             _as_cupy(partial_multiplier), *dims,
             *_i32(_multiplier_stride(multiplier), int(has_bias)), _f64(negative_slope),
             *_i32(*tiles, ASYNC_STAGING)))
        dbias_acc = dmult_acc = None
        if want_bias or want_multiplier:
            dbias_acc = torch.empty(c_out, dtype=torch.float32, device=device)
            dmult_acc = torch.empty_like(dbias_acc)
            get_kernel("general.cu", "channel_reduce<float>", launch.index)(
                (c_out,), (_THREADS,),
                (_as_cupy(partial_bias), _as_cupy(partial_multiplier), _as_cupy(dbias_acc),
                 _as_cupy(dmult_acc), *_i32(grid_z, c_out, 1)))

        # 2. dweight: per-block partial GEMMs, then a fixed-order sum of the partials. Before dx,
        # so that the partials are freed (stream-ordered) before dx is allocated: lower peak.
        dweight = None
        if want_weight:
            dweight = torch.empty_like(weight)
            tiles_w = (d, math.ceil(h / 4), math.ceil(w / 32))
            grid_w = min(n * math.prod(tiles_w), 2 * sms)
            partial_weight = torch.empty((grid_w, weight.numel()), dtype=torch.float32,
                                         device=device)
            pc = _as_cupy(partial_weight)
            get_kernel("parity_backward.cu", "parity_grad_weight_tf32", launch.index)(
                (grid_w, math.ceil(c_out / 32)), (128,),
                (xc, zc, pc, *dims, *_i32(*tiles_w, ASYNC_STAGING)))
            get_kernel("parity_backward.cu", "partial_sum_reduce", launch.index)(
                (min(math.ceil(weight.numel() / 32), 8 * sms),), (_THREADS,),
                (pc, _as_cupy(dweight), *_i32(grid_w, weight.numel())))
            del pc, partial_weight

        # 3. dx: implicit GEMM over (offset, class) blocks with packed weight fragments.
        dx = None
        if want_x:
            dx = torch.empty_like(x)
            ksteps_out = math.ceil(c_out / 8)
            ntiles = 1 if c_in <= 8 else 2
            fragments = torch.empty(27 * ksteps_out * ntiles * 64, dtype=torch.int32,
                                    device=device)
            fc = _as_cupy(fragments)
            get_kernel("parity_backward.cu", "pack_weight_fragments", launch.index)(
                (math.ceil(27 * ksteps_out * ntiles * 32 / 256),), (256,),
                (wc, fc, *_i32(c_in, c_out, ksteps_out, ntiles)))
            kernel = get_kernel("parity_backward.cu", f"parity_grad_x_tf32<{ntiles}>",
                                launch.index)
            shared = ksteps_out * 8 * _grad_x_channel_stride() * 4
            if shared > 48 * 1024:
                kernel.max_dynamic_shared_size_bytes = shared
            tiles_x = (d, math.ceil(h / 4), math.ceil(w / 32))
            kernel((n * math.prod(tiles_x),), (128,),
                   (zc, fc, _as_cupy(dx), *dims, *_i32(ksteps_out, *tiles_x, ASYNC_STAGING)),
                   shared_mem=shared)
    return _finish(dbias_acc, dmult_acc, bias, multiplier, wanted, x, dx, dweight, weight)


def _grad_x_channel_stride() -> int:
    # grad_x_tile::CS in parity_backward.cu: pooled positions (1+1) x (4+1) x (32+1), rounded up
    # to == 8 (mod 32).
    positions = 2 * 5 * 33
    return ((positions - 8 + 31) // 32) * 32 + 8
