"""Timing: CUDA events around each run, L2 flushed before it (outside the timed region).

The benchmark input (16.8 MB) fits in the H100's 50 MB L2, so back-to-back runs would time the
cache: before every timed run a 256 MiB buffer is zeroed, evicting everything, and only then the
start event is recorded. The GPU runs the stream in order, so the flush is never inside the
events; the flush also gives the host time to queue the run, as in a training loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TimingPlan:
    """How long to time one point: warm-up calls, then reps filling ``target_s`` within bounds."""

    warmup: int
    min_reps: int
    max_reps: int
    target_s: float


@dataclass(frozen=True)
class Stats:
    """Milliseconds per run over ``reps`` timed runs."""

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    reps: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Stats:
        ordered = sorted(samples_ms)
        return cls(
            median_ms=quantile(ordered, 0.5),
            p10_ms=quantile(ordered, 0.1),
            p25_ms=quantile(ordered, 0.25),
            p75_ms=quantile(ordered, 0.75),
            p90_ms=quantile(ordered, 0.9),
            min_ms=ordered[0],
            mean_ms=sum(ordered) / len(ordered),
            reps=len(ordered),
        )


def quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Timer:
    """Times a callable on one device. On CUDA: events + L2 flush; on CPU: perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._flush_buffer = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if self.is_cuda else None
        )

    @property
    def flush_mib(self) -> int:
        return L2_FLUSH_BYTES // 2**20 if self.is_cuda else 0

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()

    def measure(self, run: Callable[[], object], prepare: Callable[[], object],
                plan: TimingPlan) -> Stats:
        """Warm up, size the rep count from a short estimate, then time each rep alone.

        ``prepare`` runs before each rep outside the timed region (e.g. dropping .grad).
        """
        for _ in range(plan.warmup):
            prepare()
            run()
        self.synchronize()
        reps = plan.min_reps
        if plan.max_reps > plan.min_reps:
            estimate_reps = 3
            started = time.perf_counter()
            for _ in range(estimate_reps):
                prepare()
                self.flush()
                run()
            self.synchronize()
            per_run_s = max((time.perf_counter() - started) / estimate_reps, 1e-6)
            reps = int(min(plan.max_reps, max(plan.min_reps, plan.target_s / per_run_s)))
        return Stats.of(self._timed(run, prepare, reps))

    def _timed(self, run: Callable[[], object], prepare: Callable[[], object],
               reps: int) -> list[float]:
        if not self.is_cuda:
            samples = []
            for _ in range(reps):
                prepare()
                started = time.perf_counter()
                run()
                samples.append((time.perf_counter() - started) * 1e3)
            return samples
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            prepare()
            self.flush()
            start.record()
            run()
            end.record()
        self.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]

    def peak_extra_mib(self, run: Callable[[], object], prepare: Callable[[], object],
                       resident_bytes: int) -> float | None:
        """Peak memory of one run over ``resident_bytes`` (what was allocated before the
        implementation was built: inputs, grad_y, the flush buffer). Anything the
        implementation keeps (caches, CUDA-graph pools) therefore counts. None on CPU."""
        if not self.is_cuda:
            return None
        prepare()
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        self.synchronize()
        return (torch.cuda.max_memory_allocated(self.device) - resident_bytes) / 2**20
