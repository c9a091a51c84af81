"""The x tensor map of the wgmma forward's bulk tensor copies (TMA), encoded on the host.

``cuTensorMapEncodeTiled`` is a driver call that neither CuPy nor torch exposes, so it is
reached through ``ctypes`` in the driver library every CUDA program loads (``libcuda.so.1``).
The map holds x's address, so it is encoded per x address; a plan keeps the last one (a
training loop passes the same shapes, and often the same storage, every step). Where the copy's
rules do not hold (W * 4 not a multiple of 16, x not 16-byte aligned) or the driver lacks the
call, the kernel copies x by ``cp.async`` instead (``use_tma`` 0): slower, never wrong.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

#: Bytes of a CUtensorMap (CU_TENSOR_MAP_NUM_QWORDS x 8), passed by value to the kernel.
TENSOR_MAP_BYTES = 128
_NO_MAP = bytes(TENSOR_MAP_BYTES)

# cuda.h enumerators (CUDA 12.0+)
_FLOAT32 = 7  # CU_TENSOR_MAP_DATA_TYPE_FLOAT32
_INTERLEAVE_NONE = 0
_SWIZZLE_NONE = 0
_L2_PROMOTION_128B = 2  # CU_TENSOR_MAP_L2_PROMOTION_L2_128B
_OOB_FILL_ZEROS = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-range elements read as zeros

#: The box of one copy: a halo tile of persistent_tile (common.cuh), rows of 36 values (W),
#: 9 rows (H), 2 depths (D), every input channel, one image.
HALO_ROW, HALO_H, HALO_D = 36, 9, 2


@cache
def _encoder():
    """cuTensorMapEncodeTiled from the driver library, or None where it cannot be had."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        encode = driver.cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    encode.restype = ctypes.c_int
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, u32, ctypes.c_void_p,
                       ctypes.POINTER(u64), ctypes.POINTER(u64), ctypes.POINTER(u32),
                       ctypes.POINTER(u32), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int]
    return encode


class XTileMap:
    """The tensor map of x (N, C_in, D, H, W) fp32 contiguous for one plan's shape.

    ``arguments(address)`` gives the kernel's last two parameters: ``(use_tma, map bytes)``.
    """

    __slots__ = ("_box", "_dims", "_last", "_lock", "_out", "_out_at", "_strides", "usable")

    def __init__(self, x_shape) -> None:
        n, c_in, d, h, w = (int(v) for v in x_shape)
        self.usable = _encoder() is not None and w % 4 == 0
        u32, u64 = ctypes.c_uint32, ctypes.c_uint64
        self._dims = (u64 * 5)(w, h, d, c_in, n)
        self._strides = (u64 * 4)(w * 4, h * w * 4, d * h * w * 4, c_in * d * h * w * 4)
        self._box = (u32 * 5)(HALO_ROW, HALO_H, HALO_D, c_in, 1)
        # the encoder writes a 64-byte aligned CUtensorMap
        self._out = ctypes.create_string_buffer(TENSOR_MAP_BYTES + 64)
        self._out_at = ctypes.addressof(self._out) + (-ctypes.addressof(self._out) % 64)
        self._last = (None, 0, _NO_MAP)
        self._lock = threading.Lock()

    def arguments(self, address: int) -> tuple[int, bytes]:
        last_address, use_tma, encoded = self._last
        if address == last_address:
            return use_tma, encoded
        use_tma, encoded = 0, _NO_MAP
        if self.usable and address % 16 == 0:
            with self._lock:
                unit = (ctypes.c_uint32 * 5)(1, 1, 1, 1, 1)
                status = _encoder()(self._out_at, _FLOAT32, 5, address, self._dims,
                                    self._strides, self._box, unit, _INTERLEAVE_NONE,
                                    _SWIZZLE_NONE, _L2_PROMOTION_128B, _OOB_FILL_ZEROS)
                if status == 0:
                    use_tma, encoded = 1, ctypes.string_at(self._out_at, TENSOR_MAP_BYTES)
        self._last = (address, use_tma, encoded)
        return use_tma, encoded
