"""Make Triton 3.6's interpreter work with NumPy >= 2.4.

The interpreter stores every scalar as a 1-element array and converts it for ``range(n)``
with ``int(array)``, which NumPy 2.4 turned from a deprecation into a TypeError. Every kernel
with a run-time loop bound then fails under ``TRITON_INTERPRET=1``. This wraps the
interpreter's tensor patching to convert through ``.item()`` instead. It touches only the
interpreter (which restores its patches after each launch) and is a no-op where the old
conversion still works.
"""

from __future__ import annotations

import numpy as np

_applied = False


def _int_of_one_element_array_works() -> bool:
    try:
        int(np.array([1]))
    except TypeError:
        return False
    return True


def apply() -> None:
    global _applied
    if _applied or _int_of_one_element_array_works():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _applied = True
