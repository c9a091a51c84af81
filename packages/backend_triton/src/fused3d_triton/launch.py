"""Op bodies of the Triton backend: choose a kernel family and block shapes, launch.

Every launch goes through :func:`_fast_launch.launch`: under ``torch.compile`` that is
``torch.library.wrap_triton``, so the compiler sees the kernels (the ops are
``torch.library.triton_op``s); in eager mode it calls the compiled kernel's launcher with less
host time than ``kernel[grid](...)``. Block shapes of the fast-path kernels are autotuned on
the GPU, keyed on the problem shape and precision; under the interpreter
(``TRITON_INTERPRET=1``, CPU tensors) and during CUDA-graph capture one fixed config runs.
"""

import contextlib
import functools
import itertools
import os

import torch
import triton
from torch.library import wrap_triton

from fused3d.ops import (
    config_from_op_args,
    empty_outputs,
    finish_channel_grad,
    skipped_grad,
)

from . import _fast_launch, _interpreter_compat, kernels, parity_kernels
from ._fast_launch import launch

#: Fast path limits: one program holds the whole channel range, its 27 weight taps
#: [C_in, C_out] resident. At C_in 32 x C_out 64 the forward asked for 354 KB of shared memory
#: on the H100 (the limit is 227 KB) and failed to launch; 16 x 32 (the benchmark) runs.
FAST_MAX_IN_CHANNELS = 16
FAST_MAX_OUT_CHANNELS = 32


def interpreting() -> bool:
    return _fast_launch.INTERPRETING


if interpreting():
    _interpreter_compat.apply()


def _slope_pointer(negative_slope: float, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    """The general kernels' ``slope_ptr``: float64 reads the slope from this one-element tensor
    (see kernels._slope); other dtypes take the float argument and never read ``unused``."""
    if x.dtype == torch.float64:
        return torch.full((1,), negative_slope, dtype=torch.float64, device=x.device)
    return unused


#: Dot precision for float32 with TF32 off. "ieee" (the contract); "tf32x3" (three TF32
#: products, about fp32 accuracy on tensor cores) only for experiments, by environment variable.
FP32_DOT = os.environ.get("FUSED3D_TRITON_FP32_DOT", "ieee")


def _precision(x: torch.Tensor, allow_tf32: bool) -> str:
    # TF32 only for float32 on a GPU with the switch on; the interpreter computes plain fp32.
    if x.dtype != torch.float32 or not x.is_cuda or interpreting():
        return "ieee"
    return "tf32" if allow_tf32 else FP32_DOT


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr
# functions, a few microseconds of argument unwrapping per call on the launch path.
def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _pow2(value: int, low: int, high: int) -> int:
    """The power of two >= value, clamped to [low, high]."""
    return max(low, min(high, 1 << (max(int(value), 1) - 1).bit_length()))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uses_parity_path(x: torch.Tensor, weight: torch.Tensor, config) -> bool:
    return (
        config.is_parity_fast_path
        and x.dtype != torch.float64
        and weight.shape[0] <= FAST_MAX_IN_CHANNELS
        and weight.shape[1] <= FAST_MAX_OUT_CHANNELS
    )


def _device_of(x: torch.Tensor):
    """Triton launches on torch's current device: make it x's (and so use its current stream)."""
    if _on_gpu(x) and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and not interpreting()


def _general_blocks(x: torch.Tensor, k_total: int, c_out: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_K, BLOCK_CO, num_warps) for the general forward / dz kernels.

    The interpreter pays per operation, not per element: it gets the widest tiles. The fp64
    FMA reduction materialises a [P, K, CO] product: small tiles on a GPU.
    """
    if not _on_gpu(x):
        if x.dtype == torch.float64:
            return 64, _pow2(k_total, 16, 256), _pow2(c_out, 16, 64), 4
        return 128, _pow2(k_total, 16, 1024), _pow2(c_out, 16, 64), 4
    if x.dtype == torch.float64:
        return 32, 8, _pow2(c_out, 1, 16), 4
    return 64, 32, _pow2(c_out, 16, 64), 4


def _dx_blocks(x: torch.Tensor, c_in: int, k_total: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_CI, BLOCK_K, num_warps) for the dx kernel (K = taps x C_out)."""
    if not _on_gpu(x):
        if x.dtype == torch.float64:
            return 64, _pow2(c_in, 16, 64), _pow2(k_total, 16, 256), 4
        return 128, _pow2(c_in, 16, 64), _pow2(k_total, 16, 1024), 4
    if x.dtype == torch.float64:
        return 32, _pow2(c_in, 1, 16), 8, 4
    return 64, _pow2(c_in, 16, 32), 32, 4


def _dw_blocks(x: torch.Tensor, c_in: int, k_total: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_CI, BLOCK_K, num_warps) for the dw kernel (K = taps x C_out)."""
    if not _on_gpu(x):
        if x.dtype == torch.float64:
            return 64, _pow2(c_in, 1, 64), _pow2(k_total, 16, 256), 4
        return 256, _pow2(c_in, 16, 64), _pow2(k_total, 16, 1024), 4
    if x.dtype == torch.float64:
        return 8, _pow2(c_in, 1, 16), 32, 4
    return 32, _pow2(c_in, 16, 32), 64, 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(x: torch.Tensor) -> int:
    if x.is_cuda and not interpreting():
        return _sm_count(x.device.index if x.device.index is not None else 0)
    return 2


def _persistent_grid(x: torch.Tensor, positions: int, per_sm: int):
    """Grid of a persistent parity kernel: at most ``per_sm`` programs per SM (the weight
    tiles are loaded once per program), never more than there are blocks."""
    programs = _num_sms(x) * per_sm if _on_gpu(x) else 2
    return lambda meta: (max(1, min(programs, _cdiv(positions, meta["BLOCK_M"]))),)


# --------------------------------------------------------------------------- autotuned kernels

_PARITY_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=1)
    for bm in (64, 128)
    for nw in (4, 8)
]
# The winner kernel compiles slowly (27 taps): few candidates.
_PARITY_WINNER_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=4, num_stages=1) for bm in (32, 64)
]
# dweight's one dot per block has a [128, 256] accumulator at 16 x 32 channels: 8 warps. On the
# H100 (one 4-image chunk, see the triton NOTES) BLOCK_M 64 took 57 us, 32 took 63 us, 4 warps
# twice as long, and more stages were slower.
_PARITY_DW_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=8, num_stages=1) for bm in (32, 64)
]
_PARITY_DX_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=nw, num_stages=1)
    for bm in (64, 128)
    for nw in (4, 8)
]
_DX_CONFIGS = [
    triton.Config({"BLOCK_I": bi, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bi in (64, 128)
    for bk in (32, 64)
    for nw in (4, 8)
    for ns in (2, 3)
]
_SHAPE_KEY = ["C_in", "C_out", "D", "H", "W", "PRECISION"]

parity_forward_tuned = triton.autotune(
    _PARITY_FORWARD_CONFIGS, key=["N", *_SHAPE_KEY, "HAS_BIAS"]
)(parity_kernels.parity_forward_kernel)
# ACCUMULATE is left out of the backward kernels' keys: a chunk after the first adds to the
# partials, so it must never time candidates on them (see _launch_tuned's ``tune``).
parity_winner_tuned = triton.autotune(
    _PARITY_WINNER_CONFIGS, key=["N", *_SHAPE_KEY, "HAS_BIAS", "STORE_DZ"]
)(parity_kernels.parity_winner_kernel)
parity_dw_tuned = triton.autotune(
    _PARITY_DW_CONFIGS, key=["N", *_SHAPE_KEY]
)(parity_kernels.parity_dw_kernel)
parity_dx_tuned = triton.autotune(
    _PARITY_DX_CONFIGS, key=["N", *_SHAPE_KEY]
)(parity_kernels.parity_dx_kernel)
dx_tuned = triton.autotune(
    _DX_CONFIGS, key=["I_total", *_SHAPE_KEY, "KD", "KH", "KW", "SD", "SH", "SW"]
)(kernels.general_dx_kernel)


def _capturing() -> bool:
    return (not torch.compiler.is_compiling()) and torch.cuda.is_current_stream_capturing()


#: Problems with fewer positions than this are launch-bound: a fixed config, no autotuning.
AUTOTUNE_MIN_POSITIONS = 1 << 16


#: Tuned config per autotuned kernel and call: see :func:`_tuning_key`.
_tuned_configs: dict = {}
#: Constexprs that do not change which config is best; ACCUMULATE must not (see below).
_UNTUNED_KWARGS = frozenset({"ACCUMULATE"})


def _tuning_key(tuned, args: tuple, kwargs: dict, x: torch.Tensor) -> tuple:
    """Every scalar argument and constexpr (ACCUMULATE aside) and every tensor's dtype: at
    least as fine as the autotuner's own key, so no call reuses a config tuned for another
    shape."""
    scalars = tuple(a if not isinstance(a, torch.Tensor) else a.dtype for a in args)
    constexprs = tuple((k, v) for k, v in kwargs.items() if k not in _UNTUNED_KWARGS)
    return tuned, x.device.index, scalars, constexprs


def _launch_config(kernel, grid_fn, args: tuple, kwargs: dict, config: triton.Config) -> None:
    meta = {**kwargs, **config.all_kwargs()}
    launch(kernel, grid_fn(meta), args, meta)


def _launch_tuned(tuned, grid_fn, args: tuple, kwargs: dict, x: torch.Tensor,
                  fallback: triton.Config, tune: bool = True) -> None:
    """Launch an autotuned kernel; with one fixed config where autotuning cannot run.

    Triton's autotuner times the candidates on the first call of a key (host syncs), then
    the config it picked is kept here and later calls launch it directly (the autotuner's
    per-call Python doubled the launch's host time). Autotuning is impossible under the
    interpreter (and pointless there) and inside CUDA-graph capture: there the config tuned by
    the warm-up call is reused, so nothing new is compiled inside the capture, or the fixed
    ``fallback`` runs. So it is with ``tune=False``, for launches that add to their outputs
    (timing candidates would add several times): they take the config tuned for the same key.
    """
    if not _on_gpu(x) or x.numel() // max(1, x.shape[1]) < AUTOTUNE_MIN_POSITIONS:
        _launch_config(tuned.fn, grid_fn, args, kwargs, fallback)
        return
    if wrap_triton(tuned) is not tuned:
        # Traced by torch.compile: the compiler launches (and tunes) the autotuned kernel.
        if tune:
            wrap_triton(tuned)[grid_fn](*args, **kwargs)
        else:
            _launch_config(tuned.fn, grid_fn, args, kwargs, tuned.best_config or fallback)
        return
    key = _tuning_key(tuned, args, kwargs, x)
    config = _tuned_configs.get(key)
    if config is None and tune and not _capturing():
        tuned[grid_fn](*args, **kwargs)
        _tuned_configs[key] = tuned.best_config
        return
    _launch_config(tuned.fn, grid_fn, args, kwargs, config or fallback)


# --------------------------------------------------------------------------- forward


def triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    negative_slope: float,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused3d_triton::forward``: (y, window_index), ONE kernel launch."""
    with _device_of(x):
        return _forward(x, weight, bias, multiplier, stride, padding, output_padding,
                        negative_slope, allow_tf32)


def _forward(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope,
             allow_tf32):
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    y, window_index = empty_outputs(x, weight, stride, padding, output_padding)
    if y.numel() == 0:
        return y, window_index
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    has_bias = bias is not None
    bias_arg = bias if has_bias else multiplier
    m_stride = 0 if multiplier.numel() == 1 else 1
    precision = _precision(x, allow_tf32)
    slope = float(negative_slope)

    if _uses_parity_path(x, weight, config):
        block_ci, block_co = _pow2(c_in, 16, 32), _pow2(c_out, 16, 64)
        args = (x, weight, bias_arg, multiplier, y, window_index, n, c_in, c_out, d, h, w,
                m_stride, slope)
        _launch_tuned(
            parity_forward_tuned, _persistent_grid(x, n * d * h * w, 2), args,
            {"HAS_BIAS": has_bias, "PRECISION": precision, "BLOCK_CI": block_ci,
             "BLOCK_CO": block_co},
            x, triton.Config({"BLOCK_M": 64 if _on_gpu(x) else 128}, num_warps=4),
        )
        return y, window_index

    dp, hp, wp = y.shape[2:]
    p_total = n * dp * hp * wp
    taps = config.kernel_size[0] * config.kernel_size[1] * config.kernel_size[2]
    block_p, block_k, block_co, warps = _general_blocks(x, taps * c_in, c_out)
    grid = (_cdiv(p_total, block_p), _cdiv(c_out, block_co))
    launch(
        kernels.general_forward_kernel, grid,
        (x, weight, bias_arg, multiplier, y, window_index,
         p_total, c_in, c_out, d, h, w, dp, hp, wp, *config.kernel_size, *config.stride,
         *config.padding, m_stride, slope, _slope_pointer(negative_slope, x, multiplier)),
        {"HAS_BIAS": has_bias, "IS_FP64": x.dtype == torch.float64, "PRECISION": precision,
         "BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_CO": block_co, "num_warps": warps},
    )
    return y, window_index


# --------------------------------------------------------------------------- backward


def _launch_dx(dz, window_index, weight, dx, config, precision, is_fp64):
    n, c_in, d, h, w = dx.shape
    c_out = weight.shape[1]
    dp, hp, wp = window_index.shape[2:]
    i_total = n * d * h * w
    taps = config.kernel_size[0] * config.kernel_size[1] * config.kernel_size[2]
    block_i, block_ci, block_k, warps = _dx_blocks(dx, c_in, taps * c_out)
    args = (dz, window_index, weight, dx, i_total, c_in, c_out, d, h, w, dp, hp, wp,
            *config.kernel_size, *config.stride, *config.padding)

    def grid_fn(meta):
        return _cdiv(i_total, meta["BLOCK_I"]), _cdiv(c_in, block_ci)

    if is_fp64:
        launch(
            kernels.general_dx_kernel, grid_fn({"BLOCK_I": block_i}), args,
            {"IS_FP64": True, "PRECISION": precision, "BLOCK_I": block_i, "BLOCK_CI": block_ci,
             "BLOCK_K": block_k, "num_warps": warps},
        )
        return
    _launch_tuned(
        dx_tuned, grid_fn, args, {"IS_FP64": False, "PRECISION": precision, "BLOCK_CI": block_ci},
        dx, triton.Config({"BLOCK_I": block_i, "BLOCK_K": block_k}, num_warps=warps),
    )


def _launch_general_dw(dz, window_index, x, dw_shape, config, precision, is_fp64):
    n, c_in, d, h, w = x.shape
    c_out = dw_shape[1]
    dp, hp, wp = window_index.shape[2:]
    i_total = n * d * h * w
    taps = config.kernel_size[0] * config.kernel_size[1] * config.kernel_size[2]
    block_i, block_ci, block_k, warps = _dw_blocks(x, c_in, taps * c_out)
    tiles = _cdiv(taps * c_out, block_k) * _cdiv(c_in, block_ci)
    if _on_gpu(x):
        chunks = max(1, min(_cdiv(i_total, 4 * block_i), 4 * _num_sms(x) // tiles))
    else:
        chunks = 1
    i_chunk = _cdiv(_cdiv(i_total, chunks), block_i) * block_i
    chunks = _cdiv(i_total, i_chunk)
    partials = x.new_empty((chunks, c_in, c_out, taps), dtype=dz.dtype)
    grid = (_cdiv(taps * c_out, block_k), chunks, _cdiv(c_in, block_ci))
    launch(
        kernels.general_dw_kernel, grid,
        (dz, window_index, x, partials, i_total, i_chunk, c_in, c_out, d, h, w, dp, hp, wp,
         *config.kernel_size, *config.stride, *config.padding),
        {"IS_FP64": is_fp64, "PRECISION": precision, "BLOCK_I": block_i, "BLOCK_CI": block_ci,
         "BLOCK_K": block_k, "num_warps": warps},
    )
    # Fixed-order reduction over chunks: deterministic.
    return partials.sum(dim=0).reshape(dw_shape)


def triton_backward(
    grad_y: torch.Tensor,
    y: torch.Tensor,
    window_index: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    multiplier: torch.Tensor,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    negative_slope: float,
    allow_tf32: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused3d_triton::backward``: (dx, dweight, dbias, dmultiplier); unwanted ones empty.

    The fast path reads the saved ``y`` (registered with ``saves_output``) for each winner's
    dz; the general path recomputes z and ignores it.
    """
    with _device_of(x):
        grads = _backward(grad_y, y, window_index, x, weight, bias, multiplier, stride, padding,
                          output_padding, negative_slope, allow_tf32, output_mask)
    # The gradients the mask did not ask for (None here) become the schema's empty placeholders.
    likes = (x, weight, bias if bias is not None else x, multiplier)
    return tuple(  # type: ignore[return-value]
        skipped_grad(like) if grad is None else grad
        for grad, like in zip(grads, likes, strict=True)
    )


def _backward(grad_y, y, window_index, x, weight, bias, multiplier, stride, padding,
              output_padding, negative_slope, allow_tf32, output_mask):
    want_x, want_weight, want_bias, want_multiplier = output_mask
    want_bias = bool(want_bias) and bias is not None
    config = config_from_op_args(weight, stride, padding, output_padding, negative_slope)
    dx = dweight = dbias = dmultiplier = None
    if not (want_x or want_weight or want_bias or want_multiplier):
        return dx, dweight, dbias, dmultiplier

    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    compute = _compute_dtype(x.dtype)
    if window_index.numel() == 0 or x.numel() == 0:
        # No window (batch 0, or a conv output under 2 wide): every gradient is zero.
        if want_x:
            dx = torch.zeros_like(x)
        if want_weight:
            dweight = torch.zeros_like(weight)
        if want_bias:
            dbias = torch.zeros_like(bias)
        if want_multiplier:
            dmultiplier = torch.zeros_like(multiplier)
        return dx, dweight, dbias, dmultiplier

    has_bias = bias is not None
    bias_arg = bias if has_bias else multiplier
    m_stride = 0 if multiplier.numel() == 1 else 1
    precision = _precision(x, allow_tf32)
    slope = float(negative_slope)
    is_fp64 = x.dtype == torch.float64

    if _uses_parity_path(x, weight, config):
        dx, dweight, db_partials, dm_partials = _parity_backward(
            grad_y, y, window_index, x, weight, bias_arg, has_bias, multiplier, m_stride, slope,
            precision, want_x, want_weight)
    else:
        dz = torch.empty(window_index.shape, dtype=compute, device=x.device)
        dp, hp, wp = window_index.shape[2:]
        p_total = n * dp * hp * wp
        taps = config.kernel_size[0] * config.kernel_size[1] * config.kernel_size[2]
        block_p, block_k, block_co, warps = _general_blocks(x, taps * c_in, c_out)
        grid = (_cdiv(p_total, block_p), _cdiv(c_out, block_co))
        db_partials = x.new_zeros((grid[0], c_out), dtype=compute)
        dm_partials = x.new_zeros((grid[0], c_out), dtype=compute)
        launch(
            kernels.general_dz_kernel, grid,
            (grad_y, window_index, x, weight, bias_arg, multiplier, dz, db_partials,
             dm_partials, p_total, c_in, c_out, d, h, w, dp, hp, wp, *config.kernel_size,
             *config.stride, *config.padding, m_stride, slope,
             _slope_pointer(negative_slope, x, multiplier)),
            {"HAS_BIAS": has_bias, "IS_FP64": is_fp64, "PRECISION": precision,
             "BLOCK_P": block_p, "BLOCK_K": block_k, "BLOCK_CO": block_co, "num_warps": warps},
        )
        if want_weight:
            dweight = _launch_general_dw(
                dz, window_index, x, weight.shape, config, precision, is_fp64
            ).to(weight.dtype)
        if want_x:
            dx = torch.empty_like(x)
            _launch_dx(dz, window_index, weight, dx, config, precision, is_fp64)
    # Channel partials: summed over their slots in a fixed order (deterministic).
    if want_bias:
        dbias = finish_channel_grad(db_partials.sum(dim=0), bias)
    if want_multiplier:
        dmultiplier = finish_channel_grad(dm_partials.sum(dim=0), multiplier)
    return dx, dweight, dbias, dmultiplier


#: The parity backward runs over batch chunks whose fp32 dz scratch is at most this many bytes
#: (the benchmark problem: 2 chunks of 8 images), so that a training step's extra memory stays
#: under DESIGN's 80 MiB (y, the index, dx and the whole batch's dz took 95 MiB).
#: Each chunk costs three launches of host time. On the H100, before the short launch path
#: (_fast_launch), 16 MiB chunks gave an eager step of 1.77 ms and a 63 MiB peak, 8 MiB chunks
#: 2.66 ms and 55 MiB (CUDA graphs: 0.76 vs 0.82 ms). The environment variable exists for
#: tests (1: one image per chunk).
BACKWARD_CHUNK_BYTES = int(os.environ.get("FUSED3D_TRITON_BACKWARD_CHUNK_BYTES", str(16 << 20)))

#: y settles the derivative only for a slope in this range (see parity_kernels._dz_from_output:
#: slope * slope * m must stay a normal number for every m the kernel trusts).
_DZ_FROM_Y_SLOPES = (2.0**-10, 2.0**10)


def _parity_backward(grad_y, y, window_index, x, weight, bias_arg, has_bias, multiplier,
                     m_stride, slope, precision, want_x, want_weight):
    """The fast-path backward: (dx, dweight, dbias partials, dmultiplier partials).

    Per chunk of images: ``parity_dz_kernel`` turns grad_y and y into each winner's dz
    (elementwise) with the dbias / dmultiplier partials (without a usable y,
    ``parity_winner_kernel`` recomputes the conv instead); ``parity_dw_kernel`` adds the
    dweight partials and ``parity_dx_kernel`` gathers dx, both from that dz. Partials live in
    one slot per persistent program, added to chunk after chunk and summed over the slots at
    the end: a fixed order, deterministic.
    """
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[1]
    spatial = d * h * w
    on_gpu = _on_gpu(x)
    # Half types: the backward's dots take fp32 dz (rounded to TF32), x and w (exact in TF32).
    grad_precision = "tf32" if (x.dtype != torch.float32 and on_gpu) else precision
    from_y = y is not None and _DZ_FROM_Y_SLOPES[0] <= slope <= _DZ_FROM_Y_SLOPES[1]
    chunk = max(1, min(n, BACKWARD_CHUNK_BYTES // max(1, 4 * c_out * spatial)))
    block_ci, block_co = _pow2(c_in, 16, 32), _pow2(c_out, 16, 64)
    blocks = {"BLOCK_CI": block_ci, "BLOCK_CO": block_co}
    # Slots of partials: one per persistent program. The elementwise dz kernel runs several
    # programs per SM to keep enough loads in flight.
    channel_slots = _num_sms(x) * (4 if from_y and on_gpu else 1)
    weight_slots = _num_sms(x)
    store_dz = want_x or want_weight
    # One fp32 workspace holds the chunk's dz and every partial (one allocation instead of
    # four: each costs host time). Segments start 128 bytes apart, so pointers stay aligned.
    dz_size = chunk * c_out * spatial if store_dz else 0
    dw_size = weight_slots * 27 * c_in * c_out if want_weight else 0
    channel_size = channel_slots * c_out
    offsets = list(itertools.accumulate(
        (_cdiv(size, 32) * 32 for size in (dz_size, dw_size, channel_size, channel_size)),
        initial=0))
    workspace = torch.empty(offsets[-1], dtype=torch.float32, device=x.device)
    dz = workspace if store_dz else grad_y  # its first dz_size elements
    # dweight partials as [slot, C_in, C_out, tap] over the kernel's [slot, tap, C_in, C_out]
    # layout: the slot sum comes out in the weight's own layout.
    dw_partials = workspace.as_strided(
        (weight_slots, c_in, c_out, 27), (27 * c_in * c_out, c_out, 1, c_in * c_out),
        offsets[1]) if want_weight else grad_y
    db_partials = workspace.as_strided((channel_slots, c_out), (c_out, 1), offsets[2])
    dm_partials = workspace.as_strided((channel_slots, c_out), (c_out, 1), offsets[3])
    dx = torch.empty_like(x) if want_x else None
    # dx reads the taps transposed, [27, C_out, C_in] (55 KB at 16 x 32: stays in L1).
    weight_t = weight.permute(2, 3, 4, 1, 0).reshape(27, c_out, c_in).contiguous() if (
        want_x) else weight
    y_min_normal = 6.103515625e-05 if x.dtype == torch.float16 else 1.1754943508222875e-38
    # Fixed configs below (small problems, the interpreter, capture without a tuned config) run
    # one stage: Triton's default of 3 multi-buffers the unrolled taps' operands, and the dx
    # kernel then asked for 244 KB of shared memory on the H100 (over its 227 KB).

    for n0 in range(0, n, chunk):
        images = slice(n0, min(n, n0 + chunk))
        count = images.stop - n0
        x_c, gy_c, idx_c = x[images], grad_y[images], window_index[images]
        accumulate = n0 > 0
        if from_y:
            launch(
                parity_kernels.parity_dz_kernel, (channel_slots,),
                (gy_c, y[images], idx_c, x_c, weight, bias_arg, multiplier, dz, db_partials,
                 dm_partials, count, c_in, c_out, d, h, w, m_stride, slope),
                {"HAS_BIAS": has_bias, "STORE_DZ": store_dz, "ACCUMULATE": accumulate,
                 "Y_MIN_NORMAL": y_min_normal, "BLOCK_M": 128 if on_gpu else 64,
                 "BLOCK_CO": block_co, "num_warps": 4},
            )
        else:
            _launch_tuned(
                parity_winner_tuned, lambda meta: (channel_slots,),
                (gy_c, idx_c, x_c, weight, bias_arg, multiplier, dz, db_partials, dm_partials,
                 count, c_in, c_out, d, h, w, m_stride, slope),
                {"HAS_BIAS": has_bias, "STORE_DZ": store_dz, "ACCUMULATE": accumulate,
                 "PRECISION": precision, **blocks},
                x, triton.Config({"BLOCK_M": 32 if on_gpu else 64}, num_warps=4, num_stages=1),
                tune=not accumulate,
            )
        if want_weight:
            _launch_tuned(
                parity_dw_tuned, lambda meta: (weight_slots,),
                (dz, idx_c, x_c, dw_partials, count, c_in, c_out, d, h, w),
                {"ACCUMULATE": accumulate, "PRECISION": grad_precision, **blocks},
                x, triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=1),
                tune=not accumulate,
            )
        if want_x:
            _launch_tuned(
                parity_dx_tuned, _persistent_grid(x, count * spatial, 4),
                (dz, idx_c, weight_t, dx[images], count, c_in, c_out, d, h, w),
                {"PRECISION": grad_precision, **blocks},
                x, triton.Config({"BLOCK_M": 64 if on_gpu else 128}, num_warps=4, num_stages=1),
            )
    dweight = None
    if want_weight:
        dweight = dw_partials.sum(dim=0).reshape(weight.shape).to(weight.dtype)
    return dx, dweight, db_partials, dm_partials
