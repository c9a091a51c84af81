"""Edge semantics: ties, NaN and inf, layouts, determinism (DESIGN section 3)."""

from __future__ import annotations

import pytest
import torch

from checks import Case, check_against_oracle, make_inputs, random_like_output, run_backend

# Kernel 2, stride 2: every conv output takes exactly one tap. With a constant input and a
# weight that is the same for every tap, all eight values of a window are the same sum in the
# same order: a tie in any precision, and the first position must win.
TIE_CASE = Case(kernel_size=2, stride=2, padding=0, output_padding=0, spatial=(2, 3, 2),
                in_channels=4, out_channels=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_ties_first_position_wins(backend_name, device, generator, dtype):
    inputs = make_inputs(TIE_CASE, dtype, device, generator)
    inputs.x = torch.full_like(inputs.x, 0.75)
    inputs.weight = inputs.weight[:, :, :1, :1, :1].expand_as(inputs.weight).contiguous()
    grad_y = random_like_output(torch.empty(2, 3, 2, 3, 2, dtype=dtype, device=device), generator)
    _, window_index, grads = run_backend(backend_name, inputs, grad_y)
    assert (window_index == 0).all(), f"tie broken wrongly: {window_index.unique().tolist()}"
    # The gradient reaches only the first position of each window, i.e. the even outputs,
    # which (kernel 2, stride 2) read weight tap (0, 0, 0) alone.
    dweight = grads[1]
    assert (dweight[:, :, 1:, :, :] == 0).all() and (dweight[:, :, 0, 1:, :] == 0).all()
    assert (dweight[:, :, 0, 0, 1] == 0).all() and (dweight[:, :, 0, 0, 0] != 0).any()
    check_against_oracle(backend_name, inputs, generator)


def _with_special(inputs, value, positions):
    x = inputs.x.clone()
    for position in positions:
        x[position] = value
    inputs.x = x
    return inputs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
def test_nonfinite_inputs(backend_name, device, generator, value):
    """NaN wins its window (last NaN), +-inf propagate; gradients stay PyTorch's."""
    case = Case(kernel_size=1, stride=1, padding=0, output_padding=0, spatial=(4, 4, 4),
                in_channels=1, out_channels=2, bias=False)
    inputs = make_inputs(case, torch.float64, device, generator)
    inputs = _with_special(inputs, value, [(0, 0, 0, 0, 1), (0, 0, 0, 1, 0), (1, 0, 3, 3, 3)])
    check_against_oracle(backend_name, inputs, generator, gradients=value != value)
    y, window_index, _ = run_backend(backend_name, inputs)
    if value != value:
        # Window (0,0,0,0,0) holds NaN at positions 1 (w) and 2 (h): the last one wins.
        assert torch.isnan(y[0, :, 0, 0, 0]).all()
        assert (window_index[0, :, 0, 0, 0] == 2).all()


def test_nan_in_weight_spreads(backend_name, device, generator):
    inputs = make_inputs(Case(), torch.float64, device, generator)
    inputs.weight = inputs.weight.clone()
    inputs.weight[0, 1, 1, 1, 1] = float("nan")
    y, _, _ = run_backend(backend_name, inputs)
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, 0]).any()
    check_against_oracle(backend_name, inputs, generator, gradients=False)


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_subnormal_values_are_kept(backend_name, device, generator, allow_tf32):
    """fp32 subnormals are numbers, as in PyTorch: x and the bias scaled by 2^-129 put (nearly)
    all of x, every conv value and y below the smallest normal (2^-126), and dweight's products
    too. A kernel built with flush-to-zero returns zeros there and picks window 0. (On the CPU
    TF32 does not exist: both ids run IEEE fp32.)"""
    case = Case(spatial=(2, 4, 8), in_channels=8, out_channels=6)
    inputs = make_inputs(case, torch.float32, device, generator)
    inputs.x = inputs.x * 2.0**-129
    inputs.bias = inputs.bias * 2.0**-129
    assert (inputs.x.abs() < 2.0**-126).float().mean() > 0.99 and (inputs.x != 0).all()
    y, _, _ = run_backend(backend_name, inputs, allow_tf32=allow_tf32)
    zeros = int((y == 0).sum())
    assert zeros == 0 and (y.abs() < 2.0**-126).all(), (
        f"{zeros} of {y.numel()} outputs are zero (subnormals flushed?); "
        f"largest |y| {float(y.abs().max()):.3g}"
    )
    # A conv value is at most 8 x 8 products and their sums, then the activation: each result
    # rounded to a multiple of 2^-149, an absolute error of at most 2^-150 apiece.
    floor = 256 * 2.0**-150
    if allow_tf32 and device == "cuda":
        # TF32 keeps 10 of fp32's 23 mantissa bits, which for a subnormal x is a quantum of
        # 2^-136: each x a product reads may move by 2^-137 (about 1% of these x, not the 2^-11
        # of a normal number), a conv value by that times the sum of |weight| of its products
        # (bounded here by all taps of its channel), and y by that times |multiplier|. Without
        # this term the H100's TF32 forward passed or missed the 2e-3 forward tolerance
        # depending on the draw (2.3e-3 was seen).
        weight_sums = inputs.weight.detach().abs().sum(dim=(0, 2, 3, 4))  # per output channel
        floor += 2.0**-137 * float(weight_sums.max() * inputs.multiplier.detach().abs().max())
    check_against_oracle(backend_name, inputs, generator, allow_tf32=allow_tf32,
                         absolute_floor=floor)


def test_channels_last_and_noncontiguous(backend_name, device, generator):
    case = Case(spatial=(3, 4, 4), in_channels=4, out_channels=6)
    inputs = make_inputs(case, torch.float64, device, generator)
    inputs.x = inputs.x.to(memory_format=torch.channels_last_3d)
    assert not inputs.x.is_contiguous()
    check_against_oracle(backend_name, inputs, generator)
    wide = make_inputs(Case(**{**case.__dict__, "spatial": (3, 4, 8)}), torch.float64, device,
                       generator)
    inputs.x = wide.x[..., ::2]  # strided view
    inputs.weight = inputs.weight.transpose(0, 1).contiguous().transpose(0, 1)
    assert not inputs.x.is_contiguous() and not inputs.weight.is_contiguous()
    check_against_oracle(backend_name, inputs, generator)


def test_negative_slope_argument(backend_name, device, generator):
    case = Case(negative_slope=0.05)
    check_against_oracle(backend_name, make_inputs(case, torch.float64, device, generator),
                         generator)


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True)],
                         ids=["x", "weight", "bias", "multiplier"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_needs_grad_mask(backend_name, device, generator, mask, dtype):
    """Only the requested gradient is produced, and it is the one the full backward gives.
    float32 at W = 8 takes the backends' fast paths (which skip the kernels not asked for);
    float64 the general ones."""
    import fused3d

    case = Case() if dtype == torch.float64 else Case(spatial=(2, 4, 8), in_channels=8,
                                                       out_channels=6)
    inputs = make_inputs(case, dtype, device, generator)
    leaves = [t.detach().clone().requires_grad_(wanted)
              for t, wanted in zip(inputs.tensors(), mask, strict=True)]
    y = fused3d.fused_block(*leaves, 2, 1, 1, backend=backend_name)
    grad_y = random_like_output(y, generator)
    (target,) = [t for t, wanted in zip(leaves, mask, strict=True) if wanted]
    (grad,) = torch.autograd.grad(y, [target], grad_y)
    full = [t.detach().clone().requires_grad_() for t in inputs.tensors()]
    y_full = fused3d.fused_block(*full, 2, 1, 1, backend=backend_name)
    expected = torch.autograd.grad(y_full, full, grad_y)[mask.index(True)]
    if dtype == torch.float64:  # the same sums
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    else:  # a backend may order a masked call's fp32 sums differently
        torch.testing.assert_close(grad, expected, rtol=1e-5,
                                   atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_run_twice_is_bitwise_identical(backend_name, device, generator, dtype):
    """Forward, window index and all four gradients are deterministic."""
    inputs = make_inputs(Case(spatial=(4, 4, 4), in_channels=8, out_channels=8), dtype, device,
                         generator)
    grad_y = random_like_output(torch.empty(2, 8, 4, 4, 4, dtype=dtype, device=device), generator)
    first = run_backend(backend_name, inputs, grad_y)
    second = run_backend(backend_name, inputs, grad_y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, a, b in zip(("dx", "dweight", "dbias", "dmultiplier"), first[2], second[2],
                          strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# A fast backward may read the saved pooled output y instead of recomputing the conv: y's sign
# gives both leaky slopes and y / m the multiplier term (the cuda backend does). These inputs
# put y at zero or NaN and m at zero or below 2**-100, where that shortcut must hand over to
# recomputing z, and take slopes <= 0, where y's sign no longer tells z's. float64 runs the
# general paths, whose sparse dweight must still spread a NaN input as PyTorch's dense one does.
def _zero_and_tiny_multiplier(inputs):
    multiplier = inputs.multiplier.clone()
    multiplier[0], multiplier[1], multiplier[2] = 0.0, 1e-35, -1e-35
    inputs.multiplier = multiplier
    return inputs


def _zero_first_image(inputs):
    x = inputs.x.clone()
    x[0] = 0.0  # with no bias, every window of image 0 is a tie at exactly zero
    inputs.x = x
    return inputs


def _nan_inside(inputs):
    # Interior positions: the oracle and the kernels then multiply NaN by the same taps.
    return _with_special(inputs, float("nan"), [(0, 1, 1, 2, 2), (1, 3, 1, 1, 3)])


BACKWARD_SPECIALS = {
    "zero-and-tiny-multiplier": (Case(in_channels=8, out_channels=6), _zero_and_tiny_multiplier),
    "zero-output": (Case(in_channels=8, out_channels=6, bias=False), _zero_first_image),
    "nan-output": (Case(in_channels=8, out_channels=6), _nan_inside),
    "slope-0": (Case(in_channels=8, out_channels=6, negative_slope=0.0), None),
    "slope-negative": (Case(in_channels=8, out_channels=6, negative_slope=-0.3), None),
}


# W = 5 and W = 8: the fast backwards copy their tiles in whole 16-byte rows where W allows it
# (the cuda backend: W % 4 == 0 for fp32 and W % 8 == 0 for half types), element by element else.
@pytest.mark.parametrize("width", [5, 8], ids=["w5", "w8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64],
                         ids=["float32", "float16", "float64"])
@pytest.mark.parametrize("special", list(BACKWARD_SPECIALS), ids=list(BACKWARD_SPECIALS))
def test_backward_where_output_does_not_settle_gradient(backend_name, device, generator,
                                                        special, dtype, width):
    case, modify = BACKWARD_SPECIALS[special]
    case = Case(**{**case.__dict__, "spatial": (*case.spatial[:2], width)})
    inputs = make_inputs(case, dtype, device, generator)
    if modify is not None:
        inputs = modify(inputs)
    check_against_oracle(backend_name, inputs, generator)
