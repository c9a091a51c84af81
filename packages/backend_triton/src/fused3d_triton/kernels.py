"""Triton kernels of the fused block (forward and backward).

Layouts (all contiguous, row-major):
  x       (N, C_in, D, H, W)            weight (C_in, C_out, KD, KH, KW)
  y, idx  (N, C_out, Dp, Hp, Wp)        dz     (N, C_out, Dp, Hp, Wp), compute dtype
``dz`` is the gradient of the conv output at each window's winner (pooled-size, never
conv-size); with the window index it is the sparse conv-output gradient.

Two families:
* ``general_*``: any kernel/stride/padding/output_padding. Each program owns a tile of pooled
  positions x output channels and loops over the 8 window positions and all kernel taps, with
  masks for taps that do not land on an input (an implicit GEMM with a gathered A operand).
* the fast path (kernel 3, stride 2, padding 1, output_padding 1) lives in
  :mod:`fused3d_triton.parity_kernels` (generated, unrolled over the 27 taps).

float64 has no tensor-core dot: ``IS_FP64`` switches every product to an fp64 FMA reduction.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton 3.6's interpreter computes bfloat16 dots wrongly: there, every dot runs on operands
# upcast to float32 (exact for fp16/bf16 products, so the result is what the GPU computes).
_INTERPRETER_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# --------------------------------------------------------------------------- helpers


@triton.jit
def _slope(negative_slope, slope_ptr, IS_FP64: tl.constexpr):
    # float64 reads the slope from a one-element float64 tensor: a float argument is rounded
    # to float32, and an int64 bit pattern breaks torch.compile (inductor's 32-bit check fails
    # on ints above 2**31). The other dtypes compute in float32, as PyTorch's leaky_relu does.
    if IS_FP64:
        slope = tl.load(slope_ptr)
    else:
        slope = tl.full((), negative_slope, tl.float32)
    return slope


@triton.jit
def _leaky(t, slope):
    return tl.where(t > 0, t, t * slope)


@triton.jit
def _leaky_grad(t, slope):
    # d leaky / dt with PyTorch's choice at t == 0 (the negative side).
    return tl.where(t > 0, 1.0, slope).to(t.dtype)


@triton.jit
def _round_tf32(v):
    """fp32 rounded to the nearest TF32 value, ties away from zero (PTX cvt.rna.tf32.f32).

    Hopper's tensor cores read only the top 19 bits of an fp32 operand, i.e. truncate it;
    cuDNN and the other backends round. Truncation errs in one direction, so on inputs whose
    products share a sign it doubles the error (seen on the H100: 2.8e-3 against 7e-4).
    Adding half a TF32 unit to the magnitude and clearing the low 13 bits rounds; inf and
    NaN (exponent all ones) are passed through untouched.
    """
    bits = v.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    rounded = ((magnitude + 0x1000) & 0x7FFFE000) | (bits & 0x80000000)
    special = (bits & 0x7F800000) == 0x7F800000
    return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)


@triton.jit
def _as_tf32(v, PRECISION: tl.constexpr):
    """v rounded to TF32 when the dots run in TF32 and v is fp32 (else v itself). Round each
    operand once, where it is loaded or made, not at every dot that reads it."""
    if PRECISION == "tf32":
        if v.dtype == tl.float32:
            v = _round_tf32(v)
    return v


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (acc may be None). With PRECISION "tf32", fp32
    operands must come through _as_tf32 first: the tensor cores would truncate them."""
    if _INTERPRETER_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _mma(acc, a, b, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b: tensor cores for fp32/fp16/bf16, an exact FMA reduction for fp64."""
    if IS_FP64:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        acc = _dot(_as_tf32(a, PRECISION), _as_tf32(b, PRECISION), acc, PRECISION)
    return acc


@triton.jit
def _compute_zeros(BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, IS_FP64: tl.constexpr):
    if IS_FP64:
        out = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float64)
    else:
        out = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    return out


@triton.jit
def _channel_params(b_ptr, m_ptr, offs_co, co_mask, m_stride, like, HAS_BIAS: tl.constexpr):
    """(bias, multiplier) for a block of output channels, in the dtype of ``like``."""
    mult = tl.load(m_ptr + offs_co * m_stride, mask=co_mask, other=0.0).to(like.dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_co, mask=co_mask, other=0.0).to(like.dtype)
    else:
        bias = tl.zeros_like(mult)
    return bias, mult


# --------------------------------------------------------------------------- general path


@triton.jit
def _general_window_z(
    x_ptr, w_ptr, x_base, pd, ph, pw, p_mask, offs_co, co_mask,
    C_in, C_out, D, H, W, KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
    WD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Conv-transpose output (no bias) at window position (WD, WH, WW) of each pooled position.

    An implicit GEMM over K = (tap, ci), gathered on the fly: output o receives input i through
    tap k when o = i*s - pad + k, i.e. i = (o + pad - k) / s is an integer inside the input.
    """
    od = 2 * pd + WD
    oh = 2 * ph + WH
    ow = 2 * pw + WW
    spatial = D * H * W
    taps = KD * KH * KW
    acc = _compute_zeros(BLOCK_P, BLOCK_CO, IS_FP64)
    for k0 in range(0, taps * C_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < taps * C_in
        tap = kk // C_in
        ci = kk - tap * C_in
        kd = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        td = od[:, None] + PAD_D - kd[None, :]
        th = oh[:, None] + PAD_H - kh[None, :]
        tw = ow[:, None] + PAD_W - kw[None, :]
        id_ = td // SD
        ih = th // SH
        iw = tw // SW
        valid = (
            (p_mask[:, None] & k_mask[None, :])
            & (td >= 0) & (td - id_ * SD == 0) & (id_ < D)
            & (th >= 0) & (th - ih * SH == 0) & (ih < H)
            & (tw >= 0) & (tw - iw * SW == 0) & (iw < W)
        )
        position = tl.where(valid, (id_ * H + ih) * W + iw, 0)
        a = tl.load(x_ptr + x_base[:, None] + (ci * spatial)[None, :] + position,
                    mask=valid, other=0.0)
        b = tl.load(
            w_ptr + (ci * (C_out * taps) + tap)[:, None] + offs_co[None, :] * taps,
            mask=k_mask[:, None] & co_mask[None, :], other=0.0,
        )
        if IS_FP64:
            # Mask the products, not only the operand: a NaN/inf weight at a tap this output
            # does not use must not reach it (0 * NaN = NaN). The tensor-core paths cannot
            # do this; see README.
            acc += tl.sum(tl.where(valid[:, :, None], a[:, :, None] * b[None, :, :], 0.0),
                          axis=1)
        else:
            acc = _dot(_as_tf32(a, PRECISION), _as_tf32(b, PRECISION), acc, PRECISION)
    return acc


@triton.jit
def general_forward_kernel(
    x_ptr, w_ptr, b_ptr, m_ptr, y_ptr, idx_ptr,
    P_total, C_in, C_out, D, H, W, Dp, Hp, Wp,
    KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
    m_stride, negative_slope, slope_ptr,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P_total
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_out
    pooled = Dp * Hp * Wp
    n = offs_p // pooled
    s = offs_p - n * pooled
    pd = s // (Hp * Wp)
    ph = (s // Wp) % Hp
    pw = s % Wp
    n64 = n.to(tl.int64)
    x_base = n64 * C_in * (D * H * W)
    slope = _slope(negative_slope, slope_ptr, IS_FP64)
    bias, mult = _channel_params(b_ptr, m_ptr, offs_co, co_mask, m_stride, slope, HAS_BIAS)

    # Max-pool scan in index order (d, h, w) with PyTorch's rule: update when best < v or
    # isnan(v). Starting from (-inf, 0) gives the same result as starting from window 0.
    best = _compute_zeros(BLOCK_P, BLOCK_CO, IS_FP64) - float("inf")
    best_index = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.int32)
    for c in tl.static_range(8):
        z = _general_window_z(
            x_ptr, w_ptr, x_base, pd, ph, pw, p_mask, offs_co, co_mask,
            C_in, C_out, D, H, W, KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
            (c >> 2) & 1, (c >> 1) & 1, c & 1,
            IS_FP64, PRECISION, BLOCK_P, BLOCK_K, BLOCK_CO,
        )
        z = z + bias[None, :]
        value = _leaky(mult[None, :] * _leaky(z, slope), slope)
        update = (best < value) | (value != value)
        best = tl.where(update, value, best)
        best_index = tl.where(update, c, best_index)

    out = (n64 * C_out * pooled + s)[:, None] + offs_co[None, :] * pooled
    mask = p_mask[:, None] & co_mask[None, :]
    tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + out, best_index.to(tl.uint8), mask=mask)


@triton.jit
def general_dz_kernel(
    gy_ptr, idx_ptr, x_ptr, w_ptr, b_ptr, m_ptr, dz_ptr, db_part_ptr, dm_part_ptr,
    P_total, C_in, C_out, D, H, W, Dp, Hp, Wp,
    KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
    m_stride, negative_slope, slope_ptr,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """dz (conv-output gradient at each winner) plus per-program dbias / dmultiplier partials.

    Recomputes the conv value z of every window position and keeps the winner's:
    u = leaky(z), v = m*u, y = leaky(v);  dz = g*leaky'(v)*m*leaky'(z),  dm = g*leaky'(v)*u.
    """
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P_total
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_out
    pooled = Dp * Hp * Wp
    n = offs_p // pooled
    s = offs_p - n * pooled
    pd = s // (Hp * Wp)
    ph = (s // Wp) % Hp
    pw = s % Wp
    n64 = n.to(tl.int64)
    x_base = n64 * C_in * (D * H * W)
    slope = _slope(negative_slope, slope_ptr, IS_FP64)
    bias, mult = _channel_params(b_ptr, m_ptr, offs_co, co_mask, m_stride, slope, HAS_BIAS)

    out = (n64 * C_out * pooled + s)[:, None] + offs_co[None, :] * pooled
    mask = p_mask[:, None] & co_mask[None, :]
    g = tl.load(gy_ptr + out, mask=mask, other=0.0).to(slope.dtype)
    winner = tl.load(idx_ptr + out, mask=mask, other=8).to(tl.int32)

    dz = _compute_zeros(BLOCK_P, BLOCK_CO, IS_FP64)
    dm = _compute_zeros(BLOCK_P, BLOCK_CO, IS_FP64)
    for c in tl.static_range(8):
        z = _general_window_z(
            x_ptr, w_ptr, x_base, pd, ph, pw, p_mask, offs_co, co_mask,
            C_in, C_out, D, H, W, KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
            (c >> 2) & 1, (c >> 1) & 1, c & 1,
            IS_FP64, PRECISION, BLOCK_P, BLOCK_K, BLOCK_CO,
        )
        z = z + bias[None, :]
        inner = _leaky(z, slope)
        g_outer = tl.where(winner == c, g * _leaky_grad(mult[None, :] * inner, slope), 0.0)
        dz += g_outer * mult[None, :] * _leaky_grad(z, slope)
        dm += g_outer * inner
    tl.store(dz_ptr + out, dz, mask=mask)
    tl.store(db_part_ptr + pid_p * C_out + offs_co, tl.sum(dz, axis=0), mask=co_mask)
    tl.store(dm_part_ptr + pid_p * C_out + offs_co, tl.sum(dm, axis=0), mask=co_mask)


@triton.jit
def _sparse_grad_at(
    dz_ptr, idx_ptr, i_d, i_h, i_w, i_mask, dz_base, co, tap, k_mask,
    KH, KW, Dp, Hp, Wp, SD, SH, SW, PAD_D, PAD_H, PAD_W,
):
    """[BLOCK_I, BLOCK_K] conv-output gradient at o = i*s - pad + k for K = (tap, co): dz of
    the pool window holding o where o is that window's winner, else 0 (and 0 outside every
    window: the cropped odd edge)."""
    kd = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    od = i_d[:, None] * SD - PAD_D + kd[None, :]
    oh = i_h[:, None] * SH - PAD_H + kh[None, :]
    ow = i_w[:, None] * SW - PAD_W + kw[None, :]
    valid = (
        (i_mask[:, None] & k_mask[None, :])
        & (od >= 0) & (od < 2 * Dp) & (oh >= 0) & (oh < 2 * Hp) & (ow >= 0) & (ow < 2 * Wp)
    )
    od = tl.where(valid, od, 0)
    oh = tl.where(valid, oh, 0)
    ow = tl.where(valid, ow, 0)
    code = (od % 2) * 4 + (oh % 2) * 2 + (ow % 2)
    position = ((od // 2) * Hp + oh // 2) * Wp + ow // 2
    offsets = dz_base[:, None] + position + (co * (Dp * Hp * Wp))[None, :]
    grad = tl.load(dz_ptr + offsets, mask=valid, other=0.0)
    winner = tl.load(idx_ptr + offsets, mask=valid, other=8).to(tl.int32)
    return tl.where(winner == code, grad, 0.0)


@triton.jit
def general_dx_kernel(
    dz_ptr, idx_ptr, w_ptr, dx_ptr,
    I_total, C_in, C_out, D, H, W, Dp, Hp, Wp,
    KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = the adjoint of the conv-transpose (a plain convolution) applied to the sparse dz:
    dx[i, ci] = sum over K = (tap k, co) of dzconv[i*s - pad + k, co] * w[ci, co, k]."""
    pid_i = tl.program_id(0)
    pid_ci = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < I_total
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < C_in
    spatial = D * H * W
    n = offs_i // spatial
    s = offs_i - n * spatial
    i_d = s // (H * W)
    i_h = (s // W) % H
    i_w = s % W
    n64 = n.to(tl.int64)
    dz_base = n64 * C_out * (Dp * Hp * Wp)
    taps = KD * KH * KW
    acc = _compute_zeros(BLOCK_I, BLOCK_CI, IS_FP64)
    for k0 in range(0, taps * C_out, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < taps * C_out
        tap = kk // C_out
        co = kk - tap * C_out
        grad = _sparse_grad_at(
            dz_ptr, idx_ptr, i_d, i_h, i_w, i_mask, dz_base, co, tap, k_mask,
            KH, KW, Dp, Hp, Wp, SD, SH, SW, PAD_D, PAD_H, PAD_W,
        )
        w_t = tl.load(
            w_ptr + offs_ci[None, :] * (C_out * taps) + (co * taps + tap)[:, None],
            mask=ci_mask[None, :] & k_mask[:, None], other=0.0,
        ).to(grad.dtype)
        acc = _mma(acc, grad, w_t, IS_FP64, PRECISION)
    out = (n64 * C_in * spatial + s)[:, None] + offs_ci[None, :] * spatial
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty),
             mask=i_mask[:, None] & ci_mask[None, :])


@triton.jit
def general_dw_kernel(
    dz_ptr, idx_ptr, x_ptr, dw_part_ptr,
    I_total, I_chunk, C_in, C_out, D, H, W, Dp, Hp, Wp,
    KD, KH, KW, SD, SH, SW, PAD_D, PAD_H, PAD_W,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-chunk partial of dw[ci, (tap k, co)] = sum over inputs i of
    x[i, ci] * dzconv[i*s - pad + k, co].

    Grid: (K = (tap, co) tile, chunk of input positions, ci tile). The partials are summed
    afterwards in a fixed order (no atomics: deterministic)."""
    pid_k = tl.program_id(0)
    chunk = tl.program_id(1)
    pid_ci = tl.program_id(2)
    taps = KD * KH * KW
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < C_in
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = kk < taps * C_out
    tap = kk // C_out
    co = kk - tap * C_out
    spatial = D * H * W
    acc = _compute_zeros(BLOCK_CI, BLOCK_K, IS_FP64)
    start = chunk * I_chunk
    stop = tl.minimum(start + I_chunk, I_total)
    for i0 in range(start, stop, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_mask = offs_i < stop
        n = offs_i // spatial
        s = offs_i - n * spatial
        n64 = n.to(tl.int64)
        grad = _sparse_grad_at(
            dz_ptr, idx_ptr, s // (H * W), (s // W) % H, s % W, i_mask,
            n64 * C_out * (Dp * Hp * Wp), co, tap, k_mask,
            KH, KW, Dp, Hp, Wp, SD, SH, SW, PAD_D, PAD_H, PAD_W,
        )
        x_t = tl.load(
            x_ptr + (n64 * C_in * spatial + s)[None, :] + offs_ci[:, None] * spatial,
            mask=ci_mask[:, None] & i_mask[None, :], other=0.0,
        ).to(grad.dtype)
        acc = _mma(acc, x_t, grad, IS_FP64, PRECISION)
    out = chunk * (C_in * C_out * taps) + offs_ci[:, None] * (C_out * taps) \
        + (co * taps + tap)[None, :]
    tl.store(dw_part_ptr + out, acc, mask=ci_mask[:, None] & k_mask[None, :])
