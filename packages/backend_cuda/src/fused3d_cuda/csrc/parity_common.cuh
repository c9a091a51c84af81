// Shared pieces of the parity fast path (kernel 3, stride 2, padding 1, output_padding 1).
//
// Parity split, per axis: conv output 2m uses x[m]*w[1]; output 2m+1 uses x[m]*w[2] +
// x[m+1]*w[0]. A 2x2x2 pool window m holds one output of each of the 8 parity classes
// P = (pd, ph, pw), the class index equal to the window index pd*4 + ph*2 + pw, so pooled
// position m reads only x at {m, m+1}^3. Class P sums the taps whose input offset o (a
// subset of P's odd axes) and kernel index k(P, o) follow from the rule above: 27 taps in
// all, each kernel position used by exactly one class.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <tuple>
#include <utility>

#include "fused3d_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Host helpers: asked on every launch, so each is answered once per device.
inline cudaError_t cached_device_attribute(cudaDeviceAttr attribute, int* value) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair((int)attribute, device);
  auto found = cache.find(key);
  if (found != cache.end()) {
    *value = found->second;
    return cudaSuccess;
  }
  e = cudaDeviceGetAttribute(value, attribute, device);
  if (e == cudaSuccess) cache[key] = *value;
  return e;
}
inline cudaError_t current_sm_count(int* sms) {
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, sms);
}

// Raise a kernel's dynamic shared-memory limit (needed above 48 KB) once per kernel and device.
inline cudaError_t raise_smem_limit(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> raised;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = raised[{kernel, device}];
  if (current >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e == cudaSuccess) current = bytes;
  return e;
}

// Resident blocks per SM of a kernel at this block size and dynamic shared memory: the driver's
// occupancy answer, asked once per (kernel, threads, bytes, device) and then remembered (the
// query costs microseconds of host time on every forward call otherwise).
inline cudaError_t resident_blocks_per_sm(const void* kernel, int threads, size_t smem,
                                          int* per_sm) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, threads, smem, device);
  auto found = cache.find(key);
  if (found != cache.end()) {
    *per_sm = found->second;
    return cudaSuccess;
  }
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
  if (e == cudaSuccess) cache[key] = *per_sm;
  return e;
}

// Programmatic dependent launch (Hopper and later): a kernel launched with early_start may
// begin, and run the part of its prologue that reads only data written two or more kernels
// back (inputs, constants), while the kernel before it finishes. Every such kernel calls
// wait_for_previous_kernel() in every block before it touches that kernel's results (or writes
// anything the kernel reads), and then start_next_kernel(): the next early-started kernel is
// launched only once all of this kernel's blocks are past their wait, so kernel k's prologue
// never runs before kernel k - 2 has finished. Both are no-ops in a kernel launched normally.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void start_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the environment variable `name` is "0": the backend's switches for a kernel choice
// (FUSED3D_CUDA_WGMMA_BACKWARD, FUSED3D_CUDA_EARLY_START), read at every call.
inline bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// Whether kernels on this device may start early (compute capability 9.0 and later).
inline bool early_start_supported() {
  int major = 0;
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, &major) == cudaSuccess &&
         major >= 9;
}

// Launch kernel<<<grid, block, smem, stream>>>(args...), allowed to start before the previous
// kernel on the stream finishes when early_start is set (see wait_for_previous_kernel).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, bool early_start, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = early_start ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// Block tile of pooled positions: one image n, one depth d, kTileH rows of h, kTileW of w.
constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kHaloD = 2, kHaloH = kTileH + 1, kHaloW = kTileW + 1;
// Row stride of a halo tile in shared memory: kHaloW rounded up to 4, so each row starts
// 16-byte aligned and its first 32 values arrive as 8 16-byte copies (the pad is never read).
constexpr int kHaloRow = (kHaloW + 3) / 4 * 4;
constexpr int kHalo = kHaloD * kHaloH * kHaloRow;  // 648 floats per channel
// Channel stride of the x tile in shared memory: = 8 (mod 16) words, so the 4 channel rows a
// warp's mma fragment touches land in distinct bank octets (conflict-free loads).
constexpr int kXStride = ((kHalo + 7) / 8 % 2 == 1) ? (kHalo + 7) / 8 * 8 : (kHalo + 7) / 8 * 8 + 8;
constexpr int kCoTile = 32;  // output channels per block (blockIdx.y picks the chunk)

// Kernel index along one axis for parity p and input offset o (see the note above).
__host__ __device__ constexpr int tap_k(int p, int o) { return p ? (o ? 0 : 2) : 1; }
// Flat weight tap kd*9 + kh*3 + kw that class `cls` applies at input offset `o` (o <= cls).
__host__ __device__ constexpr int class_tap(int cls, int o) {
  return tap_k((cls >> 2) & 1, (o >> 2) & 1) * 9 + tap_k((cls >> 1) & 1, (o >> 1) & 1) * 3 +
         tap_k(cls & 1, o & 1);
}

// Halo index of pooled row `row` (w within the tile) for warp/h-line hl and offset o.
__device__ __forceinline__ int halo_pos(int o, int hl, int row) {
  return (((o >> 2) & 1) * kHaloH + hl + ((o >> 1) & 1)) * kHaloRow + row + (o & 1);
}

struct TileCoord {
  int n, d, h0, w0;
};

__device__ __forceinline__ TileCoord decode_tile(int tile, int D, int h_tiles, int w_tiles) {
  TileCoord c;
  const int wt = tile % w_tiles;
  tile /= w_tiles;
  const int ht = tile % h_tiles;
  tile /= h_tiles;
  c.d = tile % D;
  c.n = tile / D;
  c.h0 = ht * kTileH;
  c.w0 = wt * kTileW;
  return c;
}

__device__ __forceinline__ float to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
}

__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool valid) {
  const unsigned dst_addr = (unsigned)__cvta_generic_to_shared(dst);
  const int bytes = valid ? 4 : 0;  // 0 source bytes: the copy writes zero
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// 16-byte copy of `bytes` (0..16) source bytes; the rest of the 16 destination bytes is zeroed.
__device__ __forceinline__ void cp_async_16(float* dst, const float* src, int bytes) {
  const unsigned dst_addr = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(bytes));
}

// Walk a halo tile [channel][dd][hh][ww] (channels x kHaloD planes of kHaloH rows of kHaloW
// values, rows kHaloRow apart) one plane per warp at a time, lanes along w, rows by pointer
// steps, so the index arithmetic is paid per plane and not per element. fn(channel, dd, lane)
// walks the plane's rows itself.
template <typename PlaneFn>
__device__ __forceinline__ void for_each_halo_plane(int channels, PlaneFn fn) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int plane = threadIdx.x >> 5; plane < channels * kHaloD; plane += warps)
    fn(plane / kHaloD, plane % kHaloD, lane);
}

// fp32 x tile by 16-byte copies: each row's first 32 values as 8 chunks (the copy zero-fills
// a chunk's part past W, or all of it outside the input), then the 33rd value of every row on
// its own. Needs W % 4 == 0 and a 16-byte aligned x, so that every row starts aligned. Eight
// threads share a row, so each copy works out its row with one division, not three.
__device__ __forceinline__ void issue_x_tile_chunks(float* xs, const float* x, const BlockShape& s,
                                                    TileCoord c, int ci_padded, int stride) {
  static_assert(kHaloD == 2, "a halo row's depth offset is one comparison");
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const float* x_n = x + (int64_t)c.n * s.in_channels * spatial;
  constexpr int kChunks = kTileW / 4, kRows = kHaloD * kHaloH;
  const int rows = ci_padded * kRows;
  // Row `row` of the tile: channel ci, depth offset dd, h offset hh; src is null outside x.
  auto locate = [&](int row, int iw, int& dst_offset) -> const float* {
    const int ci = row / kRows, rest = row - ci * kRows;  // rest = dd * kHaloH + hh
    const int dd = rest >= kHaloH, hh = rest - dd * kHaloH;
    const int id = c.d + dd, ih = c.h0 + hh;
    dst_offset = ci * stride + rest * kHaloRow;
    const bool inside = ci < s.in_channels && id < D && ih < H && iw < W;
    return inside ? x_n + ci * spatial + ((int64_t)id * H + ih) * W + iw : nullptr;
  };
  const int chunk = threadIdx.x % kChunks, iw = c.w0 + chunk * 4;
#pragma unroll 1  // with C_in known at compile time, unrolling holds several copies' registers
  for (int row = threadIdx.x / kChunks; row < rows; row += blockDim.x / kChunks) {
    int dst_offset;
    const float* src = locate(row, iw, dst_offset);
    const int values = src ? min(4, W - iw) : 0;
    cp_async_16(xs + dst_offset + chunk * 4, src ? src : x, 4 * values);
  }
#pragma unroll 1
  for (int row = threadIdx.x; row < rows; row += blockDim.x) {
    int dst_offset;
    const float* src = locate(row, c.w0 + kTileW, dst_offset);
    cp_async_f32(xs + dst_offset + kTileW, src ? src : x, src != nullptr);
  }
}

// Half types (fp16, bf16): x rows staged as their raw 16-bit values by 16-byte copies into a
// raw tile ([ci][kHaloD * kHaloH rows][kRawRow] values), then widened to fp32 in shared memory
// (widen_raw_x_tile), so the copies overlap the previous tile's math as fp32's do. A raw row
// holds the 32 values of four 16-byte copies and the 33rd from a 4-byte copy that reads only
// its 2 source bytes. Needs W % 8 == 0 and a 16-byte aligned x: a kernel checks raw_x_copies
// once and passes its raw tiles to issue_x_tile and settle_x_tile_tf32 only where it holds.
constexpr int kRawRow = 40;
__host__ __device__ constexpr int raw_x_tile_values(int ci_padded) {
  return ci_padded * kHaloD * kHaloH * kRawRow;
}

template <typename T>
__device__ __forceinline__ bool raw_x_copies(const T* x, const BlockShape& s) {
  return sizeof(T) == 2 && s.in_size[2] % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
}

// 4-byte copy of `bytes` (0, 2 or 4) source bytes; the rest of the destination is zeroed.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, int bytes) {
  const unsigned dst_addr = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(bytes));
}

template <typename T>
__device__ __forceinline__ void issue_raw_x_tile(uint16_t* raw, const T* x, const BlockShape& s,
                                                 TileCoord c, int ci_padded) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const T* x_n = x + (int64_t)c.n * s.in_channels * spatial;
  constexpr int kChunks = kTileW / 8, kRows = kHaloD * kHaloH;
  const int rows = ci_padded * kRows;
  // Row `row` of the tile (channel ci, depth dd, height hh) at w = iw; null outside x.
  auto source = [&](int row, int iw) -> const T* {
    const int ci = row / kRows, rest = row - ci * kRows;
    const int dd = rest >= kHaloH, hh = rest - dd * kHaloH;
    const int id = c.d + dd, ih = c.h0 + hh;
    const bool inside = ci < s.in_channels && id < D && ih < H && iw < W;
    return inside ? x_n + ci * spatial + ((int64_t)id * H + ih) * W + iw : nullptr;
  };
  const int chunk = threadIdx.x % kChunks, iw = c.w0 + chunk * 8;
#pragma unroll 1
  for (int row = threadIdx.x / kChunks; row < rows; row += blockDim.x / kChunks) {
    const T* src = source(row, iw);  // W % 8 == 0: a chunk is all inside or all outside
    cp_async_16(reinterpret_cast<float*>(raw + row * kRawRow + chunk * 8),
                reinterpret_cast<const float*>(src ? src : x), src ? 16 : 0);
  }
#pragma unroll 1
  for (int row = threadIdx.x; row < rows; row += blockDim.x) {
    const T* src = source(row, c.w0 + kTileW);
    cp_async_4(raw + row * kRawRow + kTileW, src ? src : x, src ? 2 : 0);
  }
}

template <typename T>
__device__ __forceinline__ float widen(uint16_t bits) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __uint_as_float((uint32_t)bits << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// The raw tile as fp32 [ci][halo] with channel stride `stride` (values 0..32 of each row).
template <typename T>
__device__ __forceinline__ void widen_raw_x_tile(float* xs, const uint16_t* raw, int ci_padded,
                                                 int stride) {
  constexpr int kRows = kHaloD * kHaloH, kPieces = kTileW / 8 + 1;
  for (int e = threadIdx.x; e < ci_padded * kRows * kPieces; e += blockDim.x) {
    const int row = e / kPieces, piece = e - row * kPieces;
    const int ci = row / kRows, rest = row - ci * kRows;
    float* dst = xs + ci * stride + rest * kHaloRow + piece * 8;
    const uint16_t* src = raw + row * kRawRow + piece * 8;
    if (piece < kPieces - 1) {
      const uint4 v = *reinterpret_cast<const uint4*>(src);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
      float f[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f[2 * i] = widen<T>((uint16_t)(words[i] & 0xffffu));
        f[2 * i + 1] = widen<T>((uint16_t)(words[i] >> 16));
      }
      reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
      dst[0] = widen<T>(src[0]);
    }
  }
}

// Stage x[n, :, d..d+1, h0..h0+8, w0..w0+32] (zero outside the input) as [ci][halo] floats with
// channel stride `stride`: fp32 through cp.async (asynchronous; 16-byte copies where x's rows
// are aligned); half types into the raw tile `raw` where given (the caller checked
// raw_x_copies; asynchronous, settle_x_tile_tf32 widens them), otherwise converted inline.
template <typename T>
__device__ __forceinline__ void issue_x_tile(float* xs, const T* x, const BlockShape& s,
                                             TileCoord c, int ci_padded, int stride = kXStride,
                                             uint16_t* raw = nullptr) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  if constexpr (std::is_same<T, float>::value) {
    if (W % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
      issue_x_tile_chunks(xs, x, s, c, ci_padded, stride);
      return;
    }
  } else {
    if (raw != nullptr) {
      issue_raw_x_tile(raw, x, s, c, ci_padded);
      return;
    }
  }
  const int64_t spatial = (int64_t)D * H * W;
  const T* x_n = x + (int64_t)c.n * s.in_channels * spatial;
  for_each_halo_plane(ci_padded, [&](int ci, int dd, int lane) {
    const int id = c.d + dd;
    const bool plane_valid = ci < s.in_channels && id < D;
    int64_t offset = plane_valid ? ci * spatial + ((int64_t)id * H + c.h0) * W + c.w0 : 0;
    float* dst = xs + ci * stride + dd * kHaloH * kHaloRow;
#pragma unroll 3
    for (int hh = 0; hh < kHaloH; ++hh, offset += W, dst += kHaloRow) {
      const bool row_valid = plane_valid && c.h0 + hh < H;
#pragma unroll
      for (int ww = lane; ww < kHaloW; ww += 32) {
        const bool valid = row_valid && c.w0 + ww < W;
        const T* src = valid ? x_n + offset + ww : x;
        if constexpr (std::is_same<T, float>::value) {
          cp_async_f32(dst + ww, src, valid);
        } else {
          dst[ww] = valid ? to_acc(*src) : 0.f;
        }
      }
    }
  });
}

// fp32 bits rounded to the nearest TF32 (ties away from zero; inf and NaN kept).
__device__ __forceinline__ uint32_t round_tf32_bits(float v) {
  return __float_as_uint(to_tf32(v));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], float b0,
                                         float b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(__float_as_uint(b0)),
        "r"(__float_as_uint(b1)));
}


// Make a staged x tile ([ci_padded][stride] floats, stride a multiple of 4) visible to the
// whole block and ready for the mma loops: fp32 input rounded to TF32 in place, half types'
// raw tile (when `raw` was used, see issue_x_tile) widened into it. Call after cp_async_wait;
// the caller's next __syncthreads publishes the result (the first barrier here is because
// each thread reads values other threads copied).
template <typename T>
__device__ __forceinline__ void settle_x_tile_tf32(float* xs, int ci_padded, int stride,
                                                   const uint16_t* raw = nullptr) {
  if constexpr (std::is_same<T, float>::value) {
    __syncthreads();
    float4* v = reinterpret_cast<float4*>(xs);
    for (int e = threadIdx.x; e < ci_padded * stride / 4; e += blockDim.x) {
      const float4 a = v[e];
      v[e] = make_float4(to_tf32(a.x), to_tf32(a.y), to_tf32(a.z), to_tf32(a.w));
    }
  } else {
    if (raw != nullptr) {
      __syncthreads();
      widen_raw_x_tile<T>(xs, raw, ci_padded, stride);
    }
  }
}

// One step of a persistent loop over double-buffered x tiles: copy tile `next` (if there is
// one) into the other buffer (and raw tile, for half types, when raw_base is given), then wait
// for the copies of tile `it`, issued a step earlier.
template <typename T>
__device__ __forceinline__ void prefetch_next_x_tile(float* xs_base, int xs_size, int it, int next,
                                                     int tiles, int h_tiles, int w_tiles,
                                                     const T* x, const BlockShape& s, int cip,
                                                     uint16_t* raw_base = nullptr,
                                                     int raw_size = 0) {
  if (next < tiles) {
    const int buffer = (it + 1) & 1;
    issue_x_tile<T>(xs_base + buffer * xs_size, x, s,
                    decode_tile(next, s.in_size[0], h_tiles, w_tiles), cip, kXStride,
                    raw_base ? raw_base + buffer * raw_size : nullptr);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// The 27 taps in class order (offsets o ascending within a class), each packed as its x halo
// offset (low 16 bits) and its weight tap k (high bits): per tap the mma loop then reads one
// uniform constant instead of working o, k and the halo position out again.
struct TapTable {
  int first[9];     // taps of class c: first[c] .. first[c + 1] - 1
  int packed[27];
};

__host__ __device__ constexpr TapTable make_tap_table() {
  TapTable table{};
  int n = 0;
  for (int cls = 0; cls < 8; ++cls) {
    table.first[cls] = n;
    for (int o = 0; o < 8; ++o) {
      if (o & ~cls) continue;  // offset o needs an odd parity on each axis it shifts
      const int halo_offset = (((o >> 2) & 1) * kHaloH + ((o >> 1) & 1)) * kHaloRow + (o & 1);
      table.packed[n++] = halo_offset | (class_tap(cls, o) << 16);
    }
  }
  table.first[8] = n;
  return table;
}

static __constant__ TapTable kTapTable = make_tap_table();

// The mma operands of one tap: A fragments (x) of KSTEPS k-steps for MT row tiles, B fragments
// (weights) for the 4 channel n-tiles of each k-step.
template <int MT, int KSTEPS>
struct TapFragments {
  uint32_t a[KSTEPS][MT][4];
  float4 b[KSTEPS][2];
};

// xa: this lane's x address at offset 0 (row t of the k-step, its pooled row g); wb: this
// lane's first weight fragment.
template <int MT, int KSTEPS>
__device__ __forceinline__ void load_tap(TapFragments<MT, KSTEPS>& f, int tap,
                                         const float* __restrict__ xa,
                                         const float4* __restrict__ wb) {
  const int packed = kTapTable.packed[tap];
  xa += packed & 0xffff;
  wb += (packed >> 16) * (KSTEPS * 64);
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float* p = xa + kk * 8 * kXStride + mt * 16;
      f.a[kk][mt][0] = __float_as_uint(p[0]);
      f.a[kk][mt][1] = __float_as_uint(p[8]);
      f.a[kk][mt][2] = __float_as_uint(p[4 * kXStride]);
      f.a[kk][mt][3] = __float_as_uint(p[4 * kXStride + 8]);
    }
    f.b[kk][0] = wb[kk * 64];
    f.b[kk][1] = wb[kk * 64 + 32];
  }
}

template <int MT, int KSTEPS>
__device__ __forceinline__ void mma_tap(float (&acc)[MT][4][4], const TapFragments<MT, KSTEPS>& f) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_tf32(acc[mt][0], f.a[kk][mt], f.b[kk][0].x, f.b[kk][0].y);
      mma_tf32(acc[mt][1], f.a[kk][mt], f.b[kk][0].z, f.b[kk][0].w);
      mma_tf32(acc[mt][2], f.a[kk][mt], f.b[kk][1].x, f.b[kk][1].y);
      mma_tf32(acc[mt][3], f.a[kk][mt], f.b[kk][1].z, f.b[kk][1].w);
    }
}

// Conv values of parity class `cls` for a warp's 16*MT pooled positions (w = row0 ...,
// h-line hl of the tile) x 32 channels, as mma C fragments: acc[mt][nt][r] is row
// row0 + mt*16 + g + 8*(r>>1), channel nt*8 + 2t + (r&1), started from init[channel] (the
// bias, or zero when init is null). x tile: [ci][halo] floats already rounded to TF32, C_in
// padded to 8 * KSTEPS; weights: B fragments (see stage_weights_tf32). kPrefetch loads the
// next tap's operands while the current tap's mma run (two fragment sets, no register
// copies): worth it where the registers allow (the forward with K = 16; with K = 24 two sets
// do not fit, with K = 8 the compiler spilled, and the winner kernel holds more state).
template <int MT, int KSTEPS, bool kPrefetch>
__device__ __forceinline__ void accumulate_class_tf32(float (&acc)[MT][4][4], int cls,
                                                      const float* __restrict__ xs,
                                                      const float4* __restrict__ ws4, int hl,
                                                      int row0, int lane,
                                                      const float* __restrict__ init) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float v = init ? init[nt * 8 + 2 * t + (r & 1)] : 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc[mt][nt][r] = v;
    }
  const float* xa = xs + t * kXStride + halo_pos(0, hl, row0 + g);
  const float4* wb = ws4 + lane;
  const int first = kTapTable.first[cls], last = kTapTable.first[cls + 1];  // 1 tap, or even
  if constexpr (kPrefetch) {
    TapFragments<MT, KSTEPS> even, odd;
    load_tap(even, first, xa, wb);
#pragma unroll 1
    for (int tap = first; tap < last; tap += 2) {
      if (tap + 1 < last) load_tap(odd, tap + 1, xa, wb);
      mma_tap(acc, even);
      if (tap + 2 < last) load_tap(even, tap + 2, xa, wb);
      if (tap + 1 < last) mma_tap(acc, odd);
    }
  } else {
#pragma unroll 1
    for (int tap = first; tap < last; ++tap) {
      TapFragments<MT, KSTEPS> f;
      load_tap(f, tap, xa, wb);
      mma_tap(acc, f);
    }
  }
}

// Stage the weight slice of output channels co0..co0+31 for accumulate_class_tf32, in mma
// B-fragment order: float4 (k, kk, j, lane) = {B[t][n0+g], B[t+4][n0+g], B[t][n1+g],
// B[t+4][n1+g]} with n0 = 16j, n1 = 16j + 8 (B[ci][col] = w[ci, co0+col, k]), so one 16-byte
// load per lane feeds two mma. Each 256 threads fill one (k, kk) block of 256 floats at a time,
// so the index arithmetic has no division, and the k loop is unrolled to keep several weight
// loads in flight (one at a time, staging took a tenth of the forward). blockDim.x must be a
// multiple of 256.
template <typename T, int KSTEPS>
__device__ __forceinline__ void stage_weights_tf32(float* __restrict__ ws, const T* __restrict__ w,
                                                   const BlockShape& s, int co0) {
  constexpr int ksteps = KSTEPS;  // C_in padded to 8 * KSTEPS
  const int e = threadIdx.x & 255, half = threadIdx.x >> 8, halves = blockDim.x >> 8;
  const int q = e & 3, lane = (e >> 2) & 31, j = (e >> 7) & 1;
  const int co = co0 + (2 * j + (q >> 1)) * 8 + (lane >> 2);
  const int ci_in_step = (lane & 3) + ((q & 1) ? 4 : 0);
  for (int kk = half; kk < ksteps; kk += halves) {
    const int ci = kk * 8 + ci_in_step;
    const bool valid = ci < s.in_channels && co < s.out_channels;
    const T* src = w + ((int64_t)ci * s.out_channels + co) * 27;
#pragma unroll 9
    for (int k = 0; k < 27; ++k) {
      float v = valid ? to_acc(src[k]) : 0.f;
      if (std::is_same<T, float>::value) v = to_tf32(v);
      ws[(k * ksteps + kk) * 256 + e] = v;
    }
  }
}

// ------------------------------------------------------------------ forward pieces
// (shared by the mma.sync and wgmma forward kernels)

struct ForwardGeometry {
  int ci_padded;  // C_in rounded up to 8
  int tiles, h_tiles, w_tiles;
};

// The tile grid of a forward call (tiles: all of them, as a 64-bit count; the caller checks it
// fits an int, parity_forward_supported does).
inline ForwardGeometry forward_geometry(const BlockShape& s, int ci_padded, int64_t* tiles) {
  ForwardGeometry geo;
  geo.ci_padded = ci_padded;
  geo.h_tiles = (s.in_size[1] + kTileH - 1) / kTileH;
  geo.w_tiles = (s.in_size[2] + kTileW - 1) / kTileW;
  *tiles = s.batch * s.in_size[0] * (int64_t)geo.h_tiles * geo.w_tiles;
  geo.tiles = (int)*tiles;
  return geo;
}

// Running max-pool of one window, class by class, with PyTorch's rule. The conv value t
// arrives with its bias; leaky(m * leaky(t)) is linear on each side of t = 0, so it is
// t * (t > 0 ? c_pos : c_neg) with per-channel slopes precomputed from m and the negative
// slope (one rounding instead of three; NaN and infinities propagate the same way).
// Class 0 opens each window (kOpens): its value is the maximum so far and the index stays 0,
// whatever the value (-inf included, as PyTorch leaves index 0 then). Window indices travel
// packed, one byte per window (4 per word, byte `slot`); a take writes the class into its byte
// (cls_bytes holds the class in every byte, so the write is one bit-select).
template <bool kOpens>
__device__ __forceinline__ void fold_into_pool(float t, float c_pos, float c_neg,
                                               uint32_t cls_bytes, int slot, float& best,
                                               uint32_t& windows) {
  const float v = t * (t > 0.f ? c_pos : c_neg);
  if (kOpens) {
    best = v;
  } else if (pool_takes(best, v)) {
    best = v;
    const uint32_t byte = 0xffu << (8 * slot);
    windows = (windows & ~byte) | (cls_bytes & byte);
  }
}

// The class in every byte of a word, for fold_into_pool.
__host__ __device__ constexpr uint32_t class_bytes(int cls) { return (uint32_t)cls * 0x01010101u; }

// The epilogue's slopes of one channel with multiplier m: leaky(m * leaky(t)) = t * c_pos for
// t > 0 (v = m t, kept when m > 0) and t * c_neg otherwise (v = m slope t, kept when m slope < 0).
__device__ __forceinline__ void channel_slopes(float m, float slope, float& c_pos, float& c_neg) {
  c_pos = m > 0.f ? m : slope * m;
  c_neg = (m * slope < 0.f) ? m * slope : slope * (m * slope);
}

// Per-channel constants of the block's 32 output channels co0..co0+31 in shared memory: the bias
// (0 without one or past C_out) and the slopes [c_pos x 32][c_neg x 32]. Threads 0..31.
template <typename T>
__device__ __forceinline__ void stage_channel_constants(float* bias_s, float* slopes_s,
                                                        const T* bias, const T* multiplier,
                                                        const BlockShape& s, int co0) {
  if (threadIdx.x < kCoTile) {
    const int co = co0 + threadIdx.x;
    const bool valid = co < s.out_channels;
    bias_s[threadIdx.x] = (valid && bias) ? to_acc(bias[co]) : 0.f;
    const float m = valid ? to_acc(multiplier[co * s.multiplier_stride]) : 0.f;
    channel_slopes(m, (float)s.negative_slope, slopes_s[threadIdx.x],
                   slopes_s[kCoTile + threadIdx.x]);
  }
}

// Where one thread's pooled outputs go, y[n, co, d, h, w] (and the window index, same
// offsets): its values differ by compile-time multiples of the channel stride plus w, so a
// store costs an add and its bounds checks, not the whole index product.
struct PooledOutputs {
  int64_t base;            // offset of (n, co_first, d, h, w = 0)
  int64_t channel_stride;  // D * H * W
  int width;               // W, or 0 when row h lies outside the input (nothing to store)
  int channels;            // output channels from co_first on
};

__device__ __forceinline__ PooledOutputs pooled_outputs(const BlockShape& s, TileCoord c, int h,
                                                        int co_first) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  PooledOutputs p;
  p.channel_stride = (int64_t)D * H * W;
  p.base = (((int64_t)c.n * s.out_channels + co_first) * D + c.d) * H * (int64_t)W +
           (int64_t)h * W;
  p.width = h < H ? W : 0;
  p.channels = s.out_channels - co_first;
  return p;
}

template <typename T>
__device__ __forceinline__ void store_pooled(T* y, uint8_t* window_index, const PooledOutputs& p,
                                             int channel, int w, float v, uint32_t window) {
  if (w < p.width && channel < p.channels) {
    const int64_t off = p.base + channel * p.channel_stride + w;
    y[off] = from_acc<T>(v);
    window_index[off] = (uint8_t)window;
  }
}

// ------------------------------------------------------------------ backward pieces

constexpr int kTaps = 27;
constexpr int kMaxCin = 16;   // backward: dx's one 16-wide n block of input channels, dW's m-tile
constexpr int kMaxCout = 32;  // one 32-channel slice
constexpr int kTilePositions = kTileH * kTileW;  // 256 pooled positions
// dz tile [co][position] of the dW kernels: = 4 (mod 32) words, so an mma fragment's 8 x 4
// lanes (channel g, position t) hit distinct banks.
constexpr int kDzStrideT = kTilePositions + 4;

// Packed dz: TF32 bits (the 13 low mantissa bits cleared, NaN included) | 1 << class. The
// tensor-core backward kernels read one word per element and keep or zero it for a class with
// one bit test (masked_class); TF32 ignores the 8 flag bits.
__device__ __forceinline__ float pack_dz(float dz, uint32_t cls) {
  return __uint_as_float((round_tf32_bits(dz) & ~0x1fffu) | (1u << cls));
}

// A packed dz element if its class is the one whose flag `class_bit` (1 << class) names, else
// zero: one bit test and one select.
__device__ __forceinline__ uint32_t masked_class(uint32_t packed, uint32_t class_bit) {
  uint32_t out;
  // Written as a predicate test and a select: left to itself the compiler builds a mask by two
  // shifts and ANDs it, one instruction more in the backward's innermost loops.
  asm("{\n\t.reg .pred keep;\n\t.reg .b32 flag;\n\t"
      "and.b32 flag, %1, %2;\n\tsetp.ne.u32 keep, flag, 0;\n\t"
      "selp.b32 %0, %1, 0, keep;\n\t}"
      : "=r"(out)
      : "r"(packed), "r"(class_bit));
  return out;
}

__device__ __forceinline__ int64_t pooled_offset(const BlockShape& s, TileCoord c, int co, int h,
                                                 int w) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  return (((int64_t)c.n * s.out_channels + co) * D + c.d) * H * (int64_t)W + (int64_t)h * W + w;
}

// The packed dz of tile c's 256 pooled positions for channels 0..channels-1 into
// dzs[co][kDzStrideT] by cp.async (zeros outside the pooled grid and past C_out).
__device__ __forceinline__ void issue_dz_tile(float* dzs, const float* packed_dz,
                                              const BlockShape& s, TileCoord c, int channels) {
  const int H = s.in_size[1], W = s.in_size[2];
  if (W % 4 == 0) {  // 16-byte copies (packed_dz is our aligned workspace): chunks wholly in or out
    constexpr int kChunks = kTileW / 4;
    for (int e = threadIdx.x; e < channels * kTileH * kChunks; e += blockDim.x) {
      const int row = e / kChunks, chunk = e - row * kChunks;
      const int co = row / kTileH, hh = row - co * kTileH;
      const int h = c.h0 + hh, wpos = c.w0 + chunk * 4;
      const bool valid = co < s.out_channels && h < H && wpos < W;
      const float* src = valid ? packed_dz + pooled_offset(s, c, co, h, wpos) : packed_dz;
      cp_async_16(dzs + co * kDzStrideT + hh * kTileW + chunk * 4, src, valid ? 16 : 0);
    }
    return;
  }
  for (int e = threadIdx.x; e < channels * kTilePositions; e += blockDim.x) {
    const int co = e / kTilePositions, p = e % kTilePositions;
    const int h = c.h0 + p / kTileW, wpos = c.w0 + p % kTileW;
    const bool valid = co < s.out_channels && h < H && wpos < W;
    const float* src = valid ? packed_dz + pooled_offset(s, c, co, h, wpos) : packed_dz;
    cp_async_f32(dzs + co * kDzStrideT + p, src, valid);
  }
}

// parity_backward_wgmma.cu: the dweight partials on wgmma (sm_90a builds with FUSED3D_WGMMA).
// prepare_wgmma_grad_weight encodes x's tensor map once per backward call and returns false
// where that kernel does not apply (then nothing is launched and the mma.sync kernel runs).
struct alignas(64) TensorMapBytes {
  unsigned char bytes[128];
};
bool prepare_wgmma_grad_weight(TensorMapBytes* map, const BlockShape& s, const void* x);
// x: the whole batch (the chunk's images start at n_offset).
cudaError_t launch_wgmma_grad_weight(const TensorMapBytes& map, const float* x,
                                     const BlockShape& chunk, int n_offset, int tiles,
                                     int h_tiles, int w_tiles, int blocks,
                                     const float* packed_dz, float* weight_partials,
                                     int accumulate, bool early_start, cudaStream_t stream);

}  // namespace parity
}  // namespace fused3d_cuda
