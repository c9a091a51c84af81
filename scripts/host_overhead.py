"""Where a call's time goes: host enqueue time against GPU kernel time, per backend.

    python3 scripts/host_overhead.py [--backends cuda,cupy,triton] [--batches 1,16]

For each backend (and eager fused3d.Model) and mode, with TF32 allowed:
  event_ms   CUDA events around the call, L2 flushed before it (what the benchmark reports);
  host_ms    wall time for the host to return from the call (no synchronize);
  kernel_ms  sum of the GPU kernel durations of one call (torch.profiler).
When event_ms is close to host_ms and well above kernel_ms, the host bounds the call.
An H100 run of it is in plots/host_overhead_h100.txt.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fused3d
from fused3d import kernelbench


def make(backend: str | None, batch: int):
    init = kernelbench.get_init_inputs()
    model = (fused3d.Model(*init) if backend is None else
             fused3d.FusedModel(*init, backend=backend)).cuda()
    x = torch.rand(batch, *kernelbench.get_inputs()[0].shape[1:], device="cuda")
    with torch.no_grad():
        grad_y = torch.randn_like(model(x))
    x.requires_grad_(True)

    def forward():
        with torch.no_grad():
            model(x)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(grad_y)

    return {"forward": forward, "forward+backward": step}


def measure(run, reps: int, flush: torch.Tensor) -> tuple[float, float, float]:
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    events, host = [], []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        run()
        host.append((time.perf_counter() - began) * 1e3)
        end.record()
        events.append((start, end))
        torch.cuda.synchronize()  # one call in flight: host time is not hidden by a queue
    event_ms = statistics.median(s.elapsed_time(e) for s, e in events)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return event_ms, statistics.median(host), kernel_us / 10 / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,cupy,triton")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--cprofile", default=None, metavar="BACKEND",
                        help="also print cProfile's top entries for 200 training steps at batch 1")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    available = {status.name for status in fused3d.available_backends() if status.available}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for backend in [None, *args.backends.split(",")]:
            if backend is not None and backend not in available:
                print(f"{backend}: not available")
                continue
            for mode, run in make(backend, batch).items():
                rows.append((backend or "eager", batch, mode, *measure(run, args.reps, flush)))
    if args.cprofile:
        import cProfile
        import pstats

        step = make(args.cprofile, 1)["forward+backward"]
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    print(f"\n{'impl':8} {'batch':>5} {'mode':17} {'event_ms':>9} {'host_ms':>8} {'kernel_ms':>9}")
    for impl, batch, mode, event_ms, host_ms, kernel_ms in rows:
        print(f"{impl:8} {batch:5d} {mode:17} {event_ms:9.3f} {host_ms:8.3f} {kernel_ms:9.3f}")


if __name__ == "__main__":
    main()
