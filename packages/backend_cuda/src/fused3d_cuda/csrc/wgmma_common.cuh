// Hopper (sm_90a) primitives shared by the wgmma kernels (parity_forward_wgmma.cu,
// parity_backward_wgmma.cu): shared-memory matrix descriptors, the wgmma fences, mbarriers for
// bulk tensor copies (TMA), and the driver's tensor-map encoder.
#pragma once

#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include "parity_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Shared-memory matrix descriptor, no swizzle: start address, the byte distance between core
// matrices adjacent in K (leading) and in M or N (stride), each in 16-byte units.
__device__ __forceinline__ uint64_t matrix_descriptor(uint32_t address, uint32_t leading,
                                                      uint32_t stride) {
  return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)(leading >> 4) << 16) |
         ((uint64_t)(stride >> 4) << 32);
}
// The same for a K-major operand in the 128-byte swizzle that TMA's CU_TENSOR_MAP_SWIZZLE_128B
// writes: rows of 128 bytes (32 TF32 values of K), 8-row atoms of 1 KB at `address` (atoms
// 1024-byte aligned; a start moved by 32 bytes within the rows selects the next k-step).
__device__ __forceinline__ uint64_t swizzle128_descriptor(uint32_t address) {
  return matrix_descriptor(address, 16, 1024) | (1ull << 62);
}

// (Plain sm_90 compiles, such as a compile check without -DFUSED3D_WGMMA, get empty bodies:
// only sm_90a builds define FUSED3D_WGMMA and launch the kernels.)
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Keeps the compiler from moving reads or writes of the accumulators across the fences above.
template <int N>
__device__ __forceinline__ void fence_operands(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// TMA completion: an mbarrier per buffer, waited on by phase.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
// (Their bodies, too, exist only in sm_90a compiles: the instructions need sm_90, and a build
// for an older GPU must still compile the files that hold the wgmma kernels.)
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count));
#endif
}
// Arrive on bar, announcing `bytes` of bulk copies that complete on it.
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t phase) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.b32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_address(bar)), "r"(phase) : "memory");
  } while (!done);
#else
  __trap();
#endif
}
// One bulk tensor copy of the box at (w, h, d, c, n) of a 5-D tensor map into dst; completes
// on bar.
__device__ __forceinline__ void tma_load_5d(void* dst, const CUtensorMap* map, int w, int h, int d,
                                            int c, int n, uint64_t* bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(w), "r"(h), "r"(d), "r"(c), "r"(n),
      "r"(smem_address(bar))
      : "memory");
#else
  __trap();
#endif
}
// The driver's tensor-map encoder, through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                           cudaEnableDefault, &status);
#else
    const cudaError_t e =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    if (e != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky; callers fall back to kernels without TMA
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}


// An fp32 tensor [N][C][D][H][W] at `base` as a 5-D tensor map: dims (W, H, D, C, N) and `box`
// in that order, out-of-range elements arriving as zeros. False where bulk copies cannot read
// it (row stride W * 4 not a multiple of 16, base not 16-byte aligned) or the driver lacks the
// call. (A copy must also start 16-byte aligned in w, or it faults: callers keep box starts
// at multiples of 4.)
inline bool encode_tensor_map_5d(CUtensorMap* map, const void* base, const int64_t (&dims)[5],
                                 const cuuint32_t (&box)[5], CUtensorMapSwizzle swizzle) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || dims[0] % 4 != 0 || (reinterpret_cast<uintptr_t>(base) & 15) != 0)
    return false;
  cuuint64_t sizes[5], strides[4];
  cuuint64_t stride = 4;
  for (int i = 0; i < 5; ++i) {
    sizes[i] = (cuuint64_t)dims[i];
    if (i > 0) strides[i - 1] = stride;
    stride *= sizes[i];
  }
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 5, const_cast<void*>(base), sizes, strides,
                const_cast<cuuint32_t*>(box), unit, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// x [N][C_in][D][H][W] (fp32) as a 5-D tensor map (encode_tensor_map_5d).
inline bool encode_x_tensor_map(CUtensorMap* map, const BlockShape& s, const void* x,
                                const cuuint32_t (&box)[5], CUtensorMapSwizzle swizzle) {
  const int64_t dims[5] = {s.in_size[2], s.in_size[1], s.in_size[0], s.in_channels, s.batch};
  return encode_tensor_map_5d(map, x, dims, box, swizzle);
}

}  // namespace parity
}  // namespace fused3d_cuda
