"""Run forward+backward steps of the benchmark problem on one backend, for a profiler.

    ncu --clock-control none --profile-from-start off -k regex:parity \
        python3 scripts/profile_step.py cuda --tf32 on

Warm-up steps (JIT builds, autotuning) run first; only the last step runs between
cudaProfilerStart and cudaProfilerStop, so `--profile-from-start off` profiles exactly one step.
"""

from __future__ import annotations

import argparse

import torch

import fused3d
from fused3d import kernelbench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("--tf32", choices=["on", "off"], default="on")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    dtype = getattr(torch, args.dtype)
    model = fused3d.FusedModel(*kernelbench.get_init_inputs(), backend=args.backend)
    model = model.to("cuda", dtype)
    x = kernelbench.get_inputs()[0].to("cuda", dtype).requires_grad_(not args.forward_only)

    def step() -> None:
        if args.forward_only:
            with torch.no_grad():
                model(x)
        else:
            model(x).sum().backward()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.backend}: {args.warmup} warm-up steps and 1 profiled step, {args.dtype}, "
          f"tf32 {args.tf32}")


if __name__ == "__main__":
    main()
