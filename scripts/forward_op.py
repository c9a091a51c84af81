"""The raw forward op of a backend on the benchmark problem, per precision.

    python3 scripts/forward_op.py [--backends cuda] [--precisions tf32,fp32,bf16]

Times ``<namespace>::forward`` called directly (no module, no validation, no autograd): CUDA
events, L2 flushed before each call, the best of three medians of 100 calls after 5 warm-ups,
and its normwise error against the float64 oracle. The kernel's own time, where the benchmark
(``python -m fused3d.bench``) times what a user calls.
"""

from __future__ import annotations

import argparse
import functools

import torch
from backward_paths import median_ms

import fused3d
from fused3d import kernelbench
from fused3d.testing import oracle_forward, relative_error

PRECISIONS = {"tf32": (torch.float32, True), "fp32": (torch.float32, False),
              "bf16": (torch.bfloat16, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda")
    parser.add_argument("--precisions", default="tf32,fp32,bf16")
    args = parser.parse_args()
    flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    generator = torch.Generator().manual_seed(0)
    reference = fused3d.Model(*kernelbench.get_init_inputs())
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'backend':8} {'precision':9} {'ms':>7}  (three medians)        error vs float64")
    for backend_name in args.backends.split(","):
        backend = fused3d.get_backend(backend_name)
        backend.load()
        ops = getattr(torch.ops, backend.namespace)
        for precision in args.precisions.split(","):
            dtype, allow_tf32 = PRECISIONS[precision]
            shape = kernelbench.get_inputs()[0].shape
            x = torch.randn(shape, generator=generator).to("cuda", dtype)
            weight = reference.conv_transpose.weight.detach().to("cuda", dtype)
            bias = reference.conv_transpose.bias.detach().to("cuda", dtype)
            multiplier = reference.multiplier.detach().to("cuda", dtype)
            config = ([2, 2, 2], [1, 1, 1], [1, 1, 1], 0.2)
            run = functools.partial(ops.forward, x, weight, bias, multiplier, *config, allow_tf32)
            y, _ = run()
            expected, _, _ = oracle_forward(x, weight, bias, multiplier, *config, device="cuda")
            error = relative_error(y, expected)
            medians = [median_ms(run, flush, reps=100) for _ in range(3)]
            print(f"{backend_name:8} {precision:9} {min(medians):7.4f}  "
                  f"({', '.join(f'{m:.4f}' for m in medians)})  {error:.2e}")


if __name__ == "__main__":
    main()
