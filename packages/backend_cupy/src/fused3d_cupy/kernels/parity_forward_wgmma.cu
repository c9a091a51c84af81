// TF32 forward of the parity fast path on Hopper's warpgroup MMA (wgmma, sm_90a only).
//
// Same algorithm as fused3d-cuda's wgmma forward (its parity_forward_wgmma.cu); this file is
// this backend's own implementation, compiled by NVRTC with -arch=sm_90a (see _modules.py). ONE
// launch from x to pooled y and the uint8 window index, nothing conv-sized in memory. The tile
// is parity_forward_tc's (persistent_tile in common.cuh: one image, one depth, 8 h-lines x 32 w
// pooled positions, 32 output channels per block); the convolution runs as asynchronous
// warpgroup MMAs reading both operands from shared memory, and each x tile arrives by one bulk
// tensor copy (TMA) that no thread waits on (cp.async where the copy's rules do not hold).
//
// A warpgroup (4 warps) owns 2 h-lines. Per class pair (2p, 2p+1) it computes
// D[64 x 64] = bias + sum over the pair's input offsets o of A_o[64 x K] * B_o[K x 64], K = C_in:
//  * rows (A, the weights): row r is class 2p + ((r >> 3) & 1), channel (r & 7) + 8 (r >> 4), so
//    a thread's accumulators hold both classes of one channel (the pool folds them in order);
//  * columns (B, x): the 64 pooled positions of the 2 h-lines (in line_slot order), x shifted by o.
// The offsets of a pair are those of class 2p + 1 (2, 4, 4 and 8: 18 steps for the 27 taps);
// class 2p's rows are zero at the offsets with an odd w, which only class 2p + 1 uses.
//
// Shared memory holds both operands in wgmma's K-major layout without swizzle: "core matrices"
// of 8 rows x 16 bytes (4 TF32 values of K), contiguous. x is staged twice, shifted by 0 and by
// 1 in w, each line exactly 32 positions long, so the 64 positions of two h-lines are evenly
// spaced core matrices for every offset (one stride per descriptor).
#include "common.cuh"

// NVRTC must have been given the sm_90a target: compiled for plain sm_90 the MMAs would be
// empty. Failing here makes the host keep the mma.sync forward (_ops.wgmma_forward_reasons).
#if defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "parity_forward_wgmma.cu needs the sm_90a target (NVRTC option -arch=sm_90a)"
#endif

namespace wgmma_tile {
using namespace persistent_tile;
constexpr int THREADS = 512;          // 4 warpgroups of 2 h-lines: the 8 lines of a tile
constexpr int LINES = ROWS;           // 18 staged (d, h) lines
constexpr int LINE_LEN = TW;          // 32 positions per staged line
constexpr int PLANE = LINES * LINE_LEN;  // positions per 4-channel group and copy
constexpr int M_ROWS = 64;            // wgmma M: 2 classes x 32 channels
constexpr int RAW_STRIDE = HALO;      // channel stride of the raw x tile (a dense TMA box)
constexpr int STEPS = 18;             // (class pair, input offset) steps

// The steps: class pairs in order, each over the input offsets of its odd class 2p + 1
// (subsets of 2p + 1's odd axes, ascending): {0, 1}, {0..3}, {0, 1, 4, 5}, {0..7}.
__host__ __device__ constexpr int step_pair(int step) {
    return step < 2 ? 0 : step < 6 ? 1 : step < 10 ? 2 : 3;
}
__host__ __device__ constexpr int pair_first_step(int pair) {
    return pair == 0 ? 0 : pair == 1 ? 2 : pair == 2 ? 6 : pair == 3 ? 10 : STEPS;
}
__host__ __device__ constexpr int step_offset(int step) {
    const int pair = step_pair(step), i = step - pair_first_step(pair);
    return pair == 2 ? (i & 1) | ((i & 2) << 1) : i;
}

// Dynamic shared memory in floats: weights (A) [step][k-group][row][4], x (B)
// [copy][k-group][position][4], the raw x tile the copies land in ([ci][halo]), bias, slopes,
// and the x tile's mbarrier (8 bytes). _ops.py mirrors this (_wgmma_shared_bytes).
template <int CIP>
__host__ __device__ constexpr int shared_floats() {
    return STEPS * M_ROWS * CIP + 2 * CIP * PLANE + CIP * RAW_STRIDE + 3 * CO + 2;
}
}  // namespace wgmma_tile

// The bulk copy's tensor map (CUtensorMap: 128 opaque bytes, encoded on the host by
// cuTensorMapEncodeTiled), passed by value as a __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

// ------------------------------------------------------------------ wgmma, mbarrier and TMA
// (Builds without sm_90a, such as a plain sm_90 compile check, get empty bodies; the host
// launches this kernel only on a cc 9.0 device, from the sm_90a build.)

// Shared-memory matrix descriptor, no swizzle: start address, the byte distance between core
// matrices adjacent in K (leading) and in M or N (stride), each in 16-byte units.
__device__ __forceinline__ unsigned long long matrix_descriptor(unsigned int address,
                                                                unsigned int leading,
                                                                unsigned int stride) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) |
           ((unsigned long long)(leading >> 4) << 16) | ((unsigned long long)(stride >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving reads or writes of the accumulators across the fences above.
__device__ __forceinline__ void pin_accumulators(float (&acc)[32]) {
#pragma unroll
    for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// acc[64 x 64 fragment] += A(desc_a)[64 x 8] * B(desc_b)[8 x 64], TF32 inputs, fp32 sums.
__device__ __forceinline__ void wgmma_m64n64k8_tf32(float (&d)[32], unsigned long long desc_a,
                                                    unsigned long long desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, accumulate, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
          "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
          "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(1));
#else
    __trap();
#endif
}

// Generic-proxy writes to shared memory (the staged operands) before async-proxy reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ unsigned int shared_address(const void* p) {
    return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, int count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)),
                 "r"(count));
#endif
}
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned int phase) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    unsigned int done = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.b32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(shared_address(bar)), "r"(phase)
            : "memory");
    } while (!done);
#endif
}
// One bulk tensor copy of the x halo tile [ci][dd][hh][36] at `o` into raw; completes on bar.
__device__ __forceinline__ void tma_x_tile(float* raw, const TensorMap* map,
                                           persistent_tile::Origin o, unsigned long long* bar,
                                           unsigned int bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                     shared_address(bar)),
                 "r"(bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(shared_address(raw)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(o.w0), "r"(o.h0), "r"(o.d), "r"(0),
        "r"(o.n), "r"(shared_address(bar))
        : "memory");
#endif
}

// ------------------------------------------------------------------ staging

// The slot of w (0..31) within a staged line. Column c of a line's 4 column blocks holds
// w = 16 (j >> 1) + 4 (i >> 1) + 2 (j & 1) + (i & 1), j = c >> 3, i = c & 7: the accumulator
// columns 2t, 2t + 1 of blocks j and j ^ 1 are then w 4t..4t + 3 (and 16 + 4t..), so a thread's
// pooled values leave as 16-byte stores (store_tile).
__device__ __forceinline__ int line_slot(int w) {
    return ((w >> 4) << 4) | (((w >> 1) & 1) << 3) | (((w >> 2) & 3) << 1) | (w & 1);
}

__device__ __forceinline__ float tf32(float v) { return __uint_as_float(to_tf32(v)); }

// The weights of channels co0..co0+31 as every step's A operand, TF32-rounded, in two passes:
// the block's slice w[ci][co0..co0+31][27] arrives by coalesced loads in `scratch` (the x
// copies' space, free until the first tile), then each step's rows are gathered from it in
// shared memory with compile-time index arithmetic per step (gathered straight from global
// memory, every SM hammers the same L2 lines). Returns whether every weight is at most 2^40 in
// magnitude (NaN and inf fail).
template <int CIP>
__device__ __forceinline__ bool stage_weights(float* __restrict__ ws, float* __restrict__ scratch,
                                              const float* __restrict__ weight, int Cin,
                                              int Cout, int co0) {
    using namespace wgmma_tile;
    constexpr int SLICE = CO * TAPS;  // floats per input channel
    const int run = min(CO, Cout - co0) * TAPS;
    const int total = Cin * SLICE;
    constexpr int BATCH = 9;  // loads in flight per thread
#pragma unroll 1
    for (int first = threadIdx.x; first < total; first += BATCH * THREADS) {
        float v[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int e = first + i * THREADS, ci = e / SLICE, r = e - ci * SLICE;
            v[i] = (e < total && r < run) ? weight[((long long)ci * Cout + co0) * TAPS + r] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i)
            if (first + i * THREADS < total) scratch[first + i * THREADS] = v[i];
    }
    __syncthreads();
    bool bounded = true;
    constexpr int PER_STEP = M_ROWS * CIP;
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
        const int pair = step_pair(step), o = step_offset(step);
#pragma unroll
        for (int rest = threadIdx.x; rest < PER_STEP; rest += THREADS) {
            const int k_group = rest / (M_ROWS * 4), row = (rest >> 2) % M_ROWS;
            const int ci = 4 * k_group + (rest & 3), odd = (row >> 3) & 1;
            const int co_local = (row & 7) + 8 * (row >> 4);
            const bool used = (odd || !(o & 1)) && ci < Cin;  // class 2p has no odd-w offset
            const int tap = odd ? class_tap(2 * pair + 1, o) : class_tap(2 * pair, o & ~1);
            const float v = used ? scratch[(ci * CO + co_local) * TAPS + tap] : 0.f;
            ws[step * PER_STEP + rest] = tf32(v);
            bounded &= fabsf(v) <= 0x1p40f;
        }
    }
    return bounded;
}

// Raw tile [ci][halo] -> the two shifted copies [copy][k-group][line][slot][4], TF32-rounded: a
// warp per (k-group, line) row, lanes along w, all of a warp's row loads issued before its
// stores; x at w + 1 comes from the next lane, lane 31 loads the row's 33rd value. Returns
// whether the sum of |x| is at most 2^40 (NaN and inf fail), which lets the tile take the
// NaN-free fold.
template <int CIP>
__device__ __forceinline__ bool stage_x_copies(float* __restrict__ xt,
                                               const float* __restrict__ raw) {
    using namespace wgmma_tile;
    constexpr int GROUPS = CIP / 4, TOTAL = GROUPS * LINES, WARPS = THREADS / 32;
    constexpr int PER_WARP = (TOTAL + WARPS - 1) / WARPS;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // opaque, so that the row addresses are worked out here and not hoisted out of the tile
    // loop, where they would hold registers through the MMAs and folds
    asm volatile("" : "+r"(lane), "+r"(warp));
    float4* copies = reinterpret_cast<float4*>(xt);
    float magnitude = 0.f;
    constexpr int BATCH = 3;  // rows per batch: all of a warp's rows at once need too many registers
#pragma unroll
    for (int first = 0; first < PER_WARP; first += BATCH) {
        float4 v[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int row = warp + WARPS * (first + i);
            if (first + i < PER_WARP && row < TOTAL) {
                const int k_group = row / LINES, line = row - k_group * LINES;
                const float* src = raw + 4 * k_group * RAW_STRIDE + line * ROW + lane;
                v[i] = make_float4(src[0], src[RAW_STRIDE], src[2 * RAW_STRIDE],
                                   src[3 * RAW_STRIDE]);
            }
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int row = warp + WARPS * (first + i);
            if (first + i < PER_WARP && row < TOTAL) {
                const int k_group = row / LINES, line = row - k_group * LINES;
                float4 tail = v[i];
                if (lane == 31) {  // the row's 33rd value
                    const float* src = raw + 4 * k_group * RAW_STRIDE + line * ROW + 32;
                    tail = make_float4(src[0], src[RAW_STRIDE], src[2 * RAW_STRIDE],
                                       src[3 * RAW_STRIDE]);
                }
                const float4 x0 = make_float4(tf32(v[i].x), tf32(v[i].y), tf32(v[i].z),
                                              tf32(v[i].w));
                float4 x1;
                x1.x = __shfl_down_sync(0xffffffffu, x0.x, 1);
                x1.y = __shfl_down_sync(0xffffffffu, x0.y, 1);
                x1.z = __shfl_down_sync(0xffffffffu, x0.z, 1);
                x1.w = __shfl_down_sync(0xffffffffu, x0.w, 1);
                if (lane == 31) {
                    x1 = make_float4(tf32(tail.x), tf32(tail.y), tf32(tail.z), tf32(tail.w));
                    magnitude += fabsf(x1.x) + fabsf(x1.y) + fabsf(x1.z) + fabsf(x1.w);
                }
                magnitude += fabsf(x0.x) + fabsf(x0.y) + fabsf(x0.z) + fabsf(x0.w);
                float4* dst = copies + k_group * PLANE + line * LINE_LEN + line_slot(lane);
                dst[0] = x0;                // copy 0: x at w
                dst[GROUPS * PLANE] = x1;  // copy 1: x at w + 1
            }
        }
    }
    return magnitude <= 0x1p40f;
}

// ------------------------------------------------------------------ one tile

// Descriptor offsets (16-byte units) of step `step`, k-step kk: the step's weight block, and x
// shifted by the step's offset o (copy o & 1, lines moved by o's d and h parts).
template <int KSTEPS>
__host__ __device__ constexpr unsigned int a_offset(int step, int kk) {
    return (unsigned int)(step * wgmma_tile::M_ROWS * 8 * KSTEPS + kk * 2 * wgmma_tile::M_ROWS * 4) /
           4;
}
template <int KSTEPS>
__host__ __device__ constexpr unsigned int b_offset(int step, int kk) {
    using namespace wgmma_tile;
    const int o = wgmma_tile::step_offset(step),
              line_shift = ((o >> 2) & 1) * HALO_H + ((o >> 1) & 1);
    return (unsigned int)(((o & 1) * 2 * KSTEPS + 2 * kk) * PLANE + line_shift * LINE_LEN);
}

// The MMAs of class pair P: one m64n64k8 per input offset of the pair and k-step.
template <int P, int KSTEPS>
__device__ __forceinline__ void issue_pair(float (&acc)[32], unsigned long long desc_a,
                                           unsigned long long desc_b) {
    using namespace wgmma_tile;
#pragma unroll
    for (int step = pair_first_step(P); step < pair_first_step(P + 1); ++step)
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            wgmma_m64n64k8_tf32(acc, desc_a + a_offset<KSTEPS>(step, kk),
                                desc_b + b_offset<KSTEPS>(step, kk));
}

// Start class pair `pair` (a run-time value: each pair's MMAs are unrolled behind the switch,
// with compile-time descriptor offsets) from the bias.
template <int KSTEPS>
__device__ __forceinline__ void start_pair(float (&acc)[32], int pair, float bias,
                                           unsigned long long desc_a, unsigned long long desc_b) {
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = bias;
    pin_accumulators(acc);
    wgmma_fence();
    switch (pair) {
        case 0: issue_pair<0, KSTEPS>(acc, desc_a, desc_b); break;
        case 1: issue_pair<1, KSTEPS>(acc, desc_a, desc_b); break;
        case 2: issue_pair<2, KSTEPS>(acc, desc_a, desc_b); break;
        default: issue_pair<3, KSTEPS>(acc, desc_a, desc_b); break;
    }
    wgmma_commit();
}

// Fold class pair `pair`'s values into the running pools of one line pair. acc[4j + 2h + e]:
// class 2 pair + h at the thread's position q = 2j + e (line q >> 3, slot 8 (j & 3) + 2t + e);
// both classes of a position fold in class order. leaky(m * leaky(t)) is t * (t > 0 ? c_pos :
// c_neg) (persistent_tile::stage_bias_and_slopes). Window indices travel packed, one byte per
// window (4 per word); class_bytes holds the class in every byte, so a take is one bit-select.
// FINITE: the tile's values cannot be NaN (|x| <= 2^40 by stage_x_copies, |w| <= 2^40 and
// |bias| <= 2^100 keep every partial sum of t below 2^101; c_pos >= c_neg, both finite). Then
// t (t > 0 ? c_pos : c_neg) = max(t c_pos, t c_neg) (up to the sign of a zero) and PyTorch's
// rule (pool_takes) is a plain best < v: fewer ALU instructions per value, which is what bounds
// the fold.
template <bool FINITE>
__device__ __forceinline__ void fold_pair(float (&acc)[32], int pair, float c_pos, float c_neg,
                                          float (&best)[16], unsigned int (&windows)[4]) {
    pin_accumulators(acc);
    const unsigned int even = 0x01010101u * (2 * pair), odd = 0x01010101u * (2 * pair + 1);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int q = 2 * j + e;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float t = acc[4 * j + 2 * h + e];
                const float v = FINITE ? fmaxf(t * c_pos, t * c_neg)
                                       : t * (t > 0.f ? c_pos : c_neg);
                if (FINITE ? best[q] < v : pool_takes(best[q], v)) {
                    const unsigned int byte = 0xffu << (8 * (q & 3));
                    best[q] = v;
                    windows[q >> 2] = (windows[q >> 2] & ~byte) | ((h ? odd : even) & byte);
                }
            }
        }
}

// One tile's pools for the thread's channel and 16 positions: per class pair, its MMAs, then
// the fold of its two classes. The other warpgroups' MMAs keep the tensor cores busy while this
// one folds. The pair loop stays rolled: unrolled, the compiler hoists every pair's MMAs to the
// front, wanting four accumulator sets. best starts at -inf, so class 0 takes its value by the
// usual rule (and the index stays 0 for -inf, as PyTorch leaves it).
template <int KSTEPS>
__device__ __forceinline__ void tile_pools(unsigned long long desc_a, unsigned long long desc_b,
                                           float bias, float c_pos, float c_neg,
                                           float (&best)[16], unsigned int (&windows)[4],
                                           bool finite) {
#pragma unroll
    for (int i = 0; i < 16; ++i) best[i] = __int_as_float(0xff800000);  // -inf
#pragma unroll
    for (int i = 0; i < 4; ++i) windows[i] = 0;
#pragma unroll 1
    for (int pair = 0; pair < 4; ++pair) {
        float acc[32];
        start_pair<KSTEPS>(acc, pair, bias, desc_a, desc_b);
        wgmma_wait_all();
        if (finite)  // block-uniform
            fold_pair<true>(acc, pair, c_pos, c_neg, best, windows);
        else
            fold_pair<false>(acc, pair, c_pos, c_neg, best, windows);
    }
}

// The thread's 16 pooled values: channel co, lines h0 + hl0 and + 1; best[8 L + 4 u + k] is
// line L at w = w0 + 16 u + 4 t + k (the slot order above). Where `vectors` (W % 4 == 0, y
// 16-byte and the index 4-byte aligned), the lanes of channels 2i and 2i + 1 (lane ^ 4) swap
// halves first, so that each 16-byte store instruction covers whole 128-byte lines of y: lane
// (2i, t) stores channel 2i's w 4t.. and channel 2i + 1's w 4t..; lane (2i + 1, t) their
// w 16 + 4t.. .
__device__ __forceinline__ void store_tile(float* __restrict__ y,
                                           unsigned char* __restrict__ window_index,
                                           persistent_tile::Origin o, int hl0, int co, int t,
                                           int Cout, int D, int H, int W, bool vectors,
                                           const float (&best)[16],
                                           const unsigned int (&windows)[4]) {
    const long long spatial = (long long)D * H * W;
    if (vectors) {
        const bool upper = (threadIdx.x >> 2) & 1;  // the odd channel of the lane pair
        const int even_co = co & ~1, channels = Cout - even_co;
#pragma unroll
        for (int line = 0; line < 2; ++line) {
            const float* low = best + 8 * line;  // w 4t..
            const float* high = low + 4;         // w 16 + 4t..
            float4 send, mine;
            unsigned int send_index, mine_index;
            if (upper) {
                send = make_float4(low[0], low[1], low[2], low[3]);
                mine = make_float4(high[0], high[1], high[2], high[3]);
                send_index = windows[2 * line];
                mine_index = windows[2 * line + 1];
            } else {
                send = make_float4(high[0], high[1], high[2], high[3]);
                mine = make_float4(low[0], low[1], low[2], low[3]);
                send_index = windows[2 * line + 1];
                mine_index = windows[2 * line];
            }
            float4 got;
            got.x = __shfl_xor_sync(0xffffffffu, send.x, 4);
            got.y = __shfl_xor_sync(0xffffffffu, send.y, 4);
            got.z = __shfl_xor_sync(0xffffffffu, send.z, 4);
            got.w = __shfl_xor_sync(0xffffffffu, send.w, 4);
            const unsigned int got_index = __shfl_xor_sync(0xffffffffu, send_index, 4);
            const int h = o.h0 + hl0 + line, w = o.w0 + (upper ? 16 : 0) + 4 * t;
            if (h < H && w < W) {
                const long long base =
                    (((long long)o.n * Cout + even_co) * D + o.d) * H * (long long)W +
                    (long long)h * W + w;
                // even channel: the lower lane's own half, the upper lane's received one; odd:
                // swapped
                if (channels > 0) {
                    *reinterpret_cast<float4*>(y + base) = upper ? got : mine;
                    *reinterpret_cast<unsigned int*>(window_index + base) =
                        upper ? got_index : mine_index;
                }
                if (channels > 1) {
                    *reinterpret_cast<float4*>(y + base + spatial) = upper ? mine : got;
                    *reinterpret_cast<unsigned int*>(window_index + base + spatial) =
                        upper ? mine_index : got_index;
                }
            }
        }
        return;
    }
    if (co >= Cout) return;
#pragma unroll
    for (int line = 0; line < 2; ++line) {
        const int h = o.h0 + hl0 + line;
        if (h >= H) continue;
        const long long base =
            (((long long)o.n * Cout + co) * D + o.d) * H * (long long)W + (long long)h * W;
#pragma unroll
        for (int q = 8 * line; q < 8 * line + 8; ++q) {
            const int w = o.w0 + 16 * ((q >> 2) & 1) + 4 * t + (q & 3);
            if (w < W) {
                y[base + w] = best[q];
                window_index[base + w] = (unsigned char)(windows[q >> 2] >> (8 * (q & 3)));
            }
        }
    }
}

// KSTEPS: C_in / 8 rounded up (1 or 2). use_tma: x tiles arrive by one bulk tensor copy each
// (x_map: dims (W, H, D, C_in, N), box (36, 9, 2, C_in, 1), out-of-range elements as zeros);
// otherwise every thread's cp.async copies (issue_x_tile).
template <int KSTEPS>
__global__ void __launch_bounds__(wgmma_tile::THREADS, 1) parity_forward_wgmma(
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ multiplier, float* __restrict__ y,
    unsigned char* __restrict__ window_index, int N, int Cin, int Cout, int D, int H, int W,
    int multiplier_stride, int has_bias, double negative_slope, int tiles, int tiles_h,
    int tiles_w, int use_tma, const __grid_constant__ TensorMap x_map) {
    using namespace wgmma_tile;
    constexpr int CIP = 8 * KSTEPS;
    extern __shared__ __align__(128) float4 smem4[];
    float* ws = reinterpret_cast<float*>(smem4);
    float* xt = ws + STEPS * M_ROWS * CIP;
    float* raw = xt + 2 * CIP * PLANE;  // 128-byte aligned, as the bulk copy wants
    float* bias_s = raw + CIP * RAW_STRIDE;
    float* slopes_s = bias_s + CO;  // [c_pos x 32][c_neg x 32]
    unsigned long long* x_ready = reinterpret_cast<unsigned long long*>(slopes_s + 2 * CO);
    const int co0 = blockIdx.y * CO;
    if ((int)blockIdx.x >= tiles) return;
    const unsigned int tile_bytes = (unsigned int)(Cin * RAW_STRIDE * sizeof(float));

    // Start the copy of tile `index` into raw: one bulk tensor copy, or every thread's cp.async.
    auto fetch_x_tile = [&](int index) {
        const Origin o = origin_of(index, D, tiles_h, tiles_w);
        if (use_tma) {
            if (threadIdx.x == 0) tma_x_tile(raw, &x_map, o, x_ready, tile_bytes);
        } else {
            // (the flag and the thread's row arithmetic are worked out per tile: held through
            // the tile loop, they spill)
            const bool chunks =
                W % 4 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
            issue_x_tile<CIP, RAW_STRIDE, THREADS, true>(raw, x, o, Cin, D, H, W, chunks);
            stage_commit();
        }
    };
    int tile = blockIdx.x;
    if (use_tma) {
        // channels past C_in (up to the k-step) stay zero: the box covers C_in channels only
        for (int i = Cin * RAW_STRIDE + threadIdx.x; i < CIP * RAW_STRIDE; i += THREADS)
            raw[i] = 0.f;
        if (threadIdx.x == 0) {
            mbarrier_init(x_ready, 1);
            fence_proxy_async();
        }
        __syncthreads();
    }
    fetch_x_tile(tile);
    // xt is free until the first tile's staging: the weight slice passes through it
    bool finite_block = stage_weights<CIP>(ws, xt, weight, Cin, Cout, co0);
    stage_bias_and_slopes(bias_s, slopes_s, bias, multiplier, co0, Cout, multiplier_stride,
                          has_bias, negative_slope);
    if (threadIdx.x < CO && co0 + (int)threadIdx.x < Cout) {
        const float c_pos = slopes_s[threadIdx.x], c_neg = slopes_s[CO + threadIdx.x];
        finite_block &= c_pos >= c_neg && fabsf(c_pos) <= 3.402823466e38f &&
                        fabsf(c_neg) <= 3.402823466e38f && fabsf(bias_s[threadIdx.x]) <= 0x1p100f;
    }
    finite_block = __syncthreads_and(finite_block);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hl0 = 2 * (warp >> 2), channel = 8 * (warp & 3) + (lane >> 2), t = lane & 3;
    const unsigned long long desc_a = matrix_descriptor(shared_address(ws), M_ROWS * 16, 128);
    const unsigned long long desc_b =
        matrix_descriptor(shared_address(xt) + hl0 * LINE_LEN * 16, PLANE * 16, 128);

    unsigned int phase = 0;
    for (; tile < tiles; tile += gridDim.x) {
        const Origin o = origin_of(tile, D, tiles_h, tiles_w);
        if (use_tma) {
            mbarrier_wait(x_ready, phase);
            phase ^= 1;
        } else {
            stage_wait_pending<0>();
        }
        __syncthreads();  // the raw tile is in; nobody reads xt any more
        const bool x_bounded = stage_x_copies<CIP>(xt, raw);
        fence_proxy_async();  // generic stores to xt / ws, then reads by the tensor cores
        const bool finite = __syncthreads_and(x_bounded) && finite_block;
        // raw is free again: fetch the next tile during this one's math
        if (tile + (int)gridDim.x < tiles) fetch_x_tile(tile + gridDim.x);
        float best[16];
        unsigned int windows[4];
        tile_pools<KSTEPS>(desc_a, desc_b, bias_s[channel], slopes_s[channel],
                           slopes_s[CO + channel], best, windows, finite);
        const bool vectors = W % 4 == 0 && (reinterpret_cast<unsigned long long>(y) & 15) == 0 &&
                             (reinterpret_cast<unsigned long long>(window_index) & 3) == 0;
        store_tile(y, window_index, o, hl0, co0 + channel, t, Cout, D, H, W, vectors, best,
                   windows);
    }
}

#ifndef __CUDACC_RTC__
#define FUSED3D_INSTANTIATE_WGMMA(KSTEPS)                                                      \
    template __global__ void parity_forward_wgmma<KSTEPS>(                                     \
        const float*, const float*, const float*, const float*, float*, unsigned char*, int,   \
        int, int, int, int, int, int, int, double, int, int, int, int,                        \
        const __grid_constant__ TensorMap);
FUSED3D_INSTANTIATE_WGMMA(1)
FUSED3D_INSTANTIATE_WGMMA(2)
#endif
