"""Kernel sources and their NVRTC modules.

Each ``kernels/*.cu`` file is one ``cupy.RawModule``: compiled by NVRTC the first time a process
asks for one of its kernels (CuPy then keeps the cubin in its on-disk cache, keyed by source,
options and name expressions, so later processes load it without compiling), and loaded once
per device. ``common.cuh`` is inlined into the source text here, so the cache key covers it.
"""

from __future__ import annotations

import re
import threading
from functools import cache
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"
COMMON_HEADER = "common.cuh"

#: The template instantiations each module exports (NVRTC name expressions). The .cu files list
#: the same ones as explicit instantiations for the standalone nvcc build.
_HALF_TYPES = (("float", "float"), ("double", "double"), ("half_t", "float"), ("bf16_t", "float"))
NAME_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "general.cu": (
        *(
            f"{kernel}<{t}, {acc}>"
            for kernel in (
                "general_forward", "general_grad_z", "general_grad_x", "general_grad_weight"
            )
            for t, acc in _HALF_TYPES
        ),
        "channel_reduce<float>",
        "channel_reduce<double>",
        *(f"any_nonfinite<{t}>" for t, _ in _HALF_TYPES),
    ),
    "parity_forward.cu": (
        "parity_forward_ffma<1>",
        "parity_forward_ffma<2>",
        "parity_forward_ffma<3>",
        "parity_forward_tc<1>",
        "parity_forward_tc<2>",
        "parity_tf32<1, true>",
        "parity_tf32<2, true>",
        *(
            f"parity_forward_exact<{t}, {acc}, {4 if t == 'double' else 8}, {rows}>"
            for rows in (1, 2)
            for t, acc in _HALF_TYPES
        ),
    ),
    # Compiled only on a cc 9.0 device, for sm_90a (MODULE_OPTIONS).
    "parity_forward_wgmma.cu": ("parity_forward_wgmma<1>", "parity_forward_wgmma<2>"),
    # The plain kernels of this file are extern "C": CuPy finds them by name.
    "parity_backward.cu": (
        "parity_grad_x_tf32<1>",
        "parity_grad_x_tf32<2>",
        "grad_z_from_output<float, true>",
        "grad_weight_reduce<false, float>",
        *(
            name
            for t in ("float", "half_t", "bf16_t")
            for name in (
                f"grad_z_from_output<{t}, false>",
                f"grad_weight_reduce<true, {t}>",
                f"pack_ffma_rows<{t}>",
                *(f"{kernel}<{t}, {ci4}>"
                  for kernel in ("parity_grad_x_ffma", "parity_grad_weight_ffma")
                  for ci4 in (1, 2, 3, 4)),
            )
        ),
    ),
}

COMPILE_OPTIONS = ("--std=c++17",)
#: Extra NVRTC options per module. wgmma and the bulk tensor copies exist only in the
#: architecture-specific sm_90a target, which CuPy's own -arch (sm_90 on an H100, appended after
#: these) does not give. NVRTC 13.0 given both compiles for sm_90a (checked on the H100); the
#: source refuses to compile for anything else, and then _ops.wgmma_forward_reasons reports it
#: and the forward keeps its mma.sync kernel.
MODULE_OPTIONS: dict[str, tuple[str, ...]] = {"parity_forward_wgmma.cu": ("-arch=sm_90a",)}

_lock = threading.Lock()


def kernel_sources() -> list[Path]:
    """The .cu files shipped with the package (each compiles standalone with nvcc)."""
    return [KERNEL_DIR / name for name in NAME_EXPRESSIONS if (KERNEL_DIR / name).exists()]


@cache
def module_source(file_name: str) -> str:
    """The source NVRTC compiles: the .cu file with ``common.cuh`` inlined."""
    text = (KERNEL_DIR / file_name).read_text()
    header = (KERNEL_DIR / COMMON_HEADER).read_text()
    return re.sub(r'#include\s+"common\.cuh"', lambda _: header, text)


@cache
def _module(file_name: str):
    import cupy

    return cupy.RawModule(
        code=module_source(file_name),
        options=COMPILE_OPTIONS + MODULE_OPTIONS.get(file_name, ()),
        name_expressions=list(NAME_EXPRESSIONS[file_name]),
    )


_functions: dict[tuple[int, str, str], object] = {}


def get_kernel(file_name: str, name_expression: str, device_index: int):
    """The compiled kernel ``name_expression`` of ``file_name`` on device ``device_index``.

    The caller has made ``device_index`` CuPy's current device. Cached per device: RawModule
    compiles once (for the architecture of the device it is first used on, sm_XX, as CuPy
    chooses) and loads per device.
    """
    key = (device_index, file_name, name_expression)
    function = _functions.get(key)
    if function is None:
        with _lock:
            function = _functions.get(key)
            if function is None:
                function = _module(file_name).get_function(name_expression)
                _functions[key] = function
    return function
