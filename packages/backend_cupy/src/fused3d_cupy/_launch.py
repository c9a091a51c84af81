"""Kernel launches with little host work: device addresses in, ``cuLaunchKernel`` out.

Why not ``cupy.from_dlpack`` + ``RawKernel.__call__`` per call: the kernels need only each
tensor's device address, and the op body already holds every tensor (inputs and the outputs it
allocated) until its launches are enqueued. ``from_dlpack`` does much more per tensor: the
consumer/producer stream handshake of ``__dlpack__`` (a ``torch.cuda.ExternalStream`` object and
a stream comparison), a DLPack capsule, and a CuPy ``ndarray`` with its memory wrapper; then
``RawKernel.__call__`` turns every argument into a NumPy scalar and a CuPy ``CPointer``. On the
lent host that was 40-55 us per tensor, for a kernel that reads nothing of it but the address.

So tensors travel as ``data_ptr()`` (zero-copy, the same address DLPack would hand over). Their
lifetime is the op's: torch's caching allocator is stream-ordered, and every launch here goes to
torch's current stream, so memory freed after the op returns is reused only by work queued
behind these kernels (the guarantee every torch kernel relies on). Arguments are packed with
``struct`` in the C layout of the kernel's parameter list and passed to ``cuLaunchKernel``, which
copies them at launch, and into the graph node under CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import struct
import threading

_local = threading.local()
_launch_kernel = None  # cupy.cuda.driver.launchKernel, bound on first use (CuPy is optional)


def ensure_context(device_index: int) -> None:
    """Make the device's primary context current on this thread (once per thread and device).

    ``cuLaunchKernel`` (driver API) needs a current context; a fresh thread (autograd's device
    threads) may not have bound one yet if it has made no runtime call. CuPy's own launcher does
    the same check before every launch.
    """
    ready = getattr(_local, "ready", None)
    if ready is None:
        ready = _local.ready = set()
    if device_index not in ready:
        import cupy

        ensure = getattr(cupy.cuda.runtime, "_ensure_context", None)
        if ensure is not None:
            ensure()
        else:
            cupy.cuda.runtime.memGetInfo()  # any runtime call binds the primary context
        ready.add(device_index)


class Kernel:
    """One compiled kernel on one device, with its parameter layout.

    ``signature``: the kernel's parameters as ``struct`` codes in order, e.g. ``"6P 8i d 4i"``
    (``P`` a pointer, ``i`` an int, ``d`` a double); native alignment matches the CUDA ABI. A
    by-value struct parameter is one ``<size>s`` token (``128s``: a CUtensorMap, passed as its
    bytes): ``cuLaunchKernel`` reads each parameter from its own address with the size and
    alignment the kernel declares, so the host buffer needs no padding for it.
    """

    __slots__ = ("_buffer_type", "_format", "_function", "_offsets", "_pointer", "_slots", "raw")

    def __init__(self, raw_kernel, signature: str) -> None:
        global _launch_kernel
        if _launch_kernel is None:
            import cupy

            _launch_kernel = cupy.cuda.driver.launchKernel
        self.raw = raw_kernel  # keeps the module (and the function) loaded
        self._function = raw_kernel.kernel  # the caller made this kernel's device current
        self._pointer = self._function.ptr
        self._format = "@" + signature
        codes = []
        for token in signature.split():
            count = token[:-1]
            if token[-1] == "s":
                codes.append(token)  # one parameter of `count` bytes
            else:
                codes.extend(token[-1] * (int(count) if count else 1))
        offsets = []
        for i, code in enumerate(codes):
            offsets.append(struct.calcsize("@" + "".join(codes[: i + 1])) - struct.calcsize(code))
        self._offsets = tuple(offsets)
        self._buffer_type = ctypes.c_char * max(1, struct.calcsize(self._format))
        self._slots = threading.local()

    def _slot(self) -> tuple:
        """This thread's argument buffer and the parameter array pointing into it (made once:
        cuLaunchKernel copies the arguments before it returns, so the next launch may reuse
        them; per thread, because autograd's device threads launch too)."""
        slot = getattr(self._slots, "slot", None)
        if slot is None:
            buffer = self._buffer_type()
            base = ctypes.addressof(buffer)
            params = (ctypes.c_void_p * len(self._offsets))(*[base + o for o in self._offsets])
            slot = self._slots.slot = (buffer, params, ctypes.addressof(params))
        return slot

    def launch(self, grid: tuple[int, int], block: int, stream: int, args: tuple,
               shared_mem: int = 0) -> None:
        """Enqueue on ``stream`` (a raw ``cudaStream_t``); ``args`` in signature order."""
        buffer, _, params_at = self._slot()
        struct.pack_into(self._format, buffer, 0, *args)
        _launch_kernel(self._pointer, grid[0], grid[1], 1, block, 1, 1, shared_mem,
                       stream, params_at, 0)
