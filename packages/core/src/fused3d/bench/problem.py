"""The benchmark problem, the precisions it is timed in, and the floors of DESIGN section 7."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Batch of the benchmark problem; the DESIGN floors and targets are stated at this batch.
BENCHMARK_BATCH = 16
#: Batch sweep of the full run (DESIGN section 10).
FULL_BATCHES = (1, 4, 16, 64)


@dataclass(frozen=True)
class Problem:
    """Everything but the batch: ``Model(*init_args)`` on ``torch.rand(batch, C_in, D, H, W)``."""

    in_channels: int = 16
    out_channels: int = 32
    spatial: tuple[int, int, int] = (16, 32, 32)
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1
    output_padding: int = 1

    @property
    def multiplier_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, 1, 1, 1)

    @property
    def init_args(self) -> tuple:
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                self.output_padding, self.multiplier_shape)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.in_channels, *self.spatial)

    @property
    def spatial_text(self) -> str:
        return "x".join(str(s) for s in self.spatial)

    @property
    def is_benchmark_size(self) -> bool:
        return self == Problem()


#: The problem of DESIGN section 1 (batch aside).
BENCHMARK_PROBLEM = Problem()
#: The CPU stand-in: same channels and configuration, 1/64 of the volume (interpreted Triton
#: and a 2-core machine must finish in about two minutes).
CPU_PROBLEM = Problem(spatial=(4, 8, 8))


@dataclass(frozen=True)
class Precision:
    """One arithmetic setting: the dtype and the TF32 switches (both set together)."""

    name: str
    dtype: torch.dtype
    allow_tf32: bool
    label: str

    def tf32_text(self, device_type: str) -> str:
        """``on``/``off`` for float32 on a GPU; ``n/a`` where TF32 does not exist."""
        if self.dtype != torch.float32 or device_type != "cuda":
            return "n/a"
        return "on" if self.allow_tf32 else "off"


PRECISIONS: dict[str, Precision] = {
    "tf32": Precision("tf32", torch.float32, True, "float32, TF32 on"),
    "fp32": Precision("fp32", torch.float32, False, "float32, TF32 off (IEEE)"),
    "bf16": Precision("bf16", torch.bfloat16, False, "bfloat16"),
}
#: TF32 is a GPU mode: on the CPU only the IEEE float32 and bfloat16 runs exist.
DEFAULT_PRECISIONS = {"cuda": ("tf32", "fp32", "bf16"), "cpu": ("fp32", "bf16")}


def set_tf32(enabled: bool) -> None:
    """Set cuDNN's and cuBLAS's TF32 switches together (the backends read cuDNN's)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


# Floors of the forward, DESIGN section 7, for the benchmark problem at BENCHMARK_BATCH on the
# lent H100: max(7.25 GFLOP / matmul ceiling, (16.8 MB in + 33.5 MB out) / copy ceiling).
# TF32: 7.25 GFLOP / 394 TFLOP/s = 18.4 us (bytes: 50.3 MB / 2.94 TB/s = 17.1 us).
# IEEE fp32: 7.25 GFLOP / 51 TFLOP/s = 142 us. Both scale linearly with batch and volume.
FORWARD_FLOOR_MS_AT_BENCHMARK_BATCH = {"tf32": 0.018, "fp32": 0.142}
FLOOR_DEVICE = "H100"


def forward_floor_ms(problem: Problem, precision: str, batch: int) -> float | None:
    """The forward floor for this size, or None where DESIGN states none (bf16, backward)."""
    floor = FORWARD_FLOOR_MS_AT_BENCHMARK_BATCH.get(precision)
    if floor is None:
        return None
    volume = problem.spatial[0] * problem.spatial[1] * problem.spatial[2]
    reference_volume = (BENCHMARK_PROBLEM.spatial[0] * BENCHMARK_PROBLEM.spatial[1]
                        * BENCHMARK_PROBLEM.spatial[2])
    channels = problem.in_channels * problem.out_channels
    reference_channels = BENCHMARK_PROBLEM.in_channels * BENCHMARK_PROBLEM.out_channels
    if channels != reference_channels or problem.kernel_size != BENCHMARK_PROBLEM.kernel_size:
        return None
    return floor * (batch / BENCHMARK_BATCH) * (volume / reference_volume)
