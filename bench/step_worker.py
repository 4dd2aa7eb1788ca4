"""Measure one (configuration, method) of the step benchmark in this process.

Run by bench_step.py as ``python bench/step_worker.py '<json config>'``; prints one JSON line (the result) on
stdout. Each method of each configuration gets a fresh process, so that one method's allocations (AdamW moments,
cached allocator blocks, the RSS high-water mark) never show in another's figures.

What is timed: ``warmup`` untimed steps, then ``reps`` timed steps (perf_counter on the CPU, CUDA events on a GPU),
all on the same random token batch ``[batch, seq]`` (seeded), loss = the model's causal-LM loss with
``labels=input_ids``, so every method runs the same forward:

* ``inference``: one forward under ``torch.no_grad()``.
* ``mezo-inplace-master`` (named ``mezo`` before): ``MeZO(trainable, lr, eps, perturb="inplace").step(closure)``:
  2 forwards + 3 fused perturbation passes written into the weights; bf16/fp16 weights keep fp32 masters for an
  exact restore (the in-place default); in fp32 it is plain in-place arithmetic.
* ``mezo-inplace-nomaster`` (named ``mezo-inplace`` before): the same with ``exact_restore=False`` (no masters;
  differs from ``mezo-inplace-master`` only in bf16/fp16, so the grid runs it there only).
* ``mezo-virtual``: ``MeZO(..., perturb="virtual", model=model, rounding="stochastic")``: the ± passes never write
  the weights (each module sees theta ± eps*z materialised just in time), no fp32 masters; the update is the only
  write, rounded stochastically in bf16/fp16.
* ``mezo-batched`` (LoRA only): the same optimizer, ``step_batched``: L+ and L- from one forward of 2B rows
  (``step_batched.py``: the same loss, computed from the logits of each row group).
* ``mezo-n4`` / ``mezo-batched-n4`` (LoRA only): 4 directions per step, virtual, run one after the other (8
  forwards of B rows) / in one forward of 8B rows.
* ``mezo-lowrank-r1`` / ``-r4`` / ``-r16``: ``MeZO(..., distribution="lowrank", lowrank_r=r, model=model)``
  (virtual: nn.Linear / nn.Embedding add the rank-r term ``(x V) Uᵀ`` to their output, 1-d tensors are
  materialised as in ``mezo-virtual``; the update is one fused low-rank pass per 2-d tensor, stochastic rounding
  in bf16/fp16). Run by ``bench_lowrank.py``, not in ``bench_step.py``'s grid.
* ``reference``: the reference MeZO loop (bench_perturb.reference_step's passes, with the forwards between them):
  +eps pass, forward, -2eps pass, forward, +eps pass, -lr*g pass; each pass is ``torch.manual_seed`` then, per
  tensor, ``torch.normal`` + ``p.data = p.data + scale * z``.
* ``backprop``: forward, backward, ``AdamW.step()``, ``zero_grad(set_to_none=True)`` on the same trainable set
  (AdamW's moments in the weights' dtype).
* ``backprop-ckpt``: the same with activation (gradient) checkpointing, ``use_reentrant=False``. Both backprop
  methods run in ``train()`` mode because transformers checkpoints only when training; dropout is 0 in every model
  here, so the function is the same as in eval mode.

Trainable set: LoRA r=8 on q_proj/v_proj (mode ``lora``, ``mezo_kernels.models.add_lora``) or every parameter
(mode ``full``).

Peak memory (instruments in step_measure.py). CPU: peak RSS over a baseline. After the model, the LoRA wrapper and
the batch exist, free heap is returned to the OS (``malloc_trim``), the kernel's RSS high-water mark is reset
(``/proc/self/clear_refs`` <- 5) and VmRSS is read as the baseline; the optimizer is built after that, so its state
(AdamW moments, MeZO's fp32 masters) counts; VmHWM is read after the last step. GPU:
``torch.cuda.reset_peak_memory_stats()`` at the same point, ``max_memory_allocated()`` minus ``memory_allocated()``
at the reset, and the absolute value. ``footprint`` = weight bytes + peak over baseline: what the step needs with
its weights, the figure the ratios use (on the CPU the absolute RSS also holds ~0.45 GB of interpreter and
libraries).

Each step also reports the time spent in its forwards (``Setup.loss`` adds it up), so a step splits into forwards
and the rest: perturbation passes for the MeZO methods, backward and optimizer for backprop.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.dirname(_BENCH)]          # bench/ helpers, and this checkout's mezo_kernels
import step_models as sm  # noqa: E402
from bench_perturb import reference_pass  # noqa: E402  (the reference loop, one pass between forwards)
from step_measure import read_peak, reset_peak, rss, spread, time_steps  # noqa: E402
from step_report import METHOD_ALIASES, canonical  # noqa: E402

METHODS = ("inference", "mezo-inplace-master", "mezo-inplace-nomaster", "mezo-virtual", "mezo-batched", "mezo-n4",
           "mezo-batched-n4", "reference", "backprop", "backprop-ckpt", "mezo-lowrank-r1", "mezo-lowrank-r4",
           "mezo-lowrank-r16")
LOWRANK = ("mezo-lowrank-r1", "mezo-lowrank-r4", "mezo-lowrank-r16")    # bench_lowrank.py's; not in the step grid
LORA_ONLY = ("mezo-batched", "mezo-n4", "mezo-batched-n4")      # batching ± is for adapters (grouped LoRA)
LOW_PRECISION_ONLY = ("mezo-inplace-nomaster",)                  # in fp32 it is mezo-inplace-master
N_DIRECTIONS = {"mezo-n4": 4, "mezo-batched-n4": 4}
MODES = ("lora", "full")
DEVICES = ("cpu", "cuda")
MIB = 2**20
DEFAULTS = dict(batch=2, seq=64, mode="lora", dtype="fp32", device="cpu", reps=3, warmup=1, lr=1e-6, eps=1e-3,
                seed=0, lora_r=8, cache_dir=None)


def check_config(cfg: dict) -> dict:
    """``cfg`` with defaults filled in; ValueError naming the bad field otherwise."""
    c = {**DEFAULTS, **cfg}
    sm.check_model(c.get("model", ""))
    if isinstance(c.get("method"), str):
        c["method"] = canonical(c["method"])                      # old names map to the explicit ones
    for key, allowed in (("method", METHODS), ("mode", MODES), ("device", DEVICES), ("dtype", tuple(sm.DTYPES))):
        if c.get(key) not in allowed:
            extra = f" (or the old names {', '.join(METHOD_ALIASES)})" if key == "method" else ""
            raise ValueError(f"unknown {key} {c.get(key)!r}; choose from {', '.join(allowed)}{extra}")
    if c["method"] in LORA_ONLY and c["mode"] != "lora":
        raise ValueError(f"method {c['method']} batches or multiplies LoRA directions: mode must be lora, "
                         f"got {c['mode']!r}")
    for key in ("batch", "seq", "reps", "lora_r"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {c[key]!r}")
    if c["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch.cuda.is_available() is False")
    return c


# ----------------------------------------------------------------------------------------------- the steps
class Setup:
    """Model (with LoRA in mode lora), its trainable (name, param) list and the token batch, on the device."""

    def __init__(self, c: dict):
        from mezo_kernels.models import add_lora, trainable_parameters
        self.device = torch.device(c["device"])
        model = sm.build_model(c["model"], sm.DTYPES[c["dtype"]], seed=c["seed"], cache_dir=c["cache_dir"])
        if c["mode"] == "lora":
            torch.manual_seed(c["seed"])          # peft draws lora_A from the global generator: same adapters
            model = add_lora(model, r=c["lora_r"], alpha=2 * c["lora_r"], targets=("q_proj", "v_proj"))
        self.model = model.to(self.device)
        self.trainable = trainable_parameters(self.model)
        self.params = [p for _, p in self.trainable]
        g = torch.Generator().manual_seed(c["seed"] + 1)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (c["batch"], c["seq"]), generator=g).to(self.device)
        self.fwd_s = 0.0
        self.optimizer = None                     # the MeZO of a virtual method, once built (tests read it)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.weight_bytes = sum(t.numel() * t.element_size()
                                for t in list(self.model.parameters()) + list(self.model.buffers()))

    def loss(self) -> torch.Tensor:
        """The forward; its time is added to ``fwd_s`` (synchronized on a GPU) so that a step's time splits into
        forwards and the rest (perturbation passes, backward, optimizer)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.model(input_ids=self.ids, labels=self.ids).loss
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.fwd_s += time.perf_counter() - t0
        return out

    def add_forward_time(self, seconds: float) -> None:
        """For forwards run elsewhere (the batched ± pass): counted like those of :meth:`loss`."""
        self.fwd_s += seconds


def make_step(method: str, s: Setup, c: dict) -> Callable[[], dict]:
    """The step function of ``method``; builds its optimizer (call after the memory reset). Each call returns
    ``{"loss": ..., "fwd_s": time spent in forwards}`` (plus ``seed`` and ``g`` for the MeZO methods)."""
    inner = _make_step(canonical(method), s, c)

    def step():
        s.fwd_s = 0.0
        info = inner()
        info["fwd_s"] = s.fwd_s
        return info
    return step


def _make_step(method: str, s: Setup, c: dict) -> Callable[[], dict]:
    lr, eps = c["lr"], c["eps"]
    if method == "inference":
        def step():
            with torch.no_grad():
                return {"loss": float(s.loss())}
    elif method in ("mezo-inplace-master", "mezo-inplace-nomaster"):
        from mezo_kernels.optim import MeZO
        opt = MeZO(s.trainable, lr=lr, eps=eps, seed=c["seed"], perturb="inplace",
                   exact_restore=False if method == "mezo-inplace-nomaster" else None)

        def step():
            with torch.no_grad():
                r = opt.step(lambda: float(s.loss()))
            return {"loss": r.loss_plus, "loss_minus": r.loss_minus, "seed": r.seed, "g": r.grad}
    elif method in ("mezo-virtual", "mezo-n4", "mezo-batched", "mezo-batched-n4"):
        from mezo_kernels.optim import MeZO
        opt = MeZO(s.trainable, lr=lr, eps=eps, seed=c["seed"], perturb="virtual", model=s.model,
                   rounding="stochastic", n_directions=N_DIRECTIONS.get(method, 1))
        s.optimizer = opt
        if method.startswith("mezo-batched"):
            from step_batched import batched_step
            return batched_step(s.model, s.ids, opt, on_forward=s.add_forward_time)

        def step():
            with torch.no_grad():
                r = opt.step(lambda: float(s.loss()))
            return {"loss": r.loss_plus, "loss_minus": r.loss_minus, "seed": r.seed, "g": r.grad}
    elif method in LOWRANK:
        from mezo_kernels.optim import MeZO
        opt = MeZO(s.trainable, lr=lr, eps=eps, seed=c["seed"], model=s.model, distribution="lowrank",
                   lowrank_r=int(method.rsplit("-r", 1)[1]))
        s.optimizer = opt

        def step():
            with torch.no_grad():
                r = opt.step(lambda: float(s.loss()))
            return {"loss": r.loss_plus, "loss_minus": r.loss_minus, "seed": r.seed, "g": r.grad}
    elif method == "reference":
        count = [0]

        def step():
            seed = c["seed"] * 1_000_003 + count[0]      # a new direction per step, as the reference draws one
            count[0] += 1
            with torch.no_grad():
                reference_pass(s.params, seed, eps)
                lp = float(s.loss())
                reference_pass(s.params, seed, -2 * eps)
                lm = float(s.loss())
                reference_pass(s.params, seed, eps)
                g = (lp - lm) / (2 * eps)
                reference_pass(s.params, seed, -lr * g)
            return {"loss": lp, "seed": seed, "g": g}
    elif method in ("backprop", "backprop-ckpt"):
        if method == "backprop-ckpt":
            kw = {"use_reentrant": False}
            if hasattr(s.model, "activation_checkpointing_enable"):    # transformers >= 5 name
                s.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:                                                   # the deprecated alias (removed in v6)
                s.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        s.model.train()
        opt = torch.optim.AdamW(s.params, lr=lr)

        def step():
            loss = s.loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return {"loss": float(loss.detach())}
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return step


# ----------------------------------------------------------------------------------------------- one measurement
def _need(c: dict, n_params: int, n_trainable: int, largest: int, shape: dict) -> int:
    dt = sm.DTYPES[c["dtype"]]
    return sm.estimate_bytes(c["method"], n_params, n_trainable, largest, dt.itemsize, shape, c["batch"], c["seq"],
                             exact_masters=dt != torch.float32)


def _guard(c: dict, need: int, held: int) -> str | None:
    if c["device"] == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if need - held <= free:
            return None
        return f"skipped: needs ~{need / sm.GB:.1f} GB, have {(free + held) / sm.GB:.1f} GB (GPU free)"
    return sm.guard(need, already=held)


def measure(cfg: dict) -> dict:
    """Build, guard, time and measure one (configuration, method); returns the result record (status ok|skipped)."""
    c = check_config(cfg)
    device = torch.device(c["device"])
    out = {k: c[k] for k in ("model", "batch", "seq", "mode", "dtype", "method", "device", "reps", "warmup")}
    meta = sm.meta_model(c["model"])
    if meta is not None:                           # before building: a 1B model alone is 2.5-5 GB
        n = sum(p.numel() for p in meta.parameters())
        largest = max(p.numel() for p in meta.parameters())
        lora = c["mode"] == "lora"
        why = _guard(c, _need(c, n, 0 if lora else n, 0 if lora else largest, sm.shape_of(meta.config)), 0)
        if why:
            return {**out, "status": "skipped", "error": why}
    t0 = time.perf_counter()
    s = Setup(c)
    out["load_s"] = time.perf_counter() - t0
    tr = [p.numel() for p in s.params]
    held = s.weight_bytes if device.type == "cuda" else rss()
    why = _guard(c, _need(c, s.n_params, sum(tr), max(tr), sm.shape_of(s.model.config)), held)
    if why:
        return {**out, "status": "skipped", "error": why}
    base = reset_peak(device)
    step = make_step(c["method"], s, c)
    times, infos = time_steps(step, c["warmup"], c["reps"], device)
    peak = read_peak(device)
    st = spread(times)
    info = infos[-1]
    fwd = statistics.median(i["fwd_s"] for i in infos)
    rest = statistics.median(t - i["fwd_s"] for t, i in zip(times, infos))
    out.update(status="ok", error="", **st, tokens_per_s=c["batch"] * c["seq"] / st["median_s"],
               fwd_s=fwd, other_s=rest,
               times_s=times, n_params=s.n_params, n_trainable=sum(tr), weights_mib=s.weight_bytes / MIB,
               baseline_mib=base / MIB, peak_abs_mib=peak / MIB, peak_over_base_mib=(peak - base) / MIB,
               footprint_mib=(s.weight_bytes + peak - base) / MIB, loss=info.get("loss"),
               mem_method=("cuda max_memory_allocated - allocated at reset" if device.type == "cuda"
                           else "VmHWM - VmRSS after model load (clear_refs reset)"),
               threads=torch.get_num_threads(), attn=getattr(s.model.config, "_attn_implementation", ""),
               device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: step_worker.py '<json config>'", file=sys.stderr)
        return 2
    real_stdout, sys.stdout = sys.stdout, sys.stderr      # library chatter must not mix with the JSON line
    cfg = None
    try:
        cfg = json.loads(argv[0])
        res = measure(cfg)
    except Exception as e:  # noqa: BLE001  a failed config is a result, recorded by the caller
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, MemoryError)
        res = {**(cfg if isinstance(cfg, dict) else {}), "status": "oom" if oom else "error",
               "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    finally:
        sys.stdout = real_stdout
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
