"""Two backends' TF32 forwards compared bit for bit, and cupy's TMA / cp.async copies.

    python3 scripts/forward_bitwise.py [--backends cupy,cuda]

The cupy and cuda wgmma forwards are one algorithm in two toolchains, so their y and window
index must agree exactly (the suite only bounds each against float64). For each shape (the
benchmark's, odd channel counts and sizes) with x 16-byte aligned and with x misaligned by
4 bytes (which takes cupy's cp.async copies instead of TMA), prints whether y and the index are
equal, whether cupy's two copy paths agree, and each backend's error against float64.
"""

from __future__ import annotations

import argparse

import torch

import fused3d
from fused3d.testing import oracle_forward, relative_error

CONFIG = ([2, 2, 2], [1, 1, 1], [1, 1, 1], 0.2)
#: (N, C_in, C_out, D, H, W)
SHAPES = [(16, 16, 32, 16, 32, 32), (2, 8, 32, 5, 12, 40), (1, 3, 7, 3, 9, 33),
          (2, 16, 40, 4, 8, 36), (1, 12, 64, 2, 17, 64), (3, 5, 33, 2, 3, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cupy,cuda")
    args = parser.parse_args()
    first_name, second_name = args.backends.split(",")
    ops = []
    for name in (first_name, second_name):
        backend = fused3d.get_backend(name)
        backend.load()
        ops.append(getattr(torch.ops, backend.namespace).forward)
    cupy_ops = None
    if "cupy" in (first_name, second_name):
        import fused3d_cupy._ops as cupy_ops
        print("cupy wgmma forward:", "; ".join(cupy_ops.wgmma_forward_reasons(0)) or "used")
    generator = torch.Generator().manual_seed(1)
    print(f"{'shape (N, C_in, C_out, D, H, W)':34} {'x':9} {'y equal':7} {'index':5} "
          f"{'cupy TMA = cp.async':19} errors vs float64")
    for n, c_in, c_out, d, h, w in SHAPES:
        x = torch.randn(n, c_in, d, h, w, generator=generator).cuda()
        weight = (torch.randn(c_in, c_out, 3, 3, 3, generator=generator) * 0.2).cuda()
        bias = torch.randn(c_out, generator=generator).cuda()
        multiplier = torch.randn(c_out, 1, 1, 1, generator=generator).cuda()
        expected, _, _ = oracle_forward(x, weight, bias, multiplier, *CONFIG, device="cuda")
        for alignment in ("aligned", "+4 bytes"):
            if alignment != "aligned":
                x = torch.empty(x.numel() + 1, device="cuda")[1:].view(x.shape).copy_(x)
            (y1, i1), (y2, i2) = (op(x, weight, bias, multiplier, *CONFIG, True) for op in ops)
            paths = "-"
            if cupy_ops is not None:
                paths = str(_cupy_paths_agree(cupy_ops, x, weight, bias, multiplier))
            print(f"{(n, c_in, c_out, d, h, w)!s:34} {alignment:9} {torch.equal(y1, y2)!s:7} "
                  f"{torch.equal(i1, i2)!s:5} {paths:19} {relative_error(y1, expected):.2e} "
                  f"{relative_error(y2, expected):.2e}")


def _cupy_paths_agree(cupy_ops, x, weight, bias, multiplier) -> bool | None:
    """cupy's forward with its TMA copies (where x allows them) against cp.async copies."""
    ops = torch.ops.fused3d_cupy.forward
    y1, i1 = ops(x, weight, bias, multiplier, *CONFIG, True)
    plans = [p for p in cupy_ops._forward_plans.values()
             if p.shape == tuple(y1.shape) and p.x_map is not None]
    if not plans:
        return None
    x_map = plans[-1].x_map
    usable, x_map.usable, x_map._last = x_map.usable, False, (None, 0, b"")
    try:
        y2, i2 = ops(x, weight, bias, multiplier, *CONFIG, True)
    finally:
        x_map.usable, x_map._last = usable, (None, 0, b"")
    return torch.equal(y1, y2) and torch.equal(i1, i2)


if __name__ == "__main__":
    main()
