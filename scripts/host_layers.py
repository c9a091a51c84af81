"""Host time of one forward call, layer by layer: where a backend's per-call overhead goes.

    python3 scripts/host_layers.py [--backends cupy,cuda]

Batch 16, TF32. Each row: wall time per call, no synchronize (median of 5 batches of 400 calls
after warm-up), so it is the host's cost to enqueue, not GPU time:
  FusedModel (grad / no_grad)  the module as a user calls it;
  call_forward                 core's entry below the module (validation cached);
  op below autograd            the registered op, dispatched to the backend's kernel;
for cupy also its op body (forward_impl), the two output allocations and the bare launch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused3d
from fused3d import kernelbench
from fused3d.ops import call_forward


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        samples.append((time.perf_counter() - start) / (calls // 5) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cupy,cuda")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    init = kernelbench.get_init_inputs()
    x = torch.randn(kernelbench.get_inputs()[0].shape, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.backends.split(","):
        backend = fused3d.get_backend(name)
        backend.load()
        model = fused3d.FusedModel(*init, backend=name).cuda()
        weight = model.conv_transpose.weight.detach()
        bias = model.conv_transpose.bias.detach()
        multiplier = model.multiplier.detach()
        op_args = (x, weight, bias, multiplier, [2, 2, 2], [1, 1, 1], [1, 1, 1], 0.2, True)
        op = getattr(torch.ops, backend.namespace).forward.default

        def below_autograd(op=op, op_args=op_args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*op_args)

        def no_grad(model=model):
            with torch.no_grad():
                return model(x)

        rows = [("FusedModel, grad", per_call_us(lambda model=model: model(x), 500)),
                ("FusedModel, no_grad", per_call_us(no_grad)),
                ("call_forward", per_call_us(
                    lambda ns=backend.namespace, a=op_args: call_forward(ns, *a))),
                ("op below autograd", per_call_us(below_autograd))]
        if name == "cupy":
            rows += _cupy_layers(op_args)
        for label, us in rows:
            print(f"{name:6} {label:28} {us:7.1f} us")


def _cupy_layers(op_args) -> list[tuple[str, float]]:
    import fused3d_cupy._ops as cupy_ops

    rows = [("forward_impl", per_call_us(lambda: cupy_ops.forward_impl(*op_args)))]
    plan = next(p for p in cupy_ops._forward_plans.values() if p.kernel is not None)
    x, weight, bias, multiplier = op_args[:4]
    y = torch.empty(plan.shape, device="cuda")
    index = torch.empty(plan.shape, dtype=torch.uint8, device="cuda")
    stream = cupy_ops._raw_stream(x.device.index)
    tail = plan.tail if plan.x_map is None else (*plan.tail, *plan.x_map.arguments(x.data_ptr()))
    launch_args = (x.data_ptr(), weight.data_ptr(), bias.data_ptr(), multiplier.data_ptr(),
                   y.data_ptr(), index.data_ptr(), *plan.head, *tail)
    rows.append(("  two torch.empty", per_call_us(lambda: (
        torch.empty(plan.shape, device="cuda"),
        torch.empty(plan.shape, dtype=torch.uint8, device="cuda")))))
    rows.append(("  kernel launch", per_call_us(lambda: plan.kernel.launch(
        plan.grid, plan.block, stream, launch_args, shared_mem=plan.shared))))
    return rows


if __name__ == "__main__":
    main()
