// General (gather) kernels of the fused3d CuPy backend: correct for every configuration the
// contract allows (any kernel, stride, padding, output_padding < stride, channel counts, odd
// sizes). One thread per output element; each visits only the kernel taps that reach it.
//
// Layouts (all dense, row-major): x [N, Cin, D, H, W]; weight [Cin, Cout, kD, kH, kW];
// y, window index, grad_y, grad_z [N, Cout, PD, PH, PW]. Window index = dd*4 + dh*2 + dw.
#include "common.cuh"

struct GeneralShape {
    int N, Cin, Cout, D, H, W, PD, PH, PW;
    int kD, kH, kW, sD, sH, sW, pD, pH, pW;
};

#define FUSED3D_GENERAL_PARAMS                                                                 \
    int N, int Cin, int Cout, int D, int H, int W, int PD, int PH, int PW, int kD, int kH,     \
        int kW, int sD, int sH, int sW, int pD, int pH, int pW
#define FUSED3D_GENERAL_SHAPE {N, Cin, Cout, D, H, W, PD, PH, PW, kD, kH, kW, sD, sH, sW, pD, pH, pW}

// Conv-transpose value at output (od, oh, ow) of channel co, without bias: output o receives
// x[i] * w[k] wherever o = i*s - p + k, i.e. k = o + p - i*s, so the taps that reach o are
// k = (o + p) % s, then every s-th one.
template <typename T, typename Acc>
__device__ Acc conv_at(const T* __restrict__ x, const T* __restrict__ weight, const GeneralShape& s,
                       int n, int co, int od, int oh, int ow) {
    const long long spatial = (long long)s.D * s.H * s.W;
    const int kvol = s.kD * s.kH * s.kW;
    const int kd0 = (od + s.pD) % s.sD, kh0 = (oh + s.pH) % s.sH, kw0 = (ow + s.pW) % s.sW;
    Acc acc = Acc(0);
    for (int ci = 0; ci < s.Cin; ++ci) {
        const T* xc = x + ((long long)n * s.Cin + ci) * spatial;
        const T* wc = weight + ((long long)ci * s.Cout + co) * kvol;
        for (int kd = kd0; kd < s.kD; kd += s.sD) {
            const int td = od + s.pD - kd;
            if (td < 0) break;
            const int id = td / s.sD;
            if (id >= s.D) continue;
            for (int kh = kh0; kh < s.kH; kh += s.sH) {
                const int th = oh + s.pH - kh;
                if (th < 0) break;
                const int ih = th / s.sH;
                if (ih >= s.H) continue;
                for (int kw = kw0; kw < s.kW; kw += s.sW) {
                    const int tw = ow + s.pW - kw;
                    if (tw < 0) break;
                    const int iw = tw / s.sW;
                    if (iw >= s.W) continue;
                    acc += to_acc(xc[((long long)id * s.H + ih) * s.W + iw]) *
                           to_acc(wc[(kd * s.kH + kh) * s.kW + kw]);
                }
            }
        }
    }
    return acc;
}

// Forward: one thread per pooled output; the 8 conv values of its window are computed, activated
// and max-pooled in registers, so nothing conv-sized is ever written.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 1) general_forward(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ multiplier, T* __restrict__ y, unsigned char* __restrict__ window_index,
    FUSED3D_GENERAL_PARAMS, int multiplier_stride, int has_bias, double negative_slope) {
    const GeneralShape s = FUSED3D_GENERAL_SHAPE;
    const Acc slope = Acc(negative_slope);
    const long long total = (long long)N * Cout * PD * PH * PW;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long rest = e;
        const int pw = rest % PW; rest /= PW;
        const int ph = rest % PH; rest /= PH;
        const int pd = rest % PD; rest /= PD;
        const int co = rest % Cout;
        const int n = rest / Cout;
        const Acc b = has_bias ? to_acc(bias[co]) : Acc(0);
        const Acc m = to_acc(multiplier[co * multiplier_stride]);
        Acc best = Acc(0);
        int best_index = 0;
        for (int win = 0; win < 8; ++win) {
            const int od = 2 * pd + ((win >> 2) & 1), oh = 2 * ph + ((win >> 1) & 1),
                      ow = 2 * pw + (win & 1);
            const Acc v = activate(b + conv_at<T, Acc>(x, weight, s, n, co, od, oh, ow), m, slope);
            if (win == 0 || pool_takes(best, v)) {
                best = v;
                best_index = win;
            }
        }
        y[e] = Store<T>::from(best);
        window_index[e] = static_cast<unsigned char>(best_index);
    }
}

// Fixed-order block sum (deterministic): every thread contributes one value, lane order fixed.
template <typename Acc, int THREADS>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
#pragma unroll
    for (int width = THREADS / 2; width > 0; width >>= 1) {
        if (threadIdx.x < width) scratch[threadIdx.x] += scratch[threadIdx.x + width];
        __syncthreads();
    }
    const Acc out = scratch[0];
    __syncthreads();
    return out;
}

// Backward step 1: gradient of the conv output at each window's winner (z recomputed from x,
// weight, bias there), plus per-block partial sums for dbias (sum of dz) and dmultiplier
// (sum of g * leaky'(v) * u). Grid: x = chunk of a (n, co) plane, y = planes (strided).
// y = leaky(m * leaky(z)): dy/dz = leaky'(m u) * m * leaky'(z), dy/dm = leaky'(m u) * u.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 1) general_grad_z(
    const T* __restrict__ grad_y, const unsigned char* __restrict__ window_index,
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    const T* __restrict__ multiplier, Acc* __restrict__ grad_z, Acc* __restrict__ partial_bias,
    Acc* __restrict__ partial_multiplier, FUSED3D_GENERAL_PARAMS, int multiplier_stride,
    int has_bias, double negative_slope) {
    __shared__ Acc scratch[256];
    const GeneralShape s = FUSED3D_GENERAL_SHAPE;
    const Acc slope = Acc(negative_slope);
    const long long plane_size = (long long)PD * PH * PW;
    const int planes = N * Cout;
    for (int plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const int co = plane % Cout, n = plane / Cout;
        const Acc b = has_bias ? to_acc(bias[co]) : Acc(0);
        const Acc m = to_acc(multiplier[co * multiplier_stride]);
        Acc sum_bias = Acc(0), sum_multiplier = Acc(0);
        for (long long p = (long long)blockIdx.x * 256 + threadIdx.x; p < plane_size;
             p += (long long)gridDim.x * 256) {
            const long long e = (long long)plane * plane_size + p;
            const int pw = p % PW, ph = (p / PW) % PH, pd = p / ((long long)PW * PH);
            const int win = window_index[e];
            const int od = 2 * pd + ((win >> 2) & 1), oh = 2 * ph + ((win >> 1) & 1),
                      ow = 2 * pw + (win & 1);
            const Acc z = b + conv_at<T, Acc>(x, weight, s, n, co, od, oh, ow);
            const Acc u = leaky(z, slope);
            const Acc outer = to_acc(grad_y[e]) * leaky_slope(m * u, slope);
            const Acc dz = outer * m * leaky_slope(z, slope);
            grad_z[e] = dz;
            sum_bias += dz;
            sum_multiplier += outer * u;
        }
        const Acc block_bias = block_sum<Acc, 256>(sum_bias, scratch);
        const Acc block_multiplier = block_sum<Acc, 256>(sum_multiplier, scratch);
        if (threadIdx.x == 0) {
            partial_bias[(long long)plane * gridDim.x + blockIdx.x] = block_bias;
            partial_multiplier[(long long)plane * gridDim.x + blockIdx.x] = block_multiplier;
        }
    }
}

// Backward step 2: per-channel sums of the partials in a fixed order. One block per channel.
// partial layout [N][Cout][chunks]; outputs (Cout,) in Acc.
template <typename Acc>
__global__ void __launch_bounds__(256, 1) channel_reduce(const Acc* __restrict__ partial_bias,
                                                      const Acc* __restrict__ partial_multiplier,
                                                      Acc* __restrict__ grad_bias,
                                                      Acc* __restrict__ grad_multiplier, int N,
                                                      int Cout, int chunks) {
    __shared__ Acc scratch[256];
    for (int co = blockIdx.x; co < Cout; co += gridDim.x) {
        Acc sum_bias = Acc(0), sum_multiplier = Acc(0);
        const long long count = (long long)N * chunks;
        for (long long k = threadIdx.x; k < count; k += 256) {
            const long long at = ((k / chunks) * Cout + co) * chunks + k % chunks;
            sum_bias += partial_bias[at];
            sum_multiplier += partial_multiplier[at];
        }
        const Acc total_bias = block_sum<Acc, 256>(sum_bias, scratch);
        const Acc total_multiplier = block_sum<Acc, 256>(sum_multiplier, scratch);
        if (threadIdx.x == 0) {
            grad_bias[co] = total_bias;
            grad_multiplier[co] = total_multiplier;
        }
    }
}

// Output position o (one axis) that input i reaches through tap k, or -1 when that output is
// outside every pool window (cropped odd edge) or outside the conv output.
__device__ __forceinline__ int pooled_output(int i, int k, int s, int p, int pooled) {
    const int o = i * s - p + k;
    return (o >= 0 && o < 2 * pooled) ? o : -1;
}

// Backward step 3: dx, the adjoint of the conv-transpose applied to the sparse grad_z (one
// non-zero per window, at its winner). One thread per x element, fixed summation order, so dx
// is deterministic.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 1) general_grad_x(
    const Acc* __restrict__ grad_z, const unsigned char* __restrict__ window_index,
    const T* __restrict__ weight, T* __restrict__ grad_x, FUSED3D_GENERAL_PARAMS) {
    const long long total = (long long)N * Cin * D * H * W;
    const int kvol = kD * kH * kW;
    const long long plane_size = (long long)PD * PH * PW;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        long long rest = e;
        const int iw = rest % W; rest /= W;
        const int ih = rest % H; rest /= H;
        const int id = rest % D; rest /= D;
        const int ci = rest % Cin;
        const int n = rest / Cin;
        Acc acc = Acc(0);
        for (int co = 0; co < Cout; ++co) {
            const long long plane = ((long long)n * Cout + co) * plane_size;
            const T* wc = weight + ((long long)ci * Cout + co) * kvol;
            for (int kd = 0; kd < kD; ++kd) {
                const int od = pooled_output(id, kd, sD, pD, PD);
                if (od < 0) continue;
                for (int kh = 0; kh < kH; ++kh) {
                    const int oh = pooled_output(ih, kh, sH, pH, PH);
                    if (oh < 0) continue;
                    for (int kw = 0; kw < kW; ++kw) {
                        const int ow = pooled_output(iw, kw, sW, pW, PW);
                        if (ow < 0) continue;
                        const long long q = plane + ((long long)(od >> 1) * PH + (oh >> 1)) * PW +
                                            (ow >> 1);
                        const int win = ((od & 1) << 2) | ((oh & 1) << 1) | (ow & 1);
                        if (window_index[q] == win)
                            acc += grad_z[q] * to_acc(wc[(kd * kH + kh) * kW + kw]);
                    }
                }
            }
        }
        grad_x[e] = Store<T>::from(acc);
    }
}

// Sets *flag when x holds a NaN or an infinity (every writer writes 1: a benign race).
template <typename T>
__global__ void __launch_bounds__(256) any_nonfinite(const T* __restrict__ x, long long count,
                                                     int* __restrict__ flag) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const auto v = to_acc(x[i]);
        if (v - v != v - v) *flag = 1;  // NaN for NaN and +-inf only
    }
}

// Backward step 4: dweight[ci, co, k] = sum over n and windows whose winner o is reached from
// some input i through tap k (i = (o + p - k) / s exactly) of x[n, ci, i] * grad_z. One block per
// weight element, fixed-order block reduction (deterministic). PyTorch's dense conv backward also
// multiplies every input by the zero gradient of the non-winning conv outputs; that only matters
// (x * 0 = NaN) for a NaN or infinite x, so when *x_nonfinite is set those products are added.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256, 1) general_grad_weight(
    const Acc* __restrict__ grad_z, const unsigned char* __restrict__ window_index,
    const T* __restrict__ x, const int* __restrict__ x_nonfinite, T* __restrict__ grad_weight,
    FUSED3D_GENERAL_PARAMS, int conv_d, int conv_h, int conv_w) {
    __shared__ Acc scratch[256];
    const int kvol = kD * kH * kW;
    const long long weights = (long long)Cin * Cout * kvol;
    const long long plane_size = (long long)PD * PH * PW;
    const long long spatial = (long long)D * H * W;
    for (long long widx = blockIdx.x; widx < weights; widx += gridDim.x) {
        const int k = widx % kvol;
        const int co = (widx / kvol) % Cout;
        const int ci = widx / ((long long)kvol * Cout);
        const int kd = k / (kH * kW), kh = (k / kW) % kH, kw = k % kW;
        Acc acc = Acc(0);
        const long long count = (long long)N * plane_size;
        for (long long j = threadIdx.x; j < count; j += 256) {
            const int n = j / plane_size;
            const long long p = j % plane_size;
            const long long q = ((long long)n * Cout + co) * plane_size + p;
            const int win = window_index[q];
            const int pw = p % PW, ph = (p / PW) % PH, pd = p / ((long long)PW * PH);
            const int td = 2 * pd + ((win >> 2) & 1) + pD - kd;
            const int th = 2 * ph + ((win >> 1) & 1) + pH - kh;
            const int tw = 2 * pw + (win & 1) + pW - kw;
            if (td < 0 || th < 0 || tw < 0 || td % sD || th % sH || tw % sW) continue;
            const int id = td / sD, ih = th / sH, iw = tw / sW;
            if (id >= D || ih >= H || iw >= W) continue;
            acc += to_acc(x[((long long)n * Cin + ci) * spatial + ((long long)id * H + ih) * W +
                            iw]) *
                   grad_z[q];
        }
        if (*x_nonfinite) {
            const long long inputs = (long long)N * spatial;
            for (long long j = threadIdx.x; j < inputs; j += 256) {
                const int n = j / spatial;
                const long long i = j % spatial;
                const Acc v = to_acc(x[((long long)n * Cin + ci) * spatial + i]);
                if (v - v == v - v) continue;  // finite: x * 0 adds nothing
                const int iw = i % W, ih = (i / W) % H, id = i / ((long long)W * H);
                const int od = id * sD - pD + kd, oh = ih * sH - pH + kh, ow = iw * sW - pW + kw;
                if (od < 0 || oh < 0 || ow < 0 || od >= conv_d || oh >= conv_h || ow >= conv_w)
                    continue;  // this tap reaches no conv output from here
                if (od < 2 * PD && oh < 2 * PH && ow < 2 * PW) {
                    const long long q = ((long long)n * Cout + co) * plane_size +
                                        ((long long)(od >> 1) * PH + (oh >> 1)) * PW + (ow >> 1);
                    const int cls = ((od & 1) << 2) | ((oh & 1) << 1) | (ow & 1);
                    if (window_index[q] == cls) continue;  // the winner: counted above
                }
                acc += v * Acc(0);  // NaN, as PyTorch's dense product gives
            }
        }
        const Acc total = block_sum<Acc, 256>(acc, scratch);
        if (threadIdx.x == 0) grad_weight[widx] = Store<T>::from(total);
    }
}

#ifndef __CUDACC_RTC__
// Explicit instantiations for the standalone nvcc build (CI resource report). NVRTC gets the
// same list through RawModule(name_expressions=...).
#define FUSED3D_INSTANTIATE_GENERAL(T, Acc)                                                   \
    template __global__ void general_forward<T, Acc>(                                         \
        const T*, const T*, const T*, const T*, T*, unsigned char*, int, int, int, int, int,  \
        int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, double);  \
    template __global__ void general_grad_z<T, Acc>(                                          \
        const T*, const unsigned char*, const T*, const T*, const T*, const T*, Acc*, Acc*,  \
        Acc*, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, \
        int, int, int, int, double);                                                          \
    template __global__ void general_grad_x<T, Acc>(const Acc*, const unsigned char*,        \
                                                    const T*, T*, int, int, int, int, int,   \
                                                    int, int, int, int, int, int, int, int,  \
                                                    int, int, int, int, int);                \
    template __global__ void general_grad_weight<T, Acc>(const Acc*, const unsigned char*,   \
                                                         const T*, const int*, T*, int, int, \
                                                         int, int, int, int, int, int, int,  \
                                                         int, int, int, int, int, int, int,  \
                                                         int, int, int, int, int);           \
    template __global__ void any_nonfinite<T>(const T*, long long, int*);
FUSED3D_INSTANTIATE_GENERAL(float, float)
FUSED3D_INSTANTIATE_GENERAL(double, double)
FUSED3D_INSTANTIATE_GENERAL(half_t, float)
FUSED3D_INSTANTIATE_GENERAL(bf16_t, float)
template __global__ void channel_reduce<float>(const float*, const float*, float*, float*, int,
                                               int, int);
template __global__ void channel_reduce<double>(const double*, const double*, double*, double*,
                                                int, int, int);
#endif
