"""Counting the collectives of a step, by kind, inside a benchmark process (bench_scale.py): a shim over
``torch.distributed``'s collective functions and a TorchDispatchMode for DTensor's functional collectives."""
from __future__ import annotations

import os

import torch

__all__ = ["COLLECTIVES", "CommCounter", "classify"]

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_single",
               "reduce_scatter_tensor", "reduce_scatter", "broadcast")


class CommCounter:
    """Counts collectives by kind: wraps ``torch.distributed``'s collective functions (module attributes, looked
    up at call time by FSDP2 and by MeZO's loss exchange) and, as a TorchDispatchMode, the functional collectives
    of DTensor. ``records``: (kind, bytes) per call while ``active``."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.records, self.active, self._orig = dist, [], False, {}

    def __enter__(self):
        self._depth = 0
        for name in COLLECTIVES:
            if not hasattr(self.dist, name):        # all_gather_single / reduce_scatter_single: newer torch
                continue
            fn = getattr(self.dist, name)
            self._orig[name] = fn
            setattr(self.dist, name, self._wrap(name, fn))
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns = getattr(func, "namespace", "")
                if counter.active and ns == "_c10d_functional" and func._overloadpacket.__name__ not in ("wait_tensor", "_wrap_tensor_autograd"):
                    counter.records.append(("functional." + func._overloadpacket.__name__, _payload(args)))
                    if os.environ.get("BENCH_SCALE_DEBUG"):
                        print("functional", func, [getattr(a, "shape", a) for a in args], flush=True)
                return func(*args, **(kwargs or {}))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, fn in self._orig.items():
            setattr(self.dist, name, fn)

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.active and self._depth == 0:   # the outermost call only (one may call another)
                t = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor"))
                if name == "all_gather" and isinstance(t, (list, tuple)):
                    nbytes = sum(x.numel() * x.element_size() for x in t)
                else:
                    nbytes = _payload([t])
                self.records.append((name, nbytes))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        wrapped.__wrapped__ = fn
        return wrapped


def _payload(args) -> int:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return sum(x.numel() * x.element_size() for x in a)
    return 0


def classify(records, layout: str) -> dict:
    """Per-step totals: FSDP2 all-gathers, TP all-reduces (functional), the scalar loss exchange (an all-reduce of
    at most 2 float64 per direction), anything else."""
    out = dict(ag_bytes=0, ag_calls=0, ag_max=0, tp_bytes=0, tp_calls=0, scalar_bytes=0, scalar_calls=0,
               other_bytes=0, other_calls=0)
    for kind, b in records:
        if kind in ("all_gather_single", "all_gather_into_tensor") and layout == "fsdp":
            out["ag_bytes"] += b
            out["ag_calls"] += 1
            out["ag_max"] = max(out["ag_max"], b)
        elif kind.startswith("functional.all_reduce"):
            out["tp_bytes"] += b
            out["tp_calls"] += 1
        elif kind == "all_reduce" and b <= 16:
            out["scalar_bytes"] += b
            out["scalar_calls"] += 1
        else:
            out["other_bytes"] += b
            out["other_calls"] += 1
    return out
