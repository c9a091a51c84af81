"""fused3d's Triton backend: ``@triton.jit`` kernels registered as ``torch.library.triton_op``.

Importing this module is cheap and never fails on a machine without Triton or a GPU: the
kernels are imported only when the backend is loaded (first use).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fused3d.backend import BackendBase, CallSpec

NAMESPACE = "fused3d_triton"

__all__ = ["NAMESPACE", "TritonBackend", "backend"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(BackendBase):
    name = "triton"
    namespace = NAMESPACE
    # auto: cuda > cupy > triton, from the H100 benchmark of 2026-11-24 (plots/bench_cuda.csv)
    auto_priority = 10
    description = (
        "Triton kernels: one fused forward launch (parity-split implicit GEMM for kernel 3 / "
        "stride 2), fused backward; runs on CPU under TRITON_INTERPRET=1"
    )

    @property
    def device_types(self) -> tuple[str, ...]:  # type: ignore[override]
        # The interpreter runs the same kernels on CPU tensors (how CI executes them).
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed: pip install triton")
        if not _interpreting() and not torch.cuda.is_available():
            reasons.append(
                "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels "
                "on CPU tensors through Triton's interpreter)"
            )
        return reasons

    def unsupported_reasons(self, spec: CallSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            reasons.append(f"dtype {spec.dtype} is not supported (float16, bfloat16, float32, "
                           "float64 are)")
        return reasons

    def _define_ops(self) -> None:
        from fused3d.ops import define_python_ops

        from .launch import triton_backward, triton_forward

        # torch.library.triton_op lets torch.compile see the kernels (wrap_triton). Under the
        # interpreter wrap_triton hands back the plain Python kernel, which cannot be traced
        # with fake tensors, so there the ops are opaque custom ops instead (still one graph
        # node each: no graph break).
        factory = "custom_op" if _interpreting() else "triton_op"
        define_python_ops(NAMESPACE, triton_forward, triton_backward, factory=factory,
                          saves_output=True)

    def versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            versions["triton"] = "not installed"
        versions["mode"] = "interpreter" if _interpreting() else "compiled"
        return versions


backend = TritonBackend()
