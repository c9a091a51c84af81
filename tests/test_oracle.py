"""The judge itself: the float64 oracle's term magnitudes and the error metric's floor.

These run on the CPU for every backend session (no backend is called).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fused3d.testing import (
    cancellation_floor,
    oracle_forward,
    oracle_gradient_magnitudes,
    oracle_gradients,
    relative_error,
    window_values,
)

from checks import Case, make_inputs, random_like_output


def _term_magnitudes_by_loops(x, weight, bias, multiplier, stride, padding, output_padding,
                              slope, grad_y, window_index):
    """Sum of |term| for every gradient element, one term at a time (slow, independent)."""
    conv = F.conv_transpose3d(x, weight, bias, stride=stride, padding=padding,
                              output_padding=output_padding)
    first = F.leaky_relu(conv, slope)
    scaled = first * multiplier.reshape(-1, 1, 1, 1)
    # Routed upstream gradient at each conv element: grad_y at its window's winner, else 0.
    routed = torch.zeros_like(window_values(conv))
    routed.scatter_(-1, window_index.long().unsqueeze(-1), grad_y.unsqueeze(-1))
    n, c, d, h, w = conv.shape
    pooled = routed.reshape(n, c, d // 2, h // 2, w // 2, 2, 2, 2)
    routed = pooled.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(n, c, d // 2 * 2, h // 2 * 2,
                                                            w // 2 * 2)
    routed = F.pad(routed, (0, w % 2, 0, h % 2, 0, d % 2))

    def slope_at(value):
        return torch.where(value > 0, torch.ones_like(value), torch.full_like(value, slope))

    after_multiply = routed * slope_at(scaled)
    dz = after_multiply * multiplier.reshape(-1, 1, 1, 1) * slope_at(conv)
    multiplier_terms = (after_multiply * first).abs().sum_to_size(multiplier.shape)

    dx, dweight = torch.zeros_like(x), torch.zeros_like(weight)
    taps = itertools.product(*(range(k) for k in weight.shape[2:]))
    for kd, kh, kw in taps:
        for position in itertools.product(*(range(s) for s in x.shape[2:])):
            out = [i * s - p + k for i, s, p, k in
                   zip(position, stride, padding, (kd, kh, kw), strict=True)]
            if not all(0 <= o < size for o, size in zip(out, (d, h, w), strict=True)):
                continue
            magnitude = dz[:, :, out[0], out[1], out[2]].abs()          # (N, C_out)
            x_here = x[:, :, position[0], position[1], position[2]].abs()  # (N, C_in)
            dx[:, :, position[0], position[1], position[2]] += (
                magnitude @ weight[:, :, kd, kh, kw].abs().T)
            dweight[:, :, kd, kh, kw] += x_here.T @ magnitude
    dbias = None if bias is None else dz.abs().sum(dim=(0, 2, 3, 4))
    return dx, dweight, dbias, multiplier_terms


@pytest.mark.parametrize("case", [Case(batch=2, in_channels=2, out_channels=3, spatial=(2, 3, 2)),
                                  Case(kernel_size=(3, 2, 1), stride=(2, 1, 3),
                                       padding=(1, 0, 0), output_padding=(1, 0, 2), batch=2,
                                       in_channels=2, out_channels=2, spatial=(3, 4, 2),
                                       bias=False, multiplier_shape="scalar")],
                         ids=["parity", "general-no-bias-scalar-multiplier"])
def test_gradient_magnitudes_sum_each_terms_magnitude(generator, case):
    inputs = make_inputs(case, torch.float64, "cpu", generator)
    args = (*inputs.tensors(), *case.op_args(), case.negative_slope)
    y, window_index, _ = oracle_forward(*args)
    grad_y = random_like_output(y, generator)
    got = oracle_gradient_magnitudes(*args, grad_y, window_index)
    want = _term_magnitudes_by_loops(*args, grad_y, window_index)
    gradients = oracle_gradients(*args, grad_y, window_index)
    for name, magnitude, expected, gradient in zip(("dx", "dweight", "dbias", "dmultiplier"),
                                                   got, want, gradients, strict=True):
        if expected is None:
            assert magnitude is None and gradient is None, name
            continue
        torch.testing.assert_close(magnitude, expected, rtol=1e-12, atol=0, msg=name)
        # |sum| <= sum of |terms|, equal only without cancellation (random data cancels).
        assert (gradient.abs() <= magnitude * (1 + 1e-12)).all(), name
        assert (gradient.abs() < magnitude * (1 - 1e-6)).any(), name


def test_relative_error_counts_only_beyond_the_floor():
    expected = torch.tensor([3e-4, 2.0, -1.0], dtype=torch.float64)
    magnitudes = torch.tensor([85.0, 2.0, 1.0], dtype=torch.float64)
    floor = cancellation_floor(magnitudes, torch.float64)      # 16 * 2^-53 * 85 = 1.5e-13
    within = expected + torch.tensor([1.4e-13, 0.0, 0.0], dtype=torch.float64)
    assert relative_error(within, expected, floor) == 0.0
    assert relative_error(within, expected) > 0.0               # no floor: counted
    beyond = expected + torch.tensor([1e-9, 0.0, 0.0], dtype=torch.float64)
    excess = 1e-9 - float(floor[0])
    assert relative_error(beyond, expected, floor) == pytest.approx(excess / 5 ** 0.5, rel=1e-9)
    # The float32 accumulator's floor is 2^29 times wider, not a license for wrong answers.
    assert cancellation_floor(magnitudes, torch.float32)[1] == pytest.approx(2.0 * 16 * 2**-24)
    nonfinite = cancellation_floor(torch.tensor([float("inf"), float("nan")]), torch.float64)
    assert (nonfinite == 0).all()
