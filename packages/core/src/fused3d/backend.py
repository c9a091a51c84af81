"""The backend interface (DESIGN section 5).

A backend is one object, published through the entry-point group ``fused3d.backends``.
It owns two custom ops in its own namespace, ``<namespace>::forward`` and
``<namespace>::backward``, with the schemas in :mod:`fused3d.ops`; core attaches the one
shared fake implementation and the one autograd formula to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


class BackendError(RuntimeError):
    """A backend was asked for that cannot run the call; the message lists the reasons."""


class UnknownBackendError(ValueError):
    """A backend name that no installed package registers."""


@dataclass(frozen=True)
class CallSpec:
    """What a backend needs to know to accept or refuse a call: device type and dtype.

    Backend selection is a constant under ``torch.compile`` (even with ``dynamic=True``), so it
    sees no shapes and no configuration: every backend serves every configuration the contract
    allows (a fast path where it can, a general path elsewhere).
    """

    device_type: str
    dtype: torch.dtype


@runtime_checkable
class Backend(Protocol):
    """What every backend provides."""

    #: Name users pass to ``backend=`` / ``FUSED3D_BACKEND``.
    name: str
    #: ``torch.ops`` namespace of the backend's ops, e.g. ``"fused3d_triton"``.
    namespace: str
    #: Order for ``auto`` on a device: the available backend with the highest value wins.
    auto_priority: int
    #: One line for ``python -m fused3d info``.
    description: str

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all; empty when usable."""
        ...

    def unsupported_reasons(self, spec: CallSpec) -> list[str]:
        """Why this backend cannot run this call; empty when supported."""
        ...

    def load(self) -> None:
        """Define and register the backend's ops (build/compile if needed). Idempotent."""
        ...

    def versions(self) -> dict[str, str]:
        """Toolchain versions worth reporting (e.g. triton, cupy, nvcc)."""
        ...

    def kernel_sources(self) -> list[Path]:
        """Torch-free CUDA sources that ``nvcc -c`` compiles standalone (for the CI check)."""
        ...


class BackendBase:
    """Convenience base: sensible defaults and an idempotent :meth:`load`."""

    name: str = ""
    namespace: str = ""
    auto_priority: int = 0
    description: str = ""
    #: Device types this backend's kernels run on.
    device_types: tuple[str, ...] = ("cuda",)

    def __init__(self) -> None:
        self._loaded = False
        self._unavailable: list[str] | None = None

    def unavailable_reasons(self) -> list[str]:
        # Probing a toolchain or the driver can cost a subprocess or a driver call, and the
        # answer cannot change within a process: asked once, remembered.
        if self._unavailable is None:
            self._unavailable = list(self._find_unavailable_reasons())
        return list(self._unavailable)

    def _find_unavailable_reasons(self) -> list[str]:
        """Override: why this backend cannot run on this machine (empty when usable)."""
        return []

    def unsupported_reasons(self, spec: CallSpec) -> list[str]:
        if spec.device_type not in self.device_types:
            return [
                f"backend {self.name!r} runs on {', '.join(self.device_types)} tensors, "
                f"got a {spec.device_type} tensor"
            ]
        return []

    def load(self) -> None:
        if not self._loaded:
            self._define_ops()
            self._loaded = True

    def _define_ops(self) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}

    def kernel_sources(self) -> list[Path]:
        return []

    def __repr__(self) -> str:
        return f"<fused3d backend {self.name!r}>"
