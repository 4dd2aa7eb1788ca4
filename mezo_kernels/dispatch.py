"""One place decides the backend: the registry, availability reasons, and the ``auto`` choice.

Every backend implements the same operation on a group plan (``docs/kernel_abi.md``):

| mode | name          | effect on element i (z = z(seed, base + i), fp32 math, one rounding to the dtype)   |
|------|---------------|-------------------------------------------------------------------------------------|
| 0    | AXPBY         | ``d = round(fma(z, beta, alpha * d))``                                              |
| 1    | MASTER_UPDATE | ``m' = fma(z, beta, alpha * m); m = m'; d = round(fma(z, gamma, m'))``             |
| 2    | MASTER_VIEW   | ``d = round(fma(z, gamma, m))``                                                     |
| 3    | FILL          | ``d = round(z)``                                                                    |

``MEZO_BACKEND`` (environment) overrides the ``backend`` argument everywhere.
"""
from __future__ import annotations

import importlib
import os
from typing import Protocol

import torch

from . import rng

AXPBY, MASTER_UPDATE, MASTER_VIEW, FILL = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAMES = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "MEZO_BACKEND"


class Group(Protocol):
    """What a backend reads from a group plan (see ``perturb._Group``)."""
    tensors: list[torch.Tensor]
    masters: list[torch.Tensor] | None
    bases: list[int]
    dtype: torch.dtype
    device: torch.device
    aligned: bool            # every base is a multiple of 4

    def tables(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------- torch backend
def _torch_launch(g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: int) -> None:
    """Pure-PyTorch implementation of every mode: the spec, one tensor at a time."""
    with torch.no_grad():
        for i, (t, base) in enumerate(zip(g.tensors, g.bases)):
            z = rng.normal(seed, base, t.numel(), t.device).view(t.shape)
            if mode == FILL:
                t.copy_(z)
            elif mode == AXPBY:
                t.copy_(rng.fma_update(t, z, alpha, beta))
            else:
                m = g.masters[i]
                m2 = rng.fma_update(m, z, alpha, beta) if mode == MASTER_UPDATE else m
                if mode == MASTER_UPDATE:
                    m.copy_(m2)
                t.copy_(rng.fma_update(m2, z, 1.0, gamma))


# ---------------------------------------------------------------------------------------------- extensions
def _load(modname: str):
    try:
        return importlib.import_module(modname), None
    except ImportError as e:  # not built (MEZO_SKIP_EXT=1, no nvcc) or built for another Python
        return None, f"{modname} not importable ({e}); reinstall with `pip install -e .`"


class _Ext:
    def __init__(self, name: str, modname: str):
        self.name, self.modname, self._mod, self._why = name, modname, None, None
        self._loaded, self._chunk = False, 0

    def module(self):
        if not self._loaded:
            self._mod, self._why = _load(self.modname)
            self._loaded = True
        return self._mod

    @property
    def chunk(self) -> int:
        if not self._chunk:
            self._chunk = int(self.module().chunk_size())
        return self._chunk

    def launch(self, g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: int) -> None:
        meta, chunks = g.tables(self.chunk)
        args = (meta.data_ptr(), meta.shape[1], chunks.data_ptr(), chunks.shape[0], self.chunk,
                DTYPE_CODES[g.dtype], mode, seed, alpha, beta, gamma)
        if self.name == "cuda":
            stream = torch.cuda.current_stream(g.device).cuda_stream
            self.module().axpby(*args, stream)
        else:
            self.module().axpby(*args)


class _Triton:
    name = "triton"

    def module(self):
        return importlib.import_module("mezo_kernels.triton")

    @property
    def chunk(self) -> int:
        return int(self.module().CHUNK)

    def launch(self, g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: int) -> None:
        meta, chunks = g.tables(self.chunk)
        self.module().launch(meta, chunks, meta.shape[1], chunks.shape[0], g.dtype, mode, seed,
                             alpha, beta, gamma, g.aligned)


class _Torch:
    name = "torch"
    chunk = 0
    launch = staticmethod(_torch_launch)


_REGISTRY = {"cpu": _Ext("cpu", "mezo_kernels._C"), "cuda": _Ext("cuda", "mezo_kernels._C_cuda"),
             "triton": _Triton(), "torch": _Torch()}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"serves CPU tensors only, not {device.type}"
        ext = _REGISTRY["cpu"]
        return None if ext.module() is not None else ext._why
    if name == "cuda":
        if device.type != "cuda":
            return f"serves CUDA tensors only, not {device.type}"
        ext = _REGISTRY["cuda"]
        return None if ext.module() is not None else ext._why
    if name == "triton":
        try:
            mod = importlib.import_module("mezo_kernels.triton")
        except ImportError as e:
            return f"triton not importable ({e})"
        available = getattr(mod, "available", None)
        return available(device) if available else "mezo_kernels.triton is incomplete (no available())"
    raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(NAMES)}")


def backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Every backend name mapped to ``None`` if it can run on ``device``, else the reason it cannot.

    ``device`` defaults to the current CUDA device when there is one, else the CPU."""
    dev = torch.device(device) if device is not None else _default_device()
    return {name: unavailable_reason(name, dev) for name in NAMES}


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve(backend: str, device: torch.device):
    """The backend object to use for tensors on ``device``; ``MEZO_BACKEND`` overrides ``backend``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    name = os.environ.get(ENV_VAR) or backend
    if name == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        name = next(n for n in order if unavailable_reason(n, device) is None)
    why = unavailable_reason(name, device)
    if why is not None:
        src = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else ""
        raise ValueError(f"backend {name!r}{src} is unavailable for {device}: {why}")
    return _REGISTRY[name]
