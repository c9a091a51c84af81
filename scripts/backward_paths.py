"""The backward op with and without the saved output y, on the benchmark problem.

    python3 scripts/backward_paths.py [--backends cuda] [--dtypes float32,float32-ieee,bfloat16]

A backward that reads y (``saves_output`` backends) skips recomputing the conv at each winner.
For each backend and dtype (fp32 with TF32 allowed; ``float32-ieee``: with TF32 off), this
times the raw backward op given y and given ``y=None`` (CUDA events, L2 flushed before each
call, median of 50 after 5 warm-ups) and measures both results' normwise error against the
float64 oracle on the same winners.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

import fused3d
from fused3d import kernelbench
from fused3d.testing import oracle_gradients, relative_error


def median_ms(run, flush: torch.Tensor, reps: int = 50) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    generator = torch.Generator().manual_seed(0)
    init = kernelbench.get_init_inputs()
    reference = fused3d.Model(*init)
    rows = []
    for backend_name in args.backends.split(","):
        backend = fused3d.get_backend(backend_name)
        backend.load()
        ops = getattr(torch.ops, backend.namespace)
        for dtype_name in args.dtypes.split(","):
            ieee = dtype_name.endswith("-ieee")
            dtype = getattr(torch, dtype_name.removesuffix("-ieee"))
            x = torch.rand(kernelbench.get_inputs()[0].shape, generator=generator).to("cuda", dtype)
            weight = reference.conv_transpose.weight.detach().to("cuda", dtype)
            bias = reference.conv_transpose.bias.detach().to("cuda", dtype)
            multiplier = reference.multiplier.detach().to("cuda", dtype)
            config = ([2, 2, 2], [1, 1, 1], [1, 1, 1], 0.2, not ieee)
            y, window_index = ops.forward(x, weight, bias, multiplier, *config)
            grad_y = torch.randn(y.shape, generator=generator).to("cuda", dtype)
            expected = oracle_gradients(x, weight, bias, multiplier, *config[:4], grad_y,
                                        window_index, device="cuda")
            for label, saved in (("with y", y), ("y=None", None)):
                run = functools.partial(ops.backward, grad_y, saved, window_index, x, weight,
                                        bias, multiplier, *config, [True] * 4)
                grads = run()
                errors = [relative_error(got, want) for got, want in zip(grads, expected,
                                                                         strict=True)]
                rows.append((backend_name, dtype_name, label, median_ms(run, flush), errors))
            del expected
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'backend':8} {'dtype':12} {'backward':8} {'ms':>7}  error vs float64 "
          "(dx, dweight, dbias, dmultiplier)")
    for backend_name, dtype_name, label, ms, errors in rows:
        print(f"{backend_name:8} {dtype_name:12} {label:8} {ms:7.3f}  "
              + ", ".join(f"{e:.2e}" for e in errors))


if __name__ == "__main__":
    main()
