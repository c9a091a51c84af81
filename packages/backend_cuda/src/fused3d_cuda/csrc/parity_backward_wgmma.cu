// Parity fast-path dweight on Hopper's warpgroup MMA (wgmma, sm_90a): fp32 with TF32 allowed.
//
// Same job as parity_backward.cu's dweight kernel (per-block partials of
// dW[k(P, o)][ci][co] = sum over pooled m of x[m + o][ci] dz_P[m][co], which the reduce kernel
// sums in a fixed order), with the GEMM turned so that the masked operand lives in registers.
// Per class pair p = (2p, 2p + 1) and h-line:
//   D_p[(class, co)][(o, ci)] += A_p[(class, co)][m] * B[m][(o, ci)],  K = m (pooled positions)
//  * A (registers, as wgmma allows): packed dz masked to the row's class: row r is class
//    2p + (r >> 5), channel r & 31, so warps 0-1 of a warpgroup hold the even class, 2-3 the odd;
//  * B (shared memory): x shifted by the input offsets o of the pair, K-major, in the 128-byte
//    swizzle that bulk tensor copies (TMA) write, so the copies land ready for the MMAs.
// x is held as 36 boxes of [16 ci][32 w] per tile, box (hh, od, ow) = x[n][ci][d + od][h0 + hh]
// [w0 + ow ..], stored in the order [hh][od][ow]. The 18 boxes at ow = 0 arrive by bulk tensor
// copies; those at ow = 1 are written by the threads that round x to TF32 (a copy cannot start
// at w0 + 1: its first element must be 16-byte aligned, or the copy faults), each row's 32nd
// value, x[w0 + 32], arriving by cp.async beside the dz tile. From box (hl, 0, 0) on, box r
// holds offset o = od*4 + oh*2 + ow of h-line hl (oh = r >> 2, od = (r >> 1) & 1, ow = r & 1),
// 16 rows (ci) each, so every class pair's offsets are one run of rows (one descriptor):
//   pair 0 {0, 1}: boxes 0-1 (N 32); pair 1 {0..3}: boxes 0-1 and 4-5 (two N 32);
//   pair 2 {0, 1, 4, 5}: boxes 0-3 (N 64); pair 3 (all 8): boxes 0-7 (N 128).
// Class 2p's rows at an odd-w offset (used by 2p + 1 only) are computed and dropped: 27 of 36
// (class, offset) blocks are kept. The accumulators (144 per thread) stay in registers over
// all of a block's tiles; the two warpgroups (4 h-lines of a tile each) add up in a fixed
// order at the end, so the partials are deterministic.
#include "parity_common.cuh"
#include "wgmma_common.cuh"

#if defined(FUSED3D_WGMMA) && defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "FUSED3D_WGMMA builds need the sm_90a target (-gencode=arch=compute_90a,code=sm_90a)"
#endif

#include <cstring>  // memcpy

namespace fused3d_cuda {
namespace parity {
namespace wgmma_grad_weight {

static_assert(sizeof(CUtensorMap) == sizeof(TensorMapBytes), "a tensor map is 128 bytes");

constexpr int kThreads = 256;                     // 2 warpgroups, 4 h-lines of a tile each
constexpr int kBoxBytes = kMaxCin * kTileW * 4;   // [16 ci][32 w]: 2 swizzle atoms of 1 KB
constexpr int kBoxes = kHaloH * kHaloD * 2;       // (hh, od, ow)
constexpr int kXBytes = kBoxes * kBoxBytes;       // 72 KB per tile
constexpr int kCopiedBoxes = kBoxes / 2;          // ow = 0: by bulk tensor copies
constexpr int kTailFloats = kCopiedBoxes * kMaxCin;  // x[w0 + 32] of every copied row
constexpr int kDzFloats = kMaxCout * kDzStrideT;  // dz tile [co][position]
constexpr int kAccumulators = 16 + 16 + 16 + 32 + 64;
// 1 KB of slack to align the boxes, two x buffers, two dz buffers, two row-tail buffers, two
// mbarriers.
constexpr size_t kSmemBytes =
    1024 + 2 * (size_t)kXBytes + 2 * sizeof(float) * (kDzFloats + kTailFloats) + 16;
static_assert(kAccumulators * 128 * sizeof(float) <= (size_t)kXBytes,
              "the second warpgroup's sums fit an x buffer");

__host__ __device__ constexpr int box_index(int hh, int od, int ow) {
  return (hh * 2 + od) * 2 + ow;
}
// Input offset of box r counted from (hl, 0, 0): r = (oh, od, ow) -> o = od*4 + oh*2 + ow.
__host__ __device__ constexpr int box_input_offset(int r) {
  return ((r >> 1) & 1) * 4 + ((r >> 2) & 1) * 2 + (r & 1);
}

// acc[64 x 32 fragment] += A[64 x 8] (registers) * B[8 x 32] (desc_b), TF32 in, fp32 sums.
__device__ __forceinline__ void wgmma_m64n32k8_a_regs(float (&d)[16], const uint32_t (&a)[4],
                                            uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, accumulate, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();  // only sm_90a builds launch the wgmma kernels (FUSED3D_WGMMA)
#endif
}

// acc[64 x 64 fragment] += A[64 x 8] (registers) * B[8 x 64] (desc_b), TF32 in, fp32 sums.
__device__ __forceinline__ void wgmma_m64n64k8_a_regs(float (&d)[32], const uint32_t (&a)[4],
                                            uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, accumulate, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();  // only sm_90a builds launch the wgmma kernels (FUSED3D_WGMMA)
#endif
}

// acc[64 x 128 fragment] += A[64 x 8] (registers) * B[8 x 128] (desc_b), TF32 in, fp32 sums.
__device__ __forceinline__ void wgmma_m64n128k8_a_regs(float (&d)[64], const uint32_t (&a)[4],
                                            uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, accumulate, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#else
  __trap();  // only sm_90a builds launch the wgmma kernels (FUSED3D_WGMMA)
#endif
}

// Start tile c's loads: the 18 x boxes at ow = 0 by warp 0's lanes (on bar); by every thread's
// cp.async (one commit group), the dz tile and the rows' tails x[n][ci][d + od][h0 + hh][w0 + 32]
// (tails[(hh * 2 + od) * 16 + ci], zero outside x).
__device__ __forceinline__ void issue_tile(uint8_t* x_boxes, uint64_t* bar, float* dzs,
                                           float* tails, const CUtensorMap* map,
                                           const float* x, const float* packed_dz,
                                           const BlockShape& s, TileCoord c, int n_offset) {
  if (threadIdx.x < 32) {
    if (threadIdx.x == 0) mbarrier_expect_bytes(bar, kCopiedBoxes * kBoxBytes);
    __syncwarp();
    for (int b = threadIdx.x; b < kCopiedBoxes; b += 32) {
      const int hh = b >> 1, od = b & 1;
      tma_load_5d(x_boxes + box_index(hh, od, 0) * kBoxBytes, map, c.w0, c.h0 + hh, c.d + od, 0,
                  n_offset + c.n, bar);
    }
  }
  issue_dz_tile(dzs, packed_dz, s, c, kMaxCout);
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  for (int e = threadIdx.x; e < kTailFloats; e += kThreads) {
    const int ci = e % kMaxCin, b = e / kMaxCin, hh = b >> 1, od = b & 1;
    const int d = c.d + od, h = c.h0 + hh, w = c.w0 + kTileW;
    const bool valid = ci < s.in_channels && d < D && h < H && w < W;
    const float* src =
        valid ? x + ((((int64_t)(n_offset + c.n) * s.in_channels + ci) * D + d) * H + h) * W + w
              : x;
    cp_async_f32(tails + e, src, valid);
  }
  cp_async_commit();
}

// x as the MMAs want it: the copied boxes rounded to TF32 in place (the tensor cores would
// truncate; the mma.sync kernels round their x tiles too), and the ow = 1 boxes written from
// them, shifted by one. Eight consecutive lanes take the eight 16-byte chunks of one row, so
// a chunk's next value comes from the next lane (the last chunk's from the row's tail). In
// the 128-byte swizzle, chunk k of row r sits at 16-byte slot k ^ (r & 7) of its 128-byte line,
// the same slot in both boxes.
__device__ __forceinline__ void stage_x_boxes(uint8_t* x_boxes, const float* tails) {
  constexpr int kChunks = kCopiedBoxes * kMaxCin * (kTileW / 4);  // 2304: 9 per thread
  static_assert(kChunks % kThreads == 0, "whole rounds of chunks");
#pragma unroll 3
  for (int item = threadIdx.x; item < kChunks; item += kThreads) {
    const int chunk = item & 7, row = item >> 3;  // row = copied box * 16 + ci
    const int box = row >> 4, ci = row & 15;
    const int offset = (ci >> 3) * 1024 + (ci & 7) * 128 + ((chunk ^ (ci & 7)) << 4);
    float4* unshifted =
        reinterpret_cast<float4*>(x_boxes + box_index(box >> 1, box & 1, 0) * kBoxBytes + offset);
    float4 v = *unshifted;
    v = make_float4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w));
    float next = __shfl_down_sync(0xffffffffu, v.x, 1);
    if (chunk == 7) next = to_tf32(tails[row]);
    *unshifted = v;
    *reinterpret_cast<float4*>(reinterpret_cast<uint8_t*>(unshifted) + kBoxBytes) =
        make_float4(v.y, v.z, v.w, next);  // box (hh, od, 1) follows (hh, od, 0)
  }
}

// Write (or add to, for later batch chunks) this block's partial dW slots [k][ci 16][co 32]
// from one pair's accumulators (the sum of both warpgroups'): acc[4j + 2h + e] is row
// 16 warp + g + 8h (channel co), column n = 8j + 2t + e = (box first_box + (n >> 4), ci n & 15).
// The slots to add to are all loaded first: interleaved with the stores, which the compiler
// cannot tell apart from them, each load waited for the previous store (3x this kernel's time
// for every batch chunk after the first).
template <int N>
__device__ __forceinline__ void write_pair(float* __restrict__ out, const float (&acc)[N],
                                           const float* __restrict__ other, int pair, int first_box,
                                           int accumulate) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2, t = lane & 3, cls = 2 * pair + (warp >> 1);
  auto slot_of = [&](int i, bool* used) {
    const int j = i >> 2, h = (i >> 1) & 1, e = i & 1;
    const int o = box_input_offset(first_box + (j >> 1));
    *used = (o & ~cls) == 0;  // class 2p at an odd-w offset: not a tap
    const int ci = 8 * (j & 1) + 2 * t + e, co = 16 * (warp & 1) + g + 8 * h;
    return (class_tap(cls, o) * kMaxCin + ci) * kMaxCout + co;
  };
  float earlier[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    bool used;
    const int slot = slot_of(i, &used);
    earlier[i] = (used && accumulate) ? out[slot] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    bool used;
    const int slot = slot_of(i, &used);
    const float v = acc[i] + other[i * 128];
    if (used) out[slot] = accumulate ? earlier[i] + v : v;  // batch chunks add in a fixed order
  }
}

// One h-line's packed dz for the thread's A fragments: raw[k-step][register], from the row of
// channel g at the line's position t (`row`); registers 1 and 3 are channel g + 8, 2 and 3 at
// position t + 4.
__device__ __forceinline__ void load_line(uint32_t (&raw)[4][4], const float* row) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    raw[kk][0] = __float_as_uint(row[8 * kk]);
    raw[kk][1] = __float_as_uint(row[8 * kDzStrideT + 8 * kk]);
    raw[kk][2] = __float_as_uint(row[8 * kk + 4]);
    raw[kk][3] = __float_as_uint(row[8 * kDzStrideT + 8 * kk + 4]);
  }
}

template <int N>
__device__ __forceinline__ void keep_sums(float* __restrict__ dst, const float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i * 128] = acc[i];
}

__global__ void __launch_bounds__(kThreads, 1)
    parity_grad_weight_wgmma_kernel(const float* __restrict__ x,
                                    const float* __restrict__ packed_dz,
                                    float* __restrict__ weight_partials, BlockShape s, int tiles,
                                    int h_tiles, int w_tiles, int n_offset, int accumulate,
                                    const __grid_constant__ CUtensorMap x_map) {
  extern __shared__ __align__(1024) uint8_t smem_bytes[];
  // (moved by an offset from the array, not by casts to integers, so that the compiler still
  // knows every pointer below for shared memory)
  uint8_t* base = smem_bytes + ((1024u - (smem_address(smem_bytes) & 1023u)) & 1023u);
  uint8_t* x_boxes = base;  // 2 buffers of kXBytes, 1 KB aligned (128-byte swizzle atoms)
  float* dz_tiles = reinterpret_cast<float*>(base + 2 * kXBytes);
  float* tails = dz_tiles + 2 * kDzFloats;
  uint64_t* x_ready = reinterpret_cast<uint64_t*>(tails + 2 * kTailFloats);
  const int D = s.in_size[0];
  if (threadIdx.x == 0) {
    mbarrier_init(&x_ready[0], 1);
    mbarrier_init(&x_ready[1], 1);
    fence_proxy_async();
  }
  __syncthreads();
  wait_for_previous_kernel();  // (early start: packed_dz is the kernel before's output)
  start_next_kernel();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp >> 2;            // warpgroup: h-lines 4 group .. 4 group + 3
  const int odd = (warp & 3) >> 1;        // rows of the pair's odd class
  const int co_row = 16 * (warp & 1) + (lane >> 2), t = lane & 3;
  uint32_t class_bit[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) class_bit[p] = 1u << (2 * p + odd);

  float acc0[16], acc1a[16], acc1b[16], acc2[32], acc3[64];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc0[i] = acc1a[i] = acc1b[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) acc2[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc3[i] = 0.f;

  int tile = blockIdx.x;
  if (tile < tiles)
    issue_tile(x_boxes, &x_ready[0], dz_tiles, tails, &x_map, x, packed_dz, s,
               decode_tile(tile, D, h_tiles, w_tiles), n_offset);
  for (int it = 0; tile < tiles; tile += gridDim.x, ++it) {
    const int buffer = it & 1, next = tile + gridDim.x;
    if (next < tiles) {
      // the other buffers' last readers finished at the previous tile's closing barrier
      issue_tile(x_boxes + (buffer ^ 1) * kXBytes, &x_ready[buffer ^ 1],
                 dz_tiles + (buffer ^ 1) * kDzFloats, tails + (buffer ^ 1) * kTailFloats, &x_map,
                 x, packed_dz, s, decode_tile(next, D, h_tiles, w_tiles), n_offset);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    mbarrier_wait(&x_ready[buffer], (it >> 1) & 1);
    __syncthreads();  // every thread's cp.async data (dz, row tails) is in
    uint8_t* boxes = x_boxes + buffer * kXBytes;
    stage_x_boxes(boxes, tails + buffer * kTailFloats);
    fence_proxy_async();  // the staged x, then reads by the tensor cores
    __syncthreads();

    const float* dzs = dz_tiles + buffer * kDzFloats;
    const uint32_t boxes_address = smem_address(boxes);
    fence_operands(acc0), fence_operands(acc1a), fence_operands(acc1b);
    fence_operands(acc2), fence_operands(acc3);
    // The A fragments are read by the MMAs after they issue, and the compiler does not know it:
    // a line's 16 fragments (64 registers) are built together, all live until the line's MMAs
    // have issued, and nothing writes them again before the wait that ends the line. Building
    // one k-step's fragments per MMA group without that wait gave wrong, run-to-run different
    // sums on the H100: the compiler reused a group's registers for the next group's fragments.
    // A fragments: a0 = (row g, k t), a1 = (g + 8, t), a2 = (g, t + 4), a3 = (g + 8, t + 4).
    const float* dz_rows = dzs + co_row * kDzStrideT + 4 * group * kTileW + t;
#pragma unroll 1
    for (int line = 0; line < 4; ++line) {
      const uint64_t desc = swizzle128_descriptor(
          boxes_address + box_index(4 * group + line, 0, 0) * kBoxBytes);
      uint32_t raw[4][4];  // [k-step][fragment register]
      load_line(raw, dz_rows + line * kTileW);
      uint32_t a[4][4][4];  // [k-step][pair][fragment register]
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q) a[kk][p][q] = masked_class(raw[kk][q], class_bit[p]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t step = desc + 2 * kk;  // 32 bytes of K per step, in 16-byte units
        wgmma_m64n32k8_a_regs(acc0, a[kk][0], step);
        wgmma_m64n32k8_a_regs(acc1a, a[kk][1], step);
        wgmma_m64n32k8_a_regs(acc1b, a[kk][1], step + 4 * kBoxBytes / 16);  // oh = 1: boxes 4-5
        wgmma_m64n64k8_a_regs(acc2, a[kk][2], step);
        wgmma_m64n128k8_a_regs(acc3, a[kk][3], step);
      }
      wgmma_commit();
      wgmma_wait<0>();
    }
    fence_operands(acc0), fence_operands(acc1a), fence_operands(acc1b);
    fence_operands(acc2), fence_operands(acc3);
    __syncthreads();  // this tile's buffers are free for the tile after next
  }

  // The second warpgroup's sums through shared memory (an x buffer: the loop ended with a
  // barrier), then the first adds them in a fixed order and writes the partials.
  float* other = reinterpret_cast<float*>(x_boxes) + (threadIdx.x & 127);
  if (group == 1) {
    keep_sums(other, acc0);
    keep_sums(other + 16 * 128, acc1a);
    keep_sums(other + 32 * 128, acc1b);
    keep_sums(other + 48 * 128, acc2);
    keep_sums(other + 80 * 128, acc3);
  }
  __syncthreads();
  if (group == 1) return;
  float* out = weight_partials + (int64_t)blockIdx.x * kTaps * kMaxCin * kMaxCout;
  write_pair(out, acc0, other, 0, 0, accumulate);
  write_pair(out, acc1a, other + 16 * 128, 1, 0, accumulate);
  write_pair(out, acc1b, other + 32 * 128, 1, 4, accumulate);
  write_pair(out, acc2, other + 48 * 128, 2, 0, accumulate);
  write_pair(out, acc3, other + 80 * 128, 3, 0, accumulate);
}

}  // namespace wgmma_grad_weight

bool prepare_wgmma_grad_weight(TensorMapBytes* map, const BlockShape& s, const void* x) {
#if defined(FUSED3D_WGMMA)
  if (switched_off("FUSED3D_CUDA_WGMMA_BACKWARD")) return false;
  if (s.in_channels > kMaxCin || s.out_channels > kMaxCout) return false;
  // box (32 w, 1, 1, 16 channels, 1), landing in the swizzle the MMAs read
  const cuuint32_t box[5] = {kTileW, 1, 1, kMaxCin, 1};
  return encode_x_tensor_map(reinterpret_cast<CUtensorMap*>(map), s, x, box,
                             CU_TENSOR_MAP_SWIZZLE_128B);
#else
  (void)map, (void)s, (void)x;
  return false;
#endif
}

cudaError_t launch_wgmma_grad_weight(const TensorMapBytes& map, const float* x,
                                     const BlockShape& chunk, int n_offset, int tiles,
                                     int h_tiles, int w_tiles, int blocks,
                                     const float* packed_dz, float* weight_partials,
                                     int accumulate, bool early_start, cudaStream_t stream) {
  using namespace wgmma_grad_weight;
  auto kernel = parity_grad_weight_wgmma_kernel;
  cudaError_t e = raise_smem_limit(reinterpret_cast<const void*>(kernel), kSmemBytes);
  if (e != cudaSuccess) return e;
  CUtensorMap x_map;
  std::memcpy(&x_map, &map, sizeof(x_map));
  return launch_kernel(kernel, blocks, kThreads, kSmemBytes, stream, early_start, x, packed_dz,
                       weight_partials, chunk, tiles, h_tiles, w_tiles, n_offset, accumulate,
                       x_map);
}

}  // namespace parity
}  // namespace fused3d_cuda
