// Parity fast-path forward: ONE launch from x to pooled y and the uint8 window index.
//
// Implicit GEMM per block tile (one image n, one depth d, 8 rows of h, 32 of w pooled
// positions, 32 output channels): M = pooled positions, K = taps x C_in, N = 8 parity classes
// x C_out. The classes are computed one after another (class order = window index order),
// each gets the epilogue (bias, leaky, * multiplier, leaky) and is folded into a running max
// with PyTorch's rule, so nothing conv-sized ever leaves registers.
//
// Two compute cores share the tiling:
//  * tensor cores, mma.sync m16n8k8 TF32 with fp32 accumulation (fp32 with allow_tf32, and
//    fp16/bf16, whose values are exact in TF32 so products are exact);
//  * IEEE fp32 FFMA (fp32 without allow_tf32), register-blocked 4 w x 8 channels per thread.
// Persistent grid: each block stages its 32-channel weight slice once, then walks tiles with
// the next tile's x halo copied by cp.async into a second buffer while it computes.
#include "parity_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Tensor-core kernel: 16 warps, warp w owns w positions (w & 1) * 16 ... + 15 of h-line w / 2
// (16 warps hide the mma and shared-memory latencies better than 8 with twice the rows).
constexpr int kThreadsTc = 512;
constexpr int kWarpTilesTc = 1;  // 16-row mma tiles per warp
// FFMA kernel: 8 warps; warp w owns h-line w of the tile.
constexpr int kThreadsFfma = 256;
constexpr int kTaps = 27;

// Epilogue of one conv output z (bias not yet added), then PyTorch's pool update into
// (best, packed index). leaky(m * leaky(t)) is linear on each side of t = 0, so it is
// t * (t > 0 ? c_pos : c_neg) with per-channel slopes precomputed from m and the negative
// slope (one rounding instead of three; NaN and infinities propagate the same way).
__device__ __forceinline__ void fold_into_pool(float z, float bias, float c_pos, float c_neg,
                                               int cls, float& best, uint32_t& win_bytes,
                                               int byte) {
  const float t = z + bias;
  const float v = t * (t > 0.f ? c_pos : c_neg);
  if (cls == 0) {
    best = v;
  } else if (pool_takes(best, v)) {
    best = v;
    win_bytes = (win_bytes & ~(0xffu << (8 * byte))) | ((uint32_t)cls << (8 * byte));
  }
}

template <typename T>
__device__ __forceinline__ void store_pooled(T* y, uint8_t* window_index, const BlockShape& s,
                                             TileCoord c, int h, int w, int co, float v,
                                             uint32_t win) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  if (h < H && w < W && co < s.out_channels) {
    const int64_t off = (((int64_t)c.n * s.out_channels + co) * D + c.d) * H * (int64_t)W +
                        (int64_t)h * W + w;
    y[off] = from_acc<T>(v);
    window_index[off] = (uint8_t)win;
  }
}

// ------------------------------------------------------------------ tensor-core core (TF32)

template <typename T>
__device__ __forceinline__ void tile_compute_tf32(const float* __restrict__ xs,
                                                  const float4* __restrict__ ws4,
                                                  const float* __restrict__ bias_s,
                                                  const float* __restrict__ slopes_s,
                                                  T* y, uint8_t* window_index,
                                                  const BlockShape& s, TileCoord c,
                                                  int ksteps) {
  // fp16/bf16 values are exact in TF32; fp32 x tiles were rounded to nearest in place.
  constexpr bool kRound = false;
  constexpr int MT = kWarpTilesTc;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hl = warp >> 1, row0 = (warp & 1) * 16;
  const int g = lane >> 2, t = lane & 3;
  float best[MT][4][4];
  uint32_t win[MT][4];
#pragma unroll 1  // class loop kept rolled: unrolled, the kernel overflows the instruction cache
  for (int cls = 0; cls < 8; ++cls) {
    float acc[MT][4][4];
    accumulate_class_tf32<kRound, MT>(acc, cls, xs, ws4, hl, row0, lane, ksteps);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (cls == 0) win[mt][nt] = 0u;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = nt * 8 + 2 * t + (r & 1);
          fold_into_pool(acc[mt][nt][r], bias_s[col], slopes_s[col], slopes_s[kCoTile + col],
                         cls, best[mt][nt][r], win[mt][nt], r);
        }
      }
  }
  const int co0 = blockIdx.y * kCoTile;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = row0 + mt * 16 + g + 8 * (r >> 1);
        const int col = nt * 8 + 2 * t + (r & 1);
        store_pooled(y, window_index, s, c, c.h0 + hl, c.w0 + row, co0 + col,
                     best[mt][nt][r], (win[mt][nt] >> (8 * r)) & 0xffu);
      }
}

// ------------------------------------------------------------------ IEEE fp32 core (FFMA)

// Thread layout: warp = h-line, lane = (w group of 4) x (channel group of 8).
__device__ __forceinline__ void tile_compute_ffma(const float* __restrict__ xs,
                                                  const float* __restrict__ ws,
                                                  const float* __restrict__ bias_s,
                                                  const float* __restrict__ slopes_s, float* y,
                                                  uint8_t* window_index, const BlockShape& s,
                                                  TileCoord c, int ci_padded) {
  const int lane = threadIdx.x & 31, hl = threadIdx.x >> 5;
  const int cg = lane & 3, wg = lane >> 2;
  float best[4][8];
  uint32_t win[8];  // byte j = window index of w position j, channel cc
#pragma unroll 1
  for (int cls = 0; cls < 8; ++cls) {
    float acc[4][8];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) acc[j][cc] = 0.f;
#pragma unroll
    for (int o = 0; o < 8; ++o) {
      if (o & ~cls) continue;
      const int k = class_tap(cls, o);
      const float* xa = xs + halo_pos(o, hl, wg * 4);
      const float4* wa = reinterpret_cast<const float4*>(ws + k * ci_padded * kCoTile) + cg * 2;
#pragma unroll 4
      for (int ci = 0; ci < ci_padded; ++ci) {
        float xv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = xa[ci * kXStride + j];
        const float4 w0 = wa[ci * (kCoTile / 4)], w1 = wa[ci * (kCoTile / 4) + 1];
        const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) acc[j][cc] = fmaf(xv[j], wv[cc], acc[j][cc]);
      }
    }
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      if (cls == 0) win[cc] = 0u;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = cg * 8 + cc;
        fold_into_pool(acc[j][cc], bias_s[col], slopes_s[col], slopes_s[kCoTile + col], cls,
                       best[j][cc], win[cc], j);
      }
    }
  }
  const int co0 = blockIdx.y * kCoTile;
#pragma unroll
  for (int cc = 0; cc < 8; ++cc)
#pragma unroll
    for (int j = 0; j < 4; ++j)
      store_pooled(y, window_index, s, c, c.h0 + hl, c.w0 + wg * 4 + j, co0 + cg * 8 + cc,
                   best[j][cc], (win[cc] >> (8 * j)) & 0xffu);
}

// ------------------------------------------------------------------ the kernel

struct ForwardGeometry {
  int ci_padded;  // C_in rounded up to 8
  int tiles, h_tiles, w_tiles;
};

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kTensorCores ? kThreadsTc : kThreadsFfma, 1) parity_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const T* __restrict__ multiplier, T* __restrict__ y, uint8_t* __restrict__ window_index,
    BlockShape s, ForwardGeometry geo) {
  extern __shared__ float4 smem4[];
  const int cip = geo.ci_padded;
  float* ws = reinterpret_cast<float*>(smem4);
  float* xs_base = ws + kTaps * cip * kCoTile;  // two x buffers of cip * kXStride floats
  const int xs_size = cip * kXStride;
  float* bias_s = xs_base + 2 * xs_size;
  float* slopes_s = bias_s + kCoTile;  // [c_pos x 32][c_neg x 32]
  const int co0 = blockIdx.y * kCoTile;
  if ((int)blockIdx.x >= geo.tiles) return;

  // Prefetch the first x tile, then stage the weight slice while it flies.
  int tile = blockIdx.x;
  issue_x_tile<T>(xs_base, x, s, decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles),
                  cip);
  cp_async_commit();

  const int ksteps = cip / 8;
  if constexpr (kTensorCores) {
    stage_weights_tf32<T>(ws, w, s, co0, cip);
  } else {
    // FFMA layout: [k][ci][col], 8 consecutive channels per 32-byte read.
    const int weight_floats = kTaps * cip * kCoTile;
    for (int e = threadIdx.x; e < weight_floats; e += blockDim.x) {
      const int col = e % kCoTile, ci = (e / kCoTile) % cip, k = e / (kCoTile * cip);
      const int co = co0 + col;
      ws[e] = (ci < s.in_channels && co < s.out_channels)
                  ? to_acc(w[((int64_t)ci * s.out_channels + co) * kTaps + k])
                  : 0.f;
    }
  }
  if (threadIdx.x < kCoTile) {
    const int co = co0 + threadIdx.x;
    const bool valid = co < s.out_channels;
    bias_s[threadIdx.x] = (valid && bias) ? to_acc(bias[co]) : 0.f;
    const float m = valid ? to_acc(multiplier[co * s.multiplier_stride]) : 0.f;
    const float slope = (float)s.negative_slope;
    // t > 0: v = m t, kept when m > 0.  t <= 0: v = m slope t, kept when m slope < 0.
    slopes_s[threadIdx.x] = m > 0.f ? m : slope * m;
    slopes_s[kCoTile + threadIdx.x] = (m * slope < 0.f) ? m * slope : slope * (m * slope);
  }

  for (int it = 0; tile < geo.tiles; tile += gridDim.x, ++it) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    const int next = tile + gridDim.x;
    if (next < geo.tiles) {
      issue_x_tile<T>(xs_base + ((it + 1) & 1) * xs_size, x, s,
                      decode_tile(next, s.in_size[0], geo.h_tiles, geo.w_tiles), cip);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (kTensorCores && std::is_same<T, float>::value)
      round_own_x_tile_tf32(xs_base + (it & 1) * xs_size, cip, kXStride);
    __syncthreads();  // tile `it` (and on the first pass the weights) visible to all warps
    if constexpr (kTensorCores) {
      tile_compute_tf32<T>(xs_base + (it & 1) * xs_size, smem4, bias_s, slopes_s, y,
                           window_index, s, c, ksteps);
    } else {
      tile_compute_ffma(xs_base + (it & 1) * xs_size, ws, bias_s, slopes_s,
                        reinterpret_cast<float*>(y), window_index, s, c, cip);
    }
    __syncthreads();  // everyone is done with this buffer before it is refilled
  }
}

inline int ci_padded_of(const BlockShape& s) { return (s.in_channels + 7) / 8 * 8; }

inline size_t forward_smem_bytes(const BlockShape& s) {
  const int cip = ci_padded_of(s);
  return sizeof(float) * ((size_t)kTaps * cip * kCoTile + 2 * (size_t)cip * kXStride + 3 * kCoTile);
}

template <typename T, bool kTensorCores>
cudaError_t launch_typed(const BlockShape& s, const ForwardArgs& a, cudaStream_t stream) {
  ForwardGeometry geo;
  geo.ci_padded = ci_padded_of(s);
  geo.h_tiles = (s.in_size[1] + kTileH - 1) / kTileH;
  geo.w_tiles = (s.in_size[2] + kTileW - 1) / kTileW;
  const int64_t tiles = s.batch * s.in_size[0] * (int64_t)geo.h_tiles * geo.w_tiles;
  geo.tiles = (int)tiles;
  if (tiles == 0 || s.out_channels == 0) return cudaSuccess;
  const size_t smem = forward_smem_bytes(s);
  auto kernel = parity_forward_kernel<T, kTensorCores>;
  cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  int sms = 0;
  if ((e = current_sm_count(&sms)) != cudaSuccess) return e;
  const int co_chunks = (s.out_channels + kCoTile - 1) / kCoTile;
  // One resident block per SM (the smem budget allows one): spread them over the chunks.
  int blocks = (sms + co_chunks - 1) / co_chunks;
  if (blocks < 1) blocks = 1;
  if (blocks > geo.tiles) blocks = geo.tiles;
  kernel<<<dim3(blocks, co_chunks), kTensorCores ? kThreadsTc : kThreadsFfma, smem, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
      static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier), static_cast<T*>(a.y),
      a.window_index, s, geo);
  return cudaGetLastError();
}

}  // namespace parity

bool parity_forward_supported(const BlockShape& s, DType dtype, bool /*allow_tf32*/) {
  if (!s.is_parity_fast_path() || dtype == DType::Float64) return false;
  for (int a = 0; a < 3; ++a)
    if (s.pooled_size[a] != s.in_size[a]) return false;
  const int64_t tiles = s.batch * s.in_size[0] *
                        (int64_t)((s.in_size[1] + parity::kTileH - 1) / parity::kTileH) *
                        ((s.in_size[2] + parity::kTileW - 1) / parity::kTileW);
  if (tiles >= (1LL << 31) || s.out_channels > 65535 * parity::kCoTile) return false;
  return parity::forward_smem_bytes(s) <= 227 * 1024;
}

cudaError_t launch_parity_forward(const BlockShape& s, DType dtype, bool allow_tf32,
                                  const ForwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return allow_tf32 ? parity::launch_typed<float, true>(s, a, stream)
                        : parity::launch_typed<float, false>(s, a, stream);
    case DType::Float16: return parity::launch_typed<__half, true>(s, a, stream);
    case DType::BFloat16: return parity::launch_typed<__nv_bfloat16, true>(s, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Explicit instantiations: every shipped kernel appears in `nvcc -Xptxas -v` of this file.
#define FUSED3D_INSTANTIATE_PARITY_FORWARD(T, TC)                                          \
  template __global__ void parity::parity_forward_kernel<T, TC>(                           \
      const T*, const T*, const T*, const T*, T*, uint8_t*, BlockShape,                    \
      parity::ForwardGeometry);
FUSED3D_INSTANTIATE_PARITY_FORWARD(float, true)
FUSED3D_INSTANTIATE_PARITY_FORWARD(float, false)
FUSED3D_INSTANTIATE_PARITY_FORWARD(__half, true)
FUSED3D_INSTANTIATE_PARITY_FORWARD(__nv_bfloat16, true)

}  // namespace fused3d_cuda
