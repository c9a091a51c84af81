"""Building inputs, running the backend under test with poisoned outputs, and judging results."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

import fused3d
from fused3d.config import BlockConfig
from fused3d.testing import (
    cancellation_floor,
    chosen_values,
    oracle_conv,
    oracle_forward,
    oracle_gradient_magnitudes,
    oracle_gradients,
    relative_error,
    tolerance_for,
    window_values,
)


@dataclass(frozen=True)
class Case:
    """One call of the block: the configuration and the sizes."""

    kernel_size: object = 3
    stride: object = 2
    padding: object = 1
    output_padding: object = 1
    spatial: tuple = (3, 4, 5)
    batch: int = 2
    in_channels: int = 3
    out_channels: int = 5
    bias: bool = True
    multiplier_shape: str = "channel"  # "channel": (C,1,1,1); "scalar": (1,1,1,1)
    negative_multiplier: bool = False
    negative_slope: float = 0.2

    def config(self) -> BlockConfig:
        return BlockConfig.from_args(self.kernel_size, self.stride, self.padding,
                                     self.output_padding, self.negative_slope)

    def op_args(self):
        c = self.config()
        return c.stride, c.padding, c.output_padding

    def label(self) -> str:
        def short(triple):
            return str(triple[0]) if len(set(triple)) == 1 else "".join(map(str, triple))

        c = self.config()
        return (f"k{short(c.kernel_size)}s{short(c.stride)}p{short(c.padding)}"
                f"op{short(c.output_padding)}-n{self.batch}c{self.in_channels}x{self.out_channels}"
                f"-{'x'.join(map(str, self.spatial))}{'-bias' if self.bias else ''}"
                f"-{self.multiplier_shape}")


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    multiplier: torch.Tensor
    case: Case = field(repr=False)

    def tensors(self):
        return self.x, self.weight, self.bias, self.multiplier


def make_inputs(case: Case, dtype, device, generator: torch.Generator) -> Inputs:
    """Random inputs (never zeros) in ``dtype`` on ``device``; multiplier sign from the case."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)

    config = case.config()
    fan_in = case.in_channels * max(1, int(torch.tensor(config.kernel_size).prod()))
    x = rand(case.batch, case.in_channels, *case.spatial)
    weight = rand(case.in_channels, case.out_channels, *config.kernel_size,
                  scale=fan_in ** -0.5)
    bias = rand(case.out_channels, scale=0.3) if case.bias else None
    channels = case.out_channels if case.multiplier_shape == "channel" else 1
    multiplier = rand(channels, 1, 1, 1).abs() + 0.25
    if case.negative_multiplier:
        multiplier = -multiplier
    elif channels > 1:
        multiplier[::3] = -multiplier[::3]  # mixed signs exercise both monotone directions
    cast = [None if t is None else t.to(device=device, dtype=dtype)
            for t in (x, weight, bias, multiplier)]
    return Inputs(*cast, case=case)


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty while active is filled: NaN for floats, the max value for integers.

    So an output element a kernel forgot to write shows up as NaN (or window index 255).
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def run_backend(backend_name: str, inputs: Inputs, grad_y=None, allow_tf32: bool = True):
    """(y, window_index, grads) from the backend under test, with poisoned allocations.

    ``grads`` is (dx, dweight, dbias, dmultiplier) when ``grad_y`` is given, else None.
    ``grad_y`` may also be a function of the forward's window index returning the gradient.
    """
    case = inputs.case
    leaves = [None if t is None else t.detach().clone().requires_grad_(grad_y is not None)
              for t in inputs.tensors()]
    torch.backends.cudnn.allow_tf32 = allow_tf32
    with poisoned_allocations():
        y, window_index = fused3d.fused_block_with_index(
            *leaves, *case.op_args(), case.negative_slope, backend=backend_name
        )
        grads = None
        if callable(grad_y):
            grad_y = grad_y(window_index)
        if grad_y is not None:
            wanted = [t for t in leaves if t is not None]
            computed = iter(torch.autograd.grad(y, wanted, grad_y))
            grads = tuple(next(computed) if t is not None else None for t in leaves)
    return y.detach(), window_index, grads


def random_like_output(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)


def max_abs(tensor: torch.Tensor) -> float:
    """Largest finite magnitude, 1.0 for an empty (or all non-finite) tensor."""
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.abs().max()) if finite.numel() else 1.0


def unambiguous(values64: torch.Tensor, threshold: float) -> torch.Tensor:
    """Windows whose best value beats every other by more than ``threshold`` (NaN-free)."""
    windows = window_values(values64)
    top2 = windows.topk(2, dim=-1).values
    finite = torch.isfinite(windows).all(dim=-1)
    return finite & ((top2[..., 0] - top2[..., 1]) > threshold)


def off_kink(conv64: torch.Tensor, window_index: torch.Tensor, threshold: float) -> torch.Tensor:
    """Windows whose chosen conv value lies farther than ``threshold`` from zero.

    At the LeakyReLUs' kink the derivative jumps (slope 1 vs negative_slope). Where the float64
    conv value of a winner is within an implementation's rounding of zero, the implementation
    may land on either side, and both gradients are right; such windows cannot be judged.
    """
    # (An out-of-range index is reported by the caller's own check, not here.)
    return chosen_values(conv64, window_index.clamp(max=7)).abs() > threshold


def check_against_oracle(backend_name: str, inputs: Inputs, generator: torch.Generator,
                         allow_tf32: bool = True, gradients: bool = True,
                         oracle_device: torch.device | str = "cpu",
                         absolute_floor: float = 0.0) -> None:
    """The heart of the suite: forward, window index and the four gradients vs float64
    (computed on ``oracle_device``: the CPU, or the GPU for problems too large for it).

    ``absolute_floor``: an error per forward value that is not counted, for arithmetic whose
    rounding is absolute, not relative (subnormal results are multiples of 2^-149); it also
    widens the margins within which a window's winner or a kink is ambiguous.
    """
    case = inputs.case
    stride, padding, output_padding = case.op_args()
    args = (*inputs.tensors(), stride, padding, output_padding, case.negative_slope)
    y64, index64, values64 = oracle_forward(*args, device=oracle_device)
    probe = torch.empty(y64.shape, dtype=inputs.x.dtype, device=inputs.x.device)
    tol = tolerance_for(backend_name, inputs.x.dtype, inputs.x.device.type, allow_tf32)
    grad_y = random_like_output(probe, generator) if gradients else None
    conv64 = oracle_conv(*inputs.tensors()[:3], stride, padding, output_padding,
                         device=oracle_device)

    def grad_off_kink(window_index):
        # No gradient for windows whose winner sits at the kink within rounding (see off_kink);
        # the rest (nearly all) are judged against float64. The oracle uses this grad_y too.
        nonlocal grad_y
        keep = off_kink(conv64, window_index, tol.forward * max_abs(conv64) + absolute_floor)
        grad_y = grad_y * keep.to(grad_y.device, grad_y.dtype)
        return grad_y

    y, window_index, grads = run_backend(backend_name, inputs,
                                         grad_off_kink if gradients else None, allow_tf32)

    assert y.shape == y64.shape and y.dtype == inputs.x.dtype, (y.shape, y.dtype)
    assert window_index.dtype == torch.uint8 and window_index.shape == y64.shape
    assert window_index.device == inputs.x.device and y.device == inputs.x.device
    index = window_index.to(y64.device)
    assert index.numel() == 0 or int(index.max()) < 8, "window index out of range (unwritten?)"

    # The winner: exactly PyTorch's where the margin exceeds rounding; a maximum otherwise.
    scale = max_abs(values64)
    exact = tol.elementwise is not None and inputs.x.dtype == torch.float64
    threshold = 0.0 if exact else 50 * tol.forward * scale + 2 * absolute_floor
    sure = unambiguous(values64, threshold) if not exact else torch.ones_like(index, dtype=bool)
    mismatched = (index != index64) & sure
    assert not mismatched.any(), (
        f"{int(mismatched.sum())} of {index.numel()} windows disagree with PyTorch's winner "
        f"(first at {mismatched.nonzero()[0].tolist()})"
    )
    chosen = chosen_values(values64, index)
    finite = torch.isfinite(y64)
    assert (chosen[finite] >= y64[finite] - threshold - 1e-12 * scale).all(), (
        "a window's chosen position is not a maximum"
    )

    error = relative_error(y, y64, torch.full_like(y64, absolute_floor) if absolute_floor else None)
    assert error <= tol.forward, f"forward relative error {error:.3g} > {tol.forward:.3g}"
    if tol.elementwise is not None:
        torch.testing.assert_close(y.to(y64.device, torch.float64), y64, rtol=tol.elementwise,
                                   atol=tol.elementwise * scale + absolute_floor, equal_nan=True)
    if not gradients:
        return

    expected = oracle_gradients(*args, grad_y, window_index, device=oracle_device)
    magnitudes = oracle_gradient_magnitudes(*args, grad_y, window_index, device=oracle_device)
    for name, got, want, magnitude in zip(("dx", "dweight", "dbias", "dmultiplier"), grads,
                                          expected, magnitudes, strict=True):
        if want is None:
            assert got is None, f"{name} should be None"
            continue
        assert got.shape == want.shape and got.dtype == inputs.x.dtype, (name, got.shape)
        # Rounding a cancelling sum's terms is not an error (see fused3d.testing.
        # CANCELLATION_FLOOR); beyond that floor, errors count in full.
        floor = cancellation_floor(magnitude, inputs.x.dtype)
        error = relative_error(got, want, floor)
        assert error <= tol.gradient, (
            f"{name} relative error {error:.3g} > {tol.gradient:.3g}"
        )
        if tol.elementwise is not None:  # (non-finite entries already matched above)
            finite = torch.isfinite(want)
            excess = ((got.to(want.device, torch.float64) - want).abs() - floor)[finite]
            allowed = tol.elementwise * (want.abs() + max_abs(want))[finite]
            worst = int((excess - allowed).argmax()) if excess.numel() else 0
            assert excess.numel() == 0 or excess[worst] <= allowed[worst], (
                f"{name}: element error {float(excess[worst]):.3g} beyond the cancellation "
                f"floor > {float(allowed[worst]):.3g}"
            )
