"""fused3d: ConvTranspose3d + LeakyReLU + multiplier + LeakyReLU + MaxPool3d, fused.

Public API (DESIGN section 4): :class:`Model`, :class:`FusedModel`, :func:`fused_block`,
:func:`use_backend`, :func:`available_backends`, and ``python -m fused3d info``.
"""

from .backend import Backend, BackendBase, BackendError, CallSpec, UnknownBackendError
from .config import BlockConfig
from .functional import fused_block, fused_block_with_index
from .model import FusedModel, Model
from .registry import ENV_VAR, available_backends, get_backend, requested_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "ENV_VAR",
    "Backend",
    "BackendBase",
    "BackendError",
    "BlockConfig",
    "CallSpec",
    "FusedModel",
    "Model",
    "UnknownBackendError",
    "available_backends",
    "fused_block",
    "fused_block_with_index",
    "get_backend",
    "requested_backend",
    "use_backend",
]
