"""Triton backend: one multi-tensor launch per group plan (see ``axpby.py``; RNG device code in ``philox.py``), and
the fused low-rank update of one 2-d tensor (``lowrank.py``).

Importable without triton installed, so that ``available()`` can say why the backend cannot run."""
from __future__ import annotations

try:
    from .axpby import CHUNK, available, launch
    from .lowrank import lowrank_update
except ModuleNotFoundError as _e:
    if _e.name != "triton":
        raise
    _WHY = f"triton is not installed ({_e})"
    CHUNK = None  # type: ignore[assignment]  # no kernel, no chunk size

    def available(device) -> str | None:  # type: ignore[misc]
        return _WHY

    def launch(*args, **kwargs) -> None:  # type: ignore[misc]
        raise RuntimeError(f"triton backend unavailable: {_WHY}")

    def lowrank_update(*args, **kwargs) -> None:  # type: ignore[misc]
        raise RuntimeError(f"triton backend unavailable: {_WHY}")

__all__ = ["CHUNK", "available", "launch", "lowrank_update"]
