// Parity fast-path forward on Hopper's warpgroup MMA (wgmma, sm_90a): fp32 with TF32 allowed.
//
// Same job and tiling as parity_forward.cu's tensor-core kernel (ONE launch from x to pooled y
// and the uint8 window index, nothing conv-sized in memory; one image n, one depth d, 8 h-lines
// x 32 w pooled positions, 32 output channels per tile), but the convolution runs as
// asynchronous warpgroup MMAs that read both operands from shared memory: no warp spends
// instructions or registers on operand fragments, and while one warpgroup folds a class pair
// the others' MMAs can run. 0.094-0.096 ms against the mma.sync kernel's 0.107 on the
// benchmark problem (H100); what bounds it is in the backend's README.
//
// A warpgroup (4 warps) owns 2 h-lines. Per class pair (2p, 2p+1) it computes
// D[64 x 64] = bias + sum over the pair's input offsets o of A_o[64 x K] * B_o[K x 64], K = C_in:
//  * rows (A, the weights): row r is class 2p + ((r >> 3) & 1), channel (r & 7) + 8 (r >> 4), so
//    a thread's accumulators hold both classes of one channel (the pool folds them in order);
//  * columns (B, x): the 64 pooled positions of the 2 h-lines, x shifted by o.
// The offsets of a pair are those of class 2p + 1 (2, 4, 4 and 8: 18 steps for the 27 taps);
// class 2p's rows are zero at the offsets with an odd w, which only class 2p + 1 uses.
//
// Shared memory holds both operands in wgmma's canonical K-major layout without swizzle: "core
// matrices" of 8 rows x 16 bytes (4 TF32 values of K), contiguous. x is staged twice, shifted by
// 0 and by 1 in w, each line exactly 32 positions long: then the 64 positions of two h-lines
// are evenly spaced core matrices for every offset (one stride per descriptor), which a single
// copy with its 33-wide halo rows would not give.
#include "parity_common.cuh"

#if defined(FUSED3D_WGMMA) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "FUSED3D_WGMMA builds need the sm_90a target (-gencode=arch=compute_90a,code=sm_90a)"
#endif

namespace fused3d_cuda {
namespace parity {
namespace wgmma_forward {

constexpr int kThreads = 512;              // 4 warpgroups of 2 h-lines: the 8 lines of a tile
constexpr int kLines = kHaloD * kHaloH;    // 18 staged (d, h) lines
constexpr int kLineLen = kTileW;           // 32 positions per staged line
constexpr int kPlane = kLines * kLineLen;  // positions per 4-channel group and copy
constexpr int kRows = 64;                  // wgmma M: 2 classes x 32 channels
constexpr int kSteps = 18;                 // (class pair, input offset) steps

// The steps: class pairs in order, each over the input offsets of its odd class 2p + 1
// (subsets of 2p + 1's odd axes, ascending): {0, 1}, {0..3}, {0, 1, 4, 5}, {0..7}.
__host__ __device__ constexpr int step_pair(int step) {
  return step < 2 ? 0 : step < 6 ? 1 : step < 10 ? 2 : 3;
}
__host__ __device__ constexpr int pair_first_step(int pair) {
  return pair == 0 ? 0 : pair == 1 ? 2 : pair == 2 ? 6 : pair == 3 ? 10 : kSteps;
}
__host__ __device__ constexpr int step_offset(int step) {
  const int pair = step_pair(step), i = step - pair_first_step(pair);
  return pair == 2 ? (i & 1) | ((i & 2) << 1) : i;
}

// Dynamic shared memory: weights (A) [step][k-group][row][4], x (B) [copy][k-group][position][4],
// the raw x tile the copies land in ([ci][halo], as issue_x_tile writes it), bias and slopes.
template <int CIP>
__host__ __device__ constexpr size_t smem_floats() {
  return (size_t)kSteps * kRows * CIP + 2 * CIP * kPlane + CIP * kXStride + 3 * kCoTile;
}

// ------------------------------------------------------------------ wgmma primitives

// Shared-memory matrix descriptor, no swizzle: start address, the byte distance between core
// matrices adjacent in K (leading) and in M or N (stride), each in 16-byte units.
__device__ __forceinline__ uint64_t matrix_descriptor(uint32_t address, uint32_t leading,
                                                      uint32_t stride) {
  return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)(leading >> 4) << 16) |
         ((uint64_t)(stride >> 4) << 32);
}

// (Plain sm_90 compiles of this file, such as a compile check, get empty bodies: only sm_90a
// builds define FUSED3D_WGMMA and launch the kernel.)
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
__device__ __forceinline__ void fence_operands(float (&acc)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

// acc[64 x 64 fragment] += A(desc_a)[64 x 8] * B(desc_b)[8 x 64], TF32 inputs, fp32 sums.
__device__ __forceinline__ void wgmma_tf32_m64n64k8(float (&d)[32], uint64_t desc_a,
                                                    uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, accumulate, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),
        "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#else
  __trap();  // only sm_90a builds launch this kernel (FUSED3D_WGMMA)
#endif
}

__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ------------------------------------------------------------------ staging

// The weight slice of channels co0..co0+31 as the A operand of every step, TF32-rounded. A
// thread loads a batch of its values before it stores any, so that its global loads are in
// flight together (one at a time, the staging is a chain of load latencies per block).
template <int CIP>
__device__ __forceinline__ void stage_weights(float* __restrict__ ws, const float* __restrict__ w,
                                              const BlockShape& s, int co0) {
  constexpr int kPerStep = kRows * CIP, kTotal = kSteps * kPerStep, kBatch = 24;
#pragma unroll 1
  for (int first = threadIdx.x; first < kTotal; first += kBatch * kThreads) {
    float v[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int e = first + i * kThreads;
      const int step = e / kPerStep, rest = e - step * kPerStep;
      const int k_group = rest / (kRows * 4), row = (rest >> 2) % kRows;
      const int ci = 4 * k_group + (e & 3), cls = 2 * step_pair(step) + ((row >> 3) & 1);
      const int co = co0 + (row & 7) + 8 * (row >> 4), o = step_offset(step);
      const bool used = e < kTotal && !(o & ~cls) && ci < s.in_channels && co < s.out_channels;
      v[i] = used ? w[((int64_t)ci * s.out_channels + co) * 27 + class_tap(cls, o)] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i)
      if (first + i * kThreads < kTotal) ws[first + i * kThreads] = to_tf32(v[i]);
  }
}

// Raw tile [ci][halo] -> the two shifted copies [copy][k-group][line][w][4], TF32-rounded: a
// warp per (k-group, line) row, lanes along w (lane 0 also takes the row's 33rd value).
template <int CIP>
__device__ __forceinline__ void stage_x_copies(float* __restrict__ xt,
                                               const float* __restrict__ raw) {
  constexpr int kGroups = CIP / 4;
  const int lane = threadIdx.x & 31;
  float4* copies = reinterpret_cast<float4*>(xt);
  for (int row = threadIdx.x >> 5; row < kGroups * kLines; row += kThreads / 32) {
    const int k_group = row / kLines, line = row - k_group * kLines;
    const float* src = raw + 4 * k_group * kXStride + line * kHaloRow;
    float4* dst = copies + k_group * kPlane + line * kLineLen;
    for (int w = lane; w < kHaloW; w += 32) {
      const float4 v = make_float4(to_tf32(src[w]), to_tf32(src[w + kXStride]),
                                   to_tf32(src[w + 2 * kXStride]), to_tf32(src[w + 3 * kXStride]));
      if (w < kLineLen) dst[w] = v;                 // copy 0: x at w
      if (w > 0) dst[kGroups * kPlane + w - 1] = v;  // copy 1: x at w + 1, stored under w
    }
  }
}

// ------------------------------------------------------------------ one tile

// Issue the wgmma of class pair P into acc: per input offset and k-step, one m64n64k8.
// The MMAs of class pair P into acc: one m64n64k8 per input offset o of the pair and k-step,
// with the descriptors moved (at compile time) to the step's weight block and to x shifted by o:
// copy o & 1, lines moved by o's d and h parts.
template <int KSTEPS>
__host__ __device__ constexpr uint32_t a_offset(int step, int kk) {  // 16-byte units
  return (uint32_t)(step * kRows * 8 * KSTEPS + kk * 2 * kRows * 4) / 4;
}
template <int KSTEPS>
__host__ __device__ constexpr uint32_t b_offset(int step, int kk) {
  const int o = step_offset(step), line_shift = ((o >> 2) & 1) * kHaloH + ((o >> 1) & 1);
  return (uint32_t)(((o & 1) * 2 * KSTEPS + 2 * kk) * kPlane + line_shift * kLineLen);
}

template <int P, int KSTEPS>
__device__ __forceinline__ void issue_pair(float (&acc)[32], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int step = pair_first_step(P); step < pair_first_step(P + 1); ++step)
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
      wgmma_tf32_m64n64k8(acc, desc_a + a_offset<KSTEPS>(step, kk),
                          desc_b + b_offset<KSTEPS>(step, kk));
}

// The MMAs of class pair `pair` (a run-time value: each pair's MMAs are unrolled behind the
// switch, with compile-time descriptor offsets) for one line pair into acc.
template <int KSTEPS>
__device__ __forceinline__ void start_pair(float (&acc)[32], int pair, float bias,
                                           uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = bias;
  fence_operands(acc);
  wgmma_fence();
  switch (pair) {
    case 0: issue_pair<0, KSTEPS>(acc, desc_a, desc_b); break;
    case 1: issue_pair<1, KSTEPS>(acc, desc_a, desc_b); break;
    case 2: issue_pair<2, KSTEPS>(acc, desc_a, desc_b); break;
    default: issue_pair<3, KSTEPS>(acc, desc_a, desc_b); break;
  }
  wgmma_commit();
}

// Fold class pair `pair`'s values into the running pools of one line pair. acc[4j + 2h + e]:
// class 2 pair + h at the thread's position q = 2j + e (line q >> 3, w 8 (j & 3) + 2t + e);
// both classes of a position fold in class order.
__device__ __forceinline__ void fold_pair(float (&acc)[32], int pair, float c_pos, float c_neg,
                                          float (&best)[16], uint32_t (&windows)[4]) {
  fence_operands(acc);
  const uint32_t even = class_bytes(2 * pair), odd = class_bytes(2 * pair + 1);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int q = 2 * j + e;
      fold_into_pool<false>(acc[4 * j + e], c_pos, c_neg, even, q & 3, best[q], windows[q >> 2]);
      fold_into_pool<false>(acc[4 * j + 2 + e], c_pos, c_neg, odd, q & 3, best[q],
                            windows[q >> 2]);
    }
}

// One tile's pools for the thread's channel and 16 positions: per class pair, its MMAs, then
// the fold of its two classes, in one accumulator set. The other warpgroups' MMAs keep the
// tensor cores busy while this one folds (tried and slower: 256 threads, each warpgroup
// pipelining two line pairs through two accumulator sets, 0.110 against 0.094 ms; two sets
// do not fit 512 threads' 128 registers). The class-pair loop stays rolled: fully unrolled,
// ptxas hoisted every pair's MMAs to the front, wanting four accumulator sets, and serialised
// them. best starts at -inf, so class 0 takes its value by the usual rule (and the index stays
// 0 for -inf, as PyTorch leaves it).
template <int KSTEPS>
__device__ __forceinline__ void tile_pools(uint64_t desc_a, uint64_t desc_b, float bias,
                                           float c_pos, float c_neg, float (&best)[16],
                                           uint32_t (&windows)[4]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) best[i] = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i) windows[i] = 0;
#pragma unroll 1
  for (int pair = 0; pair < 4; ++pair) {
    float acc[32];
    start_pair<KSTEPS>(acc, pair, bias, desc_a, desc_b);
    wgmma_wait<0>();
    fold_pair(acc, pair, c_pos, c_neg, best, windows);
  }
}

// The thread's 16 pooled values: one channel, lines hl0 and hl0 + 1, w = 8 jj + 2t + {0, 1}.
// Pairs of neighbours in w leave as one 8-byte store of y and one 2-byte store of the index
// where W is even (and the pointers aligned), else one by one.
__device__ __forceinline__ void store_tile(float* y, uint8_t* window_index, const BlockShape& s,
                                           TileCoord c, int hl0, int co, int t,
                                           const float (&best)[16], const uint32_t (&windows)[4]) {
  const bool pairs = s.in_size[2] % 2 == 0 && (reinterpret_cast<uintptr_t>(y) & 7) == 0 &&
                     (reinterpret_cast<uintptr_t>(window_index) & 1) == 0;
#pragma unroll
  for (int line = 0; line < 2; ++line) {
    const PooledOutputs out = pooled_outputs(s, c, c.h0 + hl0 + line, co);
    if (out.channels <= 0) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int q = 8 * line + 2 * jj, w = c.w0 + 8 * jj + 2 * t;
      const uint32_t both = (windows[q >> 2] >> (8 * (q & 3))) & 0xffffu;
      if (pairs) {
        if (w < out.width) {
          *reinterpret_cast<float2*>(y + out.base + w) = make_float2(best[q], best[q + 1]);
          *reinterpret_cast<uint16_t*>(window_index + out.base + w) = (uint16_t)both;
        }
      } else {
        store_pooled(y, window_index, out, 0, w, best[q], both & 0xffu);
        store_pooled(y, window_index, out, 0, w + 1, best[q + 1], both >> 8);
      }
    }
  }
}

// KSTEPS: C_in / 8 rounded up (1 or 2; 24 channels do not fit the shared memory).
template <int KSTEPS>
__global__ void __launch_bounds__(kThreads, 1)
    parity_forward_wgmma_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                const float* __restrict__ bias,
                                const float* __restrict__ multiplier, float* __restrict__ y,
                                uint8_t* __restrict__ window_index, BlockShape s,
                                ForwardGeometry geo) {
  constexpr int CIP = 8 * KSTEPS;
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  float* xt = ws + kSteps * kRows * CIP;
  float* raw = xt + 2 * CIP * kPlane;
  float* bias_s = raw + CIP * kXStride;
  float* slopes_s = bias_s + kCoTile;  // [c_pos x 32][c_neg x 32]
  const int co0 = blockIdx.y * kCoTile;
  if ((int)blockIdx.x >= geo.tiles) return;

  int tile = blockIdx.x;
  issue_x_tile<float>(raw, x, s, decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles), CIP,
                      kXStride);
  cp_async_commit();
  stage_weights<CIP>(ws, w, s, co0);
  stage_channel_constants(bias_s, slopes_s, bias, multiplier, s, co0);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hl0 = 2 * (warp >> 2), channel = 8 * (warp & 3) + (lane >> 2), t = lane & 3;
  const uint64_t desc_a =
      matrix_descriptor((uint32_t)__cvta_generic_to_shared(ws), kRows * 16, 128);
  const uint64_t desc_b = matrix_descriptor(
      (uint32_t)__cvta_generic_to_shared(xt) + hl0 * kLineLen * 16, kPlane * 16, 128);

  for (; tile < geo.tiles; tile += gridDim.x) {
    const TileCoord c = decode_tile(tile, s.in_size[0], geo.h_tiles, geo.w_tiles);
    cp_async_wait<0>();
    __syncthreads();  // the raw tile (first pass: weights too) is in; nobody reads xt any more
    stage_x_copies<CIP>(xt, raw);
    fence_proxy_async();  // generic stores to xt / ws, then reads by the tensor cores
    __syncthreads();
    const int next = tile + gridDim.x;
    if (next < geo.tiles) {  // raw is free again: fetch the next tile during this one's math
      issue_x_tile<float>(raw, x, s, decode_tile(next, s.in_size[0], geo.h_tiles, geo.w_tiles),
                          CIP, kXStride);
      cp_async_commit();
    }
    float best[16];
    uint32_t windows[4];
    tile_pools<KSTEPS>(desc_a, desc_b, bias_s[channel], slopes_s[channel],
                       slopes_s[kCoTile + channel], best, windows);
    store_tile(y, window_index, s, c, hl0, co0 + channel, t, best, windows);
  }
}

template <int KSTEPS>
cudaError_t launch(const BlockShape& s, const ForwardArgs& a, cudaStream_t stream) {
  int64_t tiles = 0;
  const ForwardGeometry geo = forward_geometry(s, 8 * KSTEPS, &tiles);
  if (tiles == 0 || s.out_channels == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * smem_floats<8 * KSTEPS>();
  auto kernel = parity_forward_wgmma_kernel<KSTEPS>;
  cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  int sms = 0;
  if ((e = current_sm_count(&sms)) != cudaSuccess) return e;
  const int co_chunks = (s.out_channels + kCoTile - 1) / kCoTile;
  // A persistent grid, one block per SM, spread over the channel chunks.
  int blocks = (sms + co_chunks - 1) / co_chunks;
  if (blocks < 1) blocks = 1;
  if (blocks > geo.tiles) blocks = geo.tiles;
  kernel<<<dim3(blocks, co_chunks), kThreads, smem, stream>>>(
      static_cast<const float*>(a.x), static_cast<const float*>(a.weight),
      static_cast<const float*>(a.bias), static_cast<const float*>(a.multiplier),
      static_cast<float*>(a.y), a.window_index, s, geo);
  return cudaGetLastError();
}

}  // namespace wgmma_forward
}  // namespace parity

bool parity_wgmma_forward_supported(const BlockShape& s, DType dtype, bool allow_tf32) {
#if defined(FUSED3D_WGMMA)
  return dtype == DType::Float32 && allow_tf32 && s.in_channels <= 16 &&
         parity_forward_supported(s, dtype, allow_tf32);
#else
  (void)s, (void)dtype, (void)allow_tf32;
  return false;
#endif
}

cudaError_t launch_parity_wgmma_forward(const BlockShape& s, const ForwardArgs& a,
                                        cudaStream_t stream) {
  return s.in_channels <= 8 ? parity::wgmma_forward::launch<1>(s, a, stream)
                            : parity::wgmma_forward::launch<2>(s, a, stream);
}

template __global__ void parity::wgmma_forward::parity_forward_wgmma_kernel<1>(
    const float*, const float*, const float*, const float*, float*, uint8_t*, BlockShape,
    parity::ForwardGeometry);
template __global__ void parity::wgmma_forward::parity_forward_wgmma_kernel<2>(
    const float*, const float*, const float*, const float*, float*, uint8_t*, BlockShape,
    parity::ForwardGeometry);

}  // namespace fused3d_cuda
