"""Accuracy budget of every backend, in one table (used by the test suite and the benchmark).

Errors are measured against a float64 oracle. Exact paths (float64, IEEE float32) are checked
element-wise and tight; TF32 and half types normwise (``||out - ref|| / ||ref||``), since their
per-element error follows the operand rounding, not the result's size. A gradient element is
a sum, and where its terms cancel no order of summation gets closer than the accumulator's
rounding of their magnitudes: that much error is not counted (``CANCELLATION_FLOOR``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import POOL, WINDOW_SIZE


@dataclass(frozen=True)
class Tolerance:
    #: Normwise relative error allowed for the forward output.
    forward: float
    #: Normwise relative error allowed for each gradient.
    gradient: float
    #: Also compare element-wise with ``torch.testing.assert_close(rtol=elementwise, atol=...)``?
    elementwise: float | None = None


#: Precision classes: what the arithmetic is, not only the dtype.
FLOAT64, IEEE32, TF32, FLOAT16, BFLOAT16 = "float64", "ieee-fp32", "tf32", "float16", "bfloat16"

_DEFAULT = {
    FLOAT64: Tolerance(forward=1e-12, gradient=1e-12, elementwise=1e-10),
    # IEEE fp32: accumulation order differs from the oracle's; sums of up to ~10^3 terms.
    IEEE32: Tolerance(forward=2e-6, gradient=1e-5, elementwise=1e-4),
    # TF32 operands carry 10 mantissa bits: ~5e-4 relative each, partly cancelling in sums.
    # Gradients are channel sums over up to 10^7 terms that cancel: eager PyTorch's own cuDNN
    # TF32 result at the benchmark size (batch 1, H100, 2026-11-24) is 1.4e-2 off float64
    # in dbias and 5e-3 in dx/dweight, so the bound is set where eager PyTorch passes.
    TF32: Tolerance(forward=2e-3, gradient=2e-2),
    # Half types: fp32 accumulation, operands and output rounded to 11 / 8 significant bits.
    FLOAT16: Tolerance(forward=2e-3, gradient=5e-3),
    BFLOAT16: Tolerance(forward=1.5e-2, gradient=3e-2),
}

#: One row per backend; a backend absent here uses the default row. Loosen nothing to get green.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "reference": dict(_DEFAULT),
    "cuda": dict(_DEFAULT),
    "triton": dict(_DEFAULT),
    "cupy": dict(_DEFAULT),
}


def precision_class(dtype: torch.dtype, device_type: str, allow_tf32: bool) -> str:
    """Which row of the table a call falls in. TF32 exists only for fp32 on a GPU."""
    if dtype == torch.float64:
        return FLOAT64
    if dtype == torch.float16:
        return FLOAT16
    if dtype == torch.bfloat16:
        return BFLOAT16
    if dtype == torch.float32:
        return TF32 if (allow_tf32 and device_type == "cuda") else IEEE32
    raise TypeError(f"no tolerance for dtype {dtype}")


def tolerance_for(
    backend: str, dtype: torch.dtype, device_type: str, allow_tf32: bool
) -> Tolerance:
    """The tolerance a backend must meet for one call."""
    return TOLERANCES.get(backend, _DEFAULT)[precision_class(dtype, device_type, allow_tf32)]


def accumulation_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulator: float64 sums in float64, every other dtype in fp32."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


#: A sum whose terms cancel is known only to within its accumulator's rounding of the terms'
#: magnitudes, in any summation order: the float64 oracle itself was 1.2e-12 off the exact
#: dbias when 180 terms of total magnitude 85 summed to 3.0e-4 (one output channel). So each
#: gradient element's error is counted beyond ``CANCELLATION_FLOOR * unit * sum|terms|`` only.
#: The floor is far below every tolerance unless the sum cancels by >~10^4 (see
#: ``oracle_gradient_magnitudes``).
CANCELLATION_FLOOR = 16


def cancellation_floor(magnitudes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element, the error a sum of terms with these total ``magnitudes`` may carry in
    ``dtype``'s accumulator whatever its order (see ``CANCELLATION_FLOOR``); none where the
    magnitudes are not finite."""
    floor = CANCELLATION_FLOOR * accumulation_unit(dtype) * magnitudes
    return floor.nan_to_num(nan=0.0, posinf=0.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor,
                   floor: torch.Tensor | None = None) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are zero-sized or zero).

    Non-finite entries must match exactly (same positions, same infinities); they are then left
    out of the norm. A mismatch returns ``inf``. ``floor`` (same shape, optional) is a per-element
    error that is not counted: ``|actual - expected|`` is reduced by it, down to 0.
    """
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    same_nonfinite = torch.equal(torch.isnan(actual), torch.isnan(expected)) and torch.equal(
        actual[torch.isinf(expected)], expected[torch.isinf(expected)]
    )
    if not same_nonfinite or not torch.isfinite(actual[finite]).all():
        return float("inf")
    reference_norm = expected[finite].norm().item()
    difference = (actual[finite] - expected[finite]).abs()
    if floor is not None:
        difference = (difference - floor.detach().to("cpu", torch.float64)[finite]).clamp(min=0)
    error_norm = difference.norm().item()
    if reference_norm == 0.0:
        return error_norm
    return error_norm / reference_norm


# --------------------------------------------------------------------------- float64 oracle
# Eager PyTorch ops only: the oracle shares no code with any backend (the reference backend
# included). PyTorch's own max_pool3d picks each window's winner (first maximum, last NaN).


def activated(x, weight, bias, multiplier, stride, padding, output_padding, negative_slope):
    """leaky(m * leaky(conv_transpose3d(x))): the values the pool scans, in the inputs' dtype."""
    conv = F.conv_transpose3d(x, weight, bias, stride=stride, padding=padding,
                              output_padding=output_padding)
    return F.leaky_relu(F.leaky_relu(conv, negative_slope) * multiplier.reshape(-1, 1, 1, 1),
                        negative_slope)


def pool_with_window_index(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled values, uint8 window index ``dd*4 + dh*2 + dw``) from PyTorch's max_pool3d."""
    pooled, flat = F.max_pool3d(values, kernel_size=POOL, return_indices=True)
    height, width = values.shape[-2:]
    d, h, w = flat // (height * width), (flat // width) % height, flat % width
    return pooled, ((d % 2) * 4 + (h % 2) * 2 + (w % 2)).to(torch.uint8)


def window_values(values: torch.Tensor) -> torch.Tensor:
    """All 8 values of each pool window, shape (N, C, Dp, Hp, Wp, 8), in index order."""
    n, c, d, h, w = values.shape
    dp, hp, wp = d // POOL, h // POOL, w // POOL
    cropped = values[:, :, : dp * POOL, : hp * POOL, : wp * POOL]
    return (cropped.reshape(n, c, dp, POOL, hp, POOL, wp, POOL)
            .permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(n, c, dp, hp, wp, WINDOW_SIZE))


def chosen_values(values: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
    """Each pool window's value at its window index, shape (N, C, Dp, Hp, Wp)."""
    index = window_index.to(values.device, torch.long).unsqueeze(-1)
    return torch.gather(window_values(values), -1, index).squeeze(-1)


def _as64(tensor, device):
    return None if tensor is None else tensor.detach().to(device or tensor.device, torch.float64)


def oracle_conv(x, weight, bias, stride, padding, output_padding, *, device=None):
    """The float64 conv-transpose values (before the activations), on ``device``."""
    return F.conv_transpose3d(*(_as64(t, device) for t in (x, weight, bias)), stride=stride,
                              padding=padding, output_padding=output_padding)


def oracle_forward(x, weight, bias, multiplier, stride, padding, output_padding,
                   negative_slope, *, device=None):
    """float64 ``(y, window_index, activated values)``, computed on ``device`` (default: x's)."""
    values = activated(*(_as64(t, device) for t in (x, weight, bias, multiplier)),
                       stride, padding, output_padding, negative_slope)
    y, window_index = pool_with_window_index(values)
    return y, window_index, values


def oracle_gradients(x, weight, bias, multiplier, stride, padding, output_padding,
                     negative_slope, grad_y, window_index, *, device=None):
    """float64 (dx, dweight, dbias, dmultiplier), each window's gradient sent to
    ``window_index``; dbias is None without bias.

    Routing through a given index: where two values of a window are closer than an
    implementation's rounding, either may legitimately win, and the window's whole gradient
    moves with it. So implementations are judged on the winners they chose (and separately on
    those winners being maxima).
    """
    leaves = [None if t is None else _as64(t, device).requires_grad_()
              for t in (x, weight, bias, multiplier)]
    with torch.enable_grad():
        values = activated(*leaves, stride, padding, output_padding, negative_slope)
        picked = chosen_values(values, window_index)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(picked, wanted, _as64(grad_y, values.device)))
    return tuple(None if t is None else next(grads) for t in leaves)


def oracle_gradient_magnitudes(x, weight, bias, multiplier, stride, padding, output_padding,
                               negative_slope, grad_y, window_index, *, device=None):
    """float64 sum of the magnitudes of the terms behind each element of (dx, dweight, dbias,
    dmultiplier), routed as ``oracle_gradients``; dbias is None without bias.

    With dz the gradient at the conv output: dbias sums |dz|, dweight |x| |dz|, dx |w| |dz|, and
    dmultiplier |grad at the multiplied value * first LeakyReLU|. Each is >= the magnitude of its
    gradient, equal when no terms cancel; ``cancellation_floor`` turns it into a rounding bound.
    """
    x64, weight64, bias64, multiplier64 = (_as64(t, device) for t in
                                           (x, weight, bias, multiplier))
    with torch.enable_grad():
        conv = F.conv_transpose3d(x64, weight64, bias64, stride=stride, padding=padding,
                                  output_padding=output_padding).detach().requires_grad_()
        # One multiplier per conv element, so its gradient holds the terms, not their sum.
        spread = torch.broadcast_to(multiplier64, conv.shape).clone().requires_grad_()
        values = F.leaky_relu(F.leaky_relu(conv, negative_slope) * spread, negative_slope)
        picked = chosen_values(values, window_index)
        dz, multiplier_terms = torch.autograd.grad(picked, (conv, spread),
                                                   _as64(grad_y, values.device))
        # The conv's gradients are linear in (x, weight, dz): with all three made non-negative
        # they sum the terms' magnitudes.
        leaves = [t.abs().requires_grad_() for t in (x64, weight64)]
        leaves.append(None if bias64 is None else bias64.detach().requires_grad_())
        conv_abs = F.conv_transpose3d(*leaves, stride=stride, padding=padding,
                                      output_padding=output_padding)
        wanted = [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(conv_abs, wanted, dz.abs()))
    if bias64 is None:
        grads.append(None)
    return (*grads, multiplier_terms.abs().sum_to_size(multiplier64.shape))
