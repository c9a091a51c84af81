// Shared pieces of the parity fast path (kernel 3, stride 2, padding 1, output_padding 1).
//
// Parity split, per axis: conv output 2m uses x[m]*w[1]; output 2m+1 uses x[m]*w[2] +
// x[m+1]*w[0]. A 2x2x2 pool window m holds one output of each of the 8 parity classes
// P = (pd, ph, pw), the class index equal to the window index pd*4 + ph*2 + pw, so pooled
// position m reads only x at {m, m+1}^3. Class P sums the taps whose input offset o (a
// subset of P's odd axes) and kernel index k(P, o) follow from the rule above: 27 taps in
// all, each kernel position used by exactly one class.
#pragma once

#include <type_traits>

#include "fused3d_common.cuh"

namespace fused3d_cuda {
namespace parity {

// Block tile of pooled positions: one image n, one depth d, kTileH rows of h, kTileW of w.
constexpr int kTileH = 8;
constexpr int kTileW = 32;
constexpr int kHaloD = 2, kHaloH = kTileH + 1, kHaloW = kTileW + 1;
constexpr int kHalo = kHaloD * kHaloH * kHaloW;  // 594 positions
// Channel stride of the x tile in shared memory: = 8 (mod 16) words, so the 4 channel rows a
// warp's mma fragment touches land in distinct bank octets (conflict-free loads).
constexpr int kXStride = ((kHalo + 7) / 8 % 2 == 1) ? (kHalo + 7) / 8 * 8 : (kHalo + 7) / 8 * 8 + 8;
constexpr int kCoTile = 32;  // output channels per block (blockIdx.y picks the chunk)

// Kernel index along one axis for parity p and input offset o (see the note above).
__host__ __device__ constexpr int tap_k(int p, int o) { return p ? (o ? 0 : 2) : 1; }

// Halo index of pooled row `row` (w within the tile) for warp/h-line hl and offset o.
__device__ __forceinline__ int halo_pos(int o, int hl, int row) {
  return (((o >> 2) & 1) * kHaloH + hl + ((o >> 1) & 1)) * kHaloW + row + (o & 1);
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

// Stage x[n, :, d..d+1, h0..h0+8, w0..w0+32] (zero outside the input) as [ci][halo] floats.
template <typename T, bool kRoundTf32>
__device__ __forceinline__ void load_x_tile(float* __restrict__ xs, const T* __restrict__ x,
                                            const BlockShape& s, TileCoord c, int ci_padded) {
  const int D = s.in_size[0], H = s.in_size[1], W = s.in_size[2];
  const int64_t spatial = (int64_t)D * H * W;
  const T* x_n = x + (int64_t)c.n * s.in_channels * spatial;
  const int total = ci_padded * kHalo;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int ci = e / kHalo;
    const int r = e - ci * kHalo;
    const int ww = r % kHaloW;
    const int hh = (r / kHaloW) % kHaloH;
    const int dd = r / (kHaloW * kHaloH);
    const int id = c.d + dd, ih = c.h0 + hh, iw = c.w0 + ww;
    float v = 0.f;
    if (ci < s.in_channels && id < D && ih < H && iw < W) {
      v = to_acc(x_n[ci * spatial + ((int64_t)id * H + ih) * W + iw]);
      if (kRoundTf32) v = to_tf32(v);
    }
    xs[ci * kXStride + r] = v;
  }
}

}  // namespace parity
}  // namespace fused3d_cuda
