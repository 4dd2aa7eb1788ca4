"""One place decides the backend: the registry, availability reasons, and the ``auto`` choice.

Every backend implements the same operation on a group plan (``docs/kernel_abi.md``): one of the kernel modes
of the spec, ``rng.KernelMode`` (codes, effects, which modes read the fp32 master), on tensors of the dtypes in
``rng.DTYPE_CODES``.

The decision is made in one function, :func:`choose`, per (backend, mode, distribution, device), memoised:
every path (``ParamSet`` operations, perturbed copies, row slices, fills) asks it, so a named backend that cannot
serve a mode is the same ValueError everywhere and ``auto`` falls back the same way everywhere.
``MEZO_BACKEND`` (environment) overrides the ``backend`` argument everywhere.

Launchers take what the public API already checked: a seed as an int in [0, 2**64), a ``KernelMode`` and a
``Distribution``; they do not validate them again.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Protocol

import torch

from . import rng

# The spec's codes, re-exported under the names callers of this module have used.
DTYPE_CODES, KernelMode, Distribution = rng.DTYPE_CODES, rng.KernelMode, rng.Distribution
AXPBY, MASTER_UPDATE, MASTER_VIEW, FILL = (KernelMode.AXPBY, KernelMode.MASTER_UPDATE, KernelMode.MASTER_VIEW,
                                           KernelMode.FILL)
GAUSSIAN = Distribution.GAUSSIAN
NAMES = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "MEZO_BACKEND"


class Group(Protocol):
    """What a backend reads from a group plan (see ``perturb._Group``)."""
    tensors: list[torch.Tensor]
    masters: list[torch.Tensor] | None
    sources: list[torch.Tensor] | None   # mode OUT: what meta[3] points at (the group's dtype)
    bases: list[int]
    dtype: torch.dtype
    device: torch.device
    aligned: bool            # every base is a multiple of 4

    def tables(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------- torch backend
def _torch_launch(g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: KernelMode,
                  dist: Distribution = GAUSSIAN) -> None:
    """Pure-PyTorch implementation of every mode and distribution: the spec, one tensor at a time."""
    with torch.no_grad():
        for i, (t, base) in enumerate(zip(g.tensors, g.bases)):
            z = rng.direction(seed, base, t.numel(), t.device, dist).view(t.shape)
            if mode == KernelMode.FILL:
                t.copy_(z)
            elif mode == KernelMode.AXPBY:
                t.copy_(rng.fma_update(t, z, alpha, beta))
            elif mode == KernelMode.AXPBY_SR:
                t.copy_(rng.stochastic_round(rng.fma_update(t, z, alpha, beta), t.dtype, seed, base))
            elif mode == KernelMode.OUT:
                t.copy_(rng.fma_update(g.sources[i], z, alpha, beta))
            elif mode in (KernelMode.MASTER_UPDATE, KernelMode.MASTER_VIEW):
                m = g.masters[i]
                if mode == KernelMode.MASTER_UPDATE:
                    m.copy_(rng.fma_update(m, z, alpha, beta))
                t.copy_(rng.fma_update(m, z, 1.0, gamma))
            else:
                raise ValueError(f"the torch backend does not implement kernel mode {KernelMode(mode).name}")


# ---------------------------------------------------------------------------------------------- extensions
def _load(modname: str):
    try:
        return importlib.import_module(modname), None
    except ImportError as e:  # not built (MEZO_SKIP_EXT=1, no nvcc) or built for another Python
        return None, f"{modname} not importable ({e}); reinstall with `pip install -e .`"


class _Ext:
    def __init__(self, name: str, modname: str):
        self.name, self.modname, self._mod, self._why = name, modname, None, None
        self._loaded, self._chunk, self._codes = False, 0, None

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

    def _spec(self) -> dict:
        if self._codes is None:
            self._codes = dict(self.module().spec_codes())
        return self._codes

    def unsupported(self, mode: int, dist: int) -> str | None:
        """None when the built extension implements ``mode`` with ``dist``, else why not (an older build)."""
        codes = self._spec()
        if KernelMode(mode).name not in codes.get("modes", {}):
            return (f"{self.modname} was built without kernel mode {KernelMode(mode).name}; rebuild it "
                    "(`pip install -e .`)")
        if Distribution(dist).label not in codes.get("distributions", {"gaussian": 0}):
            return (f"{self.modname} was built without the {Distribution(dist).label} distribution; rebuild it "
                    "(`pip install -e .`)")
        return None

    def launch(self, g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: KernelMode,
               dist: Distribution = GAUSSIAN) -> None:
        why = self.unsupported(mode, dist)    # two dict lookups: an old build must never get a call it misreads
        if why is not None:
            raise ValueError(why)
        meta, chunks = g.tables(self.chunk)
        head = (meta.data_ptr(), meta.shape[1], chunks.data_ptr(), chunks.shape[0], self.chunk,
                int(DTYPE_CODES[g.dtype]), int(mode))
        # an extension built before distributions existed takes no dist argument (and serves gaussian only)
        args = (*head, int(dist)) if "distributions" in self._spec() else head
        args = (*args, seed, alpha, beta, gamma)
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

    def unsupported(self, mode: int, dist: int) -> str | None:
        return None

    def launch(self, g: Group, seed: int, alpha: float, beta: float, gamma: float, mode: KernelMode,
               dist: Distribution = GAUSSIAN) -> None:
        meta, chunks = g.tables(self.chunk)
        self.module().launch(meta, chunks, meta.shape[1], chunks.shape[0], g.dtype, mode, seed,
                             alpha, beta, gamma, g.aligned, dist=int(dist))


class _Torch:
    name = "torch"
    chunk = 0
    launch = staticmethod(_torch_launch)

    @staticmethod
    def unsupported(mode: int, dist: int) -> str | None:
        return None


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


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)   # the caller of choose()


def unsupported_reason(name: str, device: torch.device, mode: int, dist: int = GAUSSIAN) -> str | None:
    """None when backend ``name`` runs kernel ``mode`` with distribution ``dist`` on ``device``, else why not."""
    why = unavailable_reason(name, device)
    if why is None:
        why = _REGISTRY[name].unsupported(KernelMode(mode), rng.distribution_code(dist))
    return why


_CHOICES: dict[tuple, object] = {}   # (backend, $MEZO_BACKEND, mode, dist, device) -> backend object


def choose(backend: str, device: torch.device, mode: KernelMode, dist: Distribution):
    """The backend object that runs kernel ``mode`` with distribution ``dist`` on tensors of ``device``, for a
    caller that asked for ``backend`` (``"auto"`` or one of ``NAMES``); ``MEZO_BACKEND`` overrides ``backend``.

    ``auto`` takes the first backend of its order (CUDA extension, Triton, torch on a GPU; C++ extension, torch on
    the CPU) that serves ``mode`` with ``dist``, warning once when a present backend is passed over for lacking
    them (the fallback may be far slower); a named backend that cannot serve them is a ValueError saying why.
    ``mode`` and ``dist`` are the spec's enums, parsed by the caller. The one place the decision is made: memoised,
    so each (backend, mode, dist, device) is decided once per process (a refusal is not memoised: it raises
    again, with the same text). Tests that replace a backend clear ``_CHOICES``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    env = os.environ.get(ENV_VAR) or None
    key = (backend, env, mode, dist, device)
    found = _CHOICES.get(key)
    if found is None:
        found = _CHOICES[key] = _decide(env or backend, env is not None, device, mode, dist)
    return found


def _decide(name: str, from_env: bool, device: torch.device, mode: KernelMode, dist: Distribution):
    """:func:`choose` without the memo."""
    assert isinstance(mode, KernelMode) and isinstance(dist, Distribution), (mode, dist)

    def why_not(n: str) -> str | None:
        return unavailable_reason(n, device) or _REGISTRY[n].unsupported(mode, dist)

    if name == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        name = next(n for n in order if why_not(n) is None)
        skipped = [n for n in order[:order.index(name)] if unavailable_reason(n, device) is None]
        if skipped:   # a present backend lacks the feature: say so once, the fallback may be far slower
            _warn_once(f"backend {skipped[0]!r} is present but {why_not(skipped[0])}; using {name!r} instead")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(NAMES)}")
    why = why_not(name)
    if why is not None:
        src = f" (from ${ENV_VAR})" if from_env else ""
        raise ValueError(f"backend {name!r}{src} is unavailable for {device}: {why}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------------- low-rank update
# The fused low-rank update of one 2-d tensor (``perturb.lowrank``) is an op of its own, not a kernel mode on a
# plan: which backends have it is decided here, once per (backend, $MEZO_BACKEND, device), like ``choose``.
LOWRANK_FEATURE = "op:lowrank_update"   # what an extension's features() lists when it has the op


def lowrank_unsupported_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` runs the fused low-rank update on ``device``, else why not."""
    why = unavailable_reason(name, device)
    if why is not None or name == "torch":
        return why
    if name in ("cpu", "cuda"):
        feats = getattr(_REGISTRY[name].module(), "features", lambda: [])()
        return None if LOWRANK_FEATURE in feats else (
            f"{_REGISTRY[name].modname} was built without the low-rank update; rebuild it (`pip install -e .`)")
    mod = importlib.import_module("mezo_kernels.triton")      # triton: available, so importable
    return None if hasattr(mod, "lowrank_update") else "mezo_kernels.triton has no lowrank_update"


_LOWRANK_CHOICES: dict[tuple, str] = {}


def choose_lowrank(backend: str, device: torch.device) -> str:
    """The backend name (one of ``NAMES``) that runs the fused low-rank update on tensors of ``device``, for a caller
    that asked for ``backend`` (``"auto"`` or a name; ``MEZO_BACKEND`` overrides it). ``auto`` takes the first of
    (cuda, triton, torch) on a GPU, (cpu, torch) on the CPU that has the op, warning once when a present backend
    is passed over; a named backend without it is a ValueError saying why. Memoised (refusals are not)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device = torch.device(device)
    env = os.environ.get(ENV_VAR) or None
    key = (backend, env, device)
    found = _LOWRANK_CHOICES.get(key)
    if found is None:
        name = env or backend
        if name == "auto":
            order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
            name = next(n for n in order if lowrank_unsupported_reason(n, device) is None)
            skipped = [n for n in order[:order.index(name)] if unavailable_reason(n, device) is None]
            if skipped:
                _warn_once(f"backend {skipped[0]!r} is present but {lowrank_unsupported_reason(skipped[0], device)}; "
                           f"using {name!r} for the low-rank update instead")
        if name not in _REGISTRY:
            raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(NAMES)}")
        why = lowrank_unsupported_reason(name, device)
        if why is not None:
            src = f" (from ${ENV_VAR})" if env is not None else ""
            raise ValueError(f"backend {name!r}{src} cannot run the low-rank update on {device}: {why}")
        found = _LOWRANK_CHOICES[key] = name
    return found
