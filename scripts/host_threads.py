"""Host time of an eager training step, with and without autograd's device thread.

    python3 scripts/host_threads.py [--backends triton,cuda,cupy] [--batch 16]

PyTorch runs the backward of CUDA tensors on a per-device worker thread; ``loss.backward()``
hands the graph to it and waits. For each backend (batch 16, TF32 allowed), in one process:
  step         host time of ``model(x).backward(g)`` (no synchronize inside the loop)
  fwd          host time of the forward with autograd recording
  bwd          host time of ``y.backward(g)`` alone (outputs made beforehand)
  ... 1thread  the same with ``torch.autograd.set_multithreading_enabled(False)``: the
               backward runs on the calling thread (a global switch fused3d leaves to users)
  step no dx   the step with an input that needs no gradient (the usual training case)
Medians of 5 loops of 60 calls, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused3d
from fused3d import kernelbench


def host_us(call, setup=None, calls: int = 60, loops: int = 5) -> float:
    """Median over ``loops`` of the host time per call of ``calls`` calls in a row."""
    per_call = []
    for _ in range(loops):
        state = setup() if setup is not None else None
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(calls):
            if setup is not None:
                call(state, i)
            else:
                call()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def measure(backend: str, batch: int) -> dict[str, float]:
    model = fused3d.FusedModel(*kernelbench.get_init_inputs(), backend=backend).cuda()
    x = torch.rand(batch, *kernelbench.get_inputs()[0].shape[1:], device="cuda")
    x_grad = x.clone().requires_grad_()
    grad_y = torch.randn_like(model(x))
    for _ in range(5):  # compile, autotune, warm the allocator
        model(x_grad).backward(grad_y)
    torch.cuda.synchronize()

    def outputs():
        return [model(x_grad) for _ in range(60)]

    def step():
        model(x_grad).backward(grad_y)

    def backward_only(ys, i):
        ys[i].backward(grad_y)

    result = {"step": host_us(step), "fwd": host_us(lambda: model(x_grad)),
              "bwd": host_us(backward_only, setup=outputs)}
    torch.autograd.set_multithreading_enabled(False)
    try:
        result["step 1thread"] = host_us(step)
        result["bwd 1thread"] = host_us(backward_only, setup=outputs)
    finally:
        torch.autograd.set_multithreading_enabled(True)
    result["step no dx"] = host_us(lambda: model(x).backward(grad_y))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton,cuda,cupy")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          "host us per call (median)")
    for backend in args.backends.split(","):
        result = measure(backend, args.batch)
        print(backend, " ".join(f"{name}={value:.0f}" for name, value in result.items()),
              flush=True)


if __name__ == "__main__":
    main()
