// PyTorch bindings of the fused3d CUDA kernels: CUDA-dispatch kernels for the two ops whose
// schemas fused3d.ops.define_schemas("fused3d_cuda") defines from Python. Outputs come from
// torch's allocator, kernels run on torch's current stream on the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is this function
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "fused3d_kernels.cuh"

namespace fused3d_cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fused3d_cuda: x must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::Float32;
}

BlockShape make_shape(const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& multiplier, c10::IntArrayRef stride,
                      c10::IntArrayRef padding, c10::IntArrayRef output_padding,
                      double negative_slope) {
  TORCH_CHECK(x.dim() == 5, "fused3d_cuda: x must be 5-D (N, C_in, D, H, W), got ", x.dim(),
              " dims");
  TORCH_CHECK(weight.dim() == 5, "fused3d_cuda: weight must be 5-D, got ", weight.dim());
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3 && output_padding.size() == 3,
              "fused3d_cuda: stride, padding and output_padding must have 3 entries");
  TORCH_CHECK(weight.size(0) == x.size(1), "fused3d_cuda: weight.shape[0] (", weight.size(0),
              ") must equal x.shape[1] (", x.size(1), ")");
  BlockShape s{};
  s.batch = x.size(0);
  s.in_channels = (int)x.size(1);
  s.out_channels = (int)weight.size(1);
  for (int a = 0; a < 3; ++a) {
    s.in_size[a] = (int)x.size(2 + a);
    s.kernel[a] = (int)weight.size(2 + a);
    s.stride[a] = (int)stride[a];
    s.padding[a] = (int)padding[a];
    const int64_t conv = (x.size(2 + a) - 1) * stride[a] - 2 * padding[a] + weight.size(2 + a) +
                         output_padding[a];
    s.conv_size[a] = (int)conv;
    s.pooled_size[a] = (int)(conv < 0 ? 0 : conv / 2);
  }
  const int64_t m = multiplier.numel();
  TORCH_CHECK(m == 1 || m == s.out_channels, "fused3d_cuda: multiplier must have 1 or C_out (",
              s.out_channels, ") elements, got ", m);
  s.multiplier_stride = (m == 1) ? 0 : 1;
  s.negative_slope = negative_slope;
  // The kernels index rows (image x channel) and the positions of one row in 32 bits.
  TORCH_CHECK(s.batch * std::max(s.in_channels, s.out_channels) < (int64_t(1) << 31) &&
                  x.numel() / std::max<int64_t>(1, s.batch * s.in_channels) < (int64_t(1) << 31),
              "fused3d_cuda: tensor too large for 32-bit row indexing");
  return s;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& multiplier) {
  TORCH_CHECK(x.is_cuda(), "fused3d_cuda: x must be a CUDA tensor");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "fused3d_cuda: ", name, " is on ", t.device(),
                " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused3d_cuda: ", name, " has dtype ",
                t.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "fused3d_cuda: ", name, " must be contiguous");
  };
  same(x, "x");
  same(weight, "weight");
  same(multiplier, "multiplier");
  if (bias.has_value()) {
    same(*bias, "bias");
    TORCH_CHECK(bias->numel() == weight.size(1), "fused3d_cuda: bias must have C_out elements");
  }
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "fused3d_cuda: ", what, " failed: ",
              cudaGetErrorString(error));
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& multiplier,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef output_padding,
                                           double negative_slope, bool allow_tf32) {
  check_inputs(x, weight, bias, multiplier);
  const c10::cuda::CUDAGuard guard(x.device());
  const BlockShape s =
      make_shape(x, weight, multiplier, stride, padding, output_padding, negative_slope);
  const std::vector<int64_t> out_shape{s.batch, s.out_channels, s.pooled_size[0],
                                       s.pooled_size[1], s.pooled_size[2]};
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor window_index = at::empty(out_shape, x.options().dtype(at::kByte));
  ForwardArgs args{};
  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.multiplier = multiplier.data_ptr();
  args.y = y.data_ptr();
  args.window_index = window_index.data_ptr<uint8_t>();
  check_launch(launch_forward(s, dtype_of(x), allow_tf32, args,
                              c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "forward kernel");
  return {y, window_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& y,
    const at::Tensor& window_index, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& multiplier, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, double negative_slope, bool allow_tf32,
    c10::List<bool> output_mask) {
  check_inputs(x, weight, bias, multiplier);
  TORCH_CHECK(output_mask.size() == 4, "fused3d_cuda: output_mask must have 4 entries");
  const c10::cuda::CUDAGuard guard(x.device());
  const BlockShape s =
      make_shape(x, weight, multiplier, stride, padding, output_padding, negative_slope);
  const at::Tensor grad = grad_y.contiguous();
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "fused3d_cuda: grad_y must match x's dtype and device");
  TORCH_CHECK(window_index.scalar_type() == at::kByte && window_index.is_contiguous() &&
                  window_index.numel() == s.pooled_numel(),
              "fused3d_cuda: window_index must be a contiguous uint8 tensor of y's shape");
  // y (the saved pooled output) lets the parity backward skip recomputing the conv; without
  // it the kernels recompute the conv at each winner.
  const bool have_y = y.has_value() && y->numel() > 0;
  TORCH_CHECK(!have_y || (y->scalar_type() == x.scalar_type() && y->device() == x.device() &&
                          y->numel() == s.pooled_numel()),
              "fused3d_cuda: y must be None or the forward's output (x's dtype and device, ",
              s.pooled_numel(), " elements), got ", y->scalar_type(), " with ", y->numel(),
              " elements on ", y->device());
  const at::Tensor y_contiguous = have_y ? y->contiguous() : at::Tensor();
  const bool want_x = output_mask.get(0), want_w = output_mask.get(1);
  const bool want_b = output_mask.get(2) && bias.has_value(), want_m = output_mask.get(3);
  const DType dtype = dtype_of(x);
  const auto acc_options = x.options().dtype(dtype == DType::Float64 ? at::kDouble : at::kFloat);

  at::Tensor dx = want_x ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor dw = want_w ? at::empty(weight.sizes(), weight.options()) : weight.new_empty({0});
  at::Tensor db_channels = want_b ? at::empty({s.out_channels}, acc_options) : at::Tensor();
  at::Tensor dm_channels = want_m ? at::empty({s.out_channels}, acc_options) : at::Tensor();
  if (want_x || want_w || want_b || want_m) {
    const int64_t workspace_bytes = backward_workspace_bytes(s, dtype, allow_tf32);
    at::Tensor workspace =
        at::empty({std::max<int64_t>(workspace_bytes, 1)}, x.options().dtype(at::kByte));
    BackwardArgs args{};
    args.grad_y = grad.data_ptr();
    args.y = have_y ? y_contiguous.data_ptr() : nullptr;
    args.window_index = window_index.data_ptr<uint8_t>();
    args.x = x.data_ptr();
    args.weight = weight.data_ptr();
    args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    args.multiplier = multiplier.data_ptr();
    args.grad_x = want_x ? dx.data_ptr() : nullptr;
    args.grad_weight = want_w ? dw.data_ptr() : nullptr;
    args.grad_bias_channels = want_b ? db_channels.data_ptr() : nullptr;
    args.grad_multiplier_channels = want_m ? dm_channels.data_ptr() : nullptr;
    args.workspace = workspace.data_ptr();
    check_launch(launch_backward(s, dtype, allow_tf32, args,
                                 c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
                 "backward kernels");
  }
  // Channel gradients to their parameters' shapes and dtypes (a one-value multiplier is
  // broadcast over the channels, so its gradient sums them).
  at::Tensor db = bias.has_value() ? bias->new_empty({0}) : x.new_empty({0});
  if (want_b) db = db_channels.reshape(bias->sizes()).to(bias->scalar_type());
  at::Tensor dm = multiplier.new_empty({0});
  if (want_m) {
    at::Tensor per_channel = dm_channels;
    if (multiplier.numel() == 1 && s.out_channels != 1) per_channel = per_channel.sum();
    dm = per_channel.reshape(multiplier.sizes()).to(multiplier.scalar_type());
  }
  return {dx, dw, db, dm};
}

}  // namespace
}  // namespace fused3d_cuda

TORCH_LIBRARY_IMPL(fused3d_cuda, CUDA, m) {
  m.impl("forward", &fused3d_cuda::forward);
  m.impl("backward", &fused3d_cuda::backward);
}
