// Parity fast-path forward on Hopper's warpgroup MMA (wgmma, sm_90a): fp32 with TF32 allowed.
//
// Same job and tiling as parity_forward.cu's tensor-core kernel (ONE launch from x to pooled y
// and the uint8 window index, nothing conv-sized in memory; one image n, one depth d, 8 h-lines
// x 32 w pooled positions, 32 output channels per tile), but the convolution runs as
// asynchronous warpgroup MMAs that read both operands from shared memory, and x tiles arrive by
// bulk tensor copies (TMA) that no thread waits on. What bounds it is in the backend's README.
//
// A warpgroup (4 warps) owns 2 h-lines. Per class pair (2p, 2p+1) it computes
// D[64 x 64] = bias + sum over the pair's input offsets o of A_o[64 x K] * B_o[K x 64], K = C_in:
//  * rows (A, the weights): row r is class 2p + ((r >> 3) & 1), channel (r & 7) + 8 (r >> 4), so
//    a thread's accumulators hold both classes of one channel (the pool folds them in order);
//  * columns (B, x): the 64 pooled positions of the 2 h-lines (in line_slot order), x shifted by o.
// The offsets of a pair are those of class 2p + 1 (2, 4, 4 and 8: 18 steps for the 27 taps);
// class 2p's rows are zero at the offsets with an odd w, which only class 2p + 1 uses.
//
// Shared memory holds both operands in wgmma's canonical K-major layout without swizzle: "core
// matrices" of 8 rows x 16 bytes (4 TF32 values of K), contiguous. x is staged twice, shifted by
// 0 and by 1 in w, each line exactly 32 positions long: then the 64 positions of two h-lines
// are evenly spaced core matrices for every offset (one stride per descriptor), which a single
// copy with its 33-wide halo rows would not give.
//
// Per tile the block (1) waits for its x tile, (2) stages the two TF32 copies, (3) starts the
// next tile's copy and (4) runs the MMAs and folds. Measured on the H100 (stand-alone harness,
// one run, 0.107 ms before): TMA x copies instead of 2,600 cp.async per tile 0.096, weights
// staged from a coalesced slice 0.085 (the per-element gather hammered the same L2 lines from
// every SM), all loads of a warp's staging rows issued first 0.079.
#include "parity_common.cuh"
#include "wgmma_common.cuh"

#include <cfloat>

#if defined(FUSED3D_WGMMA) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "FUSED3D_WGMMA builds need the sm_90a target (-gencode=arch=compute_90a,code=sm_90a)"
#endif

namespace fused3d_cuda {
namespace parity {
namespace wgmma_forward {

constexpr int kThreads = 512;              // 4 warpgroups of 2 h-lines: the 8 lines of a tile
constexpr int kLines = kHaloD * kHaloH;    // 18 staged (d, h) lines
constexpr int kLineLen = kTileW;           // 32 positions per staged line
constexpr int kPlane = kLines * kLineLen;  // positions per 4-channel group and copy
constexpr int kRows = 64;                  // wgmma M: 2 classes x 32 channels
constexpr int kRawStride = kHalo;          // channel stride of the raw x tile (a dense TMA box)
constexpr int kSteps = 18;                 // (class pair, input offset) steps

// The steps: class pairs in order, each over the input offsets of its odd class 2p + 1
// (subsets of 2p + 1's odd axes, ascending): {0, 1}, {0..3}, {0, 1, 4, 5}, {0..7}.
__host__ __device__ constexpr int step_pair(int step) {
  return step < 2 ? 0 : step < 6 ? 1 : step < 10 ? 2 : 3;
}
__host__ __device__ constexpr int pair_first_step(int pair) {
  return pair == 0 ? 0 : pair == 1 ? 2 : pair == 2 ? 6 : pair == 3 ? 10 : kSteps;
}
__host__ __device__ constexpr int step_offset(int step) {
  const int pair = step_pair(step), i = step - pair_first_step(pair);
  return pair == 2 ? (i & 1) | ((i & 2) << 1) : i;
}

// Dynamic shared memory: weights (A) [step][k-group][row][4], x (B) [copy][k-group][position][4],
// the raw x tile the copies land in ([ci][halo], as issue_x_tile writes it), bias and slopes.
// Dynamic shared memory: weights (A) [step][k-group][row][4], x (B) [copy][k-group][position][4],
// the raw x tile the copies land in ([ci][halo]), bias and slopes, the x tile's mbarrier.
template <int CIP>
__host__ __device__ constexpr size_t smem_floats() {
  return (size_t)kSteps * kRows * CIP + 2 * CIP * kPlane + CIP * kRawStride + 3 * kCoTile + 2;
}

// ------------------------------------------------------------------ MMA

// acc[64 x 64 fragment] += A(desc_a)[64 x 8] * B(desc_b)[8 x 64], TF32 inputs, fp32 sums.
__device__ __forceinline__ void wgmma_tf32_m64n64k8(float (&d)[32], uint64_t desc_a,
                                                    uint64_t desc_b) {
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
  __trap();  // only sm_90a builds launch this kernel (FUSED3D_WGMMA)
#endif
}

// ------------------------------------------------------------------ TMA

// One bulk tensor copy of the x halo tile [ci][dd][hh][36] of tile c into raw; completes on bar.
__device__ __forceinline__ void tma_x_tile(float* raw, const CUtensorMap* map, TileCoord c,
                                           uint64_t* bar, uint32_t bytes) {
  mbarrier_expect_bytes(bar, bytes);
  tma_load_5d(raw, map, c.w0, c.h0, c.d, 0, c.n, bar);
}

// ------------------------------------------------------------------ staging

// The slot of w (0..31) within a staged line. Column c of a line's 4 column blocks holds
// w = 16 (j >> 1) + 4 (i >> 1) + 2 (j & 1) + (i & 1), j = c >> 3, i = c & 7: the accumulator
// columns 2t, 2t + 1 of blocks j and j ^ 1 are then w 4t..4t + 3 (and 16 + 4t..), so a thread's
// pooled values leave as 16-byte stores (store_tile).
__device__ __forceinline__ int line_slot(int w) {
  return ((w >> 4) << 4) | (((w >> 1) & 1) << 3) | (((w >> 2) & 3) << 1) | (w & 1);
}

// The weights of channels co0..co0+31 as every step's A operand, TF32-rounded, in two passes:
// the block's slice w[ci][co0..co0+31][27] arrives by coalesced loads in `scratch` (the x copies'
// space, free until the first tile), then each step's rows are gathered from it in shared
// memory, where the index arithmetic is compile-time per step. Returns whether every weight is
// at most 2^40 in magnitude (NaN and inf fail).
template <int CIP>
__device__ __forceinline__ bool stage_weights(float* __restrict__ ws, float* __restrict__ scratch,
                                              const float* __restrict__ w, const BlockShape& s,
                                              int co0) {
  constexpr int kSlice = kCoTile * 27;  // floats per input channel
  const int run = min(kCoTile, s.out_channels - co0) * 27;
  const int total = s.in_channels * kSlice;
  constexpr int kBatch = 9;
#pragma unroll 1
  for (int first = threadIdx.x; first < total; first += kBatch * kThreads) {
    float v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int e = first + i * kThreads, ci = e / kSlice, r = e - ci * kSlice;
      v[i] = (e < total && r < run) ? w[((int64_t)ci * s.out_channels + co0) * 27 + r] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      if (first + i * kThreads < total) scratch[first + i * kThreads] = v[i];
  }
  __syncthreads();
  bool bounded = true;
  constexpr int kPerStep = kRows * CIP;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int pair = step_pair(step), o = step_offset(step);
#pragma unroll
    for (int rest = threadIdx.x; rest < kPerStep; rest += kThreads) {
      const int k_group = rest / (kRows * 4), row = (rest >> 2) % kRows;
      const int ci = 4 * k_group + (rest & 3), odd = (row >> 3) & 1;
      const int co_local = (row & 7) + 8 * (row >> 4);
      const bool used = (odd || !(o & 1)) && ci < s.in_channels;  // class 2p has no odd-w offset
      const int tap = odd ? class_tap(2 * pair + 1, o) : class_tap(2 * pair, o & ~1);
      const float v = used ? scratch[(ci * kCoTile + co_local) * 27 + tap] : 0.f;
      ws[step * kPerStep + rest] = to_tf32(v);
      bounded &= fabsf(v) <= 0x1p40f;
    }
  }
  return bounded;
}

// Raw tile [ci][halo] -> the two shifted copies [copy][k-group][line][slot][4], TF32-rounded: a
// warp per (k-group, line) row, lanes along w, all of a warp's row loads issued before its
// stores (one at a time, the staging was a chain of load latencies); x at w + 1 comes from the
// next lane, lane 31 loads the row's 33rd value. Returns whether the sum of |x| is at most 2^40
// (NaN and inf fail), which lets the tile take fold_pair<true>.
template <int CIP>
__device__ __forceinline__ bool stage_x_copies(float* __restrict__ xt,
                                               const float* __restrict__ raw) {
  constexpr int kGroups = CIP / 4, kTotal = kGroups * kLines, kWarps = kThreads / 32;
  constexpr int kPerWarp = (kTotal + kWarps - 1) / kWarps;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // opaque, so that the row addresses are worked out here and not hoisted out of the tile
  // loop, where they would hold registers through the MMAs and folds (and spill)
  asm volatile("" : "+r"(lane), "+r"(warp));
  float4* copies = reinterpret_cast<float4*>(xt);
  float magnitude = 0.f;
  // rows in batches of three: all five of a warp's rows at once spill (128 registers)
  constexpr int kBatch = 3;
#pragma unroll
  for (int first = 0; first < kPerWarp; first += kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = warp + kWarps * (first + i);
      if (first + i < kPerWarp && row < kTotal) {
        const int k_group = row / kLines, line = row - k_group * kLines;
        const float* src = raw + 4 * k_group * kRawStride + line * kHaloRow + lane;
        v[i] = make_float4(src[0], src[kRawStride], src[2 * kRawStride], src[3 * kRawStride]);
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = warp + kWarps * (first + i);
      if (first + i < kPerWarp && row < kTotal) {
        const int k_group = row / kLines, line = row - k_group * kLines;
        float4 tail = v[i];
        if (lane == 31) {  // the row's 33rd value
          const float* src = raw + 4 * k_group * kRawStride + line * kHaloRow + 32;
          tail = make_float4(src[0], src[kRawStride], src[2 * kRawStride], src[3 * kRawStride]);
        }
        const float4 x0 =
            make_float4(to_tf32(v[i].x), to_tf32(v[i].y), to_tf32(v[i].z), to_tf32(v[i].w));
        float4 x1;
        x1.x = __shfl_down_sync(0xffffffffu, x0.x, 1);
        x1.y = __shfl_down_sync(0xffffffffu, x0.y, 1);
        x1.z = __shfl_down_sync(0xffffffffu, x0.z, 1);
        x1.w = __shfl_down_sync(0xffffffffu, x0.w, 1);
        if (lane == 31) {
          x1 = make_float4(to_tf32(tail.x), to_tf32(tail.y), to_tf32(tail.z), to_tf32(tail.w));
          magnitude += fabsf(x1.x) + fabsf(x1.y) + fabsf(x1.z) + fabsf(x1.w);
        }
        magnitude += fabsf(x0.x) + fabsf(x0.y) + fabsf(x0.z) + fabsf(x0.w);
        float4* dst = copies + k_group * kPlane + line * kLineLen + line_slot(lane);
        dst[0] = x0;                 // copy 0: x at w
        dst[kGroups * kPlane] = x1;  // copy 1: x at w + 1
      }
    }
  }
  return magnitude <= 0x1p40f;
}

// ------------------------------------------------------------------ one tile

// Issue the wgmma of class pair P into acc: per input offset and k-step, one m64n64k8.
// The MMAs of class pair P into acc: one m64n64k8 per input offset o of the pair and k-step,
// with the descriptors moved (at compile time) to the step's weight block and to x shifted by o:
// copy o & 1, lines moved by o's d and h parts.
template <int KSTEPS>
__host__ __device__ constexpr uint32_t a_offset(int step, int kk) {  // 16-byte units
  return (uint32_t)(step * kRows * 8 * KSTEPS + kk * 2 * kRows * 4) / 4;
}
template <int KSTEPS>
__host__ __device__ constexpr uint32_t b_offset(int step, int kk) {
  const int o = step_offset(step), line_shift = ((o >> 2) & 1) * kHaloH + ((o >> 1) & 1);
  return (uint32_t)(((o & 1) * 2 * KSTEPS + 2 * kk) * kPlane + line_shift * kLineLen);
}

template <int P, int KSTEPS>
__device__ __forceinline__ void issue_pair(float (&acc)[32], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int step = pair_first_step(P); step < pair_first_step(P + 1); ++step)
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
      wgmma_tf32_m64n64k8(acc, desc_a + a_offset<KSTEPS>(step, kk),
                          desc_b + b_offset<KSTEPS>(step, kk));
}

// The MMAs of class pair `pair` (a run-time value: each pair's MMAs are unrolled behind the
// switch, with compile-time descriptor offsets) for one line pair into acc.
template <int KSTEPS>
__device__ __forceinline__ void start_pair(float (&acc)[32], int pair, float bias,
                                           uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = bias;
  fence_operands(acc);
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
// both classes of a position fold in class order.
// kFinite: the tile's values cannot be NaN (|x| <= 2^40 by stage_x_copies, |w| <= 2^40 and
// |bias| <= 2^100 keep every partial sum of t below 2^101, c_pos >= c_neg are finite). Then
// t (t > 0 ? c_pos : c_neg) = max(t c_pos, t c_neg) (up to the sign of a zero) and PyTorch's
// rule is a plain best < v: 4.8 ALU-pipe instructions per value instead of fold_into_pool's
// 6.8, and the ALU pipe (which issues every other cycle) is what bounds the fold.
template <bool kFinite>
__device__ __forceinline__ void fold_pair(float (&acc)[32], int pair, float c_pos, float c_neg,
                                          float (&best)[16], uint32_t (&windows)[4]) {
  fence_operands(acc);
  const uint32_t even = class_bytes(2 * pair), odd = class_bytes(2 * pair + 1);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int q = 2 * j + e;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float t = acc[4 * j + 2 * h + e];
        if (!kFinite) {
          fold_into_pool<false>(t, c_pos, c_neg, h ? odd : even, q & 3, best[q], windows[q >> 2]);
          continue;
        }
        const float v = fmaxf(t * c_pos, t * c_neg);
        if (best[q] < v) {
          const uint32_t byte = 0xffu << (8 * (q & 3));
          best[q] = v;
          windows[q >> 2] = (windows[q >> 2] & ~byte) | ((h ? odd : even) & byte);
        }
      }
    }
}

// One tile's pools for the thread's channel and 16 positions: per class pair, its MMAs, then
// the fold of its two classes, in one accumulator set. The other warpgroups' MMAs keep the
// tensor cores busy while this one folds (tried and slower: 256 threads, each warpgroup
// pipelining two line pairs through two accumulator sets, 0.110 against 0.094 ms; two sets
// do not fit 512 threads' 128 registers). The class-pair loop stays rolled: fully unrolled,
// ptxas hoisted every pair's MMAs to the front, wanting four accumulator sets, and serialised
// them. best starts at -inf, so class 0 takes its value by the usual rule (and the index stays
// 0 for -inf, as PyTorch leaves it).
template <int KSTEPS>
__device__ __forceinline__ void tile_pools(uint64_t desc_a, uint64_t desc_b, float bias,
                                           float c_pos, float c_neg, float (&best)[16],
                                           uint32_t (&windows)[4], bool finite) {
#pragma unroll
  for (int i = 0; i < 16; ++i) best[i] = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i) windows[i] = 0;
#pragma unroll 1
  for (int pair = 0; pair < 4; ++pair) {
    float acc[32];
    start_pair<KSTEPS>(acc, pair, bias, desc_a, desc_b);
    wgmma_wait<0>();
    if (finite)  // block-uniform
      fold_pair<true>(acc, pair, c_pos, c_neg, best, windows);
    else
      fold_pair<false>(acc, pair, c_pos, c_neg, best, windows);
  }
}

// The thread's 16 pooled values: one channel, lines hl0 and hl0 + 1; best[8 L + 4 u + k] is
// line L at w = 16 u + 4 t + k (the slot order above). Where W % 4 == 0 and the pointers are
// aligned, the lanes of channels 2i and 2i + 1 (lane ^ 4) swap halves first, so that each
// 16-byte store instruction covers whole 128-byte lines of y: lane (2i, t) stores channel
// 2i's w 4t.. and channel 2i + 1's w 4t..; lane (2i + 1, t) their w 16 + 4t.. .
__device__ __forceinline__ void store_tile(float* y, uint8_t* window_index, const BlockShape& s,
                                           TileCoord c, int hl0, int co, int t,
                                           const float (&best)[16], const uint32_t (&windows)[4]) {
  const bool vectors = s.in_size[2] % 4 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(window_index) & 3) == 0;
  if (vectors) {
    const bool upper = (threadIdx.x >> 2) & 1;  // the odd channel of the lane pair
#pragma unroll
    for (int line = 0; line < 2; ++line) {
      const float* low = best + 8 * line;  // w 4t..
      const float* high = low + 4;         // w 16 + 4t..
      float4 send, mine;
      uint32_t send_index, mine_index;
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
      const uint32_t got_index = __shfl_xor_sync(0xffffffffu, send_index, 4);
      const int even_co = co & ~1;
      const PooledOutputs out = pooled_outputs(s, c, c.h0 + hl0 + line, even_co);
      const int w = c.w0 + (upper ? 16 : 0) + 4 * t;
      if (w < out.width) {
        // even channel: the lower lane's own half, the upper lane's received one; odd: swapped
        if (out.channels > 0) {
          *reinterpret_cast<float4*>(y + out.base + w) = upper ? got : mine;
          *reinterpret_cast<uint32_t*>(window_index + out.base + w) = upper ? got_index : mine_index;
        }
        if (out.channels > 1) {
          const int64_t off = out.base + out.channel_stride + w;
          *reinterpret_cast<float4*>(y + off) = upper ? mine : got;
          *reinterpret_cast<uint32_t*>(window_index + off) = upper ? mine_index : got_index;
        }
      }
    }
    return;
  }
#pragma unroll
  for (int line = 0; line < 2; ++line) {
    const PooledOutputs out = pooled_outputs(s, c, c.h0 + hl0 + line, co);
    if (out.channels <= 0) continue;
#pragma unroll
    for (int q = 8 * line; q < 8 * line + 8; ++q) {
      const int w = c.w0 + 16 * ((q >> 2) & 1) + 4 * t + (q & 3);
      store_pooled(y, window_index, out, 0, w, best[q], (windows[q >> 2] >> (8 * (q & 3))) & 0xffu);
    }
  }
}

// KSTEPS: C_in / 8 rounded up (1 or 2; 24 channels do not fit the shared memory). With
// use_tma, x tiles arrive by one bulk tensor copy each (x_map); otherwise by cp.async.
template <int KSTEPS>
__global__ void __launch_bounds__(kThreads, 1)
    parity_forward_wgmma_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                const float* __restrict__ bias,
                                const float* __restrict__ multiplier, float* __restrict__ y,
                                uint8_t* __restrict__ window_index, BlockShape s,
                                ForwardGeometry geo, const __grid_constant__ CUtensorMap x_map,
                                bool use_tma) {
  constexpr int CIP = 8 * KSTEPS;
  extern __shared__ __align__(128) float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  float* xt = ws + kSteps * kRows * CIP;
  float* raw = xt + 2 * CIP * kPlane;  // 128-byte aligned, as the bulk copy wants
  float* bias_s = raw + CIP * kRawStride;
  float* slopes_s = bias_s + kCoTile;  // [c_pos x 32][c_neg x 32]
  uint64_t* x_ready = reinterpret_cast<uint64_t*>(slopes_s + 2 * kCoTile);
  const int co0 = blockIdx.y * kCoTile;
  if ((int)blockIdx.x >= geo.tiles) return;
  const uint32_t tile_bytes = (uint32_t)(s.in_channels * kRawStride * sizeof(float));

  // Start the copy of tile `index` into raw: one bulk tensor copy, or every thread's cp.async.
  auto fetch_x_tile = [&](int index) {
    const TileCoord c = decode_tile(index, s.in_size[0], geo.h_tiles, geo.w_tiles);
    if (use_tma) {
      if (threadIdx.x == 0) tma_x_tile(raw, &x_map, c, x_ready, tile_bytes);
    } else {
      issue_x_tile<float>(raw, x, s, c, CIP, kRawStride);
      cp_async_commit();
    }
  };
  int tile = blockIdx.x;
  if (use_tma) {
    // channels past C_in (up to the k-step) stay zero: the box covers C_in channels only
    for (int i = s.in_channels * kRawStride + threadIdx.x; i < CIP * kRawStride; i += kThreads)
      raw[i] = 0.f;
    if (threadIdx.x == 0) {
      mbarrier_init(x_ready, 1);
      fence_proxy_async();
    }
    __syncthreads();
  }
  fetch_x_tile(tile);
  // xt is free until the first tile's staging: the weight slice passes through it
  bool finite_block = stage_weights<CIP>(ws, xt, w, s, co0);
  stage_channel_constants(bias_s, slopes_s, bias, multiplier, s, co0);
  if (threadIdx.x < kCoTile && co0 + (int)threadIdx.x < s.out_channels) {
    const float c_pos = slopes_s[threadIdx.x], c_neg = slopes_s[kCoTile + threadIdx.x];
    finite_block &= c_pos >= c_neg && fabsf(c_pos) <= FLT_MAX && fabsf(c_neg) <= FLT_MAX &&
                    fabsf(bias_s[threadIdx.x]) <= 0x1p100f;
  }
  finite_block = __syncthreads_and(finite_block);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hl0 = 2 * (warp >> 2), channel = 8 * (warp & 3) + (lane >> 2), t = lane & 3;
  const uint64_t desc_a =
      matrix_descriptor((uint32_t)__cvta_generic_to_shared(ws), kRows * 16, 128);
  const uint64_t desc_b = matrix_descriptor(
      (uint32_t)__cvta_generic_to_shared(xt) + hl0 * kLineLen * 16, kPlane * 16, 128);

  uint32_t phase = 0;
  for (; tile < geo.tiles; tile += gridDim.x) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    if (use_tma) {
      mbarrier_wait(x_ready, phase);
      phase ^= 1;
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // the raw tile is in; nobody reads xt any more
    const bool x_bounded = stage_x_copies<CIP>(xt, raw);
    fence_proxy_async();  // generic stores to xt / ws, then reads by the tensor cores
    const bool finite = __syncthreads_and(x_bounded) && finite_block;
    // raw is free again: fetch the next tile during this one's math
    if (tile + (int)gridDim.x < geo.tiles) fetch_x_tile(tile + gridDim.x);
    float best[16];
    uint32_t windows[4];
    tile_pools<KSTEPS>(desc_a, desc_b, bias_s[channel], slopes_s[channel],
                       slopes_s[kCoTile + channel], best, windows, finite);
    store_tile(y, window_index, s, c, hl0, co0 + channel, t, best, windows);
  }
}

// The x tensor map of the bulk copies: box (36, 9, 2, C_in, 1), a halo tile with kHaloRow-long
// rows (see encode_x_tensor_map). False where it cannot be made: the kernel then copies with
// cp.async.
inline bool encode_x_map(CUtensorMap* map, const BlockShape& s, const void* x) {
  const cuuint32_t box[5] = {kHaloRow, kHaloH, kHaloD, (cuuint32_t)s.in_channels, 1};
  return encode_x_tensor_map(map, s, x, box, CU_TENSOR_MAP_SWIZZLE_NONE);
}

template <int KSTEPS>
cudaError_t launch(const BlockShape& s, const ForwardArgs& a, cudaStream_t stream) {
  int64_t tiles = 0;
  const ForwardGeometry geo = forward_geometry(s, 8 * KSTEPS, &tiles);
  if (tiles == 0 || s.out_channels == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * smem_floats<8 * KSTEPS>();
  auto kernel = parity_forward_wgmma_kernel<KSTEPS>;
  cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  int sms = 0;
  if ((e = current_sm_count(&sms)) != cudaSuccess) return e;
  const int co_chunks = (s.out_channels + kCoTile - 1) / kCoTile;
  // A persistent grid, one block per SM, spread over the channel chunks.
  int blocks = (sms + co_chunks - 1) / co_chunks;
  if (blocks < 1) blocks = 1;
  if (blocks > geo.tiles) blocks = geo.tiles;
  CUtensorMap x_map{};
  const bool use_tma = encode_x_map(&x_map, s, a.x);
  kernel<<<dim3(blocks, co_chunks), kThreads, smem, stream>>>(
      static_cast<const float*>(a.x), static_cast<const float*>(a.weight),
      static_cast<const float*>(a.bias), static_cast<const float*>(a.multiplier),
      static_cast<float*>(a.y), a.window_index, s, geo, x_map, use_tma);
  return cudaGetLastError();
}

}  // namespace wgmma_forward
}  // namespace parity

bool parity_wgmma_forward_supported(const BlockShape& s, DType dtype, bool allow_tf32) {
#if defined(FUSED3D_WGMMA)
  return dtype == DType::Float32 && allow_tf32 && s.in_channels <= 16 &&
         parity_forward_supported(s, dtype, allow_tf32);
#else
  (void)s, (void)dtype, (void)allow_tf32;
  return false;
#endif
}

cudaError_t launch_parity_wgmma_forward(const BlockShape& s, const ForwardArgs& a,
                                        cudaStream_t stream) {
  return s.in_channels <= 8 ? parity::wgmma_forward::launch<1>(s, a, stream)
                            : parity::wgmma_forward::launch<2>(s, a, stream);
}

template __global__ void parity::wgmma_forward::parity_forward_wgmma_kernel<1>(
    const float*, const float*, const float*, const float*, float*, uint8_t*, BlockShape,
    parity::ForwardGeometry, const __grid_constant__ CUtensorMap, bool);
template __global__ void parity::wgmma_forward::parity_forward_wgmma_kernel<2>(
    const float*, const float*, const float*, const float*, float*, uint8_t*, BlockShape,
    parity::ForwardGeometry, const __grid_constant__ CUtensorMap, bool);

}  // namespace fused3d_cuda
