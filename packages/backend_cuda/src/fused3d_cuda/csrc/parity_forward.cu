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
// Persistent grid: each block stages its 32-channel weight slice once, then walks tiles. The
// tensor-core kernel (one block per SM) copies the next tile's x halo by cp.async into a
// second buffer while it computes; the FFMA kernel runs two blocks per SM with one buffer each.
#include "parity_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Tensor-core kernel: 16 warps, warp w owns w positions (w & 1) * 16 ... + 15 of h-line w / 2
// (16 warps hide the mma and shared-memory latencies better than 8 with twice the rows).
constexpr int kThreadsTc = 512;
constexpr int kWarpTilesTc = 1;  // 16-row mma tiles per warp
// FFMA kernel: 8 warps, warp w owns h-line w of the tile; two blocks per SM (one x buffer
// each), so one block's tile load overlaps the other's arithmetic.
constexpr int kThreadsFfma = 256;
constexpr int kBlocksPerSmFfma = 2;

// ------------------------------------------------------------------ tensor-core core (TF32)

template <typename T, int KSTEPS>
__device__ __forceinline__ void tile_compute_tf32(const float* __restrict__ xs,
                                                  const float4* __restrict__ ws4,
                                                  const float* __restrict__ bias_s,
                                                  const float* __restrict__ slopes_s,
                                                  T* y, uint8_t* window_index,
                                                  const BlockShape& s, TileCoord c) {
  constexpr int MT = kWarpTilesTc;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarpsPerLine = kTileW / (16 * MT);
  const int hl = warp / kWarpsPerLine, row0 = (warp % kWarpsPerLine) * 16 * MT;
  const int g = lane >> 2, t = lane & 3;
  float best[MT][4][4];
  uint32_t windows[MT][4];  // byte r: the window index of value r
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      windows[mt][nt] = 0;
#pragma unroll
      for (int r = 0; r < 4; ++r) best[mt][nt][r] = -INFINITY;
    }
  // (The SASS holds one copy of this loop's body per class whatever the pragma says, which
  // measured faster than a rolled loop; a separate class-0 step, as in the FFMA kernel, kept
  // the loop rolled and cost 11%.)
#pragma unroll 1
  for (int cls = 0; cls < 8; ++cls) {
    float acc[MT][4][4];
    accumulate_class_tf32<MT, KSTEPS, KSTEPS == 2>(acc, cls, xs, ws4, hl, row0, lane, bias_s);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int col = nt * 8 + 2 * t + (r & 1);
          fold_into_pool<false>(acc[mt][nt][r], slopes_s[col], slopes_s[kCoTile + col],
                                class_bytes(cls), r, best[mt][nt][r], windows[mt][nt]);
        }
  }
  // Value r of n-tile nt: channel co_first + nt * 8 + (r & 1), w = w_first + 8 * (r >> 1).
  const PooledOutputs out = pooled_outputs(s, c, c.h0 + hl, blockIdx.y * kCoTile + 2 * t);
  const int w_first = c.w0 + row0 + g;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        store_pooled(y, window_index, out, nt * 8 + (r & 1), w_first + mt * 16 + 8 * (r >> 1),
                     best[mt][nt][r], (windows[mt][nt] >> (8 * r)) & 0xffu);
}

// ------------------------------------------------------------------ IEEE fp32 core (FFMA)

// acc[j][cc] += x[ci][w j] * W[ci][channel cc] for one input channel ci of one tap; with
// kFromBias the sums start from the bias instead (the first step of a class: no separate
// initialisation of the 32 accumulators).
template <bool kFromBias>
__device__ __forceinline__ void ffma_step(float (&acc)[4][8], const float* __restrict__ xa,
                                          const float4* __restrict__ wa, int ci,
                                          const float* __restrict__ bias) {
  float xv[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) xv[j] = xa[ci * kXStride + j];
  const float4 w0 = wa[ci * (kCoTile / 4)], w1 = wa[ci * (kCoTile / 4) + 1];
  const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc)
      acc[j][cc] = fmaf(xv[j], wv[cc], kFromBias ? bias[cc] : acc[j][cc]);
}

// Thread layout: warp = h-line, lane = (w group of 4) x (channel group of 8). ci_padded: C_in
// padded to 8 (a run-time value: fixed at compile time, the loops unrolled into spills).
__device__ __forceinline__ void tile_compute_ffma(const float* __restrict__ xs,
                                                  const float* __restrict__ ws,
                                                  const float* __restrict__ bias_s,
                                                  const float* __restrict__ slopes_s, float* y,
                                                  uint8_t* window_index, const BlockShape& s,
                                                  TileCoord c, int ci_padded) {
  const int lane = threadIdx.x & 31, hl = threadIdx.x >> 5;
  const int cg = lane & 3, wg = lane >> 2;
  float best[4][8];
  uint32_t windows[8];  // byte j: the window index at w position j, channel cc
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    windows[cc] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) best[j][cc] = -INFINITY;
  }
#pragma unroll 1
  for (int cls = 0; cls < 8; ++cls) {
    float acc[4][8];
#pragma unroll
    for (int o = 0; o < 8; ++o) {
      if (o & ~cls) continue;  // o = 0 belongs to every class: its first step adds the bias
      const int k = class_tap(cls, o);
      const float* xa = xs + halo_pos(o, hl, wg * 4);
      const float4* wa = reinterpret_cast<const float4*>(ws + k * ci_padded * kCoTile) + cg * 2;
      if (o == 0) ffma_step<true>(acc, xa, wa, 0, bias_s + cg * 8);
#pragma unroll 4
      for (int ci = o == 0 ? 1 : 0; ci < ci_padded; ++ci)
        ffma_step<false>(acc, xa, wa, ci, nullptr);
    }
    auto fold_class = [&](auto opens) {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        const int col = cg * 8 + cc;
#pragma unroll
        for (int j = 0; j < 4; ++j)
          fold_into_pool<decltype(opens)::value>(acc[j][cc], slopes_s[col],
                                                 slopes_s[kCoTile + col], class_bytes(cls), j,
                                                 best[j][cc], windows[cc]);
      }
    };
    if (cls == 0) {
      fold_class(std::true_type{});
    } else {
      fold_class(std::false_type{});
    }
  }
  // The thread's 4 w positions are consecutive: where W % 4 == 0 they are 16 aligned bytes of y
  // and 4 of the window index (its packed word as it stands), one store each per channel.
  const PooledOutputs out = pooled_outputs(s, c, c.h0 + hl, blockIdx.y * kCoTile + cg * 8);
  const int w_first = c.w0 + wg * 4;
  const bool vectors = out.width % 4 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(window_index) & 3) == 0;
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    if (vectors) {
      if (w_first < out.width && cc < out.channels) {
        const int64_t off = out.base + cc * out.channel_stride + w_first;
        *reinterpret_cast<float4*>(y + off) =
            make_float4(best[0][cc], best[1][cc], best[2][cc], best[3][cc]);
        *reinterpret_cast<uint32_t*>(window_index + off) = windows[cc];
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        store_pooled(y, window_index, out, cc, w_first + j, best[j][cc],
                     (windows[cc] >> (8 * j)) & 0xffu);
    }
  }
}

// ------------------------------------------------------------------ the kernel


// x buffers per block: the tensor-core kernel (one block per SM) double-buffers its x tiles;
// the FFMA kernel runs two blocks per SM with one buffer each.
template <bool kTensorCores>
__host__ __device__ constexpr int x_buffers() {
  return kTensorCores ? 2 : 1;
}

// Half types stage raw x tiles where the shared memory has room for two (C_in <= 16).
template <typename T, bool kTensorCores, int KSTEPS>
__host__ __device__ constexpr bool kRawStaging() {
  return kTensorCores && sizeof(T) == 2 && KSTEPS <= 2;
}

// KSTEPS: C_in / 8 rounded up, fixed at compile time (the tensor-core kernel's mma loops and
// the FFMA kernel's channel loops then have known trip counts).
template <typename T, bool kTensorCores, int KSTEPS>
__global__ void __launch_bounds__(kTensorCores ? kThreadsTc : kThreadsFfma,
                                  kTensorCores ? 1 : kBlocksPerSmFfma)
    parity_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                          const T* __restrict__ bias, const T* __restrict__ multiplier,
                          T* __restrict__ y, uint8_t* __restrict__ window_index, BlockShape s,
                          ForwardGeometry geo) {
  extern __shared__ float4 smem4[];
  constexpr int kBuffers = x_buffers<kTensorCores>();
  constexpr int cip = 8 * KSTEPS;
  float* ws = reinterpret_cast<float*>(smem4);
  float* xs_base = ws + kTaps * cip * kCoTile;  // kBuffers x buffers of cip * kXStride floats
  const int xs_size = cip * kXStride;
  float* bias_s = xs_base + kBuffers * xs_size;
  float* slopes_s = bias_s + kCoTile;  // [c_pos x 32][c_neg x 32]
  // Half types: raw x tiles, one per x buffer (see issue_x_tile), 16-byte aligned; null
  // where the raw copies do not apply (the values are then converted inline).
  constexpr int raw_size = kRawStaging<T, kTensorCores, KSTEPS>() ? raw_x_tile_values(cip) : 0;
  uint16_t* raw_base = raw_size && raw_x_copies(x, s)
                           ? reinterpret_cast<uint16_t*>(slopes_s + 2 * kCoTile)
                           : nullptr;
  const int co0 = blockIdx.y * kCoTile;
  if ((int)blockIdx.x >= geo.tiles) return;

  // Prefetch the first x tile, then stage the weight slice while it flies.
  int tile = blockIdx.x;
  issue_x_tile<T>(xs_base, x, s, decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles),
                  cip, kXStride, raw_base);
  cp_async_commit();

  if constexpr (kTensorCores) {
    stage_weights_tf32<T, KSTEPS>(ws, w, s, co0);
  } else {
    // FFMA layout: [k][ci][col], 8 consecutive channels per 32-byte read. A warp fills the
    // 32 channels of its rows ci for every k, the k loop unrolled so that several weight loads
    // are in flight (one at a time, staging took a tenth of the kernel's samples).
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5, co = co0 + lane;
    for (int ci = threadIdx.x >> 5; ci < cip; ci += warps) {
      const bool valid = ci < s.in_channels && co < s.out_channels;
      const T* src = w + ((int64_t)ci * s.out_channels + co) * kTaps;
#pragma unroll 9
      for (int k = 0; k < kTaps; ++k)
        ws[(k * cip + ci) * kCoTile + lane] = valid ? to_acc(src[k]) : 0.f;
    }
  }
  stage_channel_constants(bias_s, slopes_s, bias, multiplier, s, co0);

  for (int it = 0; tile < geo.tiles; tile += gridDim.x, ++it) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    float* xs = xs_base + (it % kBuffers) * xs_size;
    if constexpr (kBuffers == 2) {  // fetch the next tile into the other buffer meanwhile
      prefetch_next_x_tile<T>(xs_base, xs_size, it, tile + gridDim.x, geo.tiles, geo.h_tiles,
                              geo.w_tiles, x, s, cip, raw_base, raw_size);
    } else {  // one buffer: this tile is fetched once the previous one is done with it
      if (it > 0) {
        issue_x_tile<T>(xs, x, s, c, cip);
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    if constexpr (kTensorCores) {
      settle_x_tile_tf32<T>(xs, cip, kXStride,
                            raw_base ? raw_base + (it % kBuffers) * raw_size : nullptr);
    }
    __syncthreads();  // tile `it` (and on the first pass the weights) visible to all warps
    if constexpr (kTensorCores) {
      tile_compute_tf32<T, KSTEPS>(xs, smem4, bias_s, slopes_s, y, window_index, s, c);
    } else {
      tile_compute_ffma(xs, ws, bias_s, slopes_s, reinterpret_cast<float*>(y), window_index, s,
                        c, geo.ci_padded);
    }
    __syncthreads();  // everyone is done with this buffer before it is refilled
  }
}

inline int ci_padded_of(const BlockShape& s) { return (s.in_channels + 7) / 8 * 8; }

// raw_staging: kRawStaging of the kernel (two raw x tiles of 16-bit values after the rest).
inline size_t forward_smem_bytes(const BlockShape& s, bool tensor_cores, bool raw_staging) {
  const int cip = ci_padded_of(s);
  const size_t buffers = tensor_cores ? x_buffers<true>() : x_buffers<false>();
  return sizeof(float) *
             ((size_t)kTaps * cip * kCoTile + buffers * cip * kXStride + 3 * kCoTile) +
         (raw_staging ? buffers * sizeof(uint16_t) * raw_x_tile_values(cip) : 0);
}

template <typename T, bool kTensorCores, int KSTEPS>
cudaError_t launch_typed(const BlockShape& s, const ForwardArgs& a, cudaStream_t stream) {
  int64_t tiles = 0;
  const ForwardGeometry geo = forward_geometry(s, ci_padded_of(s), &tiles);
  if (tiles == 0 || s.out_channels == 0) return cudaSuccess;
  const size_t smem =
      forward_smem_bytes(s, kTensorCores, kRawStaging<T, kTensorCores, KSTEPS>());
  const int threads = kTensorCores ? kThreadsTc : kThreadsFfma;
  auto kernel = parity_forward_kernel<T, kTensorCores, KSTEPS>;
  cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  int sms = 0, per_sm = 0;
  if ((e = current_sm_count(&sms)) != cudaSuccess) return e;
  if ((e = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem,
                                  &per_sm)) != cudaSuccess)
    return e;
  if (per_sm < 1) per_sm = 1;
  const int co_chunks = (s.out_channels + kCoTile - 1) / kCoTile;
  // A persistent grid of the resident blocks, spread over the channel chunks.
  int blocks = (sms * per_sm + co_chunks - 1) / co_chunks;
  if (blocks < 1) blocks = 1;
  if (blocks > geo.tiles) blocks = geo.tiles;
  kernel<<<dim3(blocks, co_chunks), threads, smem, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
      static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier), static_cast<T*>(a.y),
      a.window_index, s, geo);
  return cudaGetLastError();
}

// The kernel for C_in padded to 8, 16 or 24.
template <typename T, bool kTensorCores>
cudaError_t launch_by_channels(const BlockShape& s, const ForwardArgs& a, cudaStream_t stream) {
  switch (ci_padded_of(s) / 8) {
    case 1: return launch_typed<T, kTensorCores, 1>(s, a, stream);
    case 2: return launch_typed<T, kTensorCores, 2>(s, a, stream);
    case 3: return launch_typed<T, kTensorCores, 3>(s, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace parity

bool parity_forward_supported(const BlockShape& s, DType dtype, bool allow_tf32) {
  if (!s.is_parity_fast_path() || dtype == DType::Float64) return false;
  if (s.in_channels > 24) return false;  // the tensor-core kernel is built for C_in <= 24
  for (int a = 0; a < 3; ++a)
    if (s.pooled_size[a] != s.in_size[a]) return false;
  int64_t tiles = 0;
  parity::forward_geometry(s, parity::ci_padded_of(s), &tiles);
  if (tiles >= (1LL << 31) || s.out_channels > 65535 * parity::kCoTile) return false;
  const bool tensor_cores = dtype != DType::Float32 || allow_tf32;
  const bool raw_staging = dtype != DType::Float32 && parity::ci_padded_of(s) <= 16;
  return parity::forward_smem_bytes(s, tensor_cores, raw_staging) <= 227 * 1024;
}

cudaError_t launch_parity_forward(const BlockShape& s, DType dtype, bool allow_tf32,
                                  const ForwardArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return allow_tf32 ? parity::launch_by_channels<float, true>(s, a, stream)
                        : parity::launch_by_channels<float, false>(s, a, stream);
    case DType::Float16: return parity::launch_by_channels<__half, true>(s, a, stream);
    case DType::BFloat16: return parity::launch_by_channels<__nv_bfloat16, true>(s, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Explicit instantiations: every shipped kernel appears in `nvcc -Xptxas -v` of this file.
#define FUSED3D_INSTANTIATE_PARITY_FORWARD(T, TC, KSTEPS)                                  \
  template __global__ void parity::parity_forward_kernel<T, TC, KSTEPS>(                   \
      const T*, const T*, const T*, const T*, T*, uint8_t*, BlockShape,                    \
      parity::ForwardGeometry);
#define FUSED3D_INSTANTIATE_PARITY_FORWARD_ALL_CIN(T, TC) \
  FUSED3D_INSTANTIATE_PARITY_FORWARD(T, TC, 1)            \
  FUSED3D_INSTANTIATE_PARITY_FORWARD(T, TC, 2)            \
  FUSED3D_INSTANTIATE_PARITY_FORWARD(T, TC, 3)
FUSED3D_INSTANTIATE_PARITY_FORWARD_ALL_CIN(float, true)
FUSED3D_INSTANTIATE_PARITY_FORWARD_ALL_CIN(__half, true)
FUSED3D_INSTANTIATE_PARITY_FORWARD_ALL_CIN(__nv_bfloat16, true)
FUSED3D_INSTANTIATE_PARITY_FORWARD_ALL_CIN(float, false)

}  // namespace fused3d_cuda
