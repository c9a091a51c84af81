"""The cuda backend's dweight on warpgroup MMA (parity_backward_wgmma.cu) against its mma.sync
kernel, on the H100 (a Hopper build: sm_90a with FUSED3D_WGMMA).

    python3 scripts/wgmma_backward.py [--reps 50]

FUSED3D_CUDA_WGMMA_BACKWARD=0 selects the mma.sync kernel; it is read at every backward call,
so both kernels run in this one process. For several shapes (the benchmark problem, odd sizes,
channel counts below the padded 16 / 32, a W the bulk copies cannot take) it checks:
  * dweight of either kernel against the float64 oracle on the same winners (normwise error),
    and that dx, dbias and dmultiplier are bitwise the same with either (only dweight moves);
  * the wgmma kernel run twice gives bitwise the same dweight (deterministic);
  * the wgmma kernel ran (torch profiler) exactly where W % 4 == 0.
Then it times the raw backward op on the benchmark problem, the two kernels alternated in
three rounds (CUDA events, L2 flushed before each call, median of --reps after warm-up).
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
from backward_paths import median_ms  # this folder: CUDA events, L2 flushed, median

import fused3d
from fused3d import kernelbench
from fused3d.testing import oracle_gradients, relative_error

SWITCH = "FUSED3D_CUDA_WGMMA_BACKWARD"

# (batch, C_in, C_out, (D, H, W)); W % 4 == 0 except the last (which takes the mma.sync kernel
# either way: its rows are not 16-byte aligned for the bulk copies).
SHAPES = [
    (16, 16, 32, (16, 32, 32)),
    (2, 3, 5, (5, 7, 8)),
    (3, 8, 32, (4, 9, 36)),
    (1, 16, 17, (3, 10, 40)),
    (5, 13, 32, (2, 17, 12)),
    (2, 16, 32, (3, 5, 6)),
]


def with_switch(value: str, run):
    previous = os.environ.get(SWITCH)
    os.environ[SWITCH] = value
    try:
        return run()
    finally:
        if previous is None:
            del os.environ[SWITCH]
        else:
            os.environ[SWITCH] = previous


def problem(batch, c_in, c_out, size, generator):
    x = torch.rand(batch, c_in, *size, generator=generator).cuda()
    weight = (torch.randn(c_in, c_out, 3, 3, 3, generator=generator) * 0.1).cuda()
    bias = (torch.randn(c_out, generator=generator) * 0.1).cuda()
    multiplier = torch.randn(c_out, 1, 1, 1, generator=generator).cuda()
    return x, weight, bias, multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    backend = fused3d.get_backend("cuda")
    backend.load()
    ops = torch.ops.fused3d_cuda
    generator = torch.Generator().manual_seed(0)
    config = ([2, 2, 2], [1, 1, 1], [1, 1, 1], 0.2, True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':34} {'wgmma ran':>9} {'dW err wgmma':>12} {'dW err mma':>11} "
          f"{'others equal':>12} {'repeatable':>10}")
    failures = 0
    for batch, c_in, c_out, size in SHAPES:
        x, weight, bias, multiplier = problem(batch, c_in, c_out, size, generator)
        y, window_index = ops.forward(x, weight, bias, multiplier, *config)
        grad_y = torch.randn(y.shape, generator=generator).cuda()

        run = functools.partial(ops.backward, grad_y, y, window_index, x, weight, bias,
                                multiplier, *config, [True] * 4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with_switch("1", run)
            torch.cuda.synchronize()
        used = any("wgmma" in event.name for event in prof.events()
                   if event.device_type == torch.autograd.DeviceType.CUDA)
        wgmma, again = with_switch("1", run), with_switch("1", run)
        mma = with_switch("0", run)
        expected = oracle_gradients(x, weight, bias, multiplier, *config[:4], grad_y,
                                    window_index, device="cuda")
        error_wgmma = relative_error(wgmma[1], expected[1])
        error_mma = relative_error(mma[1], expected[1])
        others = all(torch.equal(wgmma[i], mma[i]) for i in (0, 2, 3))  # dx, dbias, dmultiplier
        repeatable = torch.equal(wgmma[1], again[1])
        ok = (others and repeatable and error_wgmma <= 2 * max(error_mma, 1e-4)
              and used == (size[2] % 4 == 0))
        failures += not ok
        label = f"N{batch} Cin{c_in} Cout{c_out} {'x'.join(map(str, size))}"
        print(f"{label:34} {used!s:>9} {error_wgmma:12.2e} {error_mma:11.2e} {others!s:>12} "
              f"{repeatable!s:>10}{'' if ok else '  FAIL'}")

    # timings on the benchmark problem
    flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    x = torch.rand(kernelbench.get_inputs()[0].shape, generator=generator).cuda()
    init = fused3d.Model(*kernelbench.get_init_inputs())
    weight = init.conv_transpose.weight.detach().cuda()
    bias = init.conv_transpose.bias.detach().cuda()
    multiplier = init.multiplier.detach().cuda()
    y, window_index = ops.forward(x, weight, bias, multiplier, *config)
    grad_y = torch.randn(y.shape, generator=generator).cuda()

    backward = functools.partial(ops.backward, grad_y, y, window_index, x, weight, bias,
                                 multiplier, *config, [True] * 4)

    print("raw backward op, benchmark problem (ms, median of", args.reps, "):")
    for round_index in range(3):
        times = {value: with_switch(value, lambda: median_ms(backward, flush, args.reps))
                 for value in ("1", "0")}
        print(f"  round {round_index}: wgmma dweight {times['1']:.4f}  "
              f"mma.sync dweight {times['0']:.4f}")
    print("FAILURES:", failures)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
