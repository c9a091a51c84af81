// Device helpers shared by the fused3d kernels (torch-free).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fused3d_kernels.cuh"

namespace fused3d_cuda {

// Accumulation type: float64 stays exact, everything else accumulates in float32.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename A> __device__ __forceinline__ A leaky(A t, A slope) {
  return t > A(0) ? t : t * slope;
}
// d leaky / dt with PyTorch's choice at t == 0 (the negative side).
template <typename A> __device__ __forceinline__ A leaky_slope(A t, A slope) {
  return t > A(0) ? A(1) : slope;
}
template <typename A> __device__ __forceinline__ bool is_nan(A v) { return v != v; }

// Gradients at a window's winner from its conv value z (bias included), the channel's m and
// the incoming g. y = leaky(m * leaky(z)):  dy/dz = leaky'(m u) m leaky'(z),
// dy/dm = leaky'(m u) u with u = leaky(z).
template <typename A>
__device__ __forceinline__ void winner_gradients(A z, A m, A g, A slope, A& dz, A& dm_term) {
  const A u = leaky(z, slope);
  const A outer = leaky_slope(m * u, slope) * g;
  dz = outer * m * leaky_slope(z, slope);
  dm_term = outer * u;
}

// PyTorch's max_pool3d scan rule: take the candidate when `best < v or isnan(v)`, so the first
// maximum wins a tie and the last NaN wins.
template <typename A> __device__ __forceinline__ bool pool_takes(A best, A v) {
  return best < v || is_nan(v);
}

inline int ceil_div_int(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

inline int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = 65535LL * 32;  // grid-stride loops cover the rest
  return (int)(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace fused3d_cuda
