// Shared pieces of the parity fast path (kernel 3, stride 2, padding 1, output_padding 1).
//
// Parity split, per axis: conv output 2m uses x[m]*w[1]; output 2m+1 uses x[m]*w[2] +
// x[m+1]*w[0]. A 2x2x2 pool window m holds one output of each of the 8 parity classes
// P = (pd, ph, pw), the class index equal to the window index pd*4 + ph*2 + pw, so pooled
// position m reads only x at {m, m+1}^3. Class P sums the taps whose input offset o (a
// subset of P's odd axes) and kernel index k(P, o) follow from the rule above: 27 taps in
// all, each kernel position used by exactly one class.
#pragma once

#include <algorithm>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "fused3d_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Host helpers: both are asked on every launch, so they are answered once per device.
inline cudaError_t current_sm_count(int* sms) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(device);
  if (found != cache.end()) {
    *sms = found->second;
    return cudaSuccess;
  }
  e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) cache[device] = *sms;
  return e;
}

// Raise a kernel's dynamic shared-memory limit (needed above 48 KB) once per kernel and device.
inline cudaError_t raise_smem_limit(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> raised;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = raised[{kernel, device}];
  if (current >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e == cudaSuccess) current = bytes;
  return e;
}

// Block tile of pooled positions: one image n, one depth d, kTileH rows of h, kTileW of w.
constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kHaloD = 2, kHaloH = kTileH + 1, kHaloW = kTileW + 1;
constexpr int kHalo = kHaloD * kHaloH * kHaloW;  // 594 positions
// Channel stride of the x tile in shared memory: = 8 (mod 16) words, so the 4 channel rows a
// warp's mma fragment touches land in distinct bank octets (conflict-free loads).
constexpr int kXStride = ((kHalo + 7) / 8 % 2 == 1) ? (kHalo + 7) / 8 * 8 : (kHalo + 7) / 8 * 8 + 8;
constexpr int kCoTile = 32;  // output channels per block (blockIdx.y picks the chunk)

// Kernel index along one axis for parity p and input offset o (see the note above).
__host__ __device__ constexpr int tap_k(int p, int o) { return p ? (o ? 0 : 2) : 1; }
// Flat weight tap kd*9 + kh*3 + kw that class `cls` applies at input offset `o` (o <= cls).
__host__ __device__ constexpr int class_tap(int cls, int o) {
  return tap_k((cls >> 2) & 1, (o >> 2) & 1) * 9 + tap_k((cls >> 1) & 1, (o >> 1) & 1) * 3 +
         tap_k(cls & 1, o & 1);
}

// Halo index of pooled row `row` (w within the tile) for warp/h-line hl and offset o.
__device__ __forceinline__ int halo_pos(int o, int hl, int row) {
  return (((o >> 2) & 1) * kHaloH + hl + ((o >> 1) & 1)) * kHaloW + row + (o & 1);
}

struct TileCoord {
  int n, d, h0, w0;
};

__device__ __forceinline__ TileCoord decode_tile(int tile, int D, int h_tiles, int w_tiles) {
  TileCoord c;
  const int wt = tile % w_tiles;
  tile /= w_tiles;
  const int ht = tile % h_tiles;
  tile /= h_tiles;
  c.d = tile % D;
  c.n = tile / D;
  c.h0 = ht * kTileH;
  c.w0 = wt * kTileW;
  return c;
}

__device__ __forceinline__ float to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
}

// Stage x[n, :, d..d+1, h0..h0+8, w0..w0+32] (zero outside the input) as [ci][halo] floats.
template <typename T, bool kRoundTf32>
__device__ __forceinline__ void load_x_tile(float* __restrict__ xs, const T* __restrict__ x,
                                            const BlockShape& s, TileCoord c, int ci_padded) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const T* x_n = x + (int64_t)c.n * s.in_channels * spatial;
  const int total = ci_padded * kHalo;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int ci = e / kHalo;
    const int r = e - ci * kHalo;
    const int ww = r % kHaloW;
    const int hh = (r / kHaloW) % kHaloH;
    const int dd = r / (kHaloW * kHaloH);
    const int id = c.d + dd, ih = c.h0 + hh, iw = c.w0 + ww;
    float v = 0.f;
    if (ci < s.in_channels && id < D && ih < H && iw < W) {
      v = to_acc(x_n[ci * spatial + ((int64_t)id * H + ih) * W + iw]);
      if (kRoundTf32) v = to_tf32(v);
    }
    xs[ci * kXStride + r] = v;
  }
}

__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool valid) {
  const unsigned dst_addr = (unsigned)__cvta_generic_to_shared(dst);
  const int bytes = valid ? 4 : 0;  // 0 source bytes: the copy writes zero
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Stage one x halo tile: fp32 through cp.async (asynchronous), other types converted inline.
template <typename T>
__device__ __forceinline__ void issue_x_tile(float* xs, const T* x, const BlockShape& s,
                                             TileCoord c, int ci_padded) {
  if constexpr (std::is_same<T, float>::value) {
    const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
    const int64_t spatial = (int64_t)D * H * W;
    const float* x_n = x + (int64_t)c.n * s.in_channels * spatial;
    const int total = ci_padded * kHalo;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      const int ci = e / kHalo;
      const int r = e - ci * kHalo;
      const int ww = r % kHaloW;
      const int hh = (r / kHaloW) % kHaloH;
      const int dd = r / (kHaloW * kHaloH);
      const int id = c.d + dd, ih = c.h0 + hh, iw = c.w0 + ww;
      const bool valid = ci < s.in_channels && id < D && ih < H && iw < W;
      const float* src = valid ? x_n + ci * spatial + ((int64_t)id * H + ih) * W + iw : x;
      cp_async_f32(xs + ci * kXStride + r, src, valid);
    }
  } else {
    load_x_tile<T, false>(xs, x, s, c, ci_padded);
  }
}

// fp32 bits rounded to the nearest TF32 (ties away from zero; inf and NaN kept).
__device__ __forceinline__ uint32_t round_tf32_bits(float v) {
  return __float_as_uint(to_tf32(v));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], float b0,
                                         float b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(__float_as_uint(b0)),
        "r"(__float_as_uint(b1)));
}


// Round this thread's own elements of an x tile (the ones its cp.async calls wrote, now
// complete) to TF32 in place, so the mma loops read ready operands. Call between
// cp_async_wait and the __syncthreads that publishes the tile.
__device__ __forceinline__ void round_own_x_tile_tf32(float* xs, int ci_padded, int stride) {
  const int total = ci_padded * kHalo;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int ci = e / kHalo;
    float* p = xs + ci * stride + (e - ci * kHalo);
    *p = to_tf32(*p);
  }
}

// Conv values of parity class `cls` for a warp's 16*MT pooled positions (w = row0 ...,
// h-line hl of the tile) x 32 channels, as mma C fragments: acc[mt][nt][r] is row
// row0 + mt*16 + g + 8*(r>>1), channel nt*8 + 2t + (r&1). x tile: [ci][halo] floats;
// weights: B fragments (see stage_weights_tf32).
template <bool kRound, int MT>
__device__ __forceinline__ void accumulate_class_tf32(float (&acc)[MT][4][4], int cls,
                                                      const float* __restrict__ xs,
                                                      const float4* __restrict__ ws4, int hl,
                                                      int row0, int lane, int ksteps) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
#pragma unroll
  for (int o = 0; o < 8; ++o) {
    if (o & ~cls) continue;  // offset o needs an odd parity on each axis it shifts
    const int k = class_tap(cls, o);
    const int p0 = halo_pos(o, hl, row0 + g);
    for (int kk = 0; kk < ksteps; ++kk) {
      const float* xa = xs + (kk * 8 + t) * kXStride + p0;
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float v0 = xa[mt * 16], v1 = xa[mt * 16 + 8];
        const float v2 = xa[4 * kXStride + mt * 16], v3 = xa[4 * kXStride + mt * 16 + 8];
        a[mt][0] = kRound ? round_tf32_bits(v0) : __float_as_uint(v0);
        a[mt][1] = kRound ? round_tf32_bits(v1) : __float_as_uint(v1);
        a[mt][2] = kRound ? round_tf32_bits(v2) : __float_as_uint(v2);
        a[mt][3] = kRound ? round_tf32_bits(v3) : __float_as_uint(v3);
      }
      const float4* wb = ws4 + ((k * ksteps + kk) * 2) * 32 + lane;
      const float4 b01 = wb[0], b23 = wb[32];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_tf32(acc[mt][0], a[mt], b01.x, b01.y);
        mma_tf32(acc[mt][1], a[mt], b01.z, b01.w);
        mma_tf32(acc[mt][2], a[mt], b23.x, b23.y);
        mma_tf32(acc[mt][3], a[mt], b23.z, b23.w);
      }
    }
  }
}

// Stage the weight slice of output channels co0..co0+31 for accumulate_class_tf32, in mma
// B-fragment order: float4 (k, kk, j, lane) = {B[t][n0+g], B[t+4][n0+g], B[t][n1+g],
// B[t+4][n1+g]} with n0 = 16j, n1 = 16j + 8 (B[ci][col] = w[ci, co0+col, k]), so one 16-byte
// load per lane feeds two mma.
template <typename T>
__device__ __forceinline__ void stage_weights_tf32(float* __restrict__ ws, const T* __restrict__ w,
                                                   const BlockShape& s, int co0, int cip) {
  const int ksteps = cip / 8;
  const int weight_floats = 27 * cip * kCoTile;
  for (int e = threadIdx.x; e < weight_floats; e += blockDim.x) {
    const int q = e & 3, lane = (e >> 2) & 31, j = (e >> 7) & 1, rest = e >> 8;
    const int kk = rest % ksteps;
    const int k = rest / ksteps;
    const int ci = kk * 8 + (lane & 3) + ((q & 1) ? 4 : 0);
    const int co = co0 + (2 * j + (q >> 1)) * 8 + (lane >> 2);
    float v = 0.f;
    if (ci < s.in_channels && co < s.out_channels) {
      v = to_acc(w[((int64_t)ci * s.out_channels + co) * 27 + k]);
      if (std::is_same<T, float>::value) v = to_tf32(v);
    }
    ws[e] = v;
  }
}

}  // namespace parity
}  // namespace fused3d_cuda
