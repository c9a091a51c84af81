"""Shapes of the block: the one place that says how big every tensor is.

The block is ConvTranspose3d -> LeakyReLU -> * multiplier -> LeakyReLU -> MaxPool3d(2).
Backends, the fake (meta) implementations, the tests and the benchmark all take their
sizes from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Triple = tuple[int, int, int]

#: The pool is fixed by the block: a 2x2x2 window with stride 2 (DESIGN section 3).
POOL = 2
#: Number of positions in one pool window; the window index is in ``range(WINDOW_SIZE)``.
WINDOW_SIZE = POOL**3
DEFAULT_NEGATIVE_SLOPE = 0.2


def as_triple(value: int | Sequence[int], name: str) -> Triple:
    """Normalise an int or a 3-sequence of ints to a 3-tuple, naming ``name`` in errors."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got bool {value!r}")
    if isinstance(value, int):
        return (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int or a sequence of 3 ints, got {type(value).__name__}"
        ) from None
    if len(items) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
    return items  # type: ignore[return-value]


def conv_output_size(size, kernel: int, stride: int, padding: int, output_padding: int):
    """ConvTranspose3d output length along one axis (works on ints and SymInts)."""
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def pooled_size(conv_size):
    """MaxPool3d(2) output length along one axis: floor(conv_size / 2)."""
    return conv_size // POOL


@dataclass(frozen=True)
class BlockConfig:
    """Static configuration of one call: everything that is not a tensor.

    ``kernel_size`` comes from the weight; the other fields from the call's arguments.
    Hashable, so it can key caches and autotuners.
    """

    kernel_size: Triple
    stride: Triple
    padding: Triple
    output_padding: Triple
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    @classmethod
    def from_args(
        cls,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> BlockConfig:
        """Build a config from user-style arguments (ints or 3-tuples), validating each."""
        config = cls(
            kernel_size=as_triple(kernel_size, "kernel_size"),
            stride=as_triple(stride, "stride"),
            padding=as_triple(padding, "padding"),
            output_padding=as_triple(output_padding, "output_padding"),
            negative_slope=_as_slope(negative_slope),
        )
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the argument if the configuration is outside the contract."""
        for axis in range(3):
            k, s, p, op = (
                self.kernel_size[axis],
                self.stride[axis],
                self.padding[axis],
                self.output_padding[axis],
            )
            if k < 1:
                raise ValueError(f"kernel_size must be >= 1 on every axis, got {self.kernel_size}")
            if s < 1:
                raise ValueError(f"stride must be >= 1 on every axis, got {self.stride}")
            if p < 0:
                raise ValueError(f"padding must be >= 0 on every axis, got {self.padding}")
            if op < 0 or op >= s:
                raise ValueError(
                    "output_padding must satisfy 0 <= output_padding < stride on every axis, "
                    f"got output_padding={self.output_padding} with stride={self.stride}"
                )

    def conv_shape(self, spatial: Sequence) -> tuple:
        """Spatial shape of the ConvTranspose3d output for input spatial shape ``spatial``."""
        return tuple(
            conv_output_size(
                spatial[a],
                self.kernel_size[a],
                self.stride[a],
                self.padding[a],
                self.output_padding[a],
            )
            for a in range(3)
        )

    def pooled_shape(self, spatial: Sequence) -> tuple:
        """Spatial shape of the block's output (after the 2x2x2 pool)."""
        return tuple(pooled_size(c) for c in self.conv_shape(spatial))

    def output_shape(self, x_shape: Sequence, out_channels) -> tuple:
        """Full output shape ``(N, C_out, Dp, Hp, Wp)`` for input shape ``x_shape``."""
        return (x_shape[0], out_channels, *self.pooled_shape(x_shape[2:]))

    @property
    def is_parity_fast_path(self) -> bool:
        """The benchmark configuration (kernel 3, stride 2, padding 1, output_padding 1).

        Its conv-transpose splits into 8 parity classes and each pool window holds exactly
        one output of each class, so pooled position m reads only inputs {m, m+1}^3.
        """
        return (
            self.kernel_size == (3, 3, 3)
            and self.stride == (2, 2, 2)
            and self.padding == (1, 1, 1)
            and self.output_padding == (1, 1, 1)
        )

    def as_op_args(self) -> tuple[list[int], list[int], list[int], float]:
        """The (stride, padding, output_padding, negative_slope) arguments of the custom ops."""
        return list(self.stride), list(self.padding), list(self.output_padding), self.negative_slope


def _as_slope(negative_slope: float) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    value = float(negative_slope)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")
    return value

