"""Launch a ``@triton.jit`` kernel in eager mode without most of Triton's per-call Python.

``kernel[grid](...)`` binds and specializes every argument, reads several knobs, looks the
compiled kernel up and only then calls its launcher; an ``@triton.autotune`` kernel adds its own
key building on top. On the lent H100's host that measured 31 us per launch (62 us autotuned)
against 8.5 us for the compiled kernel's launcher alone and 6.4 us for Triton's argument binder
(``.scratch``-level A/B, torch 2.11, triton 3.6). A training step launches eight kernels.

:func:`launch` keeps Triton's own binder, so the specialization (dtypes, 16-byte alignment of
pointers, integers equal to 1 or divisible by 16, constexpr values) is exactly the one Triton
computes, and uses it as the key of a cache of compiled kernels. The first launch of a key goes
through ``JITFunction.run`` (which compiles); later ones call the compiled kernel's launcher on
torch's current stream (what Triton itself uses). Two per-call checks of Triton are left out:
that the globals a kernel read at compile time are unchanged (those of these kernels are
constants) and the debug / instrumentation knobs (taken as fixed for the process). Under
``torch.compile`` tracing (``wrap_triton`` enabled), under the interpreter, or with a Triton
that lacks the internals used here, the kernel is launched the ordinary way.
"""

from __future__ import annotations

import os

from torch.library import wrap_triton

try:  # imported once here, not on every launch
    from triton import knobs
    from triton.runtime.driver import driver
except ImportError:  # a Triton without these internals: the ordinary path only
    knobs = driver = None

#: TRITON_INTERPRET is read once: Triton itself fixes it when it is imported.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (JITFunction, device, specialization, options) -> CompiledKernel
_compiled: dict = {}
# FUSED3D_TRITON_FAST_LAUNCH=0 launches every kernel the ordinary way (to rule this out).
_usable = (knobs is not None and not INTERPRETING
           and os.environ.get("FUSED3D_TRITON_FAST_LAUNCH", "1") != "0")


def launch(kernel, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` function, with a fixed grid.

    ``kwargs`` holds the constexpr arguments and launch options (``num_warps``, ...).
    """
    global _usable
    if not _usable or wrap_triton(kernel) is not kernel:
        # Traced by torch.compile (the compiler must see the launch), or interpreted.
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    try:
        device = driver.active.get_current_device()
        binder = kernel.device_caches[device][-1]
        bound, specialization, options = binder(*args, **kwargs)
        key = (kernel, device, tuple(specialization), tuple(options.items()))
    except (AttributeError, IndexError):
        # Not the Triton internals this was written against (triton 3.6): the ordinary path.
        _usable = False
        kernel[grid](*args, **kwargs)
        return
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if hasattr(compiled, "result"):  # asynchronous compile mode hands back a future
            compiled = compiled.result()
        _compiled[key] = compiled
        return
    stream = driver.active.get_current_stream(device)
    values = bound.values()
    grid_0 = grid[0]
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *values),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)


def active() -> bool:
    """Whether eager launches take the short path in this process."""
    return _usable


def cached_kernels() -> int:
    """How many compiled kernels the short path holds (for tests and diagnostics)."""
    return len(_compiled)
