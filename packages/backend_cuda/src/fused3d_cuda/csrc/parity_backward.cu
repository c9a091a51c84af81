// Parity fast-path backward (not yet specialised: the general path serves every call).
#include "fused3d_kernels.cuh"

namespace fused3d_cuda {

bool parity_backward_supported(const BlockShape&, DType, bool) { return false; }
int64_t parity_backward_workspace_bytes(const BlockShape&, DType) { return 0; }
cudaError_t launch_parity_backward(const BlockShape&, DType, bool, const BackwardArgs&,
                                   cudaStream_t) {
  return cudaErrorNotSupported;
}

}  // namespace fused3d_cuda
