// Forward kernels for the parity fast path: kernel 3, stride 2, padding 1, output_padding 1.
//
// Per axis the conv-transpose splits by output parity (see parity_tap in common.cuh): output 2m
// takes x[m] * w[1], output 2m+1 takes x[m] * w[2] + x[m+1] * w[0]. A 2x2x2 pool window holds
// one output of each of the 8 parity classes (class c = window index c), so pooled position m
// reads only x at {m, m+1}^3: an implicit GEMM with M = pooled positions, K = 8 input offsets
// x C_in, N = 8 classes x C_out, of whose 64 (offset, class) blocks 27 are non-zero. The pooled
// grid equals the input grid (PD = D, PH = H, PW = W). Same algorithm as DESIGN section 7; this
// file is this backend's own implementation.
#include "common.cuh"

// ------------------------------------------------------------------ TF32 tensor-core kernel
// Block: 4 warps; warp w owns output channels [8 * (4 * blockIdx.y + w), +8) and keeps all 27
// weight taps of its 8 channels in registers as mma B fragments for the whole (persistent)
// launch. Per tile of TD x TH x TW pooled positions the block stages x at {tile, tile+1}^3 in
// shared memory (as TF32, channel-major), and each warp walks the tile in 16-position rows
// (m16 tiles along w). For each of the 8 input offsets it loads the A fragment once and feeds
// every class that uses the offset, so the 8 class accumulators of one (position, channel) end
// in the same thread and the pool is a register max.
namespace tf32_tile {
constexpr int TD = 2, TH = 4, TW = 32;
constexpr int XD = TD + 1, XH = TH + 1, XW = TW + 1;
constexpr int XPOS = XD * XH * XW;
// Channel stride of the staged tile: >= XPOS and == 8 (mod 32), so the A-fragment loads
// (lanes: channel t, position g) hit 32 distinct banks.
constexpr int CS = ((XPOS - 8 + 31) / 32) * 32 + 8;
constexpr int MTILES = TD * TH * (TW / 16);
}  // namespace tf32_tile

//
// Only GRAD = true is instantiated now: GRAD = false, this kernel's own pooling forward, gave
// way to parity_forward_tc below. GRAD = true is backward step 1 on
// the forward's arithmetic (same products from the bias in the same order, so z is
// bit-identical to parity_forward_tc's):
// instead of pooling, each (position, channel) takes the class the forward chose (window_index),
// writes grad_z there as a TF32 value with the class in its 3 low bits (TF32 leaves the low 13
// mantissa bits zero; the dx/dweight kernels mask them off), and sums dbias / dmultiplier per
// channel: lanes, then a fixed-order shuffle tree, then one partial per block (deterministic).
template <int KSTEPS, bool GRAD>
__global__ void __launch_bounds__(128, 2) parity_tf32(
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ multiplier, float* __restrict__ y,
    unsigned char* __restrict__ window_index, const float* __restrict__ grad_y,
    unsigned int* __restrict__ grad_z_packed, float* __restrict__ partial_bias,
    float* __restrict__ partial_multiplier, int N, int Cin, int Cout, int D, int H, int W,
    int multiplier_stride, int has_bias, double negative_slope, int tiles_d, int tiles_h,
    int tiles_w, int async_staging, int pipeline) {
    using namespace tf32_tile;
    constexpr int CIN_PAD = 8 * KSTEPS;
    constexpr int BUFFER = CIN_PAD * CS;
    // One x tile per buffer; two when pipelined (dynamic shared memory: the host passes the size).
    extern __shared__ unsigned int xs_buffers[];
    // Pipelined (needs cp.async): the next tile's copies are in flight while this one computes.
    const bool pipelined = async_staging && pipeline;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int co_base = (blockIdx.y * 4 + warp) * 8;
    const float slope = float(negative_slope);

    // B fragments: B[k = ci][n = co] = weight[ci][co][tap]; b0 = B[t][g], b1 = B[t + 4][g].
    unsigned int bfrag[8][8][KSTEPS][2];
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int a = 0; a < 8; ++a) {
            if (!class_uses_offset(c, a)) continue;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int ci = ks * 8 + t + 4 * half, co = co_base + g;
                    const float v = (ci < Cin && co < Cout)
                                        ? weight[((long long)ci * Cout + co) * 27 + class_tap(c, a)]
                                        : 0.0f;
                    bfrag[c][a][ks][half] = to_tf32(v);
                }
        }

    // This thread's two output channels (accumulator columns 2t, 2t+1).
    float chan_bias[2], chan_mult[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int co = co_base + 2 * t + j;
        chan_bias[j] = (has_bias && co < Cout) ? bias[co] : 0.0f;
        chan_mult[j] = co < Cout ? multiplier[co * multiplier_stride] : 0.0f;
    }

    float sum_bias[2] = {0.0f, 0.0f}, sum_multiplier[2] = {0.0f, 0.0f};  // GRAD only
    const long long spatial = (long long)D * H * W;
    const int num_tiles = N * tiles_d * tiles_h * tiles_w;
    // Stage x at {tile, tile + 1}^3 of tile `tile` into `xs` (channel-major, TF32 or raw fp32).
    auto stage = [&](int tile, unsigned int* xs) {
        int rest = tile;
        const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
        const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
        const int d0 = (rest % tiles_d) * TD;
        const int n = rest / tiles_d;
        const float* xn = x + (long long)n * Cin * spatial;
        for (int i = threadIdx.x; i < CIN_PAD * XPOS; i += 128) {
            const int ci = i / XPOS, pos = i % XPOS;
            const int lw = pos % XW, lh = (pos / XW) % XH, ld = pos / (XW * XH);
            const int gd = d0 + ld, gh = h0 + lh, gw = w0 + lw;
            // x beyond the edge contributes nothing (x[m+1] at m = last): zeros.
            const bool valid = ci < Cin && gd < D && gh < H && gw < W;
            const float* src = valid ? xn + (long long)ci * spatial + ((long long)gd * H + gh) * W + gw
                                     : xn;
            if (async_staging) {
                stage_async<4>(xs + ci * CS + pos, src, valid);
            } else {
                xs[ci * CS + pos] = to_tf32(valid ? *src : 0.0f);
            }
        }
    };
    if (pipelined && blockIdx.x < num_tiles) {
        stage(blockIdx.x, xs_buffers);
        stage_commit();
    }
    int iteration = 0;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x, ++iteration) {
        int rest = tile;
        const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
        const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
        const int d0 = (rest % tiles_d) * TD;
        const int n = rest / tiles_d;

        unsigned int* xs = xs_buffers + (pipelined ? (iteration & 1) * BUFFER : 0);
        if (pipelined) {
            // The other buffer was last read in the previous iteration (synchronised at its end).
            if (tile + gridDim.x < num_tiles) {
                stage(tile + gridDim.x, xs_buffers + ((iteration + 1) & 1) * BUFFER);
                stage_commit();
                stage_wait_pending<1>();  // this tile's group has landed, the next may fly
            } else {
                stage_wait_pending<0>();
            }
        } else {
            __syncthreads();  // the previous tile's fragments have been read
            stage(tile, xs);
            if (async_staging) stage_wait();
        }
        __syncthreads();

        for (int mt = 0; mt < MTILES; ++mt) {
            const int ld = mt / (TH * 2), lh = (mt / 2) % TH, lw0 = (mt % 2) * 16;
            if (d0 + ld >= D || h0 + lh >= H || w0 + lw0 >= W) continue;  // warp-uniform
            // Sums start from the bias: z comes out bit-identical to parity_forward_tc's (same
            // products, same order), whose winners the GRAD pass routes.
            float acc[8][4];
#pragma unroll
            for (int c = 0; c < 8; ++c)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[c][r] = chan_bias[r & 1];

#pragma unroll
            for (int a = 0; a < 8; ++a) {
                const int ad = (a >> 2) & 1, ah = (a >> 1) & 1, aw = a & 1;
                const int base = ((ld + ad) * XH + (lh + ah)) * XW + lw0 + aw + g;
                unsigned int afrag[KSTEPS][4];
#pragma unroll
                for (int ks = 0; ks < KSTEPS; ++ks) {
                    const unsigned int* lo = xs + (ks * 8 + t) * CS + base;
                    const unsigned int* hi = lo + 4 * CS;
                    afrag[ks][0] = lo[0];
                    afrag[ks][1] = lo[8];
                    afrag[ks][2] = hi[0];
                    afrag[ks][3] = hi[8];
                }
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    if (!class_uses_offset(c, a)) continue;
#pragma unroll
                    for (int ks = 0; ks < KSTEPS; ++ks)
                        mma_tf32(acc[c], afrag[ks][0], afrag[ks][1], afrag[ks][2], afrag[ks][3],
                                 bfrag[c][a][ks][0], bfrag[c][a][ks][1]);
                }
            }

            // Epilogue: bias, leaky, * multiplier, leaky, then the pool over the 8 classes in
            // window-index order with PyTorch's rule.
            const int pd = d0 + ld, ph = h0 + lh;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int j = r & 1;
                const int pw = w0 + lw0 + g + (r >= 2 ? 8 : 0);
                const int co = co_base + 2 * t + j;
                if (GRAD) {
                    if (pw < W && co < Cout) {
                        const long long e = (((long long)n * Cout + co) * D + pd) * (long long)H * W +
                                            (long long)ph * W + pw;
                        const int win = window_index[e];
                        float z = acc[0][r];
#pragma unroll
                        for (int c = 1; c < 8; ++c) z = (c == win) ? acc[c][r] : z;
                        const float m = chan_mult[j];
                        const float u = leaky(z, slope);
                        const float outer = grad_y[e] * leaky_slope(m * u, slope);
                        const float dz = outer * m * leaky_slope(z, slope);
                        sum_bias[j] += dz;
                        sum_multiplier[j] += outer * u;
                        grad_z_packed[e] = (to_tf32(dz) & ~7u) | static_cast<unsigned int>(win);
                    }
                    continue;
                }
                float best = 0.0f;
                int best_index = 0;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    const float v = activate(acc[c][r], chan_mult[j], slope);
                    if (c == 0 || pool_takes(best, v)) {
                        best = v;
                        best_index = c;
                    }
                }
                if (pw < W && co < Cout) {
                    const long long e = (((long long)n * Cout + co) * D + pd) * (long long)H * W +
                                        (long long)ph * W + pw;
                    y[e] = best;
                    window_index[e] = static_cast<unsigned char>(best_index);
                }
            }
        }
        if (pipelined) __syncthreads();  // every warp is done with xs before it is restaged
    }
    if (GRAD) {
        // Fixed-order tree over the 8 lanes (g) that share this thread's channels.
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int mask = 4; mask < 32; mask <<= 1) {
                sum_bias[j] += __shfl_xor_sync(0xffffffffu, sum_bias[j], mask);
                sum_multiplier[j] += __shfl_xor_sync(0xffffffffu, sum_multiplier[j], mask);
            }
        if (g == 0) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int co = co_base + 2 * t + j;
                if (co < Cout) {
                    partial_bias[(long long)blockIdx.x * Cout + co] = sum_bias[j];
                    partial_multiplier[(long long)blockIdx.x * Cout + co] = sum_multiplier[j];
                }
            }
        }
    }
}

// ------------------------------------------------------------------ exact (SIMT) kernel
// For IEEE fp32 (TF32 off), float64, and fp16/bf16 with fp32 accumulation. Block: 4 * TD warps
// over a TD x TH x TW = TD x 2 x 32 tile of pooled positions and 4 * CO_T output channels; warp w
// takes depth row w / 4 and channel group w % 4, lane = w position, and each thread computes both
// h rows, CO_T channels and all 8 classes (2 * 8 * CO_T accumulators). Input channels stream
// through shared memory in chunks of CI; weights are read as warp-wide broadcasts. TD = 1 lets
// two blocks share an SM, so one block's staging overlaps the other's arithmetic.
namespace simt_tile {
constexpr int TH = 2, TW = 32;
constexpr int XH = TH + 1, XW = TW + 1;
}  // namespace simt_tile

template <typename T, typename Acc, int CO_T, int TD>
__global__ void __launch_bounds__(128 * TD, TD == 1 ? 2 : 1) parity_forward_exact(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ multiplier, T* __restrict__ y, unsigned char* __restrict__ window_index,
    int N, int Cin, int Cout, int D, int H, int W, int multiplier_stride, int has_bias,
    double negative_slope, int tiles_d, int tiles_h, int tiles_w, int async_staging) {
    using namespace simt_tile;
    constexpr int COB = 4 * CO_T, THREADS = 128 * TD;
    // Input channels per shared-memory chunk (8-byte types: 4, to stay in 48 KB static smem).
    constexpr int CI = sizeof(Acc) == 8 ? 4 : 8;
    // Weight rows padded by 4 words: the staging stores (tap fastest) spread over the banks,
    // and the per-thread CO_T-wide reads stay 16-byte aligned.
    constexpr int WROW = COB + 4;
    constexpr int XD = TD + 1, XPOS = XD * XH * XW;
    __shared__ Acc xs[CI][XPOS];
    __shared__ __align__(16) Acc ws[CI][27][WROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = warp & 3, ld = warp >> 2;
    const Acc slope = Acc(negative_slope);

    int rest = blockIdx.x;
    const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
    const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
    const int d0 = (rest % tiles_d) * TD;
    const int n = rest / tiles_d;
    const int co_block = blockIdx.y * COB;
    const long long spatial = (long long)D * H * W;
    const T* xn = x + (long long)n * Cin * spatial;
    // Raw copies need the staged type to be the stored type (float, double; not the halves).
    const bool copy_async = async_staging && sizeof(T) == sizeof(Acc);

    Acc acc[TH][8][CO_T];
#pragma unroll
    for (int p = 0; p < TH; ++p)
#pragma unroll
        for (int c = 0; c < 8; ++c)
#pragma unroll
            for (int j = 0; j < CO_T; ++j) acc[p][c][j] = Acc(0);

    for (int ci0 = 0; ci0 < Cin; ci0 += CI) {
        __syncthreads();
        for (int i = threadIdx.x; i < CI * XPOS; i += THREADS) {
            const int ci = i / XPOS, pos = i % XPOS;
            const int lw = pos % XW, lh = (pos / XW) % XH, lz = pos / (XW * XH);
            const int gd = d0 + lz, gh = h0 + lh, gw = w0 + lw;
            const bool valid = ci0 + ci < Cin && gd < D && gh < H && gw < W;
            const T* src =
                valid ? xn + (long long)(ci0 + ci) * spatial + ((long long)gd * H + gh) * W + gw : xn;
            if (copy_async) {
                stage_async<sizeof(Acc)>(&xs[ci][pos], src, valid);
            } else {
                xs[ci][pos] = valid ? to_acc(*src) : Acc(0);
            }
        }
        // For one input channel the block's weights w[ci][co_block .. + COB][0 .. 27) are one
        // contiguous run: read it in order (coalesced), store transposed to [tap][co].
        for (int i = threadIdx.x; i < CI * COB * 27; i += THREADS) {
            const int ci = i / (COB * 27), run = i % (COB * 27);
            const int co_l = run / 27, tap = run % 27;
            const int co = co_block + co_l;
            const bool valid = ci0 + ci < Cin && co < Cout;
            const T* src = valid ? weight + ((long long)(ci0 + ci) * Cout + co_block) * 27 + run
                                 : weight;
            if (copy_async) {
                stage_async<sizeof(Acc)>(&ws[ci][tap][co_l], src, valid);
            } else {
                ws[ci][tap][co_l] = valid ? to_acc(*src) : Acc(0);
            }
        }
        if (copy_async) stage_wait();
        __syncthreads();

#pragma unroll 1
        for (int ci = 0; ci < CI; ++ci) {
            Acc xv[2][TH + 1][2];  // [ad][h row 0..TH][aw]
#pragma unroll
            for (int ad = 0; ad < 2; ++ad)
#pragma unroll
                for (int hh = 0; hh < TH + 1; ++hh)
#pragma unroll
                    for (int aw = 0; aw < 2; ++aw)
                        xv[ad][hh][aw] = xs[ci][((ld + ad) * XH + hh) * XW + lane + aw];
#pragma unroll
            for (int c = 0; c < 8; ++c)
#pragma unroll
                for (int a = 0; a < 8; ++a) {
                    if (!class_uses_offset(c, a)) continue;
                    const int ad = (a >> 2) & 1, ah = (a >> 1) & 1, aw = a & 1;
                    Acc wv[CO_T];
#pragma unroll
                    for (int j = 0; j < CO_T; ++j) wv[j] = ws[ci][class_tap(c, a)][group * CO_T + j];
#pragma unroll
                    for (int p = 0; p < TH; ++p)
#pragma unroll
                        for (int j = 0; j < CO_T; ++j)
                            acc[p][c][j] += xv[ad][p + ah][aw] * wv[j];
                }
        }
    }

    const int pd = d0 + ld, pw = w0 + lane;
#pragma unroll
    for (int j = 0; j < CO_T; ++j) {
        const int co = co_block + group * CO_T + j;
        if (co >= Cout) continue;
        const Acc b = has_bias ? to_acc(bias[co]) : Acc(0);
        const Acc m = to_acc(multiplier[co * multiplier_stride]);
#pragma unroll
        for (int p = 0; p < TH; ++p) {
            const int ph = h0 + p;
            Acc best = Acc(0);
            int best_index = 0;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const Acc v = activate(acc[p][c][j] + b, m, slope);
                if (c == 0 || pool_takes(best, v)) {
                    best = v;
                    best_index = c;
                }
            }
            if (pd < D && ph < H && pw < W) {
                const long long e =
                    (((long long)n * Cout + co) * D + pd) * (long long)H * W + (long long)ph * W + pw;
                y[e] = Store<T>::from(best);
                window_index[e] = static_cast<unsigned char>(best_index);
            }
        }
    }
}

// ------------------------------------------------------------------ TF32 persistent forward
// Same algorithm as fused3d-cuda's tensor-core forward (its parity_forward.cu and
// parity_common.cuh); this file's own implementation. One block of 16 warps per SM, persistent:
// it stages the B fragments of its 32 output channels once, then walks tiles of 8 h-lines x
// 32 w pooled positions of one depth, the next tile's x copies (cp.async) in flight while the
// current one computes. Warp w owns 16 positions of h-line w / 2; the 8 classes run one after
// another (K = the class's taps x C_in), each folded into a running max with PyTorch's rule,
// so nothing conv-sized leaves the registers.
namespace tc_tile {
using namespace persistent_tile;
constexpr int THREADS = 512;
// Channel stride of an x tile: == 8 (mod 16) words, so the 4 channel rows of an A fragment
// (lanes t) fall in distinct bank octets.
constexpr int XS = (HALO / 8) % 2 == 1 ? HALO : HALO + 8;

// The 27 taps in class order (offsets ascending within a class), each packed as its x halo
// offset (low 16 bits) and weight tap (high bits).
struct Taps {
    int first[9];
    int packed[27];
};
__host__ __device__ constexpr Taps make_taps() {
    Taps taps{};
    int n = 0;
    for (int cls = 0; cls < 8; ++cls) {
        taps.first[cls] = n;
        for (int o = 0; o < 8; ++o) {
            if (!class_uses_offset(cls, o)) continue;
            const int halo = (((o >> 2) & 1) * HALO_H + ((o >> 1) & 1)) * ROW + (o & 1);
            taps.packed[n++] = halo | (class_tap(cls, o) << 16);
        }
    }
    taps.first[8] = n;
    return taps;
}
}  // namespace tc_tile

__constant__ tc_tile::Taps tc_taps = tc_tile::make_taps();

// A tap's mma operands: A fragments (x) of KSTEPS k-steps, B fragments of the 4 n-tiles.
template <int KSTEPS>
struct TapOperands {
    unsigned int a[KSTEPS][4];
    float4 b[KSTEPS][2];
};

template <int KSTEPS>
__device__ __forceinline__ void load_tap(TapOperands<KSTEPS>& f, int tap, const float* xa,
                                         const float4* wb) {
    using namespace tc_tile;
    const int packed = tc_taps.packed[tap];
    xa += packed & 0xffff;
    wb += (packed >> 16) * (KSTEPS * 64);
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const float* p = xa + kk * 8 * XS;
        f.a[kk][0] = __float_as_uint(p[0]);
        f.a[kk][1] = __float_as_uint(p[8]);
        f.a[kk][2] = __float_as_uint(p[4 * XS]);
        f.a[kk][3] = __float_as_uint(p[4 * XS + 8]);
        f.b[kk][0] = wb[kk * 64];
        f.b[kk][1] = wb[kk * 64 + 32];
    }
}

template <int KSTEPS>
__device__ __forceinline__ void mma_tap(float (&acc)[4][4], const TapOperands<KSTEPS>& f) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const unsigned int* a = f.a[kk];
        mma_tf32(acc[0], a[0], a[1], a[2], a[3], __float_as_uint(f.b[kk][0].x),
                 __float_as_uint(f.b[kk][0].y));
        mma_tf32(acc[1], a[0], a[1], a[2], a[3], __float_as_uint(f.b[kk][0].z),
                 __float_as_uint(f.b[kk][0].w));
        mma_tf32(acc[2], a[0], a[1], a[2], a[3], __float_as_uint(f.b[kk][1].x),
                 __float_as_uint(f.b[kk][1].y));
        mma_tf32(acc[3], a[0], a[1], a[2], a[3], __float_as_uint(f.b[kk][1].z),
                 __float_as_uint(f.b[kk][1].w));
    }
}

template <int KSTEPS>
__global__ void __launch_bounds__(tc_tile::THREADS, 1) parity_forward_tc(
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ multiplier, float* __restrict__ y,
    unsigned char* __restrict__ window_index, int N, int Cin, int Cout, int D, int H, int W,
    int multiplier_stride, int has_bias, double negative_slope, int tiles, int tiles_h,
    int tiles_w) {
    using namespace tc_tile;
    constexpr int CIP = 8 * KSTEPS;
    extern __shared__ float4 smem4[];
    float* ws = reinterpret_cast<float*>(smem4);  // B fragments: [TAPS][KSTEPS][256]
    float* xs_base = ws + TAPS * KSTEPS * 256;     // 2 x [CIP][XS]
    float* bias_s = xs_base + 2 * CIP * XS;        // [CO]
    float* slopes_s = bias_s + CO;                 // [CO] for t > 0, then [CO] for t <= 0
    const int co0 = blockIdx.y * CO;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int line = warp >> 1, row0 = (warp & 1) * 16;
    const long long spatial = (long long)D * H * W;
    const bool chunks = W % 4 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    if ((int)blockIdx.x >= tiles) return;

    // x of `tile` into `xs`, asynchronously, as one cp.async group.
    auto issue = [&](int tile, float* xs) {
        issue_x_tile<CIP, XS, THREADS>(xs, x, origin_of(tile, D, tiles_h, tiles_w), Cin, D, H,
                                       W, chunks);
        stage_commit();
    };
    issue(blockIdx.x, xs_base);  // the first tile flies while the weights are staged

    // B fragments, rounded to TF32: float4 (tap, kk, j, lane) = {B[t][n0+g], B[t+4][n0+g],
    // B[t][n1+g], B[t+4][n1+g]} with n0 = 16j, n1 = 16j + 8, B[ci][col] = w[ci, co0+col, tap]:
    // one 16-byte load feeds two mma.
    {
        const int e = threadIdx.x & 255, q = e & 3, fl = (e >> 2) & 31, j = (e >> 7) & 1;
        const int co = co0 + (2 * j + (q >> 1)) * 8 + (fl >> 2);
        const int ci_in_step = (fl & 3) + ((q & 1) ? 4 : 0);
        for (int kk = threadIdx.x >> 8; kk < KSTEPS; kk += THREADS / 256) {
            const int ci = kk * 8 + ci_in_step;
            const bool valid = ci < Cin && co < Cout;
            const float* src = weight + ((long long)ci * Cout + co) * TAPS;
#pragma unroll 9
            for (int k = 0; k < TAPS; ++k)
                ws[(k * KSTEPS + kk) * 256 + e] = __uint_as_float(to_tf32(valid ? src[k] : 0.f));
        }
    }
    stage_bias_and_slopes(bias_s, slopes_s, bias, multiplier, co0, Cout, multiplier_stride,
                          has_bias, negative_slope);

    for (int it = 0, tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++it) {
        float* xs = xs_base + (it & 1) * CIP * XS;
        if (tile + gridDim.x < tiles) {
            issue(tile + gridDim.x, xs_base + ((it + 1) & 1) * CIP * XS);
            stage_wait_pending<1>();  // this tile's copies have landed; the next one's may fly
        } else {
            stage_wait_pending<0>();
        }
        __syncthreads();  // every thread's copies (and on the first pass the weights) visible
        // Round the tile to TF32 in place, so the mma loops read ready operands.
        for (int e = threadIdx.x; e < CIP * XS / 4; e += THREADS) {
            float4 v = reinterpret_cast<float4*>(xs)[e];
            v = make_float4(__uint_as_float(to_tf32(v.x)), __uint_as_float(to_tf32(v.y)),
                            __uint_as_float(to_tf32(v.z)), __uint_as_float(to_tf32(v.w)));
            reinterpret_cast<float4*>(xs)[e] = v;
        }
        __syncthreads();

        // Window indices travel packed: byte r of windows[nt] belongs to value r of n-tile nt
        // (channel nt * 8 + 2t + (r & 1), w row0 + g + 8 * (r >> 1)).
        float best[4][4];
        unsigned int windows[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) best[nt][r] = __int_as_float(0xff800000);  // -inf
        const float* xa = xs + t * XS + line * ROW + row0 + g;
        const float4* wb = reinterpret_cast<const float4*>(ws) + lane;
#pragma unroll 1
        for (int cls = 0; cls < 8; ++cls) {
            float acc[4][4];  // started from the bias
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[nt][r] = bias_s[nt * 8 + 2 * t + (r & 1)];
            const int first = tc_taps.first[cls], last = tc_taps.first[cls + 1];  // 1 or even
            if (KSTEPS == 2) {  // the next tap's operands load while this tap's mma run
                TapOperands<KSTEPS> even, odd;
                load_tap(even, first, xa, wb);
#pragma unroll 1
                for (int tap = first; tap < last; tap += 2) {
                    if (tap + 1 < last) load_tap(odd, tap + 1, xa, wb);
                    mma_tap(acc, even);
                    if (tap + 2 < last) load_tap(even, tap + 2, xa, wb);
                    if (tap + 1 < last) mma_tap(acc, odd);
                }
            } else {
#pragma unroll 1
                for (int tap = first; tap < last; ++tap) {
                    TapOperands<KSTEPS> f;
                    load_tap(f, tap, xa, wb);
                    mma_tap(acc, f);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int col = nt * 8 + 2 * t + (r & 1);
                    const float v = acc[nt][r] * (acc[nt][r] > 0.f ? slopes_s[col]
                                                                   : slopes_s[CO + col]);
                    // best starts at -inf with index 0: class 0 is taken unless it is -inf,
                    // which leaves index 0 as PyTorch does.
                    if (pool_takes(best[nt][r], v)) {
                        best[nt][r] = v;
                        windows[nt] = (windows[nt] & ~(0xffu << (8 * r))) |
                                      ((unsigned int)cls << (8 * r));
                    }
                }
        }

        const Origin o = origin_of(tile, D, tiles_h, tiles_w);
        const int h = o.h0 + line, w_first = o.w0 + row0 + g, channels = Cout - co0 - 2 * t;
        const long long base =
            (((long long)o.n * Cout + co0 + 2 * t) * D + o.d) * H * (long long)W +
            (long long)h * W;
        if (h < H) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int channel = nt * 8 + (r & 1), w = w_first + 8 * (r >> 1);
                    if (channel < channels && w < W) {
                        const long long off = base + channel * spatial + w;
                        y[off] = best[nt][r];
                        window_index[off] = (unsigned char)(windows[nt] >> (8 * r));
                    }
                }
        }
        __syncthreads();  // everyone is done with this buffer before it is refilled
    }
}

// ------------------------------------------------------------------ IEEE fp32 FFMA kernel
// Same algorithm as fused3d-cuda's FFMA forward (its parity_forward.cu); this file's own
// implementation. Persistent blocks of 8 warps, two per SM (one block's tile copies overlap the
// other's arithmetic): a block stages the weights of its 32 output channels once, as
// [tap][ci][channel], then walks tiles of 8 h-lines x 32 w pooled positions at one depth. The
// x tile {tile, tile+1}^3 arrives by cp.async; warp = h-line, lane = 4 w positions x 8
// channels, 32 accumulators in registers. The 8 classes run one after another, each folded
// into a running max with PyTorch's rule, so nothing conv-sized leaves the registers.
namespace ffma_tile {
using namespace persistent_tile;
constexpr int THREADS = 256;
}  // namespace ffma_tile

// Compile-time flag for generic lambdas (no <type_traits> under NVRTC).
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

template <int KSTEPS>
__global__ void __launch_bounds__(ffma_tile::THREADS, 2) parity_forward_ffma(
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ multiplier, float* __restrict__ y,
    unsigned char* __restrict__ window_index, int N, int Cin, int Cout, int D, int H, int W,
    int multiplier_stride, int has_bias, double negative_slope, int tiles, int tiles_h,
    int tiles_w) {
    using namespace ffma_tile;
    constexpr int CIP = 8 * KSTEPS;  // C_in padded to 8
    extern __shared__ float4 smem4[];
    float* ws = reinterpret_cast<float*>(smem4);  // [TAPS][CIP][CO]
    float* xs = ws + TAPS * CIP * CO;              // [CIP][HALO]
    float* bias_s = xs + CIP * HALO;               // [CO]
    float* slopes_s = bias_s + CO;                 // [CO] for t > 0, then [CO] for t <= 0
    const int co0 = blockIdx.y * CO;
    const int lane = threadIdx.x & 31, line = threadIdx.x >> 5;
    const int cg = lane & 3, wg = lane >> 2;
    const long long spatial = (long long)D * H * W;
    const bool chunks = W % 4 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    // CIP as a run-time loop bound: with the trip count known, the unrolled channel loops
    // spilled registers (as in fused3d-cuda's kernel).
    const int ci_padded = (Cin + 7) / 8 * 8;

    // Weights: a warp fills the 32 channels of its rows ci for every tap, 9 loads in flight.
    for (int ci = line; ci < CIP; ci += THREADS / 32) {
        const int co = co0 + lane;
        const bool valid = ci < Cin && co < Cout;
        const float* src = weight + ((long long)ci * Cout + co) * TAPS;
#pragma unroll 9
        for (int k = 0; k < TAPS; ++k) ws[(k * CIP + ci) * CO + lane] = valid ? src[k] : 0.f;
    }
    stage_bias_and_slopes(bias_s, slopes_s, bias, multiplier, co0, Cout, multiplier_stride,
                          has_bias, negative_slope);

    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const Origin o = origin_of(tile, D, tiles_h, tiles_w);
        issue_x_tile<CIP, HALO, THREADS>(xs, x, o, Cin, D, H, W, chunks);
        stage_wait();
        __syncthreads();  // the tile (and, on the first pass, the weights) visible to all

        // Window indices travel packed: byte j of windows[cc] is w position j of channel cc.
        float best[4][8];
        unsigned int windows[8];
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) windows[cc] = 0;
#pragma unroll 1
        for (int cls = 0; cls < 8; ++cls) {
            float acc[4][8];
#pragma unroll
            for (int o = 0; o < 8; ++o) {
                if (!class_uses_offset(cls, o)) continue;  // o = 0 is in every class: bias first
                const float* xa = xs + (((o >> 2) & 1) * HALO_H + line + ((o >> 1) & 1)) * ROW +
                                  wg * 4 + (o & 1);
                const float4* wa =
                    reinterpret_cast<const float4*>(ws + class_tap(cls, o) * CIP * CO) + cg * 2;
                auto step = [&](int ci, auto from_bias) {
                    float xv[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) xv[j] = xa[ci * HALO + j];
                    const float4 w0v = wa[ci * (CO / 4)], w1v = wa[ci * (CO / 4) + 1];
                    const float wv[8] = {w0v.x, w0v.y, w0v.z, w0v.w, w1v.x, w1v.y, w1v.z, w1v.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j)
#pragma unroll
                        for (int cc = 0; cc < 8; ++cc)
                            acc[j][cc] = fmaf(xv[j], wv[cc],
                                              decltype(from_bias)::value ? bias_s[cg * 8 + cc]
                                                                         : acc[j][cc]);
                };
                if (o == 0) step(0, Flag<true>{});  // the class's first step starts from the bias
#pragma unroll 4
                for (int ci = o == 0 ? 1 : 0; ci < ci_padded; ++ci) step(ci, Flag<false>{});
            }
            // Class 0 opens each window: its value is the maximum so far, the index stays 0
            // (also for -inf, as PyTorch leaves index 0 then).
            auto fold = [&](auto opens) {
#pragma unroll
                for (int cc = 0; cc < 8; ++cc) {
                    const int col = cg * 8 + cc;
                    const float c_pos = slopes_s[col], c_neg = slopes_s[CO + col];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float t = acc[j][cc];
                        const float v = t * (t > 0.f ? c_pos : c_neg);
                        if (decltype(opens)::value) {
                            best[j][cc] = v;
                        } else if (pool_takes(best[j][cc], v)) {
                            best[j][cc] = v;
                            windows[cc] = (windows[cc] & ~(0xffu << (8 * j))) |
                                          ((unsigned int)cls << (8 * j));
                        }
                    }
                }
            };
            if (cls == 0) {
                fold(Flag<true>{});
            } else {
                fold(Flag<false>{});
            }
        }

        // Store: the thread's 4 w positions are consecutive, so where W % 4 == 0 a channel's
        // values are one 16-byte store and its window indices one 4-byte store.
        const int h = o.h0 + line, w_first = o.w0 + wg * 4, channels = Cout - co0 - cg * 8;
        const long long base =
            (((long long)o.n * Cout + co0 + cg * 8) * D + o.d) * H * (long long)W +
            (long long)h * W;
        const bool vectors = W % 4 == 0 && (reinterpret_cast<unsigned long long>(y) & 15) == 0 &&
                             (reinterpret_cast<unsigned long long>(window_index) & 3) == 0;
        if (h < H) {
#pragma unroll
            for (int cc = 0; cc < 8; ++cc) {
                if (cc >= channels) break;
                const long long off = base + cc * spatial + w_first;
                if (vectors) {
                    if (w_first < W) {
                        *reinterpret_cast<float4*>(y + off) =
                            make_float4(best[0][cc], best[1][cc], best[2][cc], best[3][cc]);
                        *reinterpret_cast<unsigned int*>(window_index + off) = windows[cc];
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if (w_first + j < W) {
                            y[off + j] = best[j][cc];
                            window_index[off + j] = (unsigned char)(windows[cc] >> (8 * j));
                        }
                    }
                }
            }
        }
        __syncthreads();  // everyone is done with the tile before the next one is copied in
    }
}

#ifndef __CUDACC_RTC__
#define FUSED3D_INSTANTIATE_TF32(KSTEPS, GRAD)                                                \
    template __global__ void parity_tf32<KSTEPS, GRAD>(                                        \
        const float*, const float*, const float*, const float*, float*, unsigned char*,       \
        const float*, unsigned int*, float*, float*, int, int, int, int, int, int, int, int,  \
        double, int, int, int, int, int);
FUSED3D_INSTANTIATE_TF32(1, true)
FUSED3D_INSTANTIATE_TF32(2, true)
#define FUSED3D_INSTANTIATE_EXACT(T, Acc, CO_T, TD)                                            \
    template __global__ void parity_forward_exact<T, Acc, CO_T, TD>(                           \
        const T*, const T*, const T*, const T*, T*, unsigned char*, int, int, int, int, int,   \
        int, int, int, double, int, int, int, int);
FUSED3D_INSTANTIATE_EXACT(float, float, 8, 1)
FUSED3D_INSTANTIATE_EXACT(double, double, 4, 1)
FUSED3D_INSTANTIATE_EXACT(half_t, float, 8, 1)
FUSED3D_INSTANTIATE_EXACT(bf16_t, float, 8, 1)
FUSED3D_INSTANTIATE_EXACT(float, float, 8, 2)
FUSED3D_INSTANTIATE_EXACT(double, double, 4, 2)
FUSED3D_INSTANTIATE_EXACT(half_t, float, 8, 2)
FUSED3D_INSTANTIATE_EXACT(bf16_t, float, 8, 2)
#define FUSED3D_INSTANTIATE_FFMA(KSTEPS)                                                       \
    template __global__ void parity_forward_ffma<KSTEPS>(                                      \
        const float*, const float*, const float*, const float*, float*, unsigned char*, int,   \
        int, int, int, int, int, int, int, double, int, int, int);
FUSED3D_INSTANTIATE_FFMA(1)
FUSED3D_INSTANTIATE_FFMA(2)
FUSED3D_INSTANTIATE_FFMA(3)
#define FUSED3D_INSTANTIATE_TC(KSTEPS)                                                         \
    template __global__ void parity_forward_tc<KSTEPS>(                                        \
        const float*, const float*, const float*, const float*, float*, unsigned char*, int,   \
        int, int, int, int, int, int, int, double, int, int, int);
FUSED3D_INSTANTIATE_TC(1)
FUSED3D_INSTANTIATE_TC(2)
#endif
