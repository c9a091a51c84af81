// Shared helpers of the fused3d CuPy kernels. Torch-free and header-free: NVRTC compiles
// these with no include path (the Python side inlines this file into each kernel source),
// and nvcc compiles each .cu standalone for the CI resource report.
#pragma once

// Storage types for the half formats: raw 16-bit patterns, converted with PTX so that no
// CUDA header (cuda_fp16.h / cuda_bf16.h) has to be found by NVRTC.
struct half_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half_t v) {
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v.bits));
    return out;
}
__device__ __forceinline__ float to_acc(bf16_t v) {
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <typename T>
struct Store;
template <>
struct Store<float> {
    __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Store<double> {
    __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Store<half_t> {
    __device__ __forceinline__ static half_t from(float v) {
        half_t out;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(v));
        return out;
    }
};
template <>
struct Store<bf16_t> {
    __device__ __forceinline__ static bf16_t from(float v) {
        bf16_t out;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out.bits) : "f"(v));
        return out;
    }
};

// LeakyReLU and its slope exactly as PyTorch: t > 0 ? t : t * slope (the negative side at 0).
template <typename Acc>
__device__ __forceinline__ Acc leaky(Acc t, Acc slope) {
    return t > Acc(0) ? t : t * slope;
}
template <typename Acc>
__device__ __forceinline__ Acc leaky_slope(Acc t, Acc slope) {
    return t > Acc(0) ? Acc(1) : slope;
}

// The block's activation after the conv: leaky(m * leaky(z)).
template <typename Acc>
__device__ __forceinline__ Acc activate(Acc z, Acc m, Acc slope) {
    return leaky(m * leaky(z, slope), slope);
}

// PyTorch's max_pool3d update rule, scanning the window in index order (d, then h, then w):
// take v when `best < v or isnan(v)`. The first maximum wins a tie; the last NaN wins.
template <typename Acc>
__device__ __forceinline__ bool pool_takes(Acc best, Acc v) {
    return best < v || v != v;
}

// TF32 helpers (sm_80+): round-to-nearest conversion and the m16n8k8 tensor-core MMA.
__device__ __forceinline__ unsigned int to_tf32(float v) {
    unsigned int out;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(out) : "f"(v));
    return out;
}

// D (16x8, fp32) += A (16x8, tf32, row-major) * B (8x8, tf32, column-major).
// Fragment layout with g = lane / 4, t = lane % 4:
//   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   b0 = B[t][g], b1 = B[t+4][g]
//   c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
__device__ __forceinline__ void mma_tf32(float (&c)[4], unsigned int a0, unsigned int a1,
                                         unsigned int a2, unsigned int a3, unsigned int b0,
                                         unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Parity split of the kernel-3 / stride-2 / padding-1 / output-padding-1 conv-transpose, per
// axis: output 2m (parity 0) = x[m] * w[1]; output 2m+1 (parity 1) = x[m] * w[2] + x[m+1] * w[0].
// So a parity-p output takes input offset a (0 or 1, x[m + a]) through kernel tap:
__host__ __device__ constexpr int parity_tap(int parity, int offset) {
    return parity == 0 ? 1 : (offset == 0 ? 2 : 0);
}
// Class c = (pd, ph, pw) bits (c = pd*4 + ph*2 + pw, the window index of that output) uses the
// input offset a = (ad, ah, aw) bits iff a only sets bits that c sets.
__host__ __device__ constexpr bool class_uses_offset(int cls, int offset) {
    return (offset & ~cls) == 0;
}
// Flat index kd*9 + kh*3 + kw of the weight tap that class `cls` applies at input offset `offset`.
__host__ __device__ constexpr int class_tap(int cls, int offset) {
    return parity_tap((cls >> 2) & 1, (offset >> 2) & 1) * 9 +
           parity_tap((cls >> 1) & 1, (offset >> 1) & 1) * 3 + parity_tap(cls & 1, offset & 1);
}

// Asynchronous global -> shared staging (cp.async, sm_80+): every copy of a staging loop is in
// flight at once instead of one load round trip per few elements. `valid == false` writes zeros
// (src-size 0: nothing is read; `src` must still be a mapped address). Call stage_wait() and then
// __syncthreads() before the staged data is read. Raw bits are copied: TF32 kernels then feed
// fp32 bit patterns to the tensor cores, which ignore the 13 low mantissa bits (truncation
// instead of round-to-nearest).
template <int BYTES>
__device__ __forceinline__ void stage_async(void* shared_dst, const void* global_src, bool valid) {
    const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(shared_dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(global_src),
                 "n"(BYTES), "r"(valid ? BYTES : 0)
                 : "memory");
}
__device__ __forceinline__ void stage_wait() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Groups, for double buffering: stage_commit() closes the copies issued so far into a group;
// stage_wait_pending<N>() waits until at most N groups are still in flight.
__device__ __forceinline__ void stage_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void stage_wait_pending() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------ persistent tiles
// What the persistent forwards share (parity_forward_tc and parity_forward_ffma in
// parity_forward.cu, parity_forward_wgmma in its own file): a tile is 8 h-lines x 32 w pooled
// positions at one depth of one image, 32 output channels per block; its x halo {tile, tile+1}^3
// is staged as [ci][dd][hh][ww], 2 depths x 9 rows of 33 values, rows 36 floats apart (16-byte
// aligned).
namespace persistent_tile {
constexpr int TH = 8, TW = 32, CO = 32, TAPS = 27;
constexpr int HALO_H = TH + 1, ROW = 36, ROWS = 2 * HALO_H, HALO = ROWS * ROW;
static_assert(HALO % 8 == 0, "rows of 36 values");

struct Origin {
    int n, d, h0, w0;
};

__device__ __forceinline__ Origin origin_of(int tile, int D, int tiles_h, int tiles_w) {
    Origin o;
    o.w0 = (tile % tiles_w) * TW;
    tile /= tiles_w;
    o.h0 = (tile % tiles_h) * TH;
    tile /= tiles_h;
    o.d = tile % D;
    o.n = tile / D;
    return o;
}

// Issue the cp.async copies of the tile at `o` into `xs` (channel stride XSTRIDE), zeros
// outside the input: 16-byte copies of each row's first 32 values where `chunks` (W % 4 == 0,
// x 16-byte aligned), then the 33rd value on its own; 4-byte copies otherwise. OPAQUE_THREAD:
// for a caller that holds many registers through its tile loop, the thread index is hidden from
// the optimiser, so that the copies' per-thread row arithmetic is redone per tile instead of
// hoisted out of the loop and spilled.
template <int CIP, int XSTRIDE, int THREADS, bool OPAQUE_THREAD = false>
__device__ __forceinline__ void issue_x_tile(float* xs, const float* x, Origin o, int Cin,
                                             int D, int H, int W, bool chunks) {
    unsigned int thread = threadIdx.x;
    if (OPAQUE_THREAD) {
        asm volatile("" : "+r"(thread));
        __builtin_assume(thread < THREADS);  // as threadIdx.x: the row arithmetic stays unsigned
    }
    const long long spatial = (long long)D * H * W;
    const float* xn = x + (long long)o.n * Cin * spatial;
    // Row `row` of the tile at w offset ww: its shared-memory slot, and its source (null
    // outside the input).
    auto source = [&](int row, int ww, float*& dst) -> const float* {
        const int ci = row / ROWS, rest_row = row - ci * ROWS;
        const int dd = rest_row >= HALO_H, hh = rest_row - dd * HALO_H;
        dst = xs + ci * XSTRIDE + rest_row * ROW + ww;
        const bool inside = ci < Cin && o.d + dd < D && o.h0 + hh < H && o.w0 + ww < W;
        return inside ? xn + ci * spatial + ((long long)(o.d + dd) * H + o.h0 + hh) * W + o.w0 +
                            ww
                      : nullptr;
    };
    if (chunks) {
        for (int row = thread >> 3; row < CIP * ROWS; row += THREADS / 8) {
            float* dst;
            const float* src = source(row, (thread & 7) * 4, dst);
            stage_async<16>(dst, src ? src : x, src != nullptr);
        }
        for (int row = thread; row < CIP * ROWS; row += THREADS) {
            float* dst;
            const float* src = source(row, TW, dst);
            stage_async<4>(dst, src ? src : x, src != nullptr);
        }
    } else {
        for (int e = thread; e < CIP * ROWS * (TW + 1); e += THREADS) {
            const int row = e / (TW + 1);
            float* dst;
            const float* src = source(row, e - row * (TW + 1), dst);
            stage_async<4>(dst, src ? src : x, src != nullptr);
        }
    }
}

// The block's bias and activation slopes (threads 0..31, one channel each).
// leaky(m * leaky(t)) is linear on each side of t = 0: t * (t > 0 ? c_pos : c_neg), one
// rounding instead of three. t > 0: m t, kept when m > 0; t <= 0: m slope t, kept when
// m slope < 0. slopes_s holds c_pos for the 32 channels, then c_neg.
__device__ __forceinline__ void stage_bias_and_slopes(float* bias_s, float* slopes_s,
                                                      const float* bias,
                                                      const float* multiplier, int co0,
                                                      int Cout, int multiplier_stride,
                                                      int has_bias, double negative_slope) {
    if (threadIdx.x < CO) {
        const int co = co0 + threadIdx.x;
        const bool valid = co < Cout;
        bias_s[threadIdx.x] = valid && has_bias ? bias[co] : 0.f;
        const float m = valid ? multiplier[co * multiplier_stride] : 0.f;
        const float slope = float(negative_slope);
        slopes_s[threadIdx.x] = m > 0.f ? m : slope * m;
        slopes_s[CO + threadIdx.x] = m * slope < 0.f ? m * slope : slope * (m * slope);
    }
}
}  // namespace persistent_tile
