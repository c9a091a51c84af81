// General path (gather form): correct for every configuration the contract allows
// (any kernel, stride, padding, output_padding < stride, channel counts, odd sizes, batch 0).
// Not tuned: the parity fast path serves the common kernel-3 / stride-2 configuration.
//
// Forward: one thread per pooled output; it evaluates the 8 conv outputs of its window by
// gathering the inputs that reach each one, applies the epilogue and PyTorch's pool rule.
// Backward: (1) one thread per pooled output recomputes z at the winner and writes dz and the
// multiplier term to pooled-size scratch; (2) one block per channel reduces dbias / dmultiplier
// in a fixed order; (3) one thread per input element gathers dx (no atomics); (4) one block per
// weight element reduces dweight in a fixed order. Everything is deterministic.
#include "fused3d_common.cuh"

namespace fused3d_cuda {
namespace general_impl {

constexpr int kThreads = 256;

// Conv-transpose value (without bias) at conv output (od, oh, ow) of channel co, image n.
// Output o receives input i through kernel tap k when o = i*stride - padding + k.
template <typename T, typename A>
__device__ __forceinline__ A conv_transpose_at(const T* __restrict__ x, const T* __restrict__ w,
                               const BlockShape s, int64_t n, int co, int od, int oh, int ow) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int kD = s.kernel[0], kH = s.kernel[1], kW = s.kernel[2];
  const int64_t spatial = (int64_t)D * H * W;
  const int64_t kvol = (int64_t)kD * kH * kW;
  const int64_t w_ci_stride = (int64_t)s.out_channels * kvol;
  const T* x_n = x + n * s.in_channels * spatial;
  A acc = A(0);
  for (int kd = 0; kd < kD; ++kd) {
    const int td = od + s.padding[0] - kd;
    if (td < 0 || td % s.stride[0] != 0) continue;
    const int id = td / s.stride[0];
    if (id >= D) continue;
    for (int kh = 0; kh < kH; ++kh) {
      const int th = oh + s.padding[1] - kh;
      if (th < 0 || th % s.stride[1] != 0) continue;
      const int ih = th / s.stride[1];
      if (ih >= H) continue;
      for (int kw = 0; kw < kW; ++kw) {
        const int tw = ow + s.padding[2] - kw;
        if (tw < 0 || tw % s.stride[2] != 0) continue;
        const int iw = tw / s.stride[2];
        if (iw >= W) continue;
        const T* xp = x_n + ((int64_t)id * H + ih) * W + iw;
        const T* wp = w + co * kvol + ((int64_t)kd * kH + kh) * kW + kw;
        for (int ci = 0; ci < s.in_channels; ++ci) {
          acc += to_acc(xp[ci * spatial]) * to_acc(wp[ci * w_ci_stride]);
        }
      }
    }
  }
  return acc;
}

// Launch geometry of the per-element kernels: grid.x strides over the spatial positions of
// one (image, channel) row, grid.y over the rows. Both fit in 32 bits (the launcher checks),
// so no 64-bit division (a called subroutine, which costs spills) appears in the kernels.
#define FUSED3D_FOR_ROWS(row, rows)                                                    \
  for (int row = blockIdx.y; row < (rows); row += gridDim.y)
#define FUSED3D_FOR_SPATIAL(p, count)                                                  \
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < (count); p += gridDim.x * blockDim.x)

struct PooledCoord {
  int pd, ph, pw;
};

__device__ __forceinline__ PooledCoord decode_pooled(int p, const BlockShape s) {
  PooledCoord c;
  c.pw = p % s.pooled_size[2];
  p /= s.pooled_size[2];
  c.ph = p % s.pooled_size[1];
  c.pd = p / s.pooled_size[1];
  return c;
}

__device__ __forceinline__ int pooled_per_image(const BlockShape s) {
  return s.pooled_size[0] * s.pooled_size[1] * s.pooled_size[2];
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) general_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const T* __restrict__ multiplier, T* __restrict__ y, uint8_t* __restrict__ window_index,
    BlockShape s) {
  using A = typename AccOf<T>::type;
  const A slope = (A)s.negative_slope;
  const int per_image = pooled_per_image(s);
  FUSED3D_FOR_ROWS(row, (int)s.batch * s.out_channels) FUSED3D_FOR_SPATIAL(p, per_image) {
    const int n = row / s.out_channels, co = row % s.out_channels;
    const int64_t i = (int64_t)row * per_image + p;
    const PooledCoord c = decode_pooled(p, s);
    const A b = bias ? to_acc(bias[co]) : A(0);
    const A m = to_acc(multiplier[co * s.multiplier_stride]);
    A best = A(0);
    int best_index = 0;
    // Scan order d, h, w = window index order (dd*4 + dh*2 + dw).
    for (int win = 0; win < 8; ++win) {
      const int od = 2 * c.pd + ((win >> 2) & 1);
      const int oh = 2 * c.ph + ((win >> 1) & 1);
      const int ow = 2 * c.pw + (win & 1);
      const A z = b + conv_transpose_at<T, A>(x, w, s, n, co, od, oh, ow);
      const A v = leaky(m * leaky(z, slope), slope);
      if (win == 0 || pool_takes(best, v)) {
        best = v;
        best_index = win;
      }
    }
    y[i] = from_acc<T>(best);
    window_index[i] = (uint8_t)best_index;
  }
}

// dz and the multiplier term at each window's winner (pooled-size scratch, accumulation type).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) general_winner_grad_kernel(
    const T* __restrict__ grad_y, const uint8_t* __restrict__ window_index,
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
    const T* __restrict__ multiplier, typename AccOf<T>::type* __restrict__ grad_z,
    typename AccOf<T>::type* __restrict__ grad_m_terms, BlockShape s) {
  using A = typename AccOf<T>::type;
  const A slope = (A)s.negative_slope;
  const int per_image = pooled_per_image(s);
  FUSED3D_FOR_ROWS(row, (int)s.batch * s.out_channels) FUSED3D_FOR_SPATIAL(p, per_image) {
    const int n = row / s.out_channels, co = row % s.out_channels;
    const int64_t i = (int64_t)row * per_image + p;
    const PooledCoord c = decode_pooled(p, s);
    const int win = window_index[i];
    const int od = 2 * c.pd + ((win >> 2) & 1);
    const int oh = 2 * c.ph + ((win >> 1) & 1);
    const int ow = 2 * c.pw + (win & 1);
    const A b = bias ? to_acc(bias[co]) : A(0);
    const A m = to_acc(multiplier[co * s.multiplier_stride]);
    const A z = b + conv_transpose_at<T, A>(x, w, s, n, co, od, oh, ow);
    winner_gradients(z, m, A(to_acc(grad_y[i])), slope, grad_z[i], grad_m_terms[i]);
  }
}

template <typename A>
__device__ A block_sum(A value, A* scratch) {
  // Fixed-shape tree: the same inputs always give the same sum.
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if ((int)threadIdx.x < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
    __syncthreads();
  }
  const A total = scratch[0];
  __syncthreads();
  return total;
}

// One block per output channel: dbias = sum dz, dmultiplier = sum of the multiplier terms.
template <typename A>
__global__ void __launch_bounds__(kThreads, 1) general_channel_sum_kernel(
    const A* __restrict__ grad_z, const A* __restrict__ grad_m_terms, A* __restrict__ grad_bias,
    A* __restrict__ grad_multiplier, BlockShape s) {
  __shared__ A scratch[kThreads];
  const int co = blockIdx.x;
  const int per_image = pooled_per_image(s);
  A sum_z = A(0), sum_m = A(0);
  for (int n = 0; n < (int)s.batch; ++n) {
    const int64_t row = ((int64_t)n * s.out_channels + co) * per_image;
    for (int p = threadIdx.x; p < per_image; p += kThreads) {
      sum_z += grad_z[row + p];
      sum_m += grad_m_terms[row + p];
    }
  }
  sum_z = block_sum(sum_z, scratch);
  sum_m = block_sum(sum_m, scratch);
  if (threadIdx.x == 0) {
    if (grad_bias) grad_bias[co] = sum_z;
    if (grad_multiplier) grad_multiplier[co] = sum_m;
  }
}

// dx: one thread per input element gathers every winner it fed (the conv adjoint), no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) general_grad_x_kernel(
    const uint8_t* __restrict__ window_index, const typename AccOf<T>::type* __restrict__ grad_z,
    const T* __restrict__ w, T* __restrict__ grad_x, BlockShape s) {
  using A = typename AccOf<T>::type;
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int kD = s.kernel[0], kH = s.kernel[1], kW = s.kernel[2];
  const int Dp = s.pooled_size[0], Hp = s.pooled_size[1], Wp = s.pooled_size[2];
  const int64_t per_image = (int64_t)Dp * Hp * Wp;
  const int64_t kvol = (int64_t)kD * kH * kW;
  const int spatial = D * H * W;
  FUSED3D_FOR_ROWS(row, (int)s.batch * s.in_channels) FUSED3D_FOR_SPATIAL(q_in, spatial) {
    const int n = row / s.in_channels, ci = row % s.in_channels;
    const int64_t i = (int64_t)row * spatial + q_in;
    const int iw = q_in % W;
    const int ih = (q_in / W) % H;
    const int id = q_in / (W * H);
    A acc = A(0);
    for (int kd = 0; kd < kD; ++kd) {
      const int od = id * s.stride[0] - s.padding[0] + kd;
      if (od < 0 || od >= 2 * Dp) continue;  // outside every pool window: no gradient
      for (int kh = 0; kh < kH; ++kh) {
        const int oh = ih * s.stride[1] - s.padding[1] + kh;
        if (oh < 0 || oh >= 2 * Hp) continue;
        for (int kw = 0; kw < kW; ++kw) {
          const int ow = iw * s.stride[2] - s.padding[2] + kw;
          if (ow < 0 || ow >= 2 * Wp) continue;
          const int win = ((od & 1) << 2) | ((oh & 1) << 1) | (ow & 1);
          const int64_t p = ((int64_t)(od >> 1) * Hp + (oh >> 1)) * Wp + (ow >> 1);
          const T* wp = w + (int64_t)ci * s.out_channels * kvol + ((int64_t)kd * kH + kh) * kW + kw;
          for (int co = 0; co < s.out_channels; ++co) {
            const int64_t q = ((int64_t)n * s.out_channels + co) * per_image + p;
            if (window_index[q] == win) acc += grad_z[q] * to_acc(wp[co * kvol]);
          }
        }
      }
    }
    grad_x[i] = from_acc<T>(acc);
  }
}

// Sets *flag when x holds a NaN or an infinity (every writer writes 1: a benign race).
template <typename T>
__global__ void __launch_bounds__(kThreads) any_nonfinite_kernel(const T* __restrict__ x,
                                                                 int64_t count, int* flag) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count;
       i += (int64_t)gridDim.x * blockDim.x) {
    const auto v = to_acc(x[i]);
    if (v - v != v - v) *flag = 1;  // NaN for NaN and +-inf only
  }
}

// dweight: one block per weight element correlates x with the sparse dz, fixed-order sum.
// PyTorch's dense conv backward also multiplies every input by the zero gradient of the conv
// outputs that are not winners; that only matters (x * 0 = NaN) for a NaN or infinite x, so
// when the flag says x holds one, those products are added too.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) general_grad_weight_kernel(
    const uint8_t* __restrict__ window_index, const typename AccOf<T>::type* __restrict__ grad_z,
    const T* __restrict__ x, const int* __restrict__ x_nonfinite, T* __restrict__ grad_w,
    BlockShape s) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[kThreads];
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int kD = s.kernel[0], kH = s.kernel[1], kW = s.kernel[2];
  const int Hp = s.pooled_size[1], Wp = s.pooled_size[2];
  const int64_t per_image = (int64_t)s.pooled_size[0] * Hp * Wp;
  const int64_t spatial = (int64_t)D * H * W;
  int r = blockIdx.x;
  const int kw = r % kW; r /= kW;
  const int kh = r % kH; r /= kH;
  const int kd = r % kD; r /= kD;
  const int co = r % s.out_channels;
  const int ci = r / s.out_channels;
  A acc = A(0);
  for (int n = 0; n < (int)s.batch; ++n) {
    const int64_t row = ((int64_t)n * s.out_channels + co) * per_image;
    const T* x_plane = x + ((int64_t)n * s.in_channels + ci) * spatial;
    for (int p = threadIdx.x; p < (int)per_image; p += kThreads) {
      const int win = window_index[row + p];
      const int pw = p % Wp, ph = (p / Wp) % Hp, pd = p / (Wp * Hp);
      const int td = 2 * pd + ((win >> 2) & 1) + s.padding[0] - kd;
      const int th = 2 * ph + ((win >> 1) & 1) + s.padding[1] - kh;
      const int tw = 2 * pw + (win & 1) + s.padding[2] - kw;
      if (td < 0 || th < 0 || tw < 0) continue;
      if (td % s.stride[0] || th % s.stride[1] || tw % s.stride[2]) continue;
      const int id = td / s.stride[0], ih = th / s.stride[1], iw = tw / s.stride[2];
      if (id >= D || ih >= H || iw >= W) continue;
      acc += to_acc(x_plane[((int64_t)id * H + ih) * W + iw]) * grad_z[row + p];
    }
  }
  if (*x_nonfinite) {
    const int Dp = s.pooled_size[0];
    for (int n = 0; n < (int)s.batch; ++n) {
      const int64_t row = ((int64_t)n * s.out_channels + co) * per_image;
      const T* x_plane = x + ((int64_t)n * s.in_channels + ci) * spatial;
      for (int i = threadIdx.x; i < (int)spatial; i += kThreads) {
        const A v = to_acc(x_plane[i]);
        if (v - v == v - v) continue;  // finite: x * 0 adds nothing
        const int iw = i % W, ih = (i / W) % H, id = i / (W * H);
        const int od = id * s.stride[0] - s.padding[0] + kd;
        const int oh = ih * s.stride[1] - s.padding[1] + kh;
        const int ow = iw * s.stride[2] - s.padding[2] + kw;
        if (od < 0 || oh < 0 || ow < 0 || od >= s.conv_size[0] || oh >= s.conv_size[1] ||
            ow >= s.conv_size[2])
          continue;  // this tap reaches no conv output from here
        if (od < 2 * Dp && oh < 2 * Hp && ow < 2 * Wp) {
          const int64_t q = row + ((int64_t)(od >> 1) * Hp + (oh >> 1)) * Wp + (ow >> 1);
          const int cls = ((od & 1) << 2) | ((oh & 1) << 1) | (ow & 1);
          if (window_index[q] == cls) continue;  // the winner: counted above
        }
        acc += v * A(0);  // NaN, as PyTorch's dense product gives
      }
    }
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) grad_w[blockIdx.x] = from_acc<T>(acc);
}

inline dim3 grid_2d(int64_t rows, int64_t per_row) {
  const int64_t x_blocks = (per_row + kThreads - 1) / kThreads;
  return dim3((unsigned)(x_blocks < 1 ? 1 : (x_blocks > 65535 ? 65535 : x_blocks)),
              (unsigned)(rows > 65535 ? 65535 : rows));
}

template <typename T>
cudaError_t general_forward_typed(const BlockShape s, const ForwardArgs& a, cudaStream_t stream) {
  const int64_t total = s.pooled_numel();
  if (total == 0) return cudaSuccess;
  general_forward_kernel<T><<<grid_2d(s.batch * s.out_channels, total / (s.batch * s.out_channels)), kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
      static_cast<const T*>(a.bias), static_cast<const T*>(a.multiplier), static_cast<T*>(a.y),
      a.window_index, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t general_backward_typed(const BlockShape s, const BackwardArgs& a,
                                   cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t pooled = s.pooled_numel();
  A* grad_z = static_cast<A*>(a.workspace);
  A* grad_m_terms = grad_z + pooled;
  const T* w = static_cast<const T*>(a.weight);
  const T* x = static_cast<const T*>(a.x);
  if (pooled > 0) {
    general_winner_grad_kernel<T><<<grid_2d(s.batch * s.out_channels, pooled / (s.batch * s.out_channels)), kThreads, 0, stream>>>(
        static_cast<const T*>(a.grad_y), a.window_index, x, w, static_cast<const T*>(a.bias),
        static_cast<const T*>(a.multiplier), grad_z, grad_m_terms, s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if ((a.grad_bias_channels || a.grad_multiplier_channels) && s.out_channels > 0) {
    // With zero pooled elements the sums are zero: the kernel still writes them.
    general_channel_sum_kernel<A><<<s.out_channels, kThreads, 0, stream>>>(
        grad_z, grad_m_terms, static_cast<A*>(a.grad_bias_channels),
        static_cast<A*>(a.grad_multiplier_channels), s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (a.grad_x && s.input_numel() > 0) {
    general_grad_x_kernel<T><<<grid_2d(s.batch * s.in_channels, s.input_numel() / (s.batch * s.in_channels)), kThreads, 0, stream>>>(
        a.window_index, grad_z, w, static_cast<T*>(a.grad_x), s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int64_t weight_numel = (int64_t)s.in_channels * s.out_channels * s.kernel[0] *
                               s.kernel[1] * s.kernel[2];
  if (a.grad_weight && weight_numel > 0) {
    int* x_nonfinite = reinterpret_cast<int*>(grad_m_terms + pooled);
    if (cudaError_t e = cudaMemsetAsync(x_nonfinite, 0, sizeof(int), stream); e != cudaSuccess)
      return e;
    if (s.input_numel() > 0) {
      any_nonfinite_kernel<T><<<grid_for(s.input_numel(), kThreads), kThreads, 0, stream>>>(
          x, s.input_numel(), x_nonfinite);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    }
    general_grad_weight_kernel<T><<<(unsigned)weight_numel, kThreads, 0, stream>>>(
        a.window_index, grad_z, x, x_nonfinite, static_cast<T*>(a.grad_weight), s);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace general_impl

using namespace general_impl;

cudaError_t launch_general_forward(const BlockShape& s, DType dtype, const ForwardArgs& a,
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return general_forward_typed<float>(s, a, stream);
    case DType::Float64: return general_forward_typed<double>(s, a, stream);
    case DType::Float16: return general_forward_typed<__half>(s, a, stream);
    case DType::BFloat16: return general_forward_typed<__nv_bfloat16>(s, a, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t general_backward_workspace_bytes(const BlockShape& s, DType dtype) {
  const int64_t acc_bytes = dtype == DType::Float64 ? 8 : 4;
  return 2 * s.pooled_numel() * acc_bytes + 8;  // + the non-finite-x flag (aligned)
}

cudaError_t launch_general_backward(const BlockShape& s, DType dtype, const BackwardArgs& a,
                                    cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return general_backward_typed<float>(s, a, stream);
    case DType::Float64: return general_backward_typed<double>(s, a, stream);
    case DType::Float16: return general_backward_typed<__half>(s, a, stream);
    case DType::BFloat16: return general_backward_typed<__nv_bfloat16>(s, a, stream);
  }
  return cudaErrorInvalidValue;
}

// Explicit instantiations: every shipped kernel appears in `nvcc -Xptxas -v` of this file alone.
#define FUSED3D_INSTANTIATE_GENERAL(T)                                                      \
  template __global__ void general_impl::general_forward_kernel<T>(const T*, const T*, const T*, const T*, \
                                                     T*, uint8_t*, BlockShape);             \
  template __global__ void general_impl::general_winner_grad_kernel<T>(                                   \
      const T*, const uint8_t*, const T*, const T*, const T*, const T*,                     \
      AccOf<T>::type*, AccOf<T>::type*, BlockShape);                                        \
  template __global__ void general_impl::general_grad_x_kernel<T>(const uint8_t*, const AccOf<T>::type*,  \
                                                    const T*, T*, BlockShape);              \
  template __global__ void general_impl::general_grad_weight_kernel<T>(                                   \
      const uint8_t*, const AccOf<T>::type*, const T*, const int*, T*, BlockShape);              \
  template __global__ void general_impl::any_nonfinite_kernel<T>(const T*, int64_t, int*);
FUSED3D_INSTANTIATE_GENERAL(float)
FUSED3D_INSTANTIATE_GENERAL(double)
FUSED3D_INSTANTIATE_GENERAL(__half)
FUSED3D_INSTANTIATE_GENERAL(__nv_bfloat16)
template __global__ void general_impl::general_channel_sum_kernel<float>(const float*, const float*, float*,
                                                          float*, BlockShape);
template __global__ void general_impl::general_channel_sum_kernel<double>(const double*, const double*,
                                                           double*, double*, BlockShape);

}  // namespace fused3d_cuda
