"""Where a training step's time goes: each kernel's GPU time, and the host's share.

    python3 scripts/step_kernels.py cuda [--batch 16] [--steps 60] [--precision tf32|fp32]

Runs the benchmark problem's training step (TF32 by default; fp32: IEEE, TF32 off) as the
benchmark does (gradients dropped and the L2 flushed before each step) and prints:
  * the step's event time (min / p10 / median / p90) under the torch profiler;
  * every kernel's GPU duration (CUPTI) over the steps: count, min, median, max;
  * a few synchronized steps split into forward and backward, GPU time (events) beside the
    host time of each call. When the host's time is the larger, the step is host-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fused3d
from fused3d import kernelbench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backend")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precision", choices=("tf32", "fp32"), default="tf32")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    torch.manual_seed(0)
    model = fused3d.FusedModel(*kernelbench.get_init_inputs(), backend=args.backend).cuda()
    x = torch.rand(args.batch, *kernelbench.get_inputs()[0].shape[1:], device="cuda")
    x.requires_grad_()
    leaves = [x, *model.parameters()]
    grad_y = torch.randn_like(model(x))
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def prepare() -> None:
        for leaf in leaves:
            leaf.grad = None
        flush.zero_()

    for _ in range(20):
        prepare()
        model(x).backward(grad_y)
    torch.cuda.synchronize()

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(args.steps)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for start, end in events:
            prepare()
            start.record()
            model(x).backward(grad_y)
            end.record()
        torch.cuda.synchronize()
    steps = sorted(start.elapsed_time(end) for start, end in events)
    n = len(steps)
    print(f"{args.backend} batch {args.batch}, step under the profiler: min {steps[0]:.3f} "
          f"p10 {steps[n // 10]:.3f} median {steps[n // 2]:.3f} p90 {steps[9 * n // 10]:.3f} ms")

    durations: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            durations.setdefault(event.name[:80], []).append(event.device_time_total)
    print(f"{'count':>6} {'min us':>8} {'median':>8} {'max':>8}  kernel (the 256 MiB fill is "
          "the L2 flush, outside the step)")
    for name, times in sorted(durations.items(), key=lambda item: -sum(item[1])):
        times.sort()
        print(f"{len(times):6d} {times[0]:8.1f} {statistics.median(times):8.1f} "
              f"{times[-1]:8.1f}  {name}")

    print("synchronized steps, sorted by GPU time (ms):")
    rows = []
    for _ in range(30):
        prepare()
        torch.cuda.synchronize()
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        host_start = time.perf_counter()
        start.record()
        y = model(x)
        middle.record()
        host_middle = time.perf_counter()
        y.backward(grad_y)
        end.record()
        host_end = time.perf_counter()
        torch.cuda.synchronize()
        rows.append((start.elapsed_time(middle), middle.elapsed_time(end),
                     (host_middle - host_start) * 1e3, (host_end - host_middle) * 1e3))
    rows.sort(key=lambda row: row[0] + row[1])
    for gpu_forward, gpu_backward, host_forward, host_backward in rows[::5]:
        print(f"  GPU forward {gpu_forward:.3f} backward {gpu_backward:.3f} | "
              f"host forward {host_forward:.3f} backward {host_backward:.3f}")


if __name__ == "__main__":
    main()
