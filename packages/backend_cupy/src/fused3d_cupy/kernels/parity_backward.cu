// Backward kernels of the parity fast path with TF32 tensor cores (fp32, allow_tf32).
//
// Input: grad_z packed by parity_tf32<.., true> (forward file): for every pooled (n, co, q) one
// word = TF32(dz at the window's winner) with the winner's class c in the 3 low bits. The
// conv-sized gradient is zero except at winners, so per class c it is the masked matrix
// DZc[q][co] = (class == c) ? dz : 0, built in registers right before each MMA.
//
// With the parity split (common.cuh: pooled q reads x[q + a] through tap class_tap(c, a) for every
// class c that uses offset a):
//   dx[m][ci]            = sum_a sum_{c uses a} sum_co DZc[m - a][co] * w[ci][co][tap(c, a)]
//   dweight[ci][co][tap] = sum_q x[q + a][ci] * DZc[q][co]          (tap = tap(c, a))
// Both are implicit GEMMs over the same 27 (class, offset) blocks as the forward.
//
// IEEE fp32 (allow_tf32 off) takes the same three steps with plain fp32 FFMA instead: grad_z
// unpacked (its class read from the window index), parity_grad_x_ffma and
// parity_grad_weight_ffma below.
#include "common.cuh"

// Mask a packed grad_z word to class c: its TF32 value when the winner is c, else 0.
__device__ __forceinline__ unsigned int masked_class(unsigned int packed, int cls) {
    return (packed & 7u) == static_cast<unsigned int>(cls) ? (packed & ~7u) : 0u;
}

// Weight B fragments for dx, in the order the dx kernel reads them, one 8-byte pair per lane:
// fragment (tap, ks, nt) holds B[k = co][n = ci] = w[ci][co][tap] with co in [8 ks, 8 ks + 8),
// ci in [8 nt, 8 nt + 8): b0 = B[t][g], b1 = B[t + 4][g] (g = lane / 4, t = lane % 4).
extern "C" __global__ void __launch_bounds__(256) pack_weight_fragments(const float* __restrict__ weight,
                                                            unsigned int* __restrict__ fragments,
                                                            int Cin, int Cout, int ksteps,
                                                            int ntiles) {
    const int total = 27 * ksteps * ntiles * 32;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const int lane = i % 32, nt = (i / 32) % ntiles, ks = (i / (32 * ntiles)) % ksteps;
        const int tap = i / (32 * ntiles * ksteps);
        const int g = lane >> 2, t = lane & 3;
        const int ci = nt * 8 + g;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int co = ks * 8 + t + 4 * half;
            const float v = (ci < Cin && co < Cout) ? weight[((long long)ci * Cout + co) * 27 + tap]
                                                    : 0.0f;
            fragments[2 * i + half] = to_tf32(v);
        }
    }
}

// dx: block = 4 warps over a tile of 1 x 4 x 32 input positions; warp w takes row h0 + w (two
// m16 tiles along w) for all input channels (NT tiles of 8). The block stages the packed grad_z
// of pooled positions {tile - 1, tile}^3 for all output channels (dynamic shared memory,
// channel stride == 8 mod 32 so A-fragment loads are conflict-free); weight fragments come from
// the packed buffer through the read-only cache. Fixed summation order: deterministic.
namespace grad_x_tile {
constexpr int TD = 1, TH = 4, TW = 32;
constexpr int QD = TD + 1, QH = TH + 1, QW = TW + 1;
constexpr int QPOS = QD * QH * QW;
constexpr int CS = ((QPOS - 8 + 31) / 32) * 32 + 8;
}  // namespace grad_x_tile

template <int NT>
__global__ void __launch_bounds__(128) parity_grad_x_tf32(
    const unsigned int* __restrict__ grad_z_packed, const uint2* __restrict__ weight_fragments,
    float* __restrict__ grad_x, int N, int Cin, int Cout, int D, int H, int W, int ksteps,
    int tiles_d, int tiles_h, int tiles_w) {
    using namespace grad_x_tile;
    extern __shared__ unsigned int zs[];  // [ksteps * 8][CS]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;

    int rest = blockIdx.x;
    const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
    const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
    const int d0 = (rest % tiles_d) * TD;
    const int n = rest / tiles_d;
    const long long spatial = (long long)D * H * W;  // pooled grid == input grid

    // Stage grad_z at pooled (d0 - 1 + qd, h0 - 1 + qh, w0 - 1 + qw); outside the grid: 0.
    // cp.async copies the packed words as they are (already TF32 with the class bits), so
    // staging them asynchronously gives the same bits as loads would, with all copies in flight.
    const int channels = ksteps * 8;
    for (int i = threadIdx.x; i < channels * QPOS; i += 128) {
        const int co = i / QPOS, pos = i % QPOS;
        const int qw = pos % QW, qh = (pos / QW) % QH, qd = pos / (QW * QH);
        const int gd = d0 - 1 + qd, gh = h0 - 1 + qh, gw = w0 - 1 + qw;
        const bool valid = co < Cout && gd >= 0 && gh >= 0 && gw >= 0 && gd < D && gh < H && gw < W;
        const unsigned int* src =
            valid ? grad_z_packed + ((long long)n * Cout + co) * spatial + ((long long)gd * H + gh) * W +
                        gw
                  : grad_z_packed;
        stage_async<4>(zs + co * CS + pos, src, valid);
    }
    stage_wait();
    __syncthreads();

    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.0f;

    for (int ks = 0; ks < ksteps; ++ks) {
#pragma unroll
        for (int a = 0; a < 8; ++a) {
            const int ad = (a >> 2) & 1, ah = (a >> 1) & 1, aw = a & 1;
            // x[m] takes pooled q = m - a: local (1 - ad, warp + 1 - ah, w + 1 - aw).
            unsigned int raw[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int base = ((1 - ad) * QH + (warp + 1 - ah)) * QW + mt * 16 + g + 1 - aw;
                const unsigned int* lo = zs + (ks * 8 + t) * CS + base;
                const unsigned int* hi = lo + 4 * CS;
                raw[mt][0] = lo[0];
                raw[mt][1] = lo[8];
                raw[mt][2] = hi[0];
                raw[mt][3] = hi[8];
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                if (!class_uses_offset(c, a)) continue;
                uint2 b[NT];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    b[nt] = __ldg(weight_fragments + ((class_tap(c, a) * ksteps + ks) * NT + nt) * 32 +
                                  lane);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    const unsigned int a0 = masked_class(raw[mt][0], c);
                    const unsigned int a1 = masked_class(raw[mt][1], c);
                    const unsigned int a2 = masked_class(raw[mt][2], c);
                    const unsigned int a3 = masked_class(raw[mt][3], c);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
                        mma_tf32(acc[mt][nt], a0, a1, a2, a3, b[nt].x, b[nt].y);
                }
            }
        }
    }

    // C rows = positions (g, g + 8), columns = input channels (2t, 2t + 1).
    const int d = d0, h = h0 + warp;
    if (d >= D || h >= H) return;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int w = w0 + mt * 16 + g + (r >= 2 ? 8 : 0);
                const int ci = nt * 8 + 2 * t + (r & 1);
                if (w < W && ci < Cin)
                    grad_x[((long long)n * Cin + ci) * spatial + ((long long)d * H + h) * W + w] =
                        acc[mt][nt][r];
            }
}

// dweight: persistent blocks of 4 warps; warp w owns output channels [8 (4 blockIdx.y + w), +8)
// and keeps all 27 taps' 16 x 8 accumulators (input channels x its channels) in registers over
// every tile it visits. Per tile (1 x 4 x 32 pooled positions) the block stages x at
// {tile, tile + 1}^3 (TF32) and the packed grad_z of the tile; the GEMM's K runs over pooled
// positions, 8 at a time along w. Each block writes its partial sums; grad_weight_reduce adds
// the partials in block order, so dweight is deterministic.
namespace grad_w_tile {
constexpr int TD = 1, TH = 4, TW = 32;
constexpr int XD = TD + 1, XH = TH + 1, XW = TW + 1;
constexpr int XPOS = XD * XH * XW;
// Strides == 4 (mod 8): A loads (lanes: channel g, position t) and B loads (channel g,
// position t) hit distinct banks.
constexpr int XS = ((XPOS + 3) / 8) * 8 + 4;
constexpr int QPOS = TD * TH * TW;
constexpr int ZS = QPOS + 4;
// A block's partial, in accumulator order: slot (tap * 4 + r) * 128 + thread holds the
// thread's accumulator r of that tap, so a warp's stores (and the next chunk's loads) are
// 32 consecutive words. Weight order put 27 floats between lanes: one 32-byte sector per
// lane. 27 taps x 4 x 128 threads = 16 input x 32 output channels x 27 (one y chunk).
constexpr int kThreads = 128;
constexpr int kPartialSlots = 27 * 4 * kThreads;
}  // namespace grad_w_tile

extern "C" __global__ void __launch_bounds__(128, 2) parity_grad_weight_tf32(
    const float* __restrict__ x, const unsigned int* __restrict__ grad_z_packed,
    float* __restrict__ partial_weight, int N, int Cin, int Cout, int D, int H, int W, int tiles_d,
    int tiles_h, int tiles_w, int accumulate) {
    using namespace grad_w_tile;
    __shared__ unsigned int xs[16 * XS];
    __shared__ unsigned int zs[32 * ZS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int co_block = blockIdx.y * 32;

    float acc[8][8][4];
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int a = 0; a < 8; ++a)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[c][a][r] = 0.0f;

    const long long spatial = (long long)D * H * W;
    const int num_tiles = N * tiles_d * tiles_h * tiles_w;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        int rest = tile;
        const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
        const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
        const int d0 = (rest % tiles_d) * TD;
        const int n = rest / tiles_d;

        __syncthreads();
        const float* xn = x + (long long)n * Cin * spatial;
        for (int i = threadIdx.x; i < 16 * XPOS; i += 128) {
            const int ci = i / XPOS, pos = i % XPOS;
            const int lw = pos % XW, lh = (pos / XW) % XH, ld = pos / (XW * XH);
            const int gd = d0 + ld, gh = h0 + lh, gw = w0 + lw;
            const bool valid = ci < Cin && gd < D && gh < H && gw < W;
            const float* src =
                valid ? xn + (long long)ci * spatial + ((long long)gd * H + gh) * W + gw : xn;
            stage_async<4>(xs + ci * XS + pos, src, valid);  // raw fp32, rounded below
        }
        for (int i = threadIdx.x; i < 32 * QPOS; i += 128) {
            const int co_l = i / QPOS, pos = i % QPOS;
            const int lw = pos % TW, lh = (pos / TW) % TH, ld = pos / (TW * TH);
            const int gd = d0 + ld, gh = h0 + lh, gw = w0 + lw, co = co_block + co_l;
            // Outside: the word 0 (value 0 of class 0) contributes nothing.
            const bool valid = co < Cout && gd < D && gh < H && gw < W;
            const unsigned int* src =
                valid ? grad_z_packed + ((long long)n * Cout + co) * spatial +
                            ((long long)gd * H + gh) * W + gw
                      : grad_z_packed;
            // The packed words are already TF32 with the class bits: copied as they are.
            stage_async<4>(zs + co_l * ZS + pos, src, valid);
        }
        stage_wait();
        __syncthreads();
        // x to TF32, rounded to nearest in place (the tensor cores would truncate raw fp32):
        // every copy of the tile is in flight at once, and the operands keep the rounding.
        for (int i = threadIdx.x; i < 16 * XPOS; i += 128) {
            unsigned int* value = xs + (i / XPOS) * XS + i % XPOS;
            *value = to_tf32(__uint_as_float(*value));
        }
        __syncthreads();

#pragma unroll 1
        for (int row = 0; row < TD * TH; ++row) {
            const int ld = row / TH, lh = row % TH;
#pragma unroll 1
            for (int kq = 0; kq < TW / 8; ++kq) {
                const int q0 = kq * 8 + t;  // this lane's K positions q0 and q0 + 4 along w
                const unsigned int* zrow = zs + (warp * 8 + g) * ZS + row * TW + q0;
                const unsigned int z0 = zrow[0], z1 = zrow[4];
                unsigned int b[8][2];
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    b[c][0] = masked_class(z0, c);
                    b[c][1] = masked_class(z1, c);
                }
#pragma unroll
                for (int a = 0; a < 8; ++a) {
                    const int ad = (a >> 2) & 1, ah = (a >> 1) & 1, aw = a & 1;
                    const unsigned int* xrow =
                        xs + g * XS + ((ld + ad) * XH + (lh + ah)) * XW + q0 + aw;
                    const unsigned int a0 = xrow[0], a1 = xrow[8 * XS], a2 = xrow[4],
                                       a3 = xrow[8 * XS + 4];
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        if (!class_uses_offset(c, a)) continue;
                        mma_tf32(acc[c][a], a0, a1, a2, a3, b[c][0], b[c][1]);
                    }
                }
            }
        }
    }

    // Every slot is written, padding channels too (their sums are 0: x and grad_z were staged
    // as 0 there); grad_weight_reduce maps slots back to weights and skips the padding.
    float* partial = partial_weight +
                     ((long long)blockIdx.x * gridDim.y + blockIdx.y) * kPartialSlots +
                     threadIdx.x;
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int a = 0; a < 8; ++a) {
            if (!class_uses_offset(c, a)) continue;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float* out = partial + (class_tap(c, a) * 4 + r) * kThreads;
                // Batch-chunked backward: each launch adds one chunk to the same block's
                // partial, in chunk order (deterministic).
                *out = accumulate ? *out + acc[c][a][r] : acc[c][a][r];
            }
        }
}

// Backward step 1 from the saved pooled output y, instead of parity_tf32<.., true> recomputing
// the conv (the same algorithm as the cuda backend's dz-from-output kernel). With a negative
// slope s > 0 (the host checks), y = leaky(v) and v = m leaky(z) give sign(y) = sign(m) sign(z),
// hence both leaky slopes, and leaky'(v) leaky(z) = y / m. Where that is not trustworthy (y
// zero, subnormal, infinite or NaN; m zero, below 2^-100, above 2^100 or non-finite) the
// element recomputes z by direct summation in fp32. Grid (slices, Cout): block (b, co) walks
// slice b of channel co's pooled positions in every image and writes partial row b.
//
// T: the tensors' type (fp32, or fp16 / bf16 on the FFMA path; fp32 arithmetic). kPacked: the
// TF32 kernels' packed word (TF32 dz, class in the low 3 bits); else the plain fp32 dz bits (the
// FFMA path). y null: every element recomputes z (the FFMA path when y is not saved or the
// slope rules it out; the TF32 path runs parity_tf32<.., true> instead).
template <typename T, bool kPacked>
__global__ void __launch_bounds__(256) grad_z_from_output(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ multiplier, const T* __restrict__ grad_y,
    const T* __restrict__ y, const unsigned char* __restrict__ window_index,
    unsigned int* __restrict__ grad_z_packed, float* __restrict__ partial_bias,
    float* __restrict__ partial_multiplier, int N, int Cin, int Cout, int D, int H, int W,
    int multiplier_stride, int has_bias, double negative_slope) {
    __shared__ float warp_sums[8][2];
    const int co = blockIdx.y;
    const int spatial = D * H * W;  // < 2^31 (checked by the host)
    const int begin = (int)((long long)spatial * blockIdx.x / gridDim.x);
    const int end = (int)((long long)spatial * (blockIdx.x + 1) / gridDim.x);
    const float slope = (float)negative_slope;
    const float m = to_acc(multiplier[co * multiplier_stride]);
    const bool m_usable = fabsf(m) >= 0x1p-100f && fabsf(m) <= 0x1p100f;  // false for NaN
    float sum_bias = 0.0f, sum_multiplier = 0.0f;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * Cout + co) * spatial;
#pragma unroll 4
        for (int q = begin + (int)threadIdx.x; q < end; q += blockDim.x) {
            const long long e = base + q;
            const int win = window_index[e] & 7;
            const float gy = to_acc(grad_y[e]);
            const float yv = y ? to_acc(y[e]) : __int_as_float(0x7fc00000);  // NaN: recompute
            float dz, multiplier_term;
            if (m_usable && fabsf(yv) >= 1.17549435e-38f && fabsf(yv) <= 3.40282347e38f) {
                const bool v_positive = yv > 0.0f, z_positive = v_positive == (m > 0.0f);
                const float outer = v_positive ? gy : gy * slope;
                dz = outer * m * (z_positive ? 1.0f : slope);
                multiplier_term = gy * (yv / m);
            } else {
                const int pw = q % W, ph = (q / W) % H, pd = q / (W * H);
                float z = 0.0f;
                for (int a = 0; a < 8; ++a) {
                    if (!class_uses_offset(win, a)) continue;
                    const int id = pd + ((a >> 2) & 1), ih = ph + ((a >> 1) & 1), iw = pw + (a & 1);
                    if (id >= D || ih >= H || iw >= W) continue;  // past the input's far edge
                    const T* xq = x + (long long)n * Cin * spatial + ((long long)id * H + ih) * W + iw;
                    const int tap = class_tap(win, a);
                    for (int ci = 0; ci < Cin; ++ci)
                        z = fmaf(to_acc(xq[(long long)ci * spatial]),
                                 to_acc(weight[((long long)ci * Cout + co) * 27 + tap]), z);
                }
                if (has_bias) z += to_acc(bias[co]);
                const float u = leaky(z, slope);
                const float outer = gy * leaky_slope(m * u, slope);
                dz = outer * m * leaky_slope(z, slope);
                multiplier_term = outer * u;
            }
            sum_bias += dz;
            sum_multiplier += multiplier_term;
            grad_z_packed[e] = kPacked ? (to_tf32(dz) & ~7u) | static_cast<unsigned int>(win)
                                       : __float_as_uint(dz);
        }
    }
    // Fixed-order reduction: a shuffle tree per warp, then the 8 warps in order.
#pragma unroll
    for (int step = 16; step > 0; step >>= 1) {
        sum_bias += __shfl_down_sync(0xffffffffu, sum_bias, step);
        sum_multiplier += __shfl_down_sync(0xffffffffu, sum_multiplier, step);
    }
    if ((threadIdx.x & 31) == 0) {
        warp_sums[threadIdx.x >> 5][0] = sum_bias;
        warp_sums[threadIdx.x >> 5][1] = sum_multiplier;
    }
    __syncthreads();
    if (threadIdx.x < 2) {
        float total = 0.0f;
        for (int k = 0; k < 8; ++k) total += warp_sums[k][threadIdx.x];
        float* out = threadIdx.x == 0 ? partial_bias : partial_multiplier;
        out[(long long)blockIdx.x * Cout + co] = total;
    }
}

// ------------------------------------------------------------------ IEEE fp32 (FFMA)
//
// The algorithm of the cuda backend's IEEE-fp32 parity backward (parity_grad_x_simt_kernel,
// parity_grad_weight_simt_kernel), written again for this toolchain.

// dx weight rows, one per (offset o, class c that uses o), ordered by o and then by j = c's bits
// on the axes o leaves free (free_bit_index), so o's 2^(3 - |o|) rows are consecutive. A row is
// w[ci][co][class_tap(c, o)] as [co][ci padded to 4 CI4], rows `row_stride` floats apart, with
// row_stride == 4 (mod 32) (the host pads it): the up to 8 rows of one offset that a warp reads
// at one co start in 8 distinct 16-byte bank groups.
__host__ __device__ constexpr int free_bit_index(int cls, int o) {
    int j = 0, bit = 0;
    for (int axis = 0; axis < 3; ++axis)
        if (!((o >> axis) & 1)) j |= ((cls >> axis) & 1) << bit++;
    return j;
}
// The first row of offset o: each earlier offset o' owns 2^(3 - |o'|) rows.
__host__ __device__ constexpr int offset_first_row(int o) {
    int row = 0;
    for (int earlier = 0; earlier < o; ++earlier)
        row += 8 >> (((earlier >> 2) & 1) + ((earlier >> 1) & 1) + (earlier & 1));
    return row;
}

// The rows above, written once per backward call by pack_ffma_rows, so that every dx block
// stages them with coalesced 16-byte copies (gathering them from the weight is 27 x C_out x C_in
// strided loads per block).
template <typename T>
__global__ void __launch_bounds__(256) pack_ffma_rows(const T* __restrict__ weight,
                                                      float* __restrict__ rows, int Cin, int Cout,
                                                      int ci_padded, int row_stride) {
    const int row_floats = Cout * ci_padded;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < 27 * row_stride;
         e += gridDim.x * blockDim.x) {
        const int row = e / row_stride, rest = e - row * row_stride;
        const int co = rest / ci_padded, ci = rest - co * ci_padded;
        int o = 0;
        while (o < 7 && offset_first_row(o + 1) <= row) ++o;
        // The class from j: j's bits go back to the axes o leaves free; o's own axes are set.
        int j = row - offset_first_row(o), cls = o;
        for (int axis = 0; axis < 3; ++axis)
            if (!((o >> axis) & 1)) {
                cls |= (j & 1) << axis;
                j >>= 1;
            }
        rows[e] = rest < row_floats && ci < Cin
                      ? to_acc(weight[((long long)ci * Cout + co) * 27 + class_tap(cls, o)])
                      : 0.0f;
    }
}

// dx[i] = sum over o and co of grad_z[i - o, co] * w[:, co, class_tap(c, o)], c the class
// (window winner) of pooled (i - o, co), taken only where c uses o. Every pooled element has one
// class, so each (o, co) adds one weight row picked by c: 8 x C_out row reads per input
// position, not the 27 x C_out of a dense sum over classes. One thread per input position with
// all its input channels in registers; each dx element is written once by its thread (no
// atomics, fixed order: deterministic). Grid-stride over positions (the host caps the grid at
// the resident blocks). (Measured on the H100, benchmark chunk of 4 images: 111 us with the rows
// gathered from the weight by every block, 62 us with them packed once; two threads per
// position, each with half the channels, 75 us.)
template <typename T, int CI4>  // dx's type; input channels padded to 4, / 4
__global__ void __launch_bounds__(256) parity_grad_x_ffma(
    const float* __restrict__ grad_z, const unsigned char* __restrict__ window_index,
    const float* __restrict__ packed_rows, T* __restrict__ grad_x, int N, int Cin, int Cout,
    int D, int H, int W, int row_stride) {
    constexpr int CI = 4 * CI4;
    extern __shared__ float4 rows4[];
    float* rows = reinterpret_cast<float*>(rows4);  // [27][row_stride]
    for (int e = threadIdx.x; e < 27 * row_stride / 4; e += blockDim.x)
        stage_async<16>(rows4 + e, packed_rows + 4 * e, true);
    stage_wait();
    __syncthreads();
    const int spatial = D * H * W;  // pooled grid == input grid; < 2^31 (checked by the host)
    const long long positions = (long long)N * spatial;
    for (long long position = (long long)blockIdx.x * blockDim.x + threadIdx.x;
         position < positions; position += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(position / spatial);
        const int p = (int)(position - (long long)n * spatial);
        const int iw = p % W, ih = (p / W) % H, id = p / (W * H);
        float acc[CI];
#pragma unroll
        for (int c = 0; c < CI; ++c) acc[c] = 0.0f;
#pragma unroll
        for (int o = 0; o < 8; ++o) {
            const int od = (o >> 2) & 1, oh = (o >> 1) & 1, ow = o & 1;
            if (id < od || ih < oh || iw < ow) continue;  // i - o before the grid: no window
            const long long m = (long long)n * Cout * spatial + p - (od * H + oh) * W - ow;
            const float* grad_z_m = grad_z + m;
            const unsigned char* class_m = window_index + m;
            const float* offset_rows = rows + offset_first_row(o) * row_stride;
#pragma unroll 2
            for (int co = 0; co < Cout; ++co) {
                const long long channel = (long long)co * spatial;
                const int cls = class_m[channel] & 7;
                // A class that does not read x at m + o adds nothing (its row is one of o's).
                const float v = (cls & o) == o ? grad_z_m[channel] : 0.0f;
                const float4* row = reinterpret_cast<const float4*>(
                    offset_rows + free_bit_index(cls, o) * row_stride + co * CI);
#pragma unroll
                for (int q = 0; q < CI4; ++q) {
                    const float4 wv = row[q];
                    acc[4 * q + 0] = fmaf(v, wv.x, acc[4 * q + 0]);
                    acc[4 * q + 1] = fmaf(v, wv.y, acc[4 * q + 1]);
                    acc[4 * q + 2] = fmaf(v, wv.z, acc[4 * q + 2]);
                    acc[4 * q + 3] = fmaf(v, wv.w, acc[4 * q + 3]);
                }
            }
        }
        T* out = grad_x + (long long)n * Cin * spatial + p;
#pragma unroll
        for (int ci = 0; ci < CI; ++ci)
            if (ci < Cin) out[(long long)ci * spatial] = Store<T>::from(acc[ci]);
    }
}

// dweight[ci][co][class_tap(c, o)] = sum over pooled m of class c of x[m + o][ci] grad_z[m][co].
// A lane owns one output channel (of the block's 32-channel chunk, blockIdx.y); a warp owns two
// (class, offset) pairs of one class, so one class test serves both: the 27 pairs make 14
// groups (class 0's single pair is taken twice, the copy not written). 28 warps: the block's two
// halves take the even and the odd positions of each tile and add their sums in a fixed order
// at the end. The class test keeps the sum dense over a tile's positions, as the TF32 kernel's
// masked MMAs; x past the input and grad_z past the pooled grid are staged as zero. Each block
// writes its partial in the layout [tap][ci 16][co 32]; grad_weight_reduce<true> adds them.
namespace grad_w_ffma_tile {
constexpr int TH = 8, TW = 32;                  // one depth row of 8 x 32 pooled positions
constexpr int XH = TH + 1, XW = TW + 1;         // x halo {tile, tile + 1}
constexpr int XPOS = 2 * XH * XW;               // 594
constexpr int QPOS = TH * TW;                   // 256
constexpr int ZS = 32 + 1;                      // grad_z [position][co]: conflict-free both ways
constexpr int CS = 32 + 4;                      // class bytes [position][co]
constexpr int kGroups = 14;
constexpr int kThreads = 2 * kGroups * 32;      // 896
constexpr int kPartialSlots = 27 * 16 * 32;
static_assert(kPartialSlots == grad_w_tile::kPartialSlots, "grad_weight_reduce reads both layouts");
}  // namespace grad_w_ffma_tile

// Group -> its class and two offsets (both used by the class).
__constant__ signed char kFfmaGroupClass[14] = {0, 1, 2, 4, 3, 3, 5, 5, 6, 6, 7, 7, 7, 7};
__constant__ signed char kFfmaGroupOffset[14][2] = {
    {0, 0}, {0, 1}, {0, 2}, {0, 4}, {0, 1}, {2, 3}, {0, 1},
    {4, 5}, {0, 2}, {4, 6}, {0, 1}, {2, 3}, {4, 5}, {6, 7}};

template <typename T, int CI4>  // x's type; input channels padded to 4, / 4
__global__ void __launch_bounds__(grad_w_ffma_tile::kThreads, 1) parity_grad_weight_ffma(
    const T* __restrict__ x, const float* __restrict__ grad_z,
    const unsigned char* __restrict__ window_index, float* __restrict__ partial_weight, int N,
    int Cin, int Cout, int D, int H, int W, int tiles_h, int tiles_w, int accumulate) {
    using namespace grad_w_ffma_tile;
    constexpr int CI = 4 * CI4;
    constexpr int XS = CI + 4;  // x halo [position][ci], 16-byte rows
    extern __shared__ float4 smem4[];
    float* xs = reinterpret_cast<float*>(smem4);                          // [XPOS][XS]
    float* zs = xs + XPOS * XS;                                           // [QPOS][ZS]
    unsigned char* classes = reinterpret_cast<unsigned char*>(zs + QPOS * ZS);  // [QPOS][CS]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp % kGroups, half = warp / kGroups;
    const int cls = kFfmaGroupClass[group];
    const int o_a = kFfmaGroupOffset[group][0], o_b = kFfmaGroupOffset[group][1];
    // Halo distance from x[m] to x[m + o].
    const int shift_a = (((o_a >> 2) & 1) * XH + ((o_a >> 1) & 1)) * XW + (o_a & 1);
    const int shift_b = (((o_b >> 2) & 1) * XH + ((o_b >> 1) & 1)) * XW + (o_b & 1);
    const int co_block = blockIdx.y * 32;
    const long long spatial = (long long)D * H * W;
    float acc_a[CI], acc_b[CI];
#pragma unroll
    for (int c = 0; c < CI; ++c) acc_a[c] = acc_b[c] = 0.0f;

    const int num_tiles = N * D * tiles_h * tiles_w;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        int rest = tile;
        const int w0 = (rest % tiles_w) * TW; rest /= tiles_w;
        const int h0 = (rest % tiles_h) * TH; rest /= tiles_h;
        const int d0 = rest % D;
        const int n = rest / D;
        __syncthreads();  // the previous tile's reads are done
        const T* x_n = x + (long long)n * Cin * spatial;
        for (int e = threadIdx.x; e < CI * XPOS; e += blockDim.x) {
            const int ci = e / XPOS, pos = e - ci * XPOS;
            const int lw = pos % XW, lh = (pos / XW) % XH, ld = pos / (XW * XH);
            const int gd = d0 + ld, gh = h0 + lh, gw = w0 + lw;
            const bool inside = ci < Cin && gd < D && gh < H && gw < W;
            const T* src = inside ? x_n + ci * spatial + ((long long)gd * H + gh) * W + gw : x_n;
            if constexpr (sizeof(T) == sizeof(float))  // fp32: asynchronous copies (zero-filled
                stage_async<4>(xs + pos * XS + ci, src, inside);  // outside), all in flight
            else  // fp16 / bf16: widened on the way
                xs[pos * XS + ci] = inside ? to_acc(*src) : 0.0f;
        }
        const long long pooled_n = (long long)n * Cout * spatial + (long long)d0 * H * W;
        for (int e = threadIdx.x; e < 32 * QPOS; e += blockDim.x) {
            const int co_l = e / QPOS, m = e - co_l * QPOS;
            const int gh = h0 + m / TW, gw = w0 + m % TW, co = co_block + co_l;
            const bool inside = co < Cout && gh < H && gw < W;
            const long long at = pooled_n + co * spatial + (long long)gh * W + gw;
            stage_async<4>(zs + m * ZS + co_l, inside ? grad_z + at : grad_z, inside);
            classes[m * CS + co_l] = inside ? (window_index[at] & 7) : 8;  // 8: no class
        }
        stage_wait();
        __syncthreads();
#pragma unroll 1  // one position's loads in flight at a time: 72 registers for 28 warps
        for (int m = half; m < QPOS; m += 2) {
            const float v = classes[m * CS + lane] == cls ? zs[m * ZS + lane] : 0.0f;
            const int base = (m / TW) * XW + m % TW;
            const float4* xa = reinterpret_cast<const float4*>(xs + (base + shift_a) * XS);
            const float4* xb = reinterpret_cast<const float4*>(xs + (base + shift_b) * XS);
#pragma unroll
            for (int q = 0; q < CI4; ++q) {
                const float4 a = xa[q], b = xb[q];  // the same address in every lane: broadcast
                acc_a[4 * q + 0] = fmaf(a.x, v, acc_a[4 * q + 0]);
                acc_a[4 * q + 1] = fmaf(a.y, v, acc_a[4 * q + 1]);
                acc_a[4 * q + 2] = fmaf(a.z, v, acc_a[4 * q + 2]);
                acc_a[4 * q + 3] = fmaf(a.w, v, acc_a[4 * q + 3]);
                acc_b[4 * q + 0] = fmaf(b.x, v, acc_b[4 * q + 0]);
                acc_b[4 * q + 1] = fmaf(b.y, v, acc_b[4 * q + 1]);
                acc_b[4 * q + 2] = fmaf(b.z, v, acc_b[4 * q + 2]);
                acc_b[4 * q + 3] = fmaf(b.w, v, acc_b[4 * q + 3]);
            }
        }
    }
    // Fixed-order combine: the odd half's sums through shared memory, added by the even half.
    __syncthreads();
    float* combine = xs;  // [group][2 CI][lane], over the x halo and the grad_z tile
    static_assert(kGroups * 2 * CI * 32 <= XPOS * XS + QPOS * ZS, "combine buffer too small");
    if (half == 1) {
#pragma unroll
        for (int c = 0; c < CI; ++c) {
            combine[(group * 2 * CI + c) * 32 + lane] = acc_a[c];
            combine[(group * 2 * CI + CI + c) * 32 + lane] = acc_b[c];
        }
    }
    __syncthreads();
    if (half == 1) return;
    float* out = partial_weight + ((long long)blockIdx.x * gridDim.y + blockIdx.y) * kPartialSlots;
    const int tap_a = class_tap(cls, o_a), tap_b = class_tap(cls, o_b);
#pragma unroll
    for (int c = 0; c < CI; ++c) {
        const float a = acc_a[c] + combine[(group * 2 * CI + c) * 32 + lane];
        const float b = acc_b[c] + combine[(group * 2 * CI + CI + c) * 32 + lane];
        // Batch-chunked backward: each launch adds one chunk, in chunk order (deterministic).
        float& slot_a = out[(tap_a * 16 + c) * 32 + lane];
        slot_a = accumulate ? slot_a + a : a;
        if (o_b != o_a) {
            float& slot_b = out[(tap_b * 16 + c) * 32 + lane];
            slot_b = accumulate ? slot_b + b : b;
        }
    }
}

// dweight from the dweight kernels' partials: slot i summed over parts p (the blocks of the x
// grid) in a fixed order (deterministic), then written to its weight (ci, co, tap), the padding
// slots skipped. Block = 32 slots x 8 part groups: group k adds parts k, k + 8, k + 16, ...
// (many loads in flight per slot), then the 8 group sums are added in group order.
// kFfmaLayout: parity_grad_weight_ffma's [tap][ci][co] partials, else the TF32 kernel's
// accumulator order. T: dweight's type.
template <bool kFfmaLayout>
__device__ __forceinline__ long long grad_weight_of_slot(int i, int Cin, int Cout) {
    using namespace grad_w_tile;
    const int co_chunk = i / kPartialSlots, slot = i % kPartialSlots;
    int ci, co, tap;
    if (kFfmaLayout) {
        co = co_chunk * 32 + slot % 32;
        ci = (slot / 32) % 16;
        tap = slot / (16 * 32);
    } else {
        const int thread = slot % kThreads, r = (slot / kThreads) % 4;
        const int warp = thread >> 5, g = (thread & 31) >> 2, t = thread & 3;
        tap = slot / (4 * kThreads);
        // The mma C fragment: rows (input channels) g and g + 8, columns (output channels)
        // 2t, 2t + 1.
        ci = g + (r >= 2 ? 8 : 0);
        co = co_chunk * 32 + warp * 8 + 2 * t + (r & 1);
    }
    return (ci < Cin && co < Cout) ? ((long long)ci * Cout + co) * 27 + tap : -1;
}

template <bool kFfmaLayout, typename T>
__global__ void __launch_bounds__(256) grad_weight_reduce(const float* __restrict__ partial,
                                                          T* __restrict__ out, int parts,
                                                          int count, int Cin, int Cout) {
    __shared__ float group_sums[8][33];
    const int column = threadIdx.x & 31, group = threadIdx.x >> 5;
    for (int base = blockIdx.x * 32; base < count; base += gridDim.x * 32) {
        const int i = base + column;
        float sum = 0.0f;
        if (i < count) {
#pragma unroll 4
            for (int p = group; p < parts; p += 8) sum += partial[(long long)p * count + i];
        }
        group_sums[group][column] = sum;
        __syncthreads();
        if (group == 0 && i < count) {
            float total = group_sums[0][column];
#pragma unroll
            for (int k = 1; k < 8; ++k) total += group_sums[k][column];
            const long long weight = grad_weight_of_slot<kFfmaLayout>(i, Cin, Cout);
            if (weight >= 0) out[weight] = Store<T>::from(total);
        }
        __syncthreads();
    }
}

#ifndef __CUDACC_RTC__
template __global__ void parity_grad_x_tf32<1>(const unsigned int*, const uint2*, float*, int, int,
                                               int, int, int, int, int, int, int, int);
template __global__ void parity_grad_x_tf32<2>(const unsigned int*, const uint2*, float*, int, int,
                                               int, int, int, int, int, int, int, int);
#define FUSED3D_CUPY_INSTANTIATE_FFMA(T, CI4)                                                  \
    template __global__ void parity_grad_x_ffma<T, CI4>(const float*, const unsigned char*,     \
                                                        const float*, T*, int, int, int, int,   \
                                                        int, int, int);                         \
    template __global__ void parity_grad_weight_ffma<T, CI4>(const T*, const float*,            \
                                                             const unsigned char*, float*, int, \
                                                             int, int, int, int, int, int, int, \
                                                             int);
#define FUSED3D_CUPY_INSTANTIATE_FFMA_TYPE(T)                                                   \
    FUSED3D_CUPY_INSTANTIATE_FFMA(T, 1)                                                         \
    FUSED3D_CUPY_INSTANTIATE_FFMA(T, 2)                                                         \
    FUSED3D_CUPY_INSTANTIATE_FFMA(T, 3)                                                         \
    FUSED3D_CUPY_INSTANTIATE_FFMA(T, 4)                                                         \
    template __global__ void pack_ffma_rows<T>(const T*, float*, int, int, int, int);          \
    template __global__ void grad_weight_reduce<true, T>(const float*, T*, int, int, int, int); \
    template __global__ void grad_z_from_output<T, false>(                                      \
        const T*, const T*, const T*, const T*, const T*, const T*, const unsigned char*,       \
        unsigned int*, float*, float*, int, int, int, int, int, int, int, int, double);
FUSED3D_CUPY_INSTANTIATE_FFMA_TYPE(float)
FUSED3D_CUPY_INSTANTIATE_FFMA_TYPE(half_t)
FUSED3D_CUPY_INSTANTIATE_FFMA_TYPE(bf16_t)
template __global__ void grad_z_from_output<float, true>(
    const float*, const float*, const float*, const float*, const float*, const float*,
    const unsigned char*, unsigned int*, float*, float*, int, int, int, int, int, int, int, int,
    double);
template __global__ void grad_weight_reduce<false, float>(const float*, float*, int, int, int,
                                                          int);
#endif
