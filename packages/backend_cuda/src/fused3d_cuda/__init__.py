"""fused3d backend in CUDA C++ (``backend="cuda"``).

Kernels live in torch-free ``csrc/*.cu`` files; ``csrc/bindings.cpp`` registers them as the
CUDA kernels of ``fused3d_cuda::forward`` / ``fused3d_cuda::backward``, whose schemas, fake
implementations and autograd come from :mod:`fused3d.ops`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fused3d.backend import BackendBase, CallSpec
from fused3d.ops import define_schemas, register_block_ops

from . import _build

NAMESPACE = "fused3d_cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class CudaBackend(BackendBase):
    name = "cuda"
    namespace = NAMESPACE
    auto_priority = 30
    description = (
        "CUDA C++ kernels (JIT-built): parity-split implicit GEMM on tensor cores (TF32) or "
        "FFMA, general gather path for other configurations"
    )
    device_types = ("cuda",)

    def __init__(self) -> None:
        super().__init__()
        self._library: torch.library.Library | None = None

    def _find_unavailable_reasons(self) -> list[str]:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(
                f"torch {torch.__version__} was built without CUDA; install a CUDA build of torch"
            )
        elif not torch.cuda.is_available():
            reasons.append("torch sees no CUDA device")
        if _build.nvcc_path() is None:
            reasons.append(
                "nvcc not found: install the CUDA toolkit (e.g. `apt install cuda-nvcc-13-0`) "
                "or set CUDA_HOME to it"
            )
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            reasons.append("ninja not found: `pip install ninja`")
        return reasons

    def unsupported_reasons(self, spec: CallSpec) -> list[str]:
        reasons = super().unsupported_reasons(spec)
        if spec.dtype not in SUPPORTED_DTYPES:
            reasons.append(
                f"backend 'cuda' supports float32, float64, float16 and bfloat16, got {spec.dtype}"
            )
        return reasons

    def _define_ops(self) -> None:
        capability = torch.cuda.get_device_capability(torch.cuda.current_device())
        # Build/load first: if that fails no half-registered ops are left behind.
        _build.load_extension(capability)
        self._library = define_schemas(NAMESPACE)
        register_block_ops(NAMESPACE, saves_output=True)

    def versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__, "torch_cuda": str(torch.version.cuda)}
        nvcc = _build.nvcc_version()
        if nvcc:
            versions["nvcc"] = nvcc
        return versions

    def kernel_sources(self) -> list[Path]:
        return _build.kernel_sources()


backend = CudaBackend()

__all__ = ["NAMESPACE", "CudaBackend", "backend"]
