"""The one door to private or version-dependent names of torch, transformers, peft, gguf and Triton.

No other module of the package imports a private name (a leading underscore, or a module path with one) of those
libraries, nor branches on their versions: it calls a narrow function here instead. Each function has a contract
test in ``tests/test_compat.py`` that fails when an upgrade changes what it relies on, so a new version breaks
loudly, in one place.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["param_version", "bump_version", "triton_interpreting"]


# ---------------------------------------------------------------------------------------------- torch
def param_version(params: Iterable[torch.Tensor]) -> tuple:
    """``((data_ptr, _version), ...)`` of ``params``: changes on every in-place write (torch bumps ``_version``)
    and when a tensor's storage is replaced (another address). The forward engine keys its caches on it."""
    return tuple((p.data_ptr(), p._version) for p in params)


def bump_version(tensors: Iterable[torch.Tensor]) -> None:
    """Bump the version counter of ``tensors`` as an in-place op would: the kernels write through raw pointers,
    which torch cannot see, so version-keyed caches would otherwise go stale."""
    from torch.autograd.graph import increment_version
    increment_version(list(tensors))


# ---------------------------------------------------------------------------------------------- Triton
def triton_interpreting(jit_fn: Any) -> bool:
    """True when ``jit_fn`` (a ``@triton.jit`` function) runs in Triton's interpreter (``TRITON_INTERPRET=1`` was
    set before it was decorated) rather than being compiled."""
    return type(jit_fn).__name__ == "InterpretedFunction"
