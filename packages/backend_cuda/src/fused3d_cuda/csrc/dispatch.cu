// Chooses the implementation for a call: the parity fast path where it applies, else the
// general gather path. No kernels here.
#include "fused3d_kernels.cuh"

namespace fused3d_cuda {

bool BlockShape::is_parity_fast_path() const {
  for (int a = 0; a < 3; ++a) {
    if (kernel[a] != 3 || stride[a] != 2 || padding[a] != 1) return false;
    // output_padding 1 <=> conv size 2n (pooled grid = input grid)
    if (conv_size[a] != 2 * in_size[a]) return false;
  }
  return true;
}

ForwardPath forward_path(const BlockShape& shape, DType dtype, bool allow_tf32) {
  if (!parity_forward_supported(shape, dtype, allow_tf32)) return ForwardPath::General;
  if (parity_wgmma_forward_supported(shape, dtype, allow_tf32)) return ForwardPath::ParityWgmma;
  return (dtype == DType::Float32 && !allow_tf32) ? ForwardPath::ParitySimt
                                                  : ForwardPath::ParityTensorCore;
}

cudaError_t launch_forward(const BlockShape& shape, DType dtype, bool allow_tf32,
                           const ForwardArgs& args, cudaStream_t stream) {
  switch (forward_path(shape, dtype, allow_tf32)) {
    case ForwardPath::General: return launch_general_forward(shape, dtype, args, stream);
    case ForwardPath::ParityWgmma: return launch_parity_wgmma_forward(shape, args, stream);
    default: return launch_parity_forward(shape, dtype, allow_tf32, args, stream);
  }
}

int64_t backward_workspace_bytes(const BlockShape& shape, DType dtype, bool allow_tf32) {
  if (parity_backward_supported(shape, dtype, allow_tf32))
    return parity_backward_workspace_bytes(shape, dtype);
  return general_backward_workspace_bytes(shape, dtype);
}

cudaError_t launch_backward(const BlockShape& shape, DType dtype, bool allow_tf32,
                            const BackwardArgs& args, cudaStream_t stream) {
  if (parity_backward_supported(shape, dtype, allow_tf32))
    return launch_parity_backward(shape, dtype, allow_tf32, args, stream);
  return launch_general_backward(shape, dtype, args, stream);
}

}  // namespace fused3d_cuda
