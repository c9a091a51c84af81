"""Kernel sources and their NVRTC modules.

Each ``kernels/*.cu`` file is one ``cupy.RawModule``: compiled by NVRTC the first time a process
asks for one of its kernels, kept as a cubin in CuPy's on-disk cache folder (keyed by source,
options, architecture and NVRTC version, so later processes load it without compiling), and
loaded by ``cupy.RawModule(path=...)``. NVRTC is called here, through CuPy's bindings, and not by
``RawModule(code=...)``: CuPy compiles with ``-ftz=true`` (see ``_module``). ``common.cuh`` is
inlined into the source text here, so the cache key covers it.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    # Compiled only on a cc 9.0 device, for sm_90a (MODULE_ARCH).
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

#: The NVRTC options of every module (as CuPy's own compile gives them, less its -ftz=true):
#: unannotated functions are device functions.
COMPILE_OPTIONS = ("--std=c++17", "--device-as-default-execution-space")
#: Modules with a fixed NVRTC target instead of the device's own. wgmma and the bulk tensor
#: copies exist only in the architecture-specific sm_90a target; the source refuses to compile
#: for anything else, and then _ops.wgmma_forward_reasons reports it and the forward keeps its
#: mma.sync kernel.
MODULE_ARCH: dict[str, str] = {"parity_forward_wgmma.cu": "sm_90a"}

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


def cache_dir() -> Path:
    """Where compiled modules are kept: CuPy's kernel cache (``CUPY_CACHE_DIR``, default
    ``~/.cupy/kernel_cache``), in a ``fused3d`` folder."""
    root = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")
    return Path(root) / "fused3d"


def _target(file_name: str) -> tuple[str, str]:
    """(NVRTC -arch value, output kind) for the current device: its own sm_XX cubin, sm_90a for
    the wgmma module, or PTX for the newest architecture NVRTC knows on a GPU newer than that."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    if file_name in MODULE_ARCH:
        return MODULE_ARCH[file_name], "cubin"
    capability = int(cupy.cuda.Device().compute_capability)
    supported = [int(a) for a in nvrtc.getSupportedArchs()]
    if capability in supported:
        return f"sm_{capability}", "cubin"
    return f"compute_{max(a for a in supported if a <= capability)}", "ptx"


@cache
def _module(file_name: str, arch: str, kind: str):
    """The module of ``file_name`` compiled by NVRTC for ``arch``, loaded by ``cupy.RawModule``,
    and its lowered (mangled) kernel names.

    Compiled here rather than by ``RawModule(code=...)`` because CuPy adds ``-ftz=true`` to every
    compile, flushing fp32 subnormals to zero where PyTorch keeps them (an ``-ftz=false`` in
    RawModule's options, which CuPy's own flag follows, does not override it). Kept on disk in
    CuPy's cache folder, keyed by source, options, arch and NVRTC version, so later processes
    load it without compiling; written atomically, so concurrent first use is safe.
    """
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    source = module_source(file_name)
    names = NAME_EXPRESSIONS[file_name]
    options = (*COMPILE_OPTIONS, f"-arch={arch}")
    key = hashlib.sha256(repr((source, options, names, nvrtc.getVersion(), kind)).encode())
    folder = cache_dir()
    binary_path = folder / f"{key.hexdigest()}.{kind}"
    names_path = folder / f"{key.hexdigest()}.json"
    if not (binary_path.exists() and names_path.exists()):
        program = nvrtc.createProgram(source, file_name, [], [])
        try:
            for name in names:
                nvrtc.addNameExpression(program, name)
            try:
                nvrtc.compileProgram(program, list(options))
            except nvrtc.NVRTCError as error:
                raise RuntimeError(f"NVRTC could not compile {file_name} ({' '.join(options)}):\n"
                                   f"{nvrtc.getProgramLog(program)}") from error
            binary = nvrtc.getCUBIN(program) if kind == "cubin" else nvrtc.getPTX(program)
            lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
        finally:
            nvrtc.destroyProgram(program)
        if isinstance(binary, str):
            binary = binary.encode()
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in ((names_path, json.dumps(lowered).encode()), (binary_path, binary)):
            temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
    lowered = json.loads(names_path.read_text())
    return cupy.RawModule(path=str(binary_path)), lowered


_functions: dict[tuple[int, str, str], object] = {}


def get_kernel(file_name: str, name_expression: str, device_index: int):
    """The compiled kernel ``name_expression`` of ``file_name`` on device ``device_index``.

    The caller has made ``device_index`` CuPy's current device. Cached per device: each module
    compiles once per architecture (see _module) and loads per device.
    """
    key = (device_index, file_name, name_expression)
    function = _functions.get(key)
    if function is None:
        with _lock:
            function = _functions.get(key)
            if function is None:
                module, lowered = _module(file_name, *_target(file_name))
                # extern "C" kernels are not name expressions: they keep their own names
                function = module.get_function(lowered.get(name_expression, name_expression))
                _functions[key] = function
    return function
