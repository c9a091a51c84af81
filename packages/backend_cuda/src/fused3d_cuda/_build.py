"""Just-in-time build of the CUDA extension into a persistent cache.

The extension is built once per (sources, torch version, CUDA version, GPU architecture) into
``$FUSED3D_CACHE/cuda/<hash>`` (default ``~/.cache/fused3d/cuda/<hash>``) and reused by every
later process. ``torch.utils.cpp_extension.load`` guards the build directory with its own file
baton, so processes starting together build it once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
#: Torch-free kernel sources: ``nvcc -c`` compiles each on its own (the CI resource check).
KERNEL_SOURCES = (
    "general.cu", "parity_forward.cu", "parity_forward_wgmma.cu", "parity_backward.cu",
    "parity_backward_wgmma.cu",
)
#: Torch-free host code with no kernels (dispatch between the paths).
HOST_SOURCES = ("dispatch.cu",)
HEADERS = ("fused3d_kernels.cuh", "fused3d_common.cuh", "parity_common.cuh", "wgmma_common.cuh")
BINDINGS = "bindings.cpp"


class BuildError(RuntimeError):
    """The extension failed to compile; the message says where the compiler log is."""


def kernel_sources() -> list[Path]:
    return [CSRC / name for name in KERNEL_SOURCES]


def all_sources() -> list[Path]:
    return [CSRC / BINDINGS, *(CSRC / name for name in HOST_SOURCES), *kernel_sources()]


def cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def nvcc_path() -> str | None:
    home = cuda_home()
    if home:
        candidate = Path(home) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str | None:
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        if "release" in line:
            return line.split("release", 1)[1].strip().split(",")[0]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else None


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc target flags for the device: its own ``-gencode``, except on Hopper (cc 9.0), which
    gets the sm_90a target and ``FUSED3D_WGMMA`` so that the TF32 forward can use wgmma."""
    cc = f"{capability[0]}{capability[1]}"
    if capability == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a", "-DFUSED3D_WGMMA"]
    return [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def cache_root() -> Path:
    base = os.environ.get("FUSED3D_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "fused3d"
    return root / "cuda"


def build_key(capability: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    for path in [*all_sources(), *(CSRC / h for h in HEADERS)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), str(nvcc_version()),
                 *arch_flags(capability)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


_loaded_keys: set[str] = set()


def load_extension(capability: tuple[int, int]) -> Path:
    """Build (first time only) and load the extension for ``capability``; returns its folder."""
    from torch.utils.cpp_extension import load

    key = build_key(capability)
    build_dir = cache_root() / key
    if key in _loaded_keys:
        return build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=f"fused3d_cuda_{key}",
            sources=[str(p) for p in all_sources()],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", *arch_flags(capability)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # the compiler output is in the message; keep it on disk too
        log = build_dir / "build_error.log"
        log.write_text(str(error))
        raise BuildError(
            f"building the fused3d CUDA extension failed; compiler log: {log} "
            f"(build folder {build_dir})"
        ) from error
    _loaded_keys.add(key)
    return build_dir
