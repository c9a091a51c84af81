"""The two op bodies (forward, backward): pick a kernel, launch it on torch's stream.

Tensors reach the kernels zero-copy as device addresses (see ``_launch.py`` for why not a CuPy
array per tensor); every output and temporary comes from torch's allocator (so CUDA-graph capture
and torch's memory accounting see them); launches go to torch's current stream of the inputs'
device, with no host synchronisation. Per-shape launch plans are cached, so a repeated call does
little more than allocate its outputs and enqueue.
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import cache

import torch

from fused3d.config import BlockConfig
from fused3d.ops import config_from_op_args, finish_channel_grad, skipped_grad

from ._launch import Kernel, ensure_context
from ._modules import get_kernel
from ._tensor_map import TENSOR_MAP_BYTES, XTileMap

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
#: arithmetic; 2: one block of 8 warps with less halo; same bits either way).
EXACT_ROWS = int(os.environ.get("FUSED3D_CUPY_EXACT_ROWS", "2"))
#: The grad_z recompute (parity_tf32, used when y is not saved): stage x tiles with cp.async (all
#: copies of a tile in flight at once) instead of load-then-store loops. Off by default: the raw
#: copies reach the tensor cores truncated to TF32 instead of rounded, which measured about twice
#: the gradient error (over the suite's TF32 tolerance at the benchmark size). (The forward,
#: parity_forward_tc, and the dweight kernel always copy by cp.async and then round to TF32 in
#: shared memory; packed grad_z tiles, already TF32, are always copied by cp.async.)
ASYNC_STAGING = os.environ.get("FUSED3D_CUPY_ASYNC_STAGING", "0") == "1"
#: Exact (IEEE fp32 / float64) kernel: cp.async staging copies the same values, so it is on.
EXACT_ASYNC_STAGING = os.environ.get("FUSED3D_CUPY_EXACT_ASYNC_STAGING", "1") == "1"
#: With async staging, the TF32 grad_z kernel (y not saved) double-buffers its x tiles: the next
#: tile's copies fly while the current one is computed (twice the shared memory).
PIPELINE = os.environ.get("FUSED3D_CUPY_PIPELINE", "1") == "1"
#: The TF32 backward runs over batch chunks whose packed grad_z (pooled-sized, int32) is at most
#: this many bytes, so that it never exists for the whole batch at once: a lower peak of a
#: training step, for some extra dweight-partial traffic (0 = whole batch in one pass).
BACKWARD_CHUNK_BYTES = int(os.environ.get("FUSED3D_CUPY_BACKWARD_CHUNK_BYTES", str(8 << 20)))
#: How addresses are taken: "pointer" (default, ``data_ptr()``) or "dlpack" (``cupy.from_dlpack``
#: views, the slower handshake, kept to measure the difference).
ARGUMENT_MODE = os.environ.get("FUSED3D_CUPY_ARGUMENTS", "pointer")
#: The TF32 forward on a cc 9.0 GPU: Hopper's warpgroup MMA kernel fed by bulk tensor copies
#: (parity_forward_wgmma, "1", the default) or the mma.sync kernel of every sm_80+ GPU
#: (parity_forward_tc, "0").
WGMMA_FORWARD = os.environ.get("FUSED3D_CUPY_WGMMA", "1") == "1"
_THREADS = 256
#: The TF32 fast path keeps every input channel's weights in registers: C_in <= 16.
TF32_MAX_IN_CHANNELS = 16
#: The IEEE fp32 fast path (parity_forward_ffma) stages a block's weights in shared memory,
#: 27 taps x C_in padded to 8 x 32 channels: C_in <= 24 (two blocks per SM up to 16).
FFMA_MAX_IN_CHANNELS = 24
#: Its dx kernel stages grad_z of all output channels in shared memory: C_out <= 64.
TF32_MAX_OUT_CHANNELS_BACKWARD = 64
#: The FFMA backward (parity_grad_x_ffma / parity_grad_weight_ffma: IEEE fp32, and fp16 / bf16
#: with fp32 arithmetic) keeps a position's input channels in registers (C_in <= 16) and stages
#: 27 weight rows of all output channels (C_out <= 64: 111 KB of shared memory).
FFMA_MAX_IN_CHANNELS_BACKWARD = 16
FFMA_MAX_OUT_CHANNELS_BACKWARD = 64

# Parameter lists of the kernels (struct codes: P pointer, i int, d double), in source order.
_SIG_TF32 = "10P 8i d 5i"
_SIG_EXACT = "6P 8i d 4i"
_SIG_PERSISTENT = "6P 8i d 3i"  # parity_forward_tc, parity_forward_ffma
_SIG_WGMMA = f"6P 8i d 4i {TENSOR_MAP_BYTES}s"  # ... use_tma, the x tensor map by value
_SIG_GENERAL_FORWARD = "6P 20i d"
_SIG_GENERAL_GRAD_Z = "9P 20i d"
_SIG_GENERAL_ADJOINT = "4P 18i"
_SIG_GENERAL_GRAD_WEIGHT = "5P 21i"
_SIG_ANY_NONFINITE = "P q P"
_SIG_CHANNEL_REDUCE = "4P 3i"
_SIG_GRAD_WEIGHT = "3P 10i"
_SIG_GRAD_WEIGHT_REDUCE = "2P 4i"
_SIG_PACK = "2P 4i"
_SIG_GRAD_X = "3P 10i"
_SIG_GRAD_Z_FROM_OUTPUT = "10P 8i d"
_SIG_GRAD_X_FFMA = "4P 7i"
_SIG_PACK_FFMA_ROWS = "2P 4i"
_SIG_GRAD_WEIGHT_FFMA = "4P 9i"


@cache
def _cupy():
    import cupy

    return cupy


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_kernels: dict[tuple[int, str, str], Kernel] = {}


def _kernel(file_name: str, name_expression: str, device_index: int, signature: str) -> Kernel:
    key = (device_index, file_name, name_expression)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = Kernel(get_kernel(file_name, name_expression, device_index),
                                        signature)
    return kernel


_get_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _raw_stream(device_index: int) -> int:
    """torch's current stream on the device, as a raw cudaStream_t."""
    if _get_raw_stream is not None:
        return _get_raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def _on_device(device_index: int):
    """Make the tensors' device current (CuPy's kernel cache and the driver launch use it)."""
    if torch.cuda.current_device() != device_index:
        return torch.cuda.device(device_index)
    return contextlib.nullcontext()


def _address(tensor: torch.Tensor | None, stream: int = 0) -> int:
    """The tensor's device address (0 for None: the kernels never read an absent bias)."""
    if tensor is None:
        return 0
    if ARGUMENT_MODE != "dlpack":
        return tensor.data_ptr()
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    cupy = _cupy()
    with cupy.cuda.ExternalStream(stream):  # the consumer stream of the DLPack handshake
        return cupy.from_dlpack(tensor).data.ptr


def _general_shape(x: torch.Tensor, weight: torch.Tensor, config: BlockConfig, pooled) -> tuple:
    n, c_in, d, h, w = x.shape
    return (n, c_in, weight.shape[1], d, h, w, *pooled, *config.kernel_size, *config.stride,
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


def uses_ffma_path(x: torch.Tensor, config: BlockConfig, allow_tf32: bool) -> bool:
    return (
        config.is_parity_fast_path
        and x.dtype == torch.float32
        and not allow_tf32
        and x.shape[1] <= FFMA_MAX_IN_CHANNELS
    )


def uses_ffma_backward(x: torch.Tensor, weight: torch.Tensor, config: BlockConfig,
                       allow_tf32: bool) -> bool:
    return (
        config.is_parity_fast_path
        and ((x.dtype == torch.float32 and not allow_tf32)
             or x.dtype in (torch.float16, torch.bfloat16))
        and x.shape[1] <= FFMA_MAX_IN_CHANNELS_BACKWARD
        and weight.shape[1] <= FFMA_MAX_OUT_CHANNELS_BACKWARD
        and math.prod(x.shape[2:]) < 2**31
    )


# --------------------------------------------------------------------------- forward


class _ForwardPlan:
    """Everything about a forward call that depends only on shapes, dtype and flags."""

    __slots__ = ("block", "grid", "head", "index", "kernel", "shape", "shared", "tail", "x_map")


_forward_plans: dict[tuple, _ForwardPlan] = {}


def _forward_plan(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
                  allow_tf32) -> _ForwardPlan:
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    plan = _ForwardPlan()
    plan.index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    plan.shape = config.output_shape(x.shape, weight.shape[1])
    plan.kernel = None
    if math.prod(plan.shape) == 0:
        return plan
    scalar, acc = KERNEL_TYPES[x.dtype]
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    index = plan.index
    flags = (_multiplier_stride(multiplier), int(bias is not None), float(negative_slope))
    plan.head = ()
    plan.shared = 0
    plan.x_map = None
    with _on_device(index):
        if uses_tf32_path(x, config, allow_tf32) and _persistent_tiles(x.shape)[0] < 2**30:
            ksteps = 1 if c_in <= 8 else 2
            tiles, tiles_h, tiles_w = _persistent_tiles(x.shape)
            if not wgmma_forward_reasons(index):
                plan.kernel = _kernel("parity_forward_wgmma.cu",
                                      f"parity_forward_wgmma<{ksteps}>", index, _SIG_WGMMA)
                plan.shared = _raise_shared(plan.kernel, _wgmma_shared_bytes(ksteps))
                plan.x_map = XTileMap(x.shape)  # per call: use_tma and the map of x's address
            else:
                plan.kernel = _kernel("parity_forward.cu", f"parity_forward_tc<{ksteps}>",
                                      index, _SIG_PERSISTENT)
                plan.shared = _raise_shared(plan.kernel, _tc_shared_bytes(ksteps))
            # Persistent: one block of 16 warps per SM, spread over the 32-channel chunks.
            chunks = math.ceil(c_out / 32)
            plan.grid = (max(1, min(tiles, math.ceil(_sm_count(index) / chunks))), chunks)
            plan.block = 512
            plan.tail = (n, c_in, c_out, d, h, w, *flags, tiles, tiles_h, tiles_w)
        elif uses_ffma_path(x, config, allow_tf32) and _persistent_tiles(x.shape)[0] < 2**30:
            ksteps = math.ceil(c_in / 8)
            plan.kernel = _kernel("parity_forward.cu", f"parity_forward_ffma<{ksteps}>", index,
                                  _SIG_PERSISTENT)
            tiles, tiles_h, tiles_w = _persistent_tiles(x.shape)
            plan.shared = _raise_shared(plan.kernel, _ffma_shared_bytes(ksteps))
            # Persistent: the resident blocks (two per SM where the shared memory allows),
            # spread over the 32-channel chunks.
            per_sm = 2 if 2 * plan.shared <= _SM_SHARED_BYTES else 1
            chunks = math.ceil(c_out / 32)
            blocks = max(1, min(tiles, math.ceil(_sm_count(index) * per_sm / chunks)))
            plan.grid = (blocks, chunks)
            plan.block = 256
            plan.tail = (n, c_in, c_out, d, h, w, *flags, tiles, tiles_h, tiles_w)
        elif config.is_parity_fast_path:
            channels = _EXACT_CHANNELS.get(x.dtype, 8)
            rows = EXACT_ROWS
            plan.kernel = _kernel(
                "parity_forward.cu", f"parity_forward_exact<{scalar}, {acc}, {channels}, {rows}>",
                index, _SIG_EXACT)
            tiles = (math.ceil(d / rows), math.ceil(h / 2), math.ceil(w / 32))
            plan.grid = (n * math.prod(tiles), math.ceil(c_out / (4 * channels)))
            plan.block = 128 * rows
            plan.tail = (n, c_in, c_out, d, h, w, *flags, *tiles, int(EXACT_ASYNC_STAGING))
        else:
            plan.kernel = _kernel("general.cu", f"general_forward<{scalar}, {acc}>", index,
                                  _SIG_GENERAL_FORWARD)
            total = math.prod(plan.shape)
            plan.grid = (max(1, min(math.ceil(total / _THREADS), _sm_count(index) * 8)), 1)
            plan.block = _THREADS
            plan.tail = (*_general_shape(x, weight, config, plan.shape[2:]), *flags)
    return plan


def forward_impl(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
                 allow_tf32):
    device = x.device
    key = (x.shape, weight.shape, x.dtype, device, bias is None, multiplier.numel(), *stride,
           *padding, *output_padding, negative_slope, allow_tf32, ASYNC_STAGING, PIPELINE,
           EXACT_ASYNC_STAGING, EXACT_ROWS)
    plan = _forward_plans.get(key)
    if plan is None:
        if len(_forward_plans) > 256:
            _forward_plans.clear()
        plan = _forward_plans[key] = _forward_plan(
            x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
            allow_tf32)
    y = torch.empty(plan.shape, dtype=x.dtype, device=device)
    window_index = torch.empty(plan.shape, dtype=torch.uint8, device=device)
    if plan.kernel is None:
        return y, window_index
    index = plan.index
    with _on_device(index):
        ensure_context(index)
        stream = _raw_stream(index)
        x_address = _address(x, stream)
        tail = plan.tail if plan.x_map is None else (*plan.tail,
                                                     *plan.x_map.arguments(x_address))
        plan.kernel.launch(
            plan.grid, plan.block, stream,
            (x_address, _address(weight, stream), _address(bias, stream),
             _address(multiplier, stream), _address(y, stream), _address(window_index, stream),
             *plan.head, *tail),
            shared_mem=plan.shared)
    return y, window_index


@cache
def wgmma_forward_reasons(device_index: int) -> tuple[str, ...]:
    """Why the TF32 forward on this device does not take parity_forward_wgmma (empty: it does).

    Compiles the module on first use (NVRTC, for sm_90a); a compiler that cannot is a reason,
    not an error: the mma.sync kernel computes the same op.
    """
    if not WGMMA_FORWARD:
        return ("switched off (FUSED3D_CUPY_WGMMA=0)",)
    capability = torch.cuda.get_device_capability(device_index)
    if capability != (9, 0):
        return (f"needs compute capability 9.0 (sm_90a), this GPU is "
                f"{capability[0]}.{capability[1]}",)
    try:
        with _on_device(device_index):
            for ksteps in (1, 2):
                get_kernel("parity_forward_wgmma.cu", f"parity_forward_wgmma<{ksteps}>",
                           device_index)
    except Exception as error:  # NVRTC without sm_90a, or one that refuses the option
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (f"NVRTC could not build it for sm_90a ({type(error).__name__}: "
                f"{first_line[:200]})",)
    return ()


# --------------------------------------------------------------------------- backward


def _zero_grads(x, weight, bias, multiplier, wanted):
    want_x, want_weight, want_bias, want_multiplier = wanted
    return (
        torch.zeros_like(x) if want_x else skipped_grad(x),
        torch.zeros_like(weight) if want_weight else skipped_grad(weight),
        torch.zeros_like(bias) if want_bias else skipped_grad(bias if bias is not None else x),
        torch.zeros_like(multiplier) if want_multiplier else skipped_grad(multiplier),
    )


def backward_impl(grad_y, y, window_index, x, weight, bias, multiplier, stride, padding,
                  output_padding, negative_slope, allow_tf32, output_mask):
    want_x, want_weight, want_bias, want_multiplier = (bool(v) for v in output_mask)
    want_bias = want_bias and bias is not None
    wanted = (want_x, want_weight, want_bias, want_multiplier)
    if y is not None and (y.shape != grad_y.shape or y.dtype != x.dtype
                          or y.device != x.device):
        raise ValueError(
            f"fused3d_cupy: y must be None or the forward's output ({tuple(grad_y.shape)}, "
            f"{x.dtype} on {x.device}), got {tuple(y.shape)}, {y.dtype} on {y.device}")
    if grad_y.numel() == 0 or x.numel() == 0:
        return _zero_grads(x, weight, bias, multiplier, wanted)
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with _on_device(index):
        ensure_context(index)
        stream = _raw_stream(index)
        if (uses_tf32_path(x, config, allow_tf32)
                and weight.shape[1] <= TF32_MAX_OUT_CHANNELS_BACKWARD):
            return _backward_parity(grad_y, y, window_index, x, weight, bias, multiplier,
                                    negative_slope, wanted, index, stream, ffma=False)
        if uses_ffma_backward(x, weight, config, allow_tf32):
            return _backward_parity(grad_y, y, window_index, x, weight, bias, multiplier,
                                    negative_slope, wanted, index, stream, ffma=True)
        return _backward_general(grad_y, window_index, x, weight, bias, multiplier, config,
                                 wanted, index, stream)


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


def _backward_general(grad_y, window_index, x, weight, bias, multiplier, config, wanted, index,
                      stream):
    want_x, want_weight, want_bias, want_multiplier = wanted
    scalar, acc = KERNEL_TYPES[x.dtype]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_out = weight.shape[1]
    planes = grad_y.shape[0] * c_out
    plane_size = math.prod(grad_y.shape[2:])
    chunks = max(1, min(math.ceil(plane_size / _THREADS), 64))
    device = x.device
    grad_z = torch.empty(grad_y.shape, dtype=acc_dtype, device=device)
    partial_bias = torch.empty(planes * chunks, dtype=acc_dtype, device=device)
    partial_multiplier = torch.empty_like(partial_bias)
    dbias_acc = torch.empty(c_out, dtype=acc_dtype, device=device)
    dmult_acc = torch.empty_like(dbias_acc)
    dx = torch.empty_like(x) if want_x else None
    dweight = torch.empty_like(weight) if want_weight else None
    shape = _general_shape(x, weight, config, grad_y.shape[2:])
    xp, wp, zp, ip = (_address(t, stream) for t in (x, weight, grad_z, window_index))
    _kernel("general.cu", f"general_grad_z<{scalar}, {acc}>", index, _SIG_GENERAL_GRAD_Z).launch(
        (chunks, min(planes, 65535)), _THREADS, stream,
        (_address(grad_y, stream), ip, xp, wp, _address(bias, stream),
         _address(multiplier, stream), zp, _address(partial_bias, stream),
         _address(partial_multiplier, stream), *shape, _multiplier_stride(multiplier),
         int(bias is not None), float(config.negative_slope)))
    if want_bias or want_multiplier:
        _kernel("general.cu", f"channel_reduce<{acc}>", index, _SIG_CHANNEL_REDUCE).launch(
            (min(c_out, 65535), 1), _THREADS, stream,
            (_address(partial_bias, stream), _address(partial_multiplier, stream),
             _address(dbias_acc, stream), _address(dmult_acc, stream), grad_y.shape[0], c_out,
             chunks))
    x_blocks = max(1, min(math.ceil(x.numel() / _THREADS), _sm_count(index) * 8))
    if want_x:
        _kernel("general.cu", f"general_grad_x<{scalar}, {acc}>", index,
                _SIG_GENERAL_ADJOINT).launch(
            (x_blocks, 1), _THREADS, stream, (zp, ip, wp, _address(dx, stream), *shape))
    if want_weight:
        x_nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
        flag_at = _address(x_nonfinite, stream)
        _kernel("general.cu", f"any_nonfinite<{scalar}>", index, _SIG_ANY_NONFINITE).launch(
            (x_blocks, 1), _THREADS, stream, (xp, x.numel(), flag_at))
        conv_size = config.conv_shape(x.shape[2:])
        _kernel("general.cu", f"general_grad_weight<{scalar}, {acc}>", index,
                _SIG_GENERAL_GRAD_WEIGHT).launch(
            (min(weight.numel(), 65535 * 16), 1), _THREADS, stream,
            (zp, ip, xp, flag_at, _address(dweight, stream), *shape, *conv_size))
    return _finish(dbias_acc, dmult_acc, bias, multiplier, wanted, x, dx, dweight, weight)


def _backward_parity(grad_y, y, window_index, x, weight, bias, multiplier, negative_slope,
                     wanted, index, stream, ffma):
    """Per batch chunk: grad_z at the winners (from the saved output y when it settles the
    derivative, else recomputed), then the dweight partials and dx; then fixed-order reductions
    of the channel and dweight partials (deterministic).

    ``ffma`` False (TF32, fp32 only): grad_z packed as TF32 with its class bits, recomputed by
    the forward's GEMM where y is not used; tensor-core dweight and dx. True (FFMA: IEEE fp32, or
    fp16 / bf16 in fp32 arithmetic): plain fp32 grad_z, recomputed per element where y is not
    used; FFMA dweight and dx.
    """
    want_x, want_weight, want_bias, want_multiplier = wanted
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    device = x.device
    sms = _sm_count(index)
    spatial = d * h * w
    scalar = KERNEL_TYPES[x.dtype][0]
    item = x.element_size()  # bytes of an element of x, grad_y, y and dx
    grad_z_bytes = grad_y.numel() * 4
    chunk = n
    if BACKWARD_CHUNK_BYTES > 0 and grad_z_bytes > BACKWARD_CHUNK_BYTES:
        chunk = max(1, math.ceil(n * BACKWARD_CHUNK_BYTES / grad_z_bytes))
    tiles_x = (d, math.ceil(h / 4), math.ceil(w / 32))  # also the TF32 dweight kernel's tiles
    # The dweight kernels count a chunk's tiles in an int (the FFMA kernel's are fewer).
    chunk = max(1, min(chunk, (2**31 - 1) // math.prod(tiles_x)))
    starts = range(0, n, chunk)

    # y settles the derivative only for a positive slope (grad_z_from_output); the bounds keep
    # the slopes' products with any multiplier the kernel trusts normal numbers. The FFMA path
    # always runs grad_z_from_output, with no y where it cannot be used (every element
    # recomputes z then).
    y_usable = (y is not None and 2.0**-10 <= negative_slope <= 2.0**10 and spatial < 2**31)
    from_output = ffma or y_usable
    tiles = (math.ceil(d / 2), math.ceil(h / 4), math.ceil(w / 32))
    if from_output:  # slices of >= 1024 pooled positions per channel, one partial row each
        grids_z = [max(1, min(sms, spatial // 1024)) for _ in starts]
    else:
        grids_z = [min(min(chunk, n - b0) * math.prod(tiles), 2 * sms) for b0 in starts]
    co_chunks = math.ceil(c_out / 32)
    if ffma:
        # One resident block of 28 warps per SM, spread over the 32-channel chunks.
        ffma_tiles_h, ffma_tiles_w = math.ceil(h / 8), math.ceil(w / 32)
        grid_w = max(1, min(chunk * d * ffma_tiles_h * ffma_tiles_w, math.ceil(sms / co_chunks)))
    else:
        grid_w = min(chunk * math.prod(tiles_x), 2 * sms)
    ksteps_in = 1 if c_in <= 8 else 2
    ksteps_out = math.ceil(c_out / 8)
    ntiles = 1 if c_in <= 8 else 2
    ci4 = math.ceil(c_in / 4)

    # grad_z of one chunk: packed TF32 words, or fp32 bits (FFMA).
    grad_z = torch.empty((chunk, c_out, d, h, w), dtype=torch.int32, device=device)
    partial_bias = torch.empty((sum(grids_z), c_out), dtype=torch.float32, device=device)
    partial_multiplier = torch.empty_like(partial_bias)
    # One partial per dweight block (16 x 32 x 27 slots per 32-output-channel chunk, in the
    # kernel's order; grad_weight_reduce maps them back to weights).
    weight_slots = co_chunks * _GRAD_WEIGHT_PARTIAL_SLOTS
    partial_weight = (torch.empty((grid_w, weight_slots), dtype=torch.float32, device=device)
                      if want_weight else None)
    fragments = (torch.empty(27 * ksteps_out * ntiles * 64, dtype=torch.int32, device=device)
                 if want_x and not ffma else None)
    dx = torch.empty_like(x) if want_x else None

    xp, wp, zp = _address(x, stream), _address(weight, stream), _address(grad_z, stream)
    gyp, ip = _address(grad_y, stream), _address(window_index, stream)
    pbp, pmp = _address(partial_bias, stream), _address(partial_multiplier, stream)
    pwp = _address(partial_weight, stream)
    dxp = _address(dx, stream)
    flags = (_multiplier_stride(multiplier), int(bias is not None), float(negative_slope))
    if from_output:
        yp = 0
        if y_usable:
            y = y.contiguous()  # held until the launches are enqueued
            yp = _address(y, stream)
        from_output_kernel = _kernel(
            "parity_backward.cu",
            f"grad_z_from_output<{scalar}, {'false' if ffma else 'true'}>", index,
            _SIG_GRAD_Z_FROM_OUTPUT)
    else:
        grad_z_kernel = _kernel("parity_forward.cu", f"parity_tf32<{ksteps_in}, true>", index,
                                _SIG_TF32)
        grad_z_shared = _tf32_shared(grad_z_kernel, ksteps_in)
    if want_weight and ffma:
        grad_weight_kernel = _kernel("parity_backward.cu",
                                     f"parity_grad_weight_ffma<{scalar}, {ci4}>", index,
                                     _SIG_GRAD_WEIGHT_FFMA)
        grad_weight_shared = _raise_shared(grad_weight_kernel, _ffma_grad_weight_shared(ci4))
    elif want_weight:
        grad_weight_kernel = _kernel("parity_backward.cu", "parity_grad_weight_tf32", index,
                                     _SIG_GRAD_WEIGHT)
    if want_x and ffma:
        grad_x_kernel = _kernel("parity_backward.cu", f"parity_grad_x_ffma<{scalar}, {ci4}>",
                                index, _SIG_GRAD_X_FFMA)
        row_stride = _ffma_row_stride(c_out, ci4)
        # Its weight rows, packed once in the shared-memory layout (coalesced staging).
        rows = torch.empty(27 * row_stride, dtype=torch.float32, device=device)
        rows_at = _address(rows, stream)
        _kernel("parity_backward.cu", f"pack_ffma_rows<{scalar}>", index,
                _SIG_PACK_FFMA_ROWS).launch(
            (math.ceil(27 * row_stride / 256), 1), 256, stream,
            (wp, rows_at, c_in, c_out, 4 * ci4, row_stride))
        shared = _raise_shared(grad_x_kernel, 27 * row_stride * 4)
        # Grid-stride over a chunk's input positions, at most the resident blocks.
        grid_x_limit = sms * _resident_blocks(grad_x_kernel, 256, shared)
    elif want_x:
        fragments_at = _address(fragments, stream)
        _kernel("parity_backward.cu", "pack_weight_fragments", index, _SIG_PACK).launch(
            (math.ceil(27 * ksteps_out * ntiles * 32 / 256), 1), 256, stream,
            (wp, fragments_at, c_in, c_out, ksteps_out, ntiles))
        grad_x_kernel = _kernel("parity_backward.cu", f"parity_grad_x_tf32<{ntiles}>", index,
                                _SIG_GRAD_X)
        shared = _raise_shared(grad_x_kernel, ksteps_out * 8 * _grad_x_channel_stride() * 4)

    row = 0
    for step, b0 in enumerate(starts):
        size = min(chunk, n - b0)
        x_at = xp + b0 * c_in * spatial * item
        pooled_at = b0 * c_out * spatial
        dims = (size, c_in, c_out, d, h, w)
        # 1. grad_z at the winners + channel partials: from y, or recomputed (TF32: with the
        # forward's arithmetic; FFMA: per element).
        if from_output:
            from_output_kernel.launch(
                (grids_z[step], c_out), 256, stream,
                (x_at, wp, _address(bias, stream), _address(multiplier, stream),
                 gyp + item * pooled_at, yp + item * pooled_at if yp else 0, ip + pooled_at, zp,
                 pbp + 4 * row * c_out, pmp + 4 * row * c_out, *dims, *flags))
        else:
            grad_z_kernel.launch(
                (grids_z[step], math.ceil(c_out / 32)), 128, stream,
                (x_at, wp, _address(bias, stream), _address(multiplier, stream),
                 gyp + 4 * pooled_at, ip + pooled_at, gyp + 4 * pooled_at, zp,
                 pbp + 4 * row * c_out, pmp + 4 * row * c_out, *dims, *flags, *tiles,
                 *_tf32_staging()),
                shared_mem=grad_z_shared)
        row += grids_z[step]
        # 2. dweight partials, one per block, accumulated over the chunks.
        if want_weight and ffma:
            grad_weight_kernel.launch(
                (grid_w, co_chunks), 896, stream,
                (x_at, zp, ip + pooled_at, pwp, *dims, ffma_tiles_h, ffma_tiles_w,
                 int(step > 0)),
                shared_mem=grad_weight_shared)
        elif want_weight:
            grad_weight_kernel.launch(
                (grid_w, co_chunks), 128, stream,
                (x_at, zp, pwp, *dims, *tiles_x, int(step > 0)))
        # 3. dx of the chunk.
        dx_at = dxp + b0 * c_in * spatial * item
        if want_x and ffma:
            grid_x = max(1, min(math.ceil(size * spatial / 256), grid_x_limit))
            grad_x_kernel.launch(
                (grid_x, 1), 256, stream,
                (zp, ip + pooled_at, rows_at, dx_at, *dims, row_stride), shared_mem=shared)
        elif want_x:
            grad_x_kernel.launch(
                (size * math.prod(tiles_x), 1), 128, stream,
                (zp, fragments_at, dx_at, *dims, ksteps_out, *tiles_x), shared_mem=shared)

    dbias_acc = dmult_acc = None
    if want_bias or want_multiplier:
        dbias_acc = torch.empty(c_out, dtype=torch.float32, device=device)
        dmult_acc = torch.empty_like(dbias_acc)
        _kernel("general.cu", "channel_reduce<float>", index, _SIG_CHANNEL_REDUCE).launch(
            (c_out, 1), _THREADS, stream,
            (pbp, pmp, _address(dbias_acc, stream), _address(dmult_acc, stream), row, c_out, 1))
    dweight = None
    if want_weight:
        dweight = torch.empty_like(weight)
        _kernel("parity_backward.cu",
                f"grad_weight_reduce<{'true' if ffma else 'false'}, {scalar}>", index,
                _SIG_GRAD_WEIGHT_REDUCE).launch(
            (min(math.ceil(weight_slots / 32), 8 * sms), 1), _THREADS, stream,
            (pwp, _address(dweight, stream), grid_w, weight_slots, c_in, c_out))
    return _finish(dbias_acc, dmult_acc, bias, multiplier, wanted, x, dx, dweight, weight)


_raised_shared: set[tuple[int, int]] = set()
#: grad_w_tile::kPartialSlots (== grad_w_ffma_tile::kPartialSlots) in parity_backward.cu: one
#: 32-output-channel chunk's dweight partial of one block (27 taps x 16 x 32 channels).
_GRAD_WEIGHT_PARTIAL_SLOTS = 27 * 16 * 32


def _ffma_row_stride(c_out: int, ci4: int) -> int:
    """parity_grad_x_ffma's weight row stride: C_out x 4 CI4 floats, padded to 4 (mod 32)."""
    return math.ceil(c_out * 4 * ci4 / 32) * 32 + 4


def _ffma_grad_weight_shared(ci4: int) -> int:
    """parity_grad_weight_ffma (grad_w_ffma_tile): the x halo (594 positions x (4 CI4 + 4)
    floats), the grad_z tile (256 x 33 floats) and its class bytes (256 x 36)."""
    return 4 * (594 * (4 * ci4 + 4) + 256 * 33) + 256 * 36


def _resident_blocks(kernel: Kernel, threads: int, shared: int) -> int:
    """Blocks of ``kernel`` one SM holds at once (threads, registers, shared memory)."""
    warps = math.ceil(threads / 32)
    registers_per_warp = math.ceil(max(1, kernel.raw.num_regs) * 32 / 256) * 256
    by_threads = 2048 // threads
    by_registers = 65536 // (registers_per_warp * warps)
    by_shared = _SM_SHARED_BYTES // (shared + 1024)
    return max(1, min(by_threads, by_registers, by_shared, 32))


def _tf32_staging() -> tuple[int, int]:
    """The (async_staging, pipeline) arguments of parity_tf32."""
    return int(ASYNC_STAGING), int(ASYNC_STAGING and PIPELINE)


def _tf32_shared(kernel: Kernel, ksteps: int) -> int:
    """Dynamic shared memory of parity_tf32: one or two x tiles of tf32_tile::CS words per
    (padded) input channel; raises the kernel's limit above the default 48 KB when needed."""
    positions = 3 * 5 * 33  # (2+1) x (4+1) x (32+1)
    channel_stride = ((positions - 8 + 31) // 32) * 32 + 8
    buffers = 2 if (ASYNC_STAGING and PIPELINE) else 1
    return _raise_shared(kernel, buffers * 8 * ksteps * channel_stride * 4)


def _persistent_tiles(x_shape) -> tuple[int, int, int]:
    """(tiles, tiles along h, tiles along w) of parity_forward_tc / _ffma: 8 x 32 pooled
    positions of one depth of one image each (their int tile counter bounds the total)."""
    n, _, d, h, w = x_shape
    tiles_h, tiles_w = math.ceil(h / 8), math.ceil(w / 32)
    return n * d * tiles_h * tiles_w, tiles_h, tiles_w


#: Shared memory of one SM for resident blocks (H100: 228 KB, 1 KB of it reserved per block).
_SM_SHARED_BYTES = 226 * 1024
#: Floats of one channel of an x tile (tc_tile::XS, ffma_tile::HALO): 2 x 9 rows of 36.
_X_TILE_CHANNEL = 2 * 9 * 36


def _tc_shared_bytes(ksteps: int) -> int:
    """parity_forward_tc: B fragments 27 x C_in padded x 32, two x tiles, bias and slopes."""
    ci_padded = 8 * ksteps
    return 4 * (27 * ci_padded * 32 + 2 * ci_padded * _X_TILE_CHANNEL + 3 * 32)


def _wgmma_shared_bytes(ksteps: int) -> int:
    """parity_forward_wgmma (wgmma_tile::shared_floats): the 18 steps' weights (64 rows x C_in
    padded), two shifted x copies (18 lines x 32), the raw x tile, bias and slopes, mbarrier."""
    ci_padded = 8 * ksteps
    return 4 * (18 * 64 * ci_padded + 2 * ci_padded * 18 * 32 + ci_padded * _X_TILE_CHANNEL
                + 3 * 32 + 2)


def _ffma_shared_bytes(ksteps: int) -> int:
    """parity_forward_ffma: weights 27 x C_in padded x 32, one x tile, bias and slopes."""
    ci_padded = 8 * ksteps
    return 4 * (27 * ci_padded * 32 + ci_padded * _X_TILE_CHANNEL + 3 * 32)


def _raise_shared(kernel: Kernel, shared: int) -> int:
    """Raise the kernel's dynamic shared memory limit (default 48 KB) to ``shared`` bytes where
    it is above the default; returns ``shared``."""
    if shared > 48 * 1024 and (id(kernel), shared) not in _raised_shared:
        kernel.raw.max_dynamic_shared_size_bytes = shared
        _raised_shared.add((id(kernel), shared))
    return shared


def _grad_x_channel_stride() -> int:
    # grad_x_tile::CS in parity_backward.cu: pooled positions (1+1) x (4+1) x (32+1), rounded up
    # to == 8 (mod 32).
    positions = 2 * 5 * 33
    return ((positions - 8 + 31) // 32) * 32 + 8
