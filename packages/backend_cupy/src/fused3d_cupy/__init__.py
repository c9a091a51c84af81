"""fused3d backend ``cupy``: CuPy ``RawModule`` kernels compiled by NVRTC.

The kernels live in ``kernels/*.cu`` (shipped as package data; nvcc compiles each standalone for
the CI resource check). The ops are ``torch.library.custom_op``s in the namespace
``fused3d_cupy``; core attaches the fake implementations and the autograd formula.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fused3d.backend import BackendBase, CallSpec
from fused3d.ops import define_python_ops

from ._modules import kernel_sources as _kernel_sources

__all__ = ["CupyBackend", "backend"]

INSTALL_HINT = (
    "pip install 'fused3d-cupy[cuda13]' (CUDA 13 driver) or 'fused3d-cupy[cuda12]' (CUDA 12)"
)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: mma.sync TF32 and cvt.rn.bf16 need compute capability 8.0 or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


class CupyBackend(BackendBase):
    name = "cupy"
    namespace = "fused3d_cupy"
    # auto: cuda > cupy > triton, from the H100 benchmark of 2026-11-24 (plots/bench_cuda.csv)
    auto_priority = 20
    description = (
        "CuPy RawModule kernels (NVRTC): one-launch fused forward (TF32 tensor cores for the "
        "kernel-3/stride-2 case), fused backward"
    )
    device_types = ("cuda",)

    def _find_unavailable_reasons(self) -> list[str]:
        reasons = []
        try:
            import cupy
        except Exception as error:  # ImportError, or a CuPy built for another CUDA
            reasons.append(f"cupy cannot be imported ({error}); install it: {INSTALL_HINT}")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device: torch.cuda.is_available() is False")
        elif not reasons:
            try:
                import cupy

                count = cupy.cuda.runtime.getDeviceCount()
            except Exception as error:
                reasons.append(f"CuPy cannot use the CUDA driver ({error}); install the CuPy "
                               f"build matching the driver: {INSTALL_HINT}")
            else:
                if count == 0:
                    reasons.append("CuPy sees no CUDA device")
            capability = torch.cuda.get_device_capability()
            if capability < MIN_COMPUTE_CAPABILITY:
                reasons.append(
                    f"needs a GPU of compute capability >= 8.0, this one is "
                    f"{capability[0]}.{capability[1]}"
                )
        return reasons

    def unsupported_reasons(self, spec: CallSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(
                f"backend 'cupy' supports float32, float64, float16 and bfloat16, got {spec.dtype}"
            )
        return reasons

    def _define_ops(self) -> None:
        from ._ops import backward_impl, forward_impl

        define_python_ops(self.namespace, forward_impl, backward_impl, factory="custom_op",
                          saves_output=True)

    def versions(self) -> dict[str, str]:
        found = {"torch": torch.__version__}
        try:
            import cupy

            found["cupy"] = cupy.__version__
            found["cuda runtime (cupy)"] = str(cupy.cuda.runtime.runtimeGetVersion())
            major, minor = cupy.cuda.nvrtc.getVersion()
            found["nvrtc"] = f"{major}.{minor}"
        except Exception as error:
            found.setdefault("cupy", f"unavailable ({type(error).__name__})")
        return found

    def kernel_sources(self) -> list[Path]:
        return _kernel_sources()


backend = CupyBackend()
