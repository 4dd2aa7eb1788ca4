"""The compute dtype of a run, decided once: ``--dtype auto | float32 | bfloat16 | float16``.

:func:`choose` is the one decision. ``auto`` means:

* on a GPU (``cuda``): ``bfloat16``;
* on a CPU whose flags (:func:`cpu_flags`, Linux ``/proc/cpuinfo``) include ``amx_bf16`` or ``avx512_bf16``, and
  where a short timed bf16 forward of the loaded model (:func:`forward_times`) takes at most 0.8 x the fp32 one
  (beats it by at least 20 %): ``bfloat16``;
* elsewhere ``float32`` (no bf16 flag: no timing at all).

An explicit ``bfloat16`` on a CPU with neither flag runs as asked, after a warning naming the flags and the
slowdown measured by the same timing. ``$MEZO_DTYPE_AUTO`` (``float32`` or ``bfloat16``) pins what ``auto`` resolves
to without measuring (a reproducible test suite; a fleet of mixed machines).

Only the frozen weights and the activations change dtype: LoRA adapters stay fp32 (peft keeps adapters of a
low-precision model in fp32), full-parameter bf16/fp16 tensors get their exact update from MeZO (fp32 masters in
place, or stochastic rounding on the virtual path), and the objectives reduce scores and losses in fp32.

A run records the resolved dtype (``config.json``, the seed log's header, ``summary.json``); ``--resume`` and
``replay`` load that one and never decide again, so a run moved to another CPU keeps its bits.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

__all__ = ["DTYPES", "DEFAULT", "TRAINER_DEFAULT", "BF16_FLAGS", "MIN_GAIN", "ENV_VAR", "DtypeChoice", "check_dtype",
           "cpu_flags", "forward_times", "choose", "load_model", "timing_module", "cast_model"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
# the CLI's and TrainConfig's default: auto, since bf16 is within fp32's seed spread on the demo at equal steps
# (issue #22; AMX box, 3 seeds x 450 steps: fp32 74.2 +- 4.5 %, bf16 71.2 +- 11.0 %; bench/RESULTS.md)
DEFAULT = "auto"
# MeZOTrainer's: auto (which only lowers fp32 models) when that is the default, else None (the model as loaded; a
# default "float32" would upcast a model the user loaded in bf16)
TRAINER_DEFAULT = DEFAULT if DEFAULT == "auto" else None
BF16_FLAGS = ("amx_bf16", "avx512_bf16")       # either one: bf16 matmuls in hardware (oneDNN uses them)
MIN_GAIN = 0.2                                  # auto takes bf16 when its forward is >= 20 % faster than fp32
ENV_VAR = "MEZO_DTYPE_AUTO"


@dataclass(frozen=True)
class DtypeChoice:
    """What ran and why. ``dtype``: the resolved name (never ``auto``); ``asked``: what the user asked for;
    ``reason``: one line; ``flags``: the bf16 flags the CPU has (None on a GPU or when not read); ``fp32_ms`` /
    ``bf16_ms``: the timed forwards (None when nothing was timed); ``warning``: the text warned, if any."""

    dtype: str
    asked: str
    reason: str
    flags: tuple[str, ...] | None = None
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    warning: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def check_dtype(value: object, allow_auto: bool = True) -> str:
    """``value`` if it names a dtype a run can take (one of :data:`DTYPES`; ``auto`` only with ``allow_auto``);
    TypeError for a non-string, ValueError naming the choices otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"dtype must be a string, one of {', '.join(DTYPES)}; got {type(value).__name__} {value!r}")
    ok = DTYPES if allow_auto else DTYPES[1:]
    if value not in ok:
        raise ValueError(f"dtype must be one of {', '.join(ok)}, got {value!r}")
    return value


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``/proc/cpuinfo``); empty where there is no such file
    (not Linux): such a CPU counts as having no bf16 support."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def timing_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model inside ``model`` (itself, or the first ``PreTrainedModel`` among its modules, e.g.
    under a peft wrapper or an objective wrapper): what :func:`forward_times` calls on token ids. None if none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def forward_times(model: torch.nn.Module, batch: int = 8, seq: int = 64, reps: int = 2) -> tuple[float, float]:
    """(fp32, bf16) seconds of a no-grad forward of ``model`` on ``batch x seq`` random token ids: the fastest of
    ``reps`` calls each, fp32 and bf16 alternating after one warm-up each (the minimum and the alternation keep a
    burst of load on a shared machine from deciding), the other dtype on a copy of the model. ``model`` itself is
    not changed and the global RNG is not drawn from. ``model``: a transformers model (:func:`timing_module`).
    The batch is not small on purpose: on the 2-core AMX box SmolLM2-135M's bf16 forward was 0.8-1.0x the fp32
    time at 2-4 x 64 tokens but about 0.5x at 8-16 x 64, the shapes of a training step (bench/RESULTS.md)."""
    vocab = int(model.config.vocab_size)
    dev = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    dt = next(model.parameters()).dtype
    other = copy.deepcopy(model).to(torch.bfloat16 if dt == torch.float32 else torch.float32)
    pair = (model, other) if dt == torch.float32 else (other, model if dt == torch.bfloat16 else
                                                       copy.deepcopy(other).to(torch.bfloat16))

    def seconds(m: torch.nn.Module) -> float:
        t0 = time.perf_counter()
        m(input_ids=ids, attention_mask=mask)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for m in pair:                                   # warm-up: allocations, kernel and layout choices
            seconds(m)
        ts = [[seconds(m) for m in pair] for _ in range(reps)]
    return min(t[0] for t in ts), min(t[1] for t in ts)


def choose(asked: str, device: torch.device | str,
           times: Callable[[], tuple[float, float] | None] | None = None) -> DtypeChoice:
    """The compute dtype for ``asked`` on ``device`` (the one decision; see the module docstring). ``times``:
    ``() -> (fp32 s, bf16 s)`` of the loaded model (e.g. ``lambda: forward_times(model)``), called only when the
    choice needs it (``auto`` on a CPU with a bf16 flag; ``bfloat16`` on one without); None, or a call returning
    None: not measurable (auto then keeps fp32). Emits a ``UserWarning`` for ``bfloat16`` on a CPU without bf16
    support."""
    asked = check_dtype(asked)
    device = torch.device(device)
    if device.type != "cpu":
        if asked == "auto":
            return DtypeChoice("bfloat16", asked, f"auto on {device.type}: bfloat16")
        return DtypeChoice(asked, asked, "as asked")
    if asked == "auto" and os.environ.get(ENV_VAR):
        pinned = check_dtype(os.environ[ENV_VAR], allow_auto=False)
        return DtypeChoice(pinned, asked, f"auto pinned by ${ENV_VAR}={pinned}")
    if asked not in ("auto", "bfloat16"):
        return DtypeChoice(asked, asked, "as asked")
    flags = tuple(f for f in BF16_FLAGS if f in cpu_flags())
    if asked == "auto" and not flags:
        return DtypeChoice("float32", asked, f"auto: float32, the CPU has neither {' nor '.join(BF16_FLAGS)}",
                           flags=flags)
    if asked == "bfloat16" and flags:
        return DtypeChoice(asked, asked, "as asked", flags=flags)
    t32, t16 = (times() if times is not None else None) or (None, None)
    ms = {} if t32 is None else dict(fp32_ms=round(1e3 * t32, 2), bf16_ms=round(1e3 * t16, 2))
    if asked == "bfloat16":                     # no bf16 flag: run as asked, after saying what it costs
        cost = ("" if t32 is None else
                f"; a bf16 forward of this model took {1e3 * t16:.1f} ms against {1e3 * t32:.1f} ms in float32 "
                f"({t16 / t32:.2f}x the time)")
        text = (f"--dtype bfloat16 on a CPU without bf16 support (neither {' nor '.join(BF16_FLAGS)} in its flags)"
                f"{cost}; running in bfloat16 as asked (--dtype auto picks float32 here)")
        warnings.warn(text, UserWarning, stacklevel=2)
        return DtypeChoice(asked, asked, "as asked, without bf16 support", flags=flags, warning=text, **ms)
    if t32 is None:
        return DtypeChoice("float32", asked, "auto: float32, no model to time", flags=flags)
    fast = t16 <= (1 - MIN_GAIN) * t32
    why = (f"auto: {'bfloat16' if fast else 'float32'}, {'/'.join(flags)} and a bf16 forward at "
           f"{t16 / t32:.2f}x the fp32 time ({'<=' if fast else '>'} {1 - MIN_GAIN:.2f})")
    return DtypeChoice("bfloat16" if fast else "float32", asked, why, flags=flags, **ms)


def load_model(name: str, asked: str, *, seed: int = 0, seq: int = 64, recorded: str | None = None,
               decide: bool = True, share: Callable[[DtypeChoice | None], DtypeChoice] | None = None):
    """``(model, tokenizer, kind, choice)``: ``models.load_model(name, seed=seed)`` in the dtype :func:`choose`
    resolves ``asked`` to, on the CPU (where the CLI's models live). A timing loads the model in float32 first
    (kept when float32 is chosen); the model returned is always loaded directly in the chosen dtype, as a resume or
    a replay of the run loads it.
    ``recorded``: the dtype a resumed run recorded, taken as it is (nothing decided, timed or warned again).
    Several processes: only the one with ``decide`` measures, and ``share`` (its choice, or None elsewhere ->
    the deciding process's choice) gives every process the same one."""
    from .. import models
    asked = check_dtype(asked)
    if recorded is not None:
        recorded = check_dtype(recorded, allow_auto=False)
        model, tok, kind = models.load_model(name, seed=seed, dtype=getattr(torch, recorded))
        return model, tok, kind, DtypeChoice(recorded, asked, f"{recorded}, recorded by the run (not decided again)")
    fp32: list = []

    def times() -> tuple[float, float] | None:
        if not fp32:
            fp32.append(models.load_model(name, seed=seed, dtype=torch.float32))
        m = timing_module(fp32[0][0])
        return None if m is None else forward_times(m, seq=seq)

    choice = choose(asked, "cpu", times) if decide else None
    if share is not None:
        choice = share(choice)
    if choice is None:                         # no process group to hear the deciding process from: decide here
        choice = choose(asked, "cpu", times)
    if fp32 and choice.dtype == "float32":
        model, tok, kind = fp32[0]
    else:
        fp32.clear()                           # free it before loading the other dtype
        model, tok, kind = models.load_model(name, seed=seed, dtype=choice.torch_dtype)
    return model, tok, kind, choice


def cast_model(model: torch.nn.Module, asked: str, device: torch.device | str | None = None) -> DtypeChoice:
    """``MeZOTrainer(dtype=...)`` on a model already built: :func:`choose` (timing the transformers model inside
    ``model``), then cast ``model``'s floating parameters in place to the chosen dtype, except LoRA adapters
    (``lora_`` in the name), which stay fp32 as in a CLI run. ``auto`` only lowers a float32 model: one whose
    floating weights are already another dtype is left as loaded. ``device``: where it runs (default: where its
    first parameter is)."""
    asked = check_dtype(asked)
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    device = torch.device(device) if device is not None else (params[0][1].device if params else torch.device("cpu"))
    others = sorted({str(p.dtype).removeprefix("torch.") for n, p in params if p.dtype != torch.float32
                     and "lora_" not in n})
    if asked == "auto" and others:
        return DtypeChoice(others[0], asked, f"auto: the model's weights are {', '.join(others)} already, left as "
                                             "loaded")
    tm = timing_module(model)
    choice = choose(asked, device, None if tm is None else lambda: forward_times(tm))
    with torch.no_grad():
        for n, p in params:
            if p.dtype != choice.torch_dtype and not ("lora_" in n and p.dtype == torch.float32):
                p.data = p.data.to(choice.torch_dtype)     # the same Parameter object: tied weights stay tied
    return choice
