// Parity fast-path backward on tensor cores (TF32 mma.sync, fp32 accumulation), for fp32 with
// allow_tf32 and for fp16/bf16 (C_in <= 16, C_out <= 32; other calls take the general path).
//
//  1. dz kernel: dz = g * leaky'(v) * m * leaky'(z) at each window's winner, written to a
//     pooled-size scratch with per-block channel partials of dbias and dmultiplier. Two ways:
//     a. from the saved pooled output y (the usual case): an elementwise pass, since y's sign
//        gives the two leaky slopes and leaky'(v) * leaky(z) = y / m (see the kernel);
//     b. without y, or for a negative slope (y's sign no longer tells z's): the winner kernel,
//        the forward's implicit GEMM again, keeping only the winning class's conv value.
//     dz is stored rounded to TF32 with the winning class as a one-hot flag in its 8 low
//     mantissa bits (which TF32 ignores), so the later kernels read one word per element and
//     keep or zero it for a class with one bit test.
//  2. dx kernel: dx[i] = sum over offsets o and classes P >= o of dz_P[i - o] W[k(P,o)]^T, an
//     implicit GEMM over input positions (gather form: every dx element is written once by one
//     thread, no atomics).
//  3. dweight kernel: dW[k(P,o)] = sum over pooled m of x[m + o]^T dz_P[m], per-block partials
//     (for fp32 with TF32 on Hopper builds: parity_backward_wgmma.cu's warpgroup-MMA kernel).
//  4. a reduce kernel sums the per-block partials in a fixed order (deterministic results).
#include "parity_common.cuh"
#include "wgmma_common.cuh"  // bulk tensor copies (TMA) of the dx kernel's dz halo

namespace fused3d_cuda {
namespace parity {

constexpr int kThreads = 256;
constexpr int kThreadsWinner = 512;  // 16 warps, two per h-line (as the forward)
constexpr int kThreadsWide = 512;    // dx and dW kernels: 16 warps as well
constexpr int kWinnerWarps = kThreadsWinner / 32;
// dW kernel x tile stride: = 4 (mod 32) words so an mma fragment's 8x4 lanes hit distinct banks.
constexpr int kXStrideT = 676;  // x tile [ci][halo], ci = fragment row

// The dz pass's stored value: packed for the tensor-core kernels (pack_dz); plain fp32 for the
// IEEE-fp32 (FFMA) kernels, which read each element's class from the window index instead
// (the flag bits would cost dz its last 8 mantissa bits).
template <bool kPacked>
__device__ __forceinline__ float store_dz(float dz, uint32_t cls) {
  return kPacked ? pack_dz(dz, cls) : dz;
}

struct BackwardGeometry {
  int ci_padded;   // C_in rounded up to 8 (<= 16)
  int co_padded;   // C_out rounded up to 8 (<= 32)
  int tiles, h_tiles, w_tiles;
};

// The dx kernel's weight operand, written once per backward call by the first kernel of the
// first chunk (every thread of its grid takes a share) and copied by each dx block with
// 16-byte copies: B[k=co][n=ci] = w[ci, co, tap] as float4 (tap, kk, lane) = {B[t][g],
// B[t+4][g] (ci 0..7), B[t][8+g], B[t+4][8+g] (ci 8..15)}, co = kk*8 + t, rounded to TF32.
// (Staged from w by every block, the strided 4-byte loads had been a quarter of dx's time.)
template <typename T>
__device__ __forceinline__ void write_grad_x_weights(float* __restrict__ fragments,
                                                     const T* __restrict__ w, const BlockShape& s,
                                                     int co_padded) {
  const int threads = gridDim.x * gridDim.y * blockDim.x;
  const int first = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  const int ksteps = co_padded / 8, total = kTaps * ksteps * 128;
  for (int e = first; e < total; e += threads) {
    const int slot = e & 127, block = e >> 7;  // block = k * ksteps + kk
    const int k = block / ksteps, kk = block - k * ksteps;
    const int q = slot & 3, ln = slot >> 2;
    const int ci = (q >> 1) * 8 + (ln >> 2), co = kk * 8 + (ln & 3) + ((q & 1) ? 4 : 0);
    const bool valid = ci < s.in_channels && co < s.out_channels;
    const float v = valid ? to_acc(w[((int64_t)ci * s.out_channels + co) * kTaps + k]) : 0.f;
    fragments[e] = std::is_same<T, float>::value ? to_tf32(v) : v;
  }
}

// ------------------------------------------------------------------ 1b. winner kernel

template <typename T>
__global__ void __launch_bounds__(kThreadsWinner, 1) parity_winner_grad_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const T* __restrict__ multiplier, const T* __restrict__ grad_y,
    const uint8_t* __restrict__ window_index, float* __restrict__ packed_dz,
    float* __restrict__ channel_partials, float* __restrict__ grad_x_weights, BlockShape s,
    BackwardGeometry geo, int accumulate) {
  extern __shared__ float4 smem4[];
  if (grad_x_weights) write_grad_x_weights(grad_x_weights, w, s, geo.co_padded);
  // C_in padded to 16 whatever it is (this path is rare: only without a usable y), so the mma
  // loops have a fixed K.
  constexpr int cip = kMaxCin;
  float* ws = reinterpret_cast<float*>(smem4);
  float* xs_base = ws + kTaps * cip * kCoTile;
  const int xs_size = cip * kXStride;
  float* bias_s = xs_base + 2 * xs_size;
  float* mult_s = bias_s + kCoTile;
  float* reduce_s = mult_s + kCoTile;  // [16 warps][64]
  constexpr int MT = 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hl = warp >> 1, row0 = (warp & 1) * 16;
  const int g = lane >> 2, t = lane & 3;
  const float slope = (float)s.negative_slope;

  int tile = blockIdx.x;
  if (tile < geo.tiles) {
    issue_x_tile<T>(xs_base, x, s, decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles),
                    cip);
  }
  cp_async_commit();
  stage_weights_tf32<T, cip / 8>(ws, w, s, 0);
  if (threadIdx.x < kCoTile) {
    const bool valid = (int)threadIdx.x < s.out_channels;
    bias_s[threadIdx.x] = (valid && bias) ? to_acc(bias[threadIdx.x]) : 0.f;
    mult_s[threadIdx.x] = valid ? to_acc(multiplier[threadIdx.x * s.multiplier_stride]) : 0.f;
  }
  // Channel sums per warp in shared memory, [warp][dbias 32 | dmultiplier 32]; each entry is
  // owned by one lane (no races, fixed order).
  for (int e = threadIdx.x; e < kWinnerWarps * 64; e += blockDim.x) reduce_s[e] = 0.f;

  for (int it = 0; tile < geo.tiles; tile += gridDim.x, ++it) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    prefetch_next_x_tile<T>(xs_base, xs_size, it, tile + gridDim.x, geo.tiles, geo.h_tiles,
                            geo.w_tiles, x, s, cip);
    settle_x_tile_tf32<T>(xs_base + (it & 1) * xs_size, cip, kXStride);
    __syncthreads();
    const float* xs = xs_base + (it & 1) * xs_size;
    const int h = c.h0 + hl;
    // The winner of each of this thread's 32 windows (8 = outside the output: never taken).
    uint32_t win[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        win[mt][nt] = 0u;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int wpos = c.w0 + row0 + mt * 16 + g + 8 * (r >> 1);
          const int co = nt * 8 + 2 * t + (r & 1);
          uint32_t v = 8u;
          if (h < s.in_size[1] && wpos < s.in_size[2] && co < s.out_channels)
            v = window_index[pooled_offset(s, c, co, h, wpos)];
          win[mt][nt] |= v << (8 * r);
        }
      }
    float z_win[MT][4][4];
    float sum_dz[4][2], sum_dm[4][2];  // this tile's sums for channels nt*8 + 2t + e
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) sum_dz[nt][e] = sum_dm[nt][e] = 0.f;
#pragma unroll 1  // rolled: keeps the kernel inside the instruction cache
    for (int cls = 0; cls < 8; ++cls) {
      float acc[MT][4][4];
      accumulate_class_tf32<MT, cip / 8, false>(acc, cls, xs, smem4, hl, row0, lane, nullptr);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const bool take = ((win[mt][nt] >> (8 * r)) & 0xffu) == (uint32_t)cls;
            if (cls == 0) z_win[mt][nt][r] = acc[mt][nt][r];
            else if (take) z_win[mt][nt][r] = acc[mt][nt][r];
          }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint32_t cls = (win[mt][nt] >> (8 * r)) & 0xffu;
          if (cls > 7u) continue;
          const int wpos = c.w0 + row0 + mt * 16 + g + 8 * (r >> 1);
          const int col = nt * 8 + 2 * t + (r & 1);
          const int64_t off = pooled_offset(s, c, col, h, wpos);
          float dz, dm_term;
          winner_gradients(z_win[mt][nt][r] + bias_s[col], mult_s[col],
                           to_acc(grad_y[off]), slope, dz, dm_term);
          sum_dz[nt][r & 1] += dz;
          sum_dm[nt][r & 1] += dm_term;
          packed_dz[off] = pack_dz(dz, cls);
        }
    // Fixed-order reduction over the 8 row groups of the warp (lanes with equal t).
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int step = 4; step < 32; step <<= 1) {
          sum_dz[nt][e] += __shfl_xor_sync(0xffffffffu, sum_dz[nt][e], step);
          sum_dm[nt][e] += __shfl_xor_sync(0xffffffffu, sum_dm[nt][e], step);
        }
        if (g == 0) {
          reduce_s[warp * 64 + nt * 8 + 2 * t + e] += sum_dz[nt][e];
          reduce_s[warp * 64 + 32 + nt * 8 + 2 * t + e] += sum_dm[nt][e];
        }
      }
    __syncthreads();
  }
  __syncthreads();
  if (threadIdx.x < 64) {
    float total = 0.f;
    for (int wi = 0; wi < kWinnerWarps; ++wi) total += reduce_s[wi * 64 + threadIdx.x];
    float* slot = channel_partials + blockIdx.x * 64 + threadIdx.x;
    *slot = accumulate ? *slot + total : total;  // batch chunks add in a fixed order
  }
}

// ------------------------------------------------------------------ 1a. dz from the saved y

constexpr int kThreadsDz = 256;

// Smallest normal value of the output type: below it (or at zero) y's sign and y / m are not
// trustworthy (underflow), so such elements recompute z.
template <typename T> __device__ __forceinline__ float min_normal_of() { return 1.17549435e-38f; }
template <> __device__ __forceinline__ float min_normal_of<__half>() { return 6.103515625e-05f; }

// The conv value (bias included) of class `cls` at pooled position (n, d, h, w), channel co,
// summed directly in fp32: used only for the elements whose y does not settle the derivative.
template <typename T>
__device__ __forceinline__ float recompute_class_value(const T* __restrict__ x,
                                                      const T* __restrict__ w,
                                                      const T* __restrict__ bias,
                                                      const BlockShape& s, int64_t n, int co,
                                                      int d, int h, int wpos, int cls) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const T* x_n = x + n * s.in_channels * spatial;
  float z = 0.f;
  for (int o = 0; o < 8; ++o) {
    if (o & ~cls) continue;  // offset o needs an odd parity on each axis it shifts
    const int id = d + ((o >> 2) & 1), ih = h + ((o >> 1) & 1), iw = wpos + (o & 1);
    if (id >= D || ih >= H || iw >= W) continue;  // zero padding past the input's far edge
    const int k = class_tap(cls, o);
    const T* xp = x_n + ((int64_t)id * H + ih) * W + iw;
    for (int ci = 0; ci < s.in_channels; ++ci)
      z = fmaf(to_acc(xp[ci * spatial]), to_acc(w[((int64_t)ci * s.out_channels + co) * kTaps + k]),
               z);
  }
  return bias ? z + to_acc(bias[co]) : z;
}

// One channel's constants for dz from y (see parity_dz_from_output_kernel).
struct ChannelDz {
  float m, slope, y_min;
  bool m_usable;
  // dz = g * leaky'(v) * m * leaky'(z), one of two factors by y's sign (z has m's sign when
  // v > 0, the opposite one when v < 0).
  float factor_v_positive, factor_v_negative;
};

template <typename T>
__device__ __forceinline__ ChannelDz channel_dz(float m, float slope) {
  ChannelDz ch;
  ch.m = m;
  ch.slope = slope;
  ch.y_min = min_normal_of<T>();
  ch.m_usable = fabsf(m) >= 0x1p-100f && fabsf(m) <= 0x1p100f;  // false for NaN
  ch.factor_v_positive = m * (m > 0.f ? 1.f : slope);
  ch.factor_v_negative = slope * m * (m > 0.f ? slope : 1.f);
  return ch;
}

// A thread's channel sums. gy: g * y over the elements y settles (their dmultiplier terms
// g * y / m are divided by m once, at the end); dm: the recomputed elements' terms.
struct DzSums {
  float dz, gy, dm;
};

// Whether y settles the derivative at this element (see the kernel's comment).
__device__ __forceinline__ bool y_settles(const ChannelDz& ch, float yv) {
  return ch.m_usable && fabsf(yv) >= ch.y_min && fabsf(yv) <= 3.40282347e38f;
}

__device__ __forceinline__ float settled_dz(const ChannelDz& ch, DzSums& sums, float g, float yv) {
  const float dz = g * (yv > 0.f ? ch.factor_v_positive : ch.factor_v_negative);
  sums.gy += g * yv;
  sums.dz += dz;
  return dz;
}

// Four consecutive elements as fp32, read once (streamed past L2). p: 4-element aligned.
template <typename T>
__device__ __forceinline__ float4 load4_streaming(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return __ldcs(reinterpret_cast<const float4*>(p));
  } else {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    return make_float4(widen<T>((uint16_t)(v.x & 0xffffu)), widen<T>((uint16_t)(v.x >> 16)),
                       widen<T>((uint16_t)(v.y & 0xffffu)), widen<T>((uint16_t)(v.y >> 16)));
  }
}

// The stored dz of one element (pooled position p of image n, channel co, winning class cls).
template <typename T, bool kPacked>
__device__ __forceinline__ float dz_element(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ bias, const BlockShape& s,
                                            const ChannelDz& ch, DzSums& sums, int64_t n, int co,
                                            int p, uint32_t cls, float g, float yv) {
  if (y_settles(ch, yv)) return store_dz<kPacked>(settled_dz(ch, sums, g, yv), cls);
  const int W = s.in_size[2], H = s.in_size[1];
  const int wpos = p % W, h = (p / W) % H, d = p / (W * H);
  const float z = recompute_class_value(x, w, bias, s, n, co, d, h, wpos, (int)cls);
  float dz, dm_term;
  winner_gradients(z, ch.m, g, ch.slope, dz, dm_term);
  sums.dm += dm_term;
  sums.dz += dz;
  return store_dz<kPacked>(dz, cls);
}

// grid (slots, C_out): block (b, co) walks spatial slice b of channel co in every image of the
// chunk and writes its channel partials to slot b (accumulated over chunks in a fixed order).
//
// Why y suffices (negative slope s > 0, checked by the host): y = leaky(v), v = m * leaky(z),
// so sign(y) = sign(v) = sign(m) * sign(z), which gives leaky'(v) and leaky'(z); and
// leaky'(v) * v = y, so the dmultiplier term leaky'(v) * leaky(z) = y / m. That holds when y is
// a normal number and m is neither tiny, huge, zero nor non-finite; every other element (y
// zero, subnormal, infinite or NaN; such a channel's m) recomputes z, giving the winner
// kernel's formulas exactly.
//
// kPacked: the tensor-core kernels' packed dz, else plain fp32 (the IEEE-fp32 path). y null:
// every element recomputes z (the IEEE-fp32 path without a usable y; the tensor-core path
// runs the winner kernel instead).
template <typename T, bool kPacked>
__global__ void __launch_bounds__(kThreadsDz) parity_dz_from_output_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const T* __restrict__ multiplier, const T* __restrict__ grad_y, const T* __restrict__ y,
    const uint8_t* __restrict__ window_index, float* __restrict__ packed_dz,
    float* __restrict__ channel_partials, float* __restrict__ grad_x_weights, BlockShape s,
    int accumulate) {
  __shared__ float warp_sums[kThreadsDz / 32][3];
  if (grad_x_weights) write_grad_x_weights(grad_x_weights, w, s, (s.out_channels + 7) / 8 * 8);
  const int co = blockIdx.y;
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int spatial = D * H * W;  // < 2^31 (parity_backward_supported)
  // Rows of a multiple of 4 go 4 elements per thread (4-element loads, 16-byte stores).
  const bool quads =
      y != nullptr && spatial % 4 == 0 &&
      ((reinterpret_cast<uintptr_t>(grad_y) | reinterpret_cast<uintptr_t>(y)) &
       (4 * sizeof(T) - 1)) == 0 &&
      (reinterpret_cast<uintptr_t>(window_index) & 3) == 0;
  const int unit = quads ? 4 : 1, units = spatial / unit;
  const int per_slice = (units + gridDim.x - 1) / gridDim.x;  // 32-bit: no division call
  const int begin = unit * (int)min((int64_t)per_slice * blockIdx.x, (int64_t)units);
  const int end = unit * (int)min((int64_t)per_slice * (blockIdx.x + 1), (int64_t)units);
  const ChannelDz ch = channel_dz<T>(to_acc(multiplier[co * s.multiplier_stride]),
                                     (float)s.negative_slope);
  DzSums sums{0.f, 0.f, 0.f};
  // (early start: packed_dz and the channel partials were read by the kernels before)
  wait_for_previous_kernel();
  start_next_kernel();
  for (int64_t n = 0; n < s.batch; ++n) {
    const int64_t base = (n * s.out_channels + co) * spatial;
    if (quads) {
#pragma unroll 2
      for (int p = begin + 4 * (int)threadIdx.x; p < end; p += 4 * kThreadsDz) {
        const int64_t off = base + p;
        // Read once: streamed past L2 so that the packed dz the next kernels read stays.
        const float4 g4 = load4_streaming(grad_y + off);
        const float4 y4 = load4_streaming(y + off);
        const uint32_t classes =
            __ldcs(reinterpret_cast<const unsigned int*>(window_index + off));
        if (y_settles(ch, y4.x) && y_settles(ch, y4.y) && y_settles(ch, y4.z) &&
            y_settles(ch, y4.w)) {
          float4 dz4;
          dz4.x = store_dz<kPacked>(settled_dz(ch, sums, g4.x, y4.x), classes & 7u);
          dz4.y = store_dz<kPacked>(settled_dz(ch, sums, g4.y, y4.y), (classes >> 8) & 7u);
          dz4.z = store_dz<kPacked>(settled_dz(ch, sums, g4.z, y4.z), (classes >> 16) & 7u);
          dz4.w = store_dz<kPacked>(settled_dz(ch, sums, g4.w, y4.w), (classes >> 24) & 7u);
          *reinterpret_cast<float4*>(packed_dz + off) = dz4;
        } else {  // rare: one element at a time (one copy of the recompute path)
#pragma unroll 1
          for (int q = 0; q < 4; ++q)
            packed_dz[off + q] = dz_element<T, kPacked>(x, w, bias, s, ch, sums, n, co, p + q,
                                            (classes >> (8 * q)) & 7u,
                                            to_acc(grad_y[off + q]), to_acc(y[off + q]));
        }
      }
      continue;
    }
#pragma unroll 4
    for (int p = begin + (int)threadIdx.x; p < end; p += kThreadsDz) {
      const int64_t off = base + p;
      // (A NaN y settles nothing: the element recomputes z.)
      packed_dz[off] = dz_element<T, kPacked>(x, w, bias, s, ch, sums, n, co, p,
                                              window_index[off] & 7u, to_acc(grad_y[off]),
                                              y ? to_acc(y[off]) : __int_as_float(0x7fc00000));
    }
  }
  // Fixed-order block reduction: a shuffle tree per warp, then the warps in order.
  float thread_sums[3] = {sums.dz, sums.gy, sums.dm};
#pragma unroll
  for (int q = 0; q < 3; ++q)
#pragma unroll
    for (int step = 16; step > 0; step >>= 1)
      thread_sums[q] += __shfl_down_sync(0xffffffffu, thread_sums[q], step);
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int q = 0; q < 3; ++q) warp_sums[threadIdx.x >> 5][q] = thread_sums[q];
  __syncthreads();
  if (threadIdx.x == 0) {
    float totals[3] = {0.f, 0.f, 0.f};
    for (int wi = 0; wi < kThreadsDz / 32; ++wi)
      for (int q = 0; q < 3; ++q) totals[q] += warp_sums[wi][q];
    // (sum_gy is zero when m is not usable: every element was recomputed.)
    const float dm_total = (ch.m_usable ? totals[1] / ch.m : 0.f) + totals[2];
    float* slot = channel_partials + blockIdx.x * 64 + co;
    slot[0] = accumulate ? slot[0] + totals[0] : totals[0];
    slot[32] = accumulate ? slot[32] + dm_total : dm_total;
  }
}

// ------------------------------------------------------------------ 2. dx kernel

// The dz halo of a dx tile covers pooled positions one before the tile on each axis. Its rows
// are staged from w0 - 4, one aligned 16-byte chunk before the tile (kHaloRow = 36 = 9 chunks),
// so pooled w = w0 - 1 + j sits at index 3 + j. Halo index of pooled position i - o for input
// row `row` of h-line hl:
__device__ __forceinline__ int back_halo_pos(int o, int hl, int row) {
  return ((1 - ((o >> 2) & 1)) * kHaloH + hl + 1 - ((o >> 1) & 1)) * kHaloRow + row + 4 - (o & 1);
}

__device__ __forceinline__ void issue_dz_halo(float* dzs, const float* packed_dz,
                                              const BlockShape& s, TileCoord c, int cop) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const float* dz_n = packed_dz + (int64_t)c.n * s.out_channels * spatial;
  if (W % 4 == 0) {
    // 16-byte copies (packed_dz is our aligned workspace; with W % 4 == 0 every chunk starts
    // aligned and lies wholly inside or wholly outside the row).
    constexpr int kChunks = kHaloRow / 4, kRows = kHaloD * kHaloH;
    const int total = cop * kRows * kChunks;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      const int row = e / kChunks, chunk = e - row * kChunks;
      const int co = row / kRows, rest = row - co * kRows;  // rest = dd * kHaloH + hh
      const int dd = rest / kHaloH, hh = rest - dd * kHaloH;
      const int md = c.d - 1 + dd, mh = c.h0 - 1 + hh, mw = c.w0 - 4 + chunk * 4;
      const bool valid = co < s.out_channels && md >= 0 && md < D && mh >= 0 && mh < H &&
                         mw >= 0 && mw < W;
      const float* src = valid ? dz_n + co * spatial + ((int64_t)md * H + mh) * W + mw : packed_dz;
      cp_async_16(dzs + co * kXStride + rest * kHaloRow + chunk * 4, src, valid ? 16 : 0);
    }
    return;
  }
  for_each_halo_plane(cop, [&](int co, int dd, int lane) {
    const int md = c.d - 1 + dd;
    const bool plane_valid = co < s.out_channels && md >= 0 && md < D;
    int64_t offset = plane_valid ? co * spatial + ((int64_t)md * H + c.h0 - 1) * W + c.w0 - 1 : 0;
    float* dst = dzs + co * kXStride + dd * kHaloH * kHaloRow + 3;
#pragma unroll 3
    for (int hh = 0; hh < kHaloH; ++hh, offset += W, dst += kHaloRow) {
      const int mh = c.h0 - 1 + hh;
      const bool row_valid = plane_valid && mh >= 0 && mh < H;
#pragma unroll
      for (int ww = lane; ww < kHaloW; ww += 32) {
        const int mw = c.w0 - 1 + ww;
        const bool valid = row_valid && mw >= 0 && mw < W;
        cp_async_f32(dst + ww, valid ? dz_n + offset + ww : packed_dz, valid);
      }
    }
  });
}

// KSTEPS: C_out / 8 rounded up (the mma K steps), fixed at compile time so that every shared
// memory address in the mma loop is a register plus a constant. use_tma: each dz halo arrives
// by one bulk tensor copy (dz_map, box [cop][2][9][36] from w0 - 4, out-of-range positions as
// zeros: the layout and values of issue_dz_halo's copies), which sm_90a builds use where
// W % 4 == 0; the per-thread copies were an eighth of this kernel's instructions (address and
// bounds arithmetic per 16 bytes). H100, per 8-image chunk: 36.0 -> 31.0 us.
template <typename T, int KSTEPS>
__global__ void __launch_bounds__(kThreadsWide, 1) parity_grad_x_kernel(
    const float* __restrict__ packed_dz, const float* __restrict__ weight_fragments,
    T* __restrict__ grad_x, BlockShape s, BackwardGeometry geo, int weights_written_earlier,
    const __grid_constant__ CUtensorMap dz_map, int use_tma) {
  extern __shared__ __align__(128) float4 smem4[];
  constexpr int cop = 8 * KSTEPS, ksteps = KSTEPS;
  float* ws = reinterpret_cast<float*>(smem4);  // [k][kk][lane] float4, 27*cop*16 floats
  float* dz_base = ws + kTaps * cop * 16;
  const int dz_size = cop * kXStride;
  uint64_t* halo_ready = reinterpret_cast<uint64_t*>(dz_base + 2 * dz_size);  // per buffer
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hl = warp >> 1, row0 = (warp & 1) * 16;  // two warps per h-line, 16 rows each
  const int g = lane >> 2, t = lane & 3;
  if (use_tma) {
    if (threadIdx.x == 0) {
      mbarrier_init(&halo_ready[0], 1);
      mbarrier_init(&halo_ready[1], 1);
      fence_proxy_async();
    }
    __syncthreads();
  }
  auto issue_halo = [&](int buffer, int index) {
    const TileCoord c = decode_tile(index, s.in_size[0], geo.h_tiles, geo.w_tiles);
    float* dst = dz_base + buffer * dz_size;
    if (!use_tma) return issue_dz_halo(dst, packed_dz, s, c, cop);
    if (threadIdx.x == 0) {
      mbarrier_expect_bytes(&halo_ready[buffer], (uint32_t)(dz_size * sizeof(float)));
      tma_load_5d(dst, &dz_map, c.w0 - 4, c.h0 - 1, c.d - 1, 0, c.n, &halo_ready[buffer]);
    }
  };

  // The weight operand (write_grad_x_weights' layout), in the first halo's group of copies:
  // before waiting for the dz kernel when an earlier kernel wrote it (early start).
  auto copy_weights = [&] {
    for (int e = threadIdx.x; e < kTaps * cop * 4; e += blockDim.x)
      cp_async_16(ws + 4 * e, weight_fragments + 4 * e, 16);
  };
  if (weights_written_earlier) copy_weights();
  wait_for_previous_kernel();
  start_next_kernel();
  if (!weights_written_earlier) copy_weights();
  int tile = blockIdx.x;
  if (tile < geo.tiles) issue_halo(0, tile);
  cp_async_commit();

  for (int it = 0; tile < geo.tiles; tile += gridDim.x, ++it) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    const int next = tile + gridDim.x;
    // (the other buffer's last readers finished at the previous tile's closing barrier)
    if (next < geo.tiles) issue_halo((it + 1) & 1, next);
    if (use_tma) {
      cp_async_wait<0>();  // the weight operand (first tile only; nothing later)
      mbarrier_wait(&halo_ready[it & 1], (it >> 1) & 1);
    } else if (next < geo.tiles) {
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* dzs = dz_base + (it & 1) * dz_size;
    constexpr int MT = 1;
    float acc[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
#pragma unroll
    for (int o = 0; o < 8; ++o) {
      const int p0 = back_halo_pos(o, hl, row0 + g);
#pragma unroll
      for (int kk = 0; kk < ksteps; ++kk) {
        const float* da = dzs + (kk * 8 + t) * kXStride + p0;
        uint32_t raw[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          raw[mt][0] = __float_as_uint(da[mt * 16]);
          raw[mt][1] = __float_as_uint(da[mt * 16 + 8]);
          raw[mt][2] = __float_as_uint(da[4 * kXStride + mt * 16]);
          raw[mt][3] = __float_as_uint(da[4 * kXStride + mt * 16 + 8]);
        }
#pragma unroll
        for (int cls = 0; cls < 8; ++cls) {
          if (o & ~cls) continue;  // class cls reaches input i from pooled i - o only if o <= cls
          const int k = class_tap(cls, o);
          const float4 b = reinterpret_cast<const float4*>(ws)[(k * ksteps + kk) * 32 + lane];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t a[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) a[q] = masked_class(raw[mt][q], 1u << cls);
            mma_tf32(acc[mt][0], a, b.x, b.y);
            mma_tf32(acc[mt][1], a, b.z, b.w);
          }
        }
      }
    }
    const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
    const int h = c.h0 + hl;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int wpos = c.w0 + row0 + mt * 16 + g + 8 * (r >> 1);
          const int ci = nt * 8 + 2 * t + (r & 1);
          if (h < H && wpos < W && ci < s.in_channels)
            grad_x[(((int64_t)c.n * s.in_channels + ci) * D + c.d) * H * (int64_t)W +
                   (int64_t)h * W + wpos] = from_acc<T>(acc[mt][nt][r]);
        }
    __syncthreads();
  }
}

// ------------------------------------------------------------------ 3. dweight kernel

// The 27 (class, offset) pairs in 8 sets of at most 4, one set per warp (and K half). A set
// holds one or two classes, its pairs grouped by class: a warp masks the dz fragments once per
// class it meets, not once per pair (masking had been most of this kernel's instructions).
struct PairSets {
  int count[8];
  int cls[8][4];
  int offset[8][4];
};

__host__ __device__ constexpr PairSets make_pair_sets() {
  PairSets sets{};
  // Classes in the order they fill the sets: class 7's eight pairs fill three sets (3, 3, 2),
  // then class 0 (1 pair) completes the third, then classes 3, 5, 6 (4 each), 1 + 2, and 4.
  constexpr int order[8] = {7, 0, 3, 5, 6, 1, 2, 4};
  constexpr int capacity[8] = {3, 3, 3, 4, 4, 4, 4, 2};
  int set = 0;
  for (int n = 0; n < 8; ++n) {
    const int cls = order[n];
    for (int o = 0; o < 8; ++o) {
      if (o & ~cls) continue;  // offset o needs an odd parity on each axis it shifts
      if (sets.count[set] == capacity[set]) ++set;
      sets.cls[set][sets.count[set]] = cls;
      sets.offset[set][sets.count[set]] = o;
      ++sets.count[set];
    }
  }
  return sets;
}

__host__ __device__ constexpr bool pair_sets_cover_all_taps(const PairSets& sets) {
  int total = 0;
  for (int set = 0; set < 8; ++set) total += sets.count[set];
  return total == kTaps && sets.count[7] <= 4;
}
static_assert(pair_sets_cover_all_taps(make_pair_sets()), "27 pairs in 8 sets of <= 4");

static __constant__ PairSets kPairSets = make_pair_sets();

// The dweight kernel stages half-type x as raw tiles (they fit beside its other tiles).
template <typename T>
__host__ __device__ constexpr bool grad_weight_raw_x() {
  return sizeof(T) == 2;
}

template <typename T>
__global__ void __launch_bounds__(kThreadsWide, 1) parity_grad_weight_kernel(
    const T* __restrict__ x, const float* __restrict__ packed_dz,
    float* __restrict__ weight_partials, BlockShape s, BackwardGeometry geo, int accumulate) {
  extern __shared__ float4 smem4[];
  const int cip = geo.ci_padded, cop = geo.co_padded;
  float* xs_base = reinterpret_cast<float*>(smem4);  // 2 x [16][kXStrideT]
  const int xs_size = kMaxCin * kXStrideT;
  float* dz_base = xs_base + 2 * xs_size;  // 2 x [cop][kDzStrideT]
  const int dz_size = kMaxCout * kDzStrideT;  // rows >= cop stay zero
  // Half types: 2 raw x tiles after the dz tiles (see issue_x_tile), 16-byte aligned; null
  // where the raw copies do not apply.
  constexpr int raw_size = grad_weight_raw_x<T>() ? raw_x_tile_values(kMaxCin) : 0;
  uint16_t* raw_base = raw_size && raw_x_copies(x, s)
                           ? reinterpret_cast<uint16_t*>(dz_base + 2 * dz_size)
                           : nullptr;
  const int lane = threadIdx.x & 31;
  // 16 warps: warp & 7 picks the pair set, warp >> 3 the half of the K steps it sums.
  const int warp = (threadIdx.x >> 5) & 7, half = threadIdx.x >> 8;
  const int g = lane >> 2, t = lane & 3;

  // Rows ci >= cip of the x tiles and co >= cop of the dz tiles are never loaded: zero them
  // once in both buffers (nothing to do at C_in 16, C_out 32).
  const int x_pad = (kMaxCin - cip) * kXStrideT, dz_pad = (kMaxCout - cop) * kDzStrideT;
  for (int e = threadIdx.x; e < 2 * x_pad; e += blockDim.x) {
    const int buffer = e >= x_pad ? 1 : 0;
    xs_base[buffer * xs_size + cip * kXStrideT + e - buffer * x_pad] = 0.f;
  }
  for (int e = threadIdx.x; e < 2 * dz_pad; e += blockDim.x) {
    const int buffer = e >= dz_pad ? 1 : 0;
    dz_base[buffer * dz_size + cop * kDzStrideT + e - buffer * dz_pad] = 0.f;
  }

  auto issue = [&](int tile_index, int buffer) {
    const TileCoord c = decode_tile(tile_index, s.in_size[0], geo.h_tiles, geo.w_tiles);
    issue_x_tile<T>(xs_base + buffer * xs_size, x, s, c, cip, kXStrideT,
                    raw_base ? raw_base + buffer * raw_size : nullptr);
    issue_dz_tile(dz_base + buffer * dz_size, packed_dz, s, c, cop);
  };

  uint32_t my_class_bit[4];
  int my_x_offset[4], my_k[4];
  bool my_new_class[4];  // pair j's class differs from pair j - 1's: mask the dz fragments again
  const int my_pairs = kPairSets.count[warp];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int jj = j < my_pairs ? j : 0;
    const int cls = kPairSets.cls[warp][jj], o = kPairSets.offset[warp][jj];
    my_class_bit[j] = 1u << cls;
    my_new_class[j] = j == 0 || cls != kPairSets.cls[warp][j - 1];
    // halo_pos is linear in (hl, row): this lane's x fragment of pair j sits at this offset
    // from the step's origin (hl, w8), hoisted out of the mma loop.
    my_x_offset[j] = g * kXStrideT + halo_pos(o, 0, t);
    my_k[j] = class_tap(cls, o);
  }
  float acc[4][4][4];  // [pair][co n-tile][r]: row ci = g (+8), column co = nt*8 + 2t (+1)
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][nt][r] = 0.f;

  int tile = blockIdx.x;
  if (tile < geo.tiles) issue(tile, 0);
  cp_async_commit();
  for (int it = 0; tile < geo.tiles; tile += gridDim.x, ++it) {
    const int next = tile + gridDim.x;
    if (next < geo.tiles) {
      issue(next, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    settle_x_tile_tf32<T>(xs_base + (it & 1) * xs_size, cip, kXStrideT,
                          raw_base ? raw_base + (it & 1) * raw_size : nullptr);
    __syncthreads();
    const float* xs = xs_base + (it & 1) * xs_size;
    const float* dzs = dz_base + (it & 1) * dz_size;
    // K = the tile's 256 pooled positions, 8 per step (one h-line holds 4 steps).
    for (int step = half; step < kTilePositions / 8; step += 2) {
      const int hl = step >> 2, w8 = (step & 3) * 8;
      const float* x_step = xs + hl * kHaloRow + w8;
      // dz B fragments (unmasked) for the 4 channel n-tiles: b0 = (pos t, co g), b1 = (t+4, g)
      uint32_t braw[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float* d0 = dzs + (nt * 8 + g) * kDzStrideT + step * 8 + t;
        braw[nt][0] = __float_as_uint(d0[0]);
        braw[nt][1] = __float_as_uint(d0[4]);
      }
      uint32_t bmask[4][2];  // braw masked to the current pair's class
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j >= my_pairs) break;
        if (my_new_class[j]) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            bmask[nt][0] = masked_class(braw[nt][0], my_class_bit[j]);
            bmask[nt][1] = masked_class(braw[nt][1], my_class_bit[j]);
          }
        }
        // A = x^T: a0 = (ci g, pos t), a1 = (ci g+8, pos t), a2 = (g, t+4), a3 = (g+8, t+4)
        const float* xa = x_step + my_x_offset[j];
        const float v0 = xa[0], v1 = xa[8 * kXStrideT], v2 = xa[4], v3 = xa[8 * kXStrideT + 4];
        const uint32_t a[4] = {__float_as_uint(v0), __float_as_uint(v1), __float_as_uint(v2),
                               __float_as_uint(v3)};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          mma_tf32(acc[j][nt], a, __uint_as_float(bmask[nt][0]), __uint_as_float(bmask[nt][1]));
      }
    }
    __syncthreads();
  }
  // Combine the two halves in a fixed order through shared memory (the x tiles are free now:
  // the loop ended with a barrier), then write this block's partial dW: [block][k][ci][co].
  float* combine = xs_base;  // [warp 8][pair 4][nt 4][r 4][lane 32] = 64 KB
  if (half == 1) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          combine[(((warp * 4 + j) * 4 + nt) * 4 + r) * 32 + lane] = acc[j][nt][r];
  }
  __syncthreads();
  if (half == 1) return;
  float* out = weight_partials + (int64_t)blockIdx.x * kTaps * kMaxCin * kMaxCout;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j >= my_pairs) break;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ci = g + 8 * (r >> 1), co = nt * 8 + 2 * t + (r & 1);
        const float v = acc[j][nt][r] + combine[(((warp * 4 + j) * 4 + nt) * 4 + r) * 32 + lane];
        float& slot = out[(my_k[j] * kMaxCin + ci) * kMaxCout + co];
        slot = accumulate ? slot + v : v;  // batch chunks add in a fixed order
      }
  }
}

// ------------------------------------------------------------------ 2b/3b. IEEE fp32 (FFMA)

// fp32 with allow_tf32 off: dx and dweight in plain fp32 FFMA. dz comes from the same dz pass,
// stored unpacked; each element's class is read from the window index.
//
// Weight rows for the dx kernel, one per (offset o, class P >= o) pair, ordered by o and then by
// j = P's bits outside o (free_bit_index), so the 2^(3-|o|) rows of one offset are consecutive.
// A row holds w[ci, co, k(P, o)] as [co 32][ci 16] (zeros past C_in / C_out), rows kSimtRowStride
// floats apart: 516 = 4 (mod 32) words, so up to 8 lanes reading one offset's rows at one co
// hit 8 distinct 16-byte bank groups (one wavefront).
constexpr int kSimtRowStride = kMaxCout * kMaxCin + 4;
constexpr int kThreadsSimtX = 256;

// P's bits on the axes o leaves free, packed from the lowest axis up (o = 0: P itself).
__host__ __device__ constexpr int free_bit_index(int cls, int o) {
  int j = 0, bit = 0;
  for (int axis = 0; axis < 3; ++axis)
    if (!((o >> axis) & 1)) j |= ((cls >> axis) & 1) << bit++;
  return j;
}
// First row of offset o: offsets before it own 2^(3 - |o'|) rows each.
__host__ __device__ constexpr int simt_first_row(int o) {
  int row = 0;
  for (int earlier = 0; earlier < o; ++earlier)
    row += 8 >> (((earlier >> 2) & 1) + ((earlier >> 1) & 1) + (earlier & 1));
  return row;
}

// The rows above, written once per backward call (the dx blocks then stage them with coalesced
// 16-byte copies; gathering them from the weight in every block made dx ~1.8x slower on the H100).
__global__ void __launch_bounds__(kThreadsSimtX) pack_simt_rows_kernel(
    const float* __restrict__ w, float* __restrict__ rows, BlockShape s) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < kTaps * kSimtRowStride;
       e += gridDim.x * blockDim.x) {
    const int row = e / kSimtRowStride, rest = e - row * kSimtRowStride;
    const int co = rest / kMaxCin, ci = rest - co * kMaxCin;
    int o = 0;
    while (o < 7 && simt_first_row(o + 1) <= row) ++o;
    // P from j: j's bits go back to the axes o leaves free; o's own axes are odd.
    int j = row - simt_first_row(o), cls = o;
    for (int axis = 0; axis < 3; ++axis)
      if (!((o >> axis) & 1)) {
        cls |= (j & 1) << axis;
        j >>= 1;
      }
    const bool valid = rest < kMaxCout * kMaxCin && ci < s.in_channels && co < s.out_channels;
    rows[e] = valid ? w[((int64_t)ci * s.out_channels + co) * kTaps + class_tap(cls, o)] : 0.f;
  }
}

// dx[i] = sum over o and co of dz[i - o, co] * w[:, co, k(P, o)], P = the class of (i - o, co),
// taken only where P >= o (the forward's class P reads x at m + o only for o <= P). Every
// element has exactly one class, so each (o, co) adds one weight row picked by P: 8 x C_out
// row reads per input position instead of the 27 x C_out of the dense sum over classes. One
// thread per input position, all C_in channels in registers; every dx element is written once,
// by its thread (no atomics).
template <int CI4>  // C_in rounded up to 4, / 4
__global__ void __launch_bounds__(kThreadsSimtX) parity_grad_x_simt_kernel(
    const float* __restrict__ dz, const uint8_t* __restrict__ window_index,
    const float* __restrict__ packed_rows, float* __restrict__ grad_x, BlockShape s) {
  extern __shared__ float4 smem4[];
  float* rows = reinterpret_cast<float*>(smem4);  // [27][kSimtRowStride]
  for (int e = threadIdx.x; e < kTaps * kSimtRowStride / 4; e += blockDim.x)
    cp_async_16(rows + 4 * e, packed_rows + 4 * e, 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int spatial = D * H * W;  // < 2^31 (parity_backward_supported)
  const int64_t positions = s.batch * (int64_t)spatial;
  for (int64_t position = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; position < positions;
       position += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = position / spatial;
    const int p = (int)(position - n * spatial);
    const int iw = p % W, ih = (p / W) % H, id = p / (W * H);
    float acc[CI4 * 4];
#pragma unroll
    for (int c = 0; c < CI4 * 4; ++c) acc[c] = 0.f;
#pragma unroll
    for (int o = 0; o < 8; ++o) {
      const int od = (o >> 2) & 1, oh = (o >> 1) & 1, ow = o & 1;
      if (id < od || ih < oh || iw < ow) continue;  // i - o before the grid: no such window
      const int64_t m = n * s.out_channels * (int64_t)spatial + p - (od * H + oh) * W - ow;
      const float* dz_m = dz + m;
      const uint8_t* class_m = window_index + m;
      const float* first_row = rows + simt_first_row(o) * kSimtRowStride;
#pragma unroll 2
      for (int co = 0; co < s.out_channels; ++co) {
        const int64_t off = (int64_t)co * spatial;
        const uint32_t cls = class_m[off] & 7u;
        // A class that does not read x at m + o adds nothing (its row is any of o's rows).
        const float v = (cls & o) == (uint32_t)o ? dz_m[off] : 0.f;
        const float4* row = reinterpret_cast<const float4*>(
            first_row + free_bit_index((int)cls, o) * kSimtRowStride + co * kMaxCin);
#pragma unroll
        for (int q = 0; q < CI4; ++q) {
          const float4 wv = row[q];
          acc[4 * q + 0] = fmaf(v, wv.x, acc[4 * q + 0]);
          acc[4 * q + 1] = fmaf(v, wv.y, acc[4 * q + 1]);
          acc[4 * q + 2] = fmaf(v, wv.z, acc[4 * q + 2]);
          acc[4 * q + 3] = fmaf(v, wv.w, acc[4 * q + 3]);
        }
      }
    }
    float* out = grad_x + n * s.in_channels * (int64_t)spatial + p;
#pragma unroll
    for (int ci = 0; ci < CI4 * 4; ++ci)
      if (ci < s.in_channels) out[(int64_t)ci * spatial] = acc[ci];
  }
}

inline size_t grad_x_simt_smem() { return sizeof(float) * (size_t)kTaps * kSimtRowStride; }

// dW[ci, co, k(P, o)] = sum over pooled m of class P of x[m + o, ci] * dz[m, co]. A lane owns
// one co; a warp owns two (P, o) pairs of one class, so one class test serves both: the 27
// pairs make 14 groups (class 0's single pair twice, the copy not written). 28 warps: the two
// halves of the block take the even and the odd positions of each tile and add their sums in
// a fixed order at the end, then write the block's partial (reduced by parity_reduce_kernel).
// The class test keeps the sum dense over each tile's positions (as the tensor-core kernel's);
// x outside the input and dz outside the pooled grid are staged as zero.
constexpr int kSimtGroups = 14;
constexpr int kThreadsSimtW = 2 * kSimtGroups * 32;
constexpr int kSimtXStride = kMaxCin + 4;   // x halo [position][ci]; 20: 4-way store conflicts
constexpr int kSimtDzStride = kMaxCout + 1;  // dz tile [position][co]: conflict-free both ways
constexpr int kSimtClassStride = kMaxCout + 4;  // class bytes [position][co]
constexpr int kSimtHalo = kHaloD * kHaloH * kHaloW;  // 594 x positions
// Group -> class and its two offsets (<= the class).
__constant__ int8_t kSimtGroupClass[kSimtGroups] = {0, 1, 2, 4, 3, 3, 5, 5, 6, 6, 7, 7, 7, 7};
__constant__ int8_t kSimtGroupOffset[kSimtGroups][2] = {
    {0, 0}, {0, 1}, {0, 2}, {0, 4}, {0, 1}, {2, 3}, {0, 1}, {4, 5}, {0, 2}, {4, 6},
    {0, 1}, {2, 3}, {4, 5}, {6, 7}};

template <int CI4>
__global__ void __launch_bounds__(kThreadsSimtW, 1) parity_grad_weight_simt_kernel(
    const float* __restrict__ x, const float* __restrict__ dz,
    const uint8_t* __restrict__ window_index, float* __restrict__ weight_partials, BlockShape s,
    BackwardGeometry geo, int accumulate) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);       // [kSimtHalo][kSimtXStride]
  float* dzs = xs + kSimtHalo * kSimtXStride;         // [kTilePositions][kSimtDzStride]
  uint8_t* classes = reinterpret_cast<uint8_t*>(dzs + kTilePositions * kSimtDzStride);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp % kSimtGroups, half = warp / kSimtGroups;
  const uint32_t cls = (uint32_t)kSimtGroupClass[group];
  const int o_a = kSimtGroupOffset[group][0], o_b = kSimtGroupOffset[group][1];
  // Halo offset of x[m + o] from x[m]'s (row hh of the tile, column ww).
  const int shift_a = (((o_a >> 2) & 1) * kHaloH + ((o_a >> 1) & 1)) * kHaloW + (o_a & 1);
  const int shift_b = (((o_b >> 2) & 1) * kHaloH + ((o_b >> 1) & 1)) * kHaloW + (o_b & 1);
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  float acc_a[CI4 * 4], acc_b[CI4 * 4];
#pragma unroll
  for (int c = 0; c < CI4 * 4; ++c) acc_a[c] = acc_b[c] = 0.f;

  for (int tile = blockIdx.x; tile < geo.tiles; tile += gridDim.x) {
    const TileCoord c = decode_tile(tile, D, geo.h_tiles, geo.w_tiles);
    __syncthreads();  // the previous tile's reads are done
    const float* x_n = x + (int64_t)c.n * s.in_channels * spatial;
    for (int e = threadIdx.x; e < kMaxCin * kSimtHalo; e += blockDim.x) {
      const int ci = e / kSimtHalo, pos = e - ci * kSimtHalo;
      const int rest = pos / kHaloW, ww = pos - rest * kHaloW;
      const int dd = rest / kHaloH, hh = rest - dd * kHaloH;
      const int id = c.d + dd, ih = c.h0 + hh, iw = c.w0 + ww;
      const bool inside = ci < s.in_channels && id < D && ih < H && iw < W;
      // Asynchronous copies (zero-filled outside): every copy of the tile in flight at once.
      cp_async_f32(xs + pos * kSimtXStride + ci,
                   inside ? x_n + ci * spatial + ((int64_t)id * H + ih) * W + iw : x_n, inside);
    }
    const int64_t pooled_n = (int64_t)c.n * s.out_channels * spatial + (int64_t)c.d * H * W;
    for (int e = threadIdx.x; e < kMaxCout * kTilePositions; e += blockDim.x) {
      const int co = e / kTilePositions, m = e - co * kTilePositions;
      const int h = c.h0 + m / kTileW, wpos = c.w0 + m % kTileW;
      const bool inside = co < s.out_channels && h < H && wpos < W;
      const int64_t off = pooled_n + co * spatial + (int64_t)h * W + wpos;
      cp_async_f32(dzs + m * kSimtDzStride + co, inside ? dz + off : dz, inside);
      classes[m * kSimtClassStride + co] = inside ? (window_index[off] & 7u) : 8u;  // 8: none
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll 1  // 72 registers (28 warps): one position's 8 float4 loads in flight at a time
    for (int m = half; m < kTilePositions; m += 2) {
      const float v = classes[m * kSimtClassStride + lane] == cls ? dzs[m * kSimtDzStride + lane]
                                                                  : 0.f;
      const int base = (m / kTileW) * kHaloW + m % kTileW;
      const float4* xa = reinterpret_cast<const float4*>(xs + (base + shift_a) * kSimtXStride);
      const float4* xb = reinterpret_cast<const float4*>(xs + (base + shift_b) * kSimtXStride);
#pragma unroll
      for (int q = 0; q < CI4; ++q) {
        const float4 a = xa[q], b = xb[q];
        acc_a[4 * q + 0] = fmaf(a.x, v, acc_a[4 * q + 0]);
        acc_a[4 * q + 1] = fmaf(a.y, v, acc_a[4 * q + 1]);
        acc_a[4 * q + 2] = fmaf(a.z, v, acc_a[4 * q + 2]);
        acc_a[4 * q + 3] = fmaf(a.w, v, acc_a[4 * q + 3]);
        acc_b[4 * q + 0] = fmaf(b.x, v, acc_b[4 * q + 0]);
        acc_b[4 * q + 1] = fmaf(b.y, v, acc_b[4 * q + 1]);
        acc_b[4 * q + 2] = fmaf(b.z, v, acc_b[4 * q + 2]);
        acc_b[4 * q + 3] = fmaf(b.w, v, acc_b[4 * q + 3]);
      }
    }
  }
  // Fixed-order combine: the odd half's sums through shared memory, added by the even half.
  __syncthreads();
  float* combine = xs;  // [group][2 * CI4 * 4][lane]
  if (half == 1) {
#pragma unroll
    for (int c = 0; c < CI4 * 4; ++c) {
      combine[(group * 2 * CI4 * 4 + c) * 32 + lane] = acc_a[c];
      combine[(group * 2 * CI4 * 4 + CI4 * 4 + c) * 32 + lane] = acc_b[c];
    }
  }
  __syncthreads();
  if (half == 1) return;
  float* out = weight_partials + (int64_t)blockIdx.x * kTaps * kMaxCin * kMaxCout;
  const int k_a = class_tap((int)cls, o_a), k_b = class_tap((int)cls, o_b);
#pragma unroll
  for (int c = 0; c < CI4 * 4; ++c) {
    const float a = acc_a[c] + combine[(group * 2 * CI4 * 4 + c) * 32 + lane];
    const float b = acc_b[c] + combine[(group * 2 * CI4 * 4 + CI4 * 4 + c) * 32 + lane];
    float& slot_a = out[(k_a * kMaxCin + c) * kMaxCout + lane];
    slot_a = accumulate ? slot_a + a : a;  // batch chunks add in a fixed order
    if (o_b != o_a) {
      float& slot_b = out[(k_b * kMaxCin + c) * kMaxCout + lane];
      slot_b = accumulate ? slot_b + b : b;
    }
  }
}

inline size_t grad_weight_simt_smem() {
  return sizeof(float) * ((size_t)kSimtHalo * kSimtXStride + kTilePositions * kSimtDzStride) +
         (size_t)kTilePositions * kSimtClassStride;
}

// ------------------------------------------------------------------ 4. fixed-order reductions

// Items: the padded weight partials [k][ci 16][co 32] (kWeightItems), then the channel
// partials [dbias 32 | dmultiplier 32]. A block sums 32 consecutive items (lane = item, so
// every load is one 128-byte line); its 8 warps take consecutive eighths of the slots, each
// summed in slot order with several loads in flight, and warp 0 adds the eighths in order:
// a fixed order, so the result does not depend on scheduling.
constexpr int kWeightItems = kTaps * kMaxCin * kMaxCout;
constexpr int kReduceItems = kWeightItems + 2 * kMaxCout;
constexpr int kReduceWarps = kThreads / 32;
static_assert(kWeightItems % 32 == 0 && kReduceItems % 32 == 0, "whole warps of items");

template <typename T>
__global__ void __launch_bounds__(kThreads) parity_reduce_kernel(
    const float* __restrict__ weight_partials, int weight_blocks,
    const float* __restrict__ channel_partials, int channel_blocks, T* __restrict__ grad_w,
    float* __restrict__ grad_bias, float* __restrict__ grad_multiplier, BlockShape s) {
  __shared__ float eighths[kReduceWarps][32];
  wait_for_previous_kernel();  // (early start: every partial is the earlier kernels' output)
  start_next_kernel();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int item = blockIdx.x * 32 + lane;
  const bool weight_item = blockIdx.x * 32 < kWeightItems;  // a block is one kind or the other
  const float* src =
      weight_item ? weight_partials + item : channel_partials + (item - kWeightItems);
  const int stride = weight_item ? kWeightItems : 2 * kMaxCout;
  const int slots = weight_item ? weight_blocks : channel_blocks;
  const int first = (int)((int64_t)slots * warp / kReduceWarps);
  const int last = (int)((int64_t)slots * (warp + 1) / kReduceWarps);
  float sum = 0.f;
  int b = first;
  for (; b + 4 <= last; b += 4) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = src[(int64_t)(b + u) * stride];
#pragma unroll
    for (int u = 0; u < 4; ++u) sum += v[u];
  }
  for (; b < last; ++b) sum += src[(int64_t)b * stride];
  eighths[warp][lane] = sum;
  __syncthreads();
  if (warp != 0) return;
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kReduceWarps; ++w) total += eighths[w][lane];
  if (weight_item) {
    const int k = item / (kMaxCin * kMaxCout), ci = (item / kMaxCout) % kMaxCin;
    const int co = item % kMaxCout;
    if (grad_w && ci < s.in_channels && co < s.out_channels)
      grad_w[((int64_t)ci * s.out_channels + co) * kTaps + k] = from_acc<T>(total);
  } else {
    const int j = item - kWeightItems, co = j % kMaxCout;
    float* target = j >= kMaxCout ? grad_multiplier : grad_bias;
    if (target && co < s.out_channels) target[co] = total;
  }
}

// ------------------------------------------------------------------ host side

inline BackwardGeometry geometry_of(const BlockShape& s) {
  BackwardGeometry geo;
  geo.ci_padded = (s.in_channels + 7) / 8 * 8;
  geo.co_padded = (s.out_channels + 7) / 8 * 8;
  geo.h_tiles = (s.in_size[1] + kTileH - 1) / kTileH;
  geo.w_tiles = (s.in_size[2] + kTileW - 1) / kTileW;
  geo.tiles = (int)(s.batch * s.in_size[0] * (int64_t)geo.h_tiles * geo.w_tiles);
  return geo;
}

inline size_t winner_smem() {
  return sizeof(float) *
         ((size_t)kTaps * kMaxCin * kCoTile + 2 * (size_t)kMaxCin * kXStride + 2 * kCoTile +
          kWinnerWarps * 64);
}
inline size_t grad_x_smem(const BackwardGeometry& g) {
  return sizeof(float) * ((size_t)kTaps * g.co_padded * 16 + 2 * (size_t)g.co_padded * kXStride) +
         2 * sizeof(uint64_t);  // the halo buffers' mbarriers
}
inline size_t grad_weight_smem(const BackwardGeometry& g, bool raw_x) {
  return sizeof(float) * (2 * (size_t)kMaxCin * kXStrideT + 2 * (size_t)kMaxCout * kDzStrideT) +
         (raw_x ? 2 * sizeof(uint16_t) * raw_x_tile_values(kMaxCin) : 0);
}

// The backward walks the batch in chunks so that its dz scratch stays near 16 MiB (partials
// accumulate across chunks in a fixed order: deterministic, though another chunk size would
// round differently). At the benchmark size (524288 pooled values per image) this is 2 chunks
// of 8 images: 79 MiB extra for a training step on the H100 against 71 MiB with 4 chunks of 4,
// and the raw backward op 0.189 against 0.213 ms (both with early start): each chunk pays its
// kernels' first-tile copies, tails and a write of the dweight partials.
constexpr int64_t kDzChunkFloats = 4 * 1024 * 1024;
// FUSED3D_CUDA_EARLY_START=0 launches every backward kernel normally (read at every call);
// otherwise kernels after a call's first start early where the GPU can (Hopper and later).
inline bool early_start_allowed() {
  return !switched_off("FUSED3D_CUDA_EARLY_START") && early_start_supported();
}

struct WorkspaceLayout {
  int chunk_batch;  // images per chunk
  int blocks;       // blocks per launch = partial slots
  // In this order (the first two sizes are multiples of 4, keeping packed_dz 16-byte aligned):
  int64_t grad_x_weight_floats, packed_dz_floats, channel_floats, weight_floats;
};

inline WorkspaceLayout workspace_layout(const BlockShape& s, int sms) {
  WorkspaceLayout l;
  const int64_t per_image = s.pooled_numel() / (s.batch > 0 ? s.batch : 1);
  int64_t chunk = per_image > 0 ? kDzChunkFloats / per_image : s.batch;
  if (chunk > s.batch) chunk = s.batch;
  if (chunk < 1) chunk = 1;
  l.chunk_batch = (int)chunk;
  BlockShape first = s;
  first.batch = l.chunk_batch;
  const BackwardGeometry geo = geometry_of(first);
  l.blocks = sms < geo.tiles ? sms : geo.tiles;
  if (l.blocks < 1) l.blocks = 1;
  // The tensor-core dx kernel's weight operand, or the IEEE dx kernel's packed rows; rounded up
  // to 128 bytes so that packed_dz, after it, starts on a cache line.
  l.grad_x_weight_floats = (std::max<int64_t>((int64_t)kTaps * kMaxCout * 16,
                                              (int64_t)kTaps * kSimtRowStride) + 31) / 32 * 32;
  l.packed_dz_floats = per_image * l.chunk_batch;
  l.channel_floats = (int64_t)l.blocks * 64;
  l.weight_floats = (int64_t)l.blocks * kTaps * kMaxCin * kMaxCout;
  return l;
}

inline int sm_count() {
  int sms = 0;
  return current_sm_count(&sms) == cudaSuccess ? sms : 132;
}

template <typename T>
auto grad_x_kernel_for(int co_padded) {
  switch (co_padded / 8) {
    case 1: return parity_grad_x_kernel<T, 1>;
    case 2: return parity_grad_x_kernel<T, 2>;
    case 3: return parity_grad_x_kernel<T, 3>;
    default: return parity_grad_x_kernel<T, 4>;  // C_out <= kMaxCout = 32
  }
}

template <int CI4>
cudaError_t launch_simt_chunk(const BlockShape& sc, const BackwardGeometry& gc, int blocks,
                              const float* x, const float* packed_rows, const float* dz,
                              const uint8_t* window_index, float* grad_x,
                              float* weight_partials, int accumulate, cudaStream_t stream) {
  cudaError_t e;
  if (grad_x) {
    auto kernel = parity_grad_x_simt_kernel<CI4>;
    const size_t smem = grad_x_simt_smem();
    int per_sm = 0;
    if ((e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem)) != cudaSuccess ||
        (e = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreadsSimtX, smem,
                                    &per_sm)) != cudaSuccess)
      return e;
    // Persistent: each block stages the weight rows once.
    const int64_t needed = (sc.input_numel() / (sc.in_channels > 0 ? sc.in_channels : 1) +
                            kThreadsSimtX - 1) / kThreadsSimtX;
    const int grid = (int)std::max<int64_t>(
        1, std::min<int64_t>(needed, (int64_t)sm_count() * std::max(per_sm, 1)));
    kernel<<<grid, kThreadsSimtX, smem, stream>>>(dz, window_index, packed_rows, grad_x, sc);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (weight_partials) {
    auto kernel = parity_grad_weight_simt_kernel<CI4>;
    const size_t smem = grad_weight_simt_smem();
    if ((e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem)) != cudaSuccess)
      return e;
    kernel<<<blocks, kThreadsSimtW, smem, stream>>>(x, dz, window_index, weight_partials, sc, gc,
                                                    accumulate);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// The chunk launcher for C_in <= 4 CI4 (C_in <= kMaxCin = 16).
inline auto simt_chunk_launcher_for(int in_channels) {
  switch ((in_channels + 3) / 4) {
    case 1: return launch_simt_chunk<1>;
    case 2: return launch_simt_chunk<2>;
    case 3: return launch_simt_chunk<3>;
    default: return launch_simt_chunk<4>;
  }
}

template <typename T>
cudaError_t launch_backward_typed(const BlockShape& s, const BackwardArgs& a, bool ieee,
                                  cudaStream_t stream) {
  const BackwardGeometry geo = geometry_of(s);
  const WorkspaceLayout l = workspace_layout(s, sm_count());
  float* grad_x_weights = static_cast<float*>(a.workspace);
  float* packed_dz = grad_x_weights + l.grad_x_weight_floats;
  float* channel_partials = packed_dz + l.packed_dz_floats;
  float* weight_partials = channel_partials + l.channel_floats;
  const T* w = static_cast<const T*>(a.weight);
  const int64_t x_image = (int64_t)s.in_channels * s.in_size[0] * s.in_size[1] * s.in_size[2];
  const int64_t y_image = (int64_t)s.out_channels * s.in_size[0] * s.in_size[1] * s.in_size[2];
  // y settles the derivative only for a positive slope (see parity_dz_from_output_kernel);
  // the bounds keep slope * slope * m a normal number for every m the kernel trusts.
  const bool dz_from_output = a.y != nullptr && s.negative_slope >= 0x1p-10 &&
                              s.negative_slope <= 0x1p10;
  // The dz-from-y pass splits each channel's pooled grid into slices of >= 1024 positions
  // (one channel-partial slot each): smaller blocks made it latency-bound on the H100.
  const int64_t pooled_spatial = (int64_t)s.in_size[0] * s.in_size[1] * s.in_size[2];
  const int dz_slices =
      (int)std::max<int64_t>(1, std::min<int64_t>(l.blocks, pooled_spatial / 1024));
  // Kernels after the call's first may start early (see wait_for_previous_kernel).
  const bool early_start = early_start_allowed();
  cudaError_t e;
  if (geo.tiles > 0) {
    auto winner = parity_winner_grad_kernel<T>;
    auto grad_x_kernel = grad_x_kernel_for<T>(geo.co_padded);
    auto grad_w_kernel = parity_grad_weight_kernel<T>;
    const size_t smem = winner_smem(), smem_x = grad_x_smem(geo),
                 smem_w = grad_weight_smem(geo, grad_weight_raw_x<T>());
    if ((e = raise_smem_limit(reinterpret_cast<const void*>(winner), smem)) != cudaSuccess ||
        (e = raise_smem_limit(reinterpret_cast<const void*>(grad_x_kernel), smem_x)) !=
            cudaSuccess ||
        (e = raise_smem_limit(reinterpret_cast<const void*>(grad_w_kernel), smem_w)) !=
            cudaSuccess)
      return e;
    if constexpr (std::is_same<T, float>::value) {
      if (ieee && a.grad_x) {  // the IEEE dx kernel's weight rows, once per call
        pack_simt_rows_kernel<<<(kTaps * kSimtRowStride + kThreadsSimtX - 1) / kThreadsSimtX,
                                kThreadsSimtX, 0, stream>>>(w, grad_x_weights, s);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
      }
    }
    // The dz scratch [chunk image][C_out][D][H][W] as a tensor map for the dx kernel's halo
    // copies (sm_90a builds; the box is the kernel's whole halo tile).
    CUtensorMap dz_map{};
    bool dz_by_tma = false;
#if defined(FUSED3D_WGMMA)
    if (a.grad_x) {
      const int64_t dims[5] = {s.in_size[2], s.in_size[1], s.in_size[0], s.out_channels,
                               l.chunk_batch};
      const cuuint32_t box[5] = {kHaloRow, kHaloH, kHaloD, (cuuint32_t)geo.co_padded, 1};
      dz_by_tma = encode_tensor_map_5d(&dz_map, packed_dz, dims, box, CU_TENSOR_MAP_SWIZZLE_NONE);
    }
#endif
    // fp32 with TF32: the dweight partials on wgmma where the build and x allow it
    TensorMapBytes x_map;
    bool wgmma_grad_weight = false;
    if constexpr (std::is_same<T, float>::value)
      wgmma_grad_weight = !ieee && a.grad_weight && prepare_wgmma_grad_weight(&x_map, s, a.x);
    for (int64_t n0 = 0; n0 < s.batch; n0 += l.chunk_batch) {
      BlockShape sc = s;
      sc.batch = s.batch - n0 < l.chunk_batch ? s.batch - n0 : l.chunk_batch;
      const BackwardGeometry gc = geometry_of(sc);
      const int blocks = l.blocks < gc.tiles ? l.blocks : gc.tiles;
      const int accumulate = n0 > 0;
      const T* x = static_cast<const T*>(a.x) + n0 * x_image;
      const T* grad_y = static_cast<const T*>(a.grad_y) + n0 * y_image;
      const uint8_t* window_index = a.window_index + n0 * y_image;
      if (ieee) {
        // IEEE fp32: plain dz (every element recomputing z when y cannot settle it), then the
        // FFMA kernels (only instantiated for float: ieee is never set for other types).
        if constexpr (std::is_same<T, float>::value) {
          parity_dz_from_output_kernel<T, false>
              <<<dim3(dz_slices, s.out_channels), kThreadsDz, 0, stream>>>(
                  x, w, static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier),
                  grad_y, dz_from_output ? static_cast<const T*>(a.y) + n0 * y_image : nullptr,
                  window_index, packed_dz, channel_partials, nullptr, sc, accumulate);
          if ((e = cudaGetLastError()) != cudaSuccess) return e;
          T* grad_x = a.grad_x ? static_cast<T*>(a.grad_x) + n0 * x_image : nullptr;
          float* partials = a.grad_weight ? weight_partials : nullptr;
          e = simt_chunk_launcher_for(s.in_channels)(sc, gc, blocks, x, grad_x_weights, packed_dz,
                                                     window_index, grad_x, partials, accumulate,
                                                     stream);
          if (e != cudaSuccess) return e;
        }
        continue;
      }
      // The first chunk's first kernel also writes the dx kernel's weight operand.
      float* write_weights = (a.grad_x && n0 == 0) ? grad_x_weights : nullptr;
      if (dz_from_output) {
        // (the first kernel of the call follows someone else's: it starts normally)
        e = launch_kernel(parity_dz_from_output_kernel<T, true>, dim3(dz_slices, s.out_channels),
                          kThreadsDz, 0, stream, early_start && n0 > 0, x, w,
                          static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier),
                          grad_y, static_cast<const T*>(a.y) + n0 * y_image, window_index,
                          packed_dz, channel_partials, write_weights, sc, accumulate);
        if (e != cudaSuccess) return e;
      } else {
        winner<<<blocks, kThreadsWinner, smem, stream>>>(
            x, w, static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier), grad_y,
            window_index, packed_dz, channel_partials, write_weights, sc, gc, accumulate);
      }
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      if (a.grad_x) {
        e = launch_kernel(grad_x_kernel, blocks, kThreadsWide, smem_x, stream, early_start,
                          packed_dz, grad_x_weights, static_cast<T*>(a.grad_x) + n0 * x_image,
                          sc, gc, (int)(n0 > 0), dz_map, (int)dz_by_tma);
        if (e != cudaSuccess) return e;
      }
      if (wgmma_grad_weight) {  // (implies a.grad_weight)
        e = launch_wgmma_grad_weight(x_map, static_cast<const float*>(a.x), sc, (int)n0, gc.tiles,
                                     gc.h_tiles, gc.w_tiles, blocks, packed_dz, weight_partials,
                                     accumulate, early_start, stream);
        if (e != cudaSuccess) return e;
      } else if (a.grad_weight) {
        grad_w_kernel<<<blocks, kThreadsWide, smem_w, stream>>>(x, packed_dz, weight_partials,
                                                                 sc, gc, accumulate);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
      }
    }
  } else {
    // No pooled output: every gradient is zero.
    if (a.grad_x && s.input_numel() > 0 &&
        (e = cudaMemsetAsync(a.grad_x, 0, s.input_numel() * sizeof(T), stream)) != cudaSuccess)
      return e;
  }
  const int channel_blocks =
      geo.tiles > 0 ? ((dz_from_output || ieee) ? dz_slices : l.blocks) : 0;
  const int weight_blocks = (geo.tiles > 0 && a.grad_weight) ? l.blocks : 0;
  if (a.grad_weight || a.grad_bias_channels || a.grad_multiplier_channels) {
    e = launch_kernel(parity_reduce_kernel<T>, kReduceItems / 32, kThreads, 0, stream,
                      early_start && geo.tiles > 0, weight_partials, weight_blocks,
                      channel_partials, channel_blocks, static_cast<T*>(a.grad_weight),
                      static_cast<float*>(a.grad_bias_channels),
                      static_cast<float*>(a.grad_multiplier_channels), s);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace parity

bool parity_backward_supported(const BlockShape& s, DType dtype, bool allow_tf32) {
  if (!s.is_parity_fast_path()) return false;
  // fp32 without TF32 takes the FFMA kernels; half types the tensor cores either way (their
  // products are exact in TF32).
  if (dtype == DType::Float64) return false;
  if (s.in_channels > parity::kMaxCin || s.out_channels > parity::kMaxCout) return false;
  if ((int64_t)s.in_size[0] * s.in_size[1] * s.in_size[2] >= (1LL << 31)) return false;
  const int64_t tiles = s.batch * s.in_size[0] *
                        (int64_t)((s.in_size[1] + parity::kTileH - 1) / parity::kTileH) *
                        ((s.in_size[2] + parity::kTileW - 1) / parity::kTileW);
  return tiles < (1LL << 31);
}

int64_t parity_backward_workspace_bytes(const BlockShape& s, DType) {
  const parity::WorkspaceLayout l = parity::workspace_layout(s, parity::sm_count());
  return (int64_t)sizeof(float) *
         (l.grad_x_weight_floats + l.packed_dz_floats + l.channel_floats + l.weight_floats);
}

cudaError_t launch_parity_backward(const BlockShape& s, DType dtype, bool allow_tf32,
                                   const BackwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return parity::launch_backward_typed<float>(s, a, !allow_tf32, stream);
    case DType::Float16: return parity::launch_backward_typed<__half>(s, a, false, stream);
    case DType::BFloat16:
      return parity::launch_backward_typed<__nv_bfloat16>(s, a, false, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Explicit instantiations: every shipped kernel appears in `nvcc -Xptxas -v` of this file.
#define FUSED3D_INSTANTIATE_PARITY_BACKWARD(T)                                                \
  template __global__ void parity::parity_dz_from_output_kernel<T, true>(                     \
      const T*, const T*, const T*, const T*, const T*, const T*, const uint8_t*, float*,     \
      float*, float*, BlockShape, int);                                                       \
  template __global__ void parity::parity_winner_grad_kernel<T>(                              \
      const T*, const T*, const T*, const T*, const T*, const uint8_t*, float*, float*,       \
      float*, BlockShape, parity::BackwardGeometry, int);                                     \
  template __global__ void parity::parity_grad_x_kernel<T, 1>(                                \
      const float*, const float*, T*, BlockShape, parity::BackwardGeometry, int,              \
      const __grid_constant__ CUtensorMap, int);                                              \
  template __global__ void parity::parity_grad_x_kernel<T, 2>(                                \
      const float*, const float*, T*, BlockShape, parity::BackwardGeometry, int,              \
      const __grid_constant__ CUtensorMap, int);                                              \
  template __global__ void parity::parity_grad_x_kernel<T, 3>(                                \
      const float*, const float*, T*, BlockShape, parity::BackwardGeometry, int,              \
      const __grid_constant__ CUtensorMap, int);                                              \
  template __global__ void parity::parity_grad_x_kernel<T, 4>(                                \
      const float*, const float*, T*, BlockShape, parity::BackwardGeometry, int,              \
      const __grid_constant__ CUtensorMap, int);                                              \
  template __global__ void parity::parity_grad_weight_kernel<T>(                              \
      const T*, const float*, float*, BlockShape, parity::BackwardGeometry, int);             \
  template __global__ void parity::parity_reduce_kernel<T>(const float*, int, const float*,   \
                                                           int, T*, float*, float*,           \
                                                           BlockShape);
FUSED3D_INSTANTIATE_PARITY_BACKWARD(float)
FUSED3D_INSTANTIATE_PARITY_BACKWARD(__half)
FUSED3D_INSTANTIATE_PARITY_BACKWARD(__nv_bfloat16)
template __global__ void parity::parity_dz_from_output_kernel<float, false>(
    const float*, const float*, const float*, const float*, const float*, const float*,
    const uint8_t*, float*, float*, float*, BlockShape, int);
#define FUSED3D_INSTANTIATE_SIMT_BACKWARD(CI4)                                                \
  template __global__ void parity::parity_grad_x_simt_kernel<CI4>(                            \
      const float*, const uint8_t*, const float*, float*, BlockShape);                        \
  template __global__ void parity::parity_grad_weight_simt_kernel<CI4>(                       \
      const float*, const float*, const uint8_t*, float*, BlockShape,                         \
      parity::BackwardGeometry, int);
FUSED3D_INSTANTIATE_SIMT_BACKWARD(1)
FUSED3D_INSTANTIATE_SIMT_BACKWARD(2)
FUSED3D_INSTANTIATE_SIMT_BACKWARD(3)
FUSED3D_INSTANTIATE_SIMT_BACKWARD(4)

}  // namespace fused3d_cuda
