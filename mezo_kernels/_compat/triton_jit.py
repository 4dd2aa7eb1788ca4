"""Triton: the interpreter and the specialisation of launch arguments (part of :mod:`mezo_kernels._compat`)."""
from __future__ import annotations

from typing import Any


def triton_interpreting(jit_fn: Any) -> bool:
    """True when ``jit_fn`` (a ``@triton.jit`` function) runs in Triton's interpreter (``TRITON_INTERPRET=1`` was
    set before it was decorated) rather than being compiled."""
    return type(jit_fn).__name__ == "InterpretedFunction"


def triton_specialize(value: Any, specialize: bool, align: bool) -> tuple[str, Any]:
    """``(type string, specialization key)`` of one kernel argument as Triton's JIT specializes a call (the JIT's
    own ``native_specialize_impl``, Triton 3.6 and 3.9): for ahead-of-time compiles that match a real launch."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    return native_specialize_impl(BaseBackend, value, False, specialize, align)
