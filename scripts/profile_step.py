"""Run a few forward+backward steps of the benchmark problem on one backend, for a profiler.

    ncu --clock-control none -k regex:parity python3 scripts/profile_step.py cuda --tf32 on

Prints nothing but the backend and the step count; the profiler does the measuring.
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
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    model = fused3d.FusedModel(*kernelbench.get_init_inputs(), backend=args.backend).cuda()
    x = kernelbench.get_inputs()[0].cuda().requires_grad_(not args.forward_only)
    for _ in range(args.steps):
        if args.forward_only:
            with torch.no_grad():
                model(x)
        else:
            model(x).sum().backward()
    torch.cuda.synchronize()
    print(f"{args.backend}: {args.steps} steps, tf32 {args.tf32}")


if __name__ == "__main__":
    main()
