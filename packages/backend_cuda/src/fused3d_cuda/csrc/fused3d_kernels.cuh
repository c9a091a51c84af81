// Torch-free launchers of the fused3d CUDA kernels (raw pointers, sizes, a stream).
//
// Block: ConvTranspose3d -> LeakyReLU -> * multiplier -> LeakyReLU -> MaxPool3d(2).
// Every launcher checks its launches with cudaGetLastError and returns the first error.
// Tensors are contiguous NCDHW; the weight is (C_in, C_out, kD, kH, kW) as in PyTorch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define FUSED3D_HOST_DEVICE __host__ __device__
#else
#define FUSED3D_HOST_DEVICE
#endif

namespace fused3d_cuda {

// Scalar types the kernels are instantiated for.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

struct BlockShape {
  int64_t batch;
  int in_channels, out_channels;
  int in_size[3];          // D, H, W of x
  int kernel[3];
  int stride[3];
  int padding[3];
  int conv_size[3];        // conv-transpose output size per axis
  int pooled_size[3];      // floor(conv_size / 2)
  int multiplier_stride;   // 1 when the multiplier has one value per channel, 0 when one value
  double negative_slope;

  FUSED3D_HOST_DEVICE int64_t pooled_numel() const {
    return batch * out_channels * (int64_t)pooled_size[0] * pooled_size[1] * pooled_size[2];
  }
  FUSED3D_HOST_DEVICE int64_t input_numel() const {
    return batch * in_channels * (int64_t)in_size[0] * in_size[1] * in_size[2];
  }
  bool is_parity_fast_path() const;  // kernel 3, stride 2, padding 1, output_padding 1
};

struct ForwardArgs {
  const void* x;
  const void* weight;
  const void* bias;        // may be null
  const void* multiplier;
  void* y;                 // (N, C_out, Dp, Hp, Wp) in the input dtype
  uint8_t* window_index;   // same shape
};

struct BackwardArgs {
  const void* grad_y;
  const void* y;           // the forward's pooled output; null: not available (recompute)
  const uint8_t* window_index;
  const void* x;
  const void* weight;
  const void* bias;        // may be null
  const void* multiplier;
  void* grad_x;            // null when not wanted
  void* grad_weight;       // null when not wanted
  void* grad_bias_channels;        // (C_out,) in the accumulation type; null when not wanted
  void* grad_multiplier_channels;  // (C_out,) in the accumulation type; null when not wanted
  void* workspace;         // backward_workspace_bytes() bytes
};

// Which forward implementation a call gets (for reporting and tests).
enum class ForwardPath : int {
  General = 0,
  ParityTensorCore = 1,  // mma.sync
  ParitySimt = 2,        // IEEE fp32 FFMA
  ParityWgmma = 3,       // Hopper warpgroup MMA (sm_90a builds, fp32 with TF32)
};

ForwardPath forward_path(const BlockShape& shape, DType dtype, bool allow_tf32);

cudaError_t launch_forward(const BlockShape& shape, DType dtype, bool allow_tf32,
                           const ForwardArgs& args, cudaStream_t stream);

// Bytes of device scratch the backward needs (pooled-size temporaries and per-block partials).
int64_t backward_workspace_bytes(const BlockShape& shape, DType dtype, bool allow_tf32);

cudaError_t launch_backward(const BlockShape& shape, DType dtype, bool allow_tf32,
                            const BackwardArgs& args, cudaStream_t stream);

// ---- pieces used by the dispatch above (defined in general.cu / parity_*.cu)
cudaError_t launch_general_forward(const BlockShape& shape, DType dtype, const ForwardArgs& args,
                                   cudaStream_t stream);
int64_t general_backward_workspace_bytes(const BlockShape& shape, DType dtype);
cudaError_t launch_general_backward(const BlockShape& shape, DType dtype,
                                    const BackwardArgs& args, cudaStream_t stream);

bool parity_forward_supported(const BlockShape& shape, DType dtype, bool allow_tf32);
cudaError_t launch_parity_forward(const BlockShape& shape, DType dtype, bool allow_tf32,
                                  const ForwardArgs& args, cudaStream_t stream);

// Built only for sm_90a (the extension passes FUSED3D_WGMMA there); false elsewhere.
bool parity_wgmma_forward_supported(const BlockShape& shape, DType dtype, bool allow_tf32);
cudaError_t launch_parity_wgmma_forward(const BlockShape& shape, const ForwardArgs& args,
                                        cudaStream_t stream);

bool parity_backward_supported(const BlockShape& shape, DType dtype, bool allow_tf32);
int64_t parity_backward_workspace_bytes(const BlockShape& shape, DType dtype);
cudaError_t launch_parity_backward(const BlockShape& shape, DType dtype, bool allow_tf32,
                                   const BackwardArgs& args, cudaStream_t stream);

}  // namespace fused3d_cuda
