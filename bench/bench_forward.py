"""What the forward engine's reuse buys: MeZO step time and tokens/s with and without each reuse (SmolLM2-135M).

Sweeps (each a MeZO-LoRA step = 2 forwards + fused perturbation, on one fixed batch):
  prefix    16 rows x 64 tokens whose first f*64 tokens are shared (a system prompt / instruction)
  cands     8 examples x C candidates of 3 tokens after a 48-token prompt (candidate scoring)
  frozen    16 x 64 unshared rows, LoRA q/v on layers >= k only (frozen-layer reuse)
  sst2      real SST-2 k-shot batches (16) with the plain prompt and with SmolLM2's chat template
  eval      one pass over 96 SST-2 test examples (chat template) in batches of 16, cold cache: eval-cache hit rate
            (the time column is the whole pass)

"ideal" = the fraction of token-layer work the engine no longer runs (its own counters: padded tokens x layers,
prefix batch included); "measured" = 1 - t_reuse / t_plain. Target: measured >= 0.8 x ideal.

Usage: python bench/bench_forward.py [--device cpu|cuda] [--reps N] [--quick] [--results bench/RESULTS.md]
Writes bench/out/forward_<device>.csv, bench/forward_<device>.png and the ``forward-<device>`` RESULTS section.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_perturb import device_label  # noqa: E402
from results import replace_section  # noqa: E402

from mezo_kernels.tasks import data, objectives, registry as tasks  # noqa: E402
from mezo_kernels import models
from mezo_kernels.forward.engine import ForwardEngine  # noqa: E402
from mezo_kernels.optim import MeZO  # noqa: E402

MODES = {"plain": ForwardEngine.plain, "reuse": ForwardEngine}


def lora_model(base, first_layer: int):
    """A LoRA-wrapped copy of the base model (peft modifies the model it wraps)."""
    torch.manual_seed(0)
    return models.add_lora(copy.deepcopy(base), first_layer=first_layer)


def synthetic(rows_n: int, length: int, shared: int, vocab: int, step: int) -> list[list[int]]:
    """Rows of step ``step``: the same ``shared`` leading tokens every step (a fixed template), fresh tails."""
    pre = torch.randint(100, vocab, (shared,), generator=torch.Generator().manual_seed(12345)).tolist()
    g = torch.Generator().manual_seed(step)
    return [pre + torch.randint(100, vocab, (length - shared,), generator=g).tolist() for _ in range(rows_n)]


def candidates(n_ex: int, C: int, prompt: int, cont: int, vocab: int, step: int) -> tuple[list[list[int]], int]:
    g = torch.Generator().manual_seed(step)
    rows = []
    for _ in range(n_ex):
        p = torch.randint(100, vocab, (prompt,), generator=g).tolist()
        rows += [p + torch.randint(100, vocab, (cont,), generator=g).tolist() for _ in range(C)]
    return rows, prompt - 1          # the first position read: the prompt's last token predicts the candidate


def encode(rows: list[list[int]], first_read: int | None = None):
    """Right-padded [ids, mask] and the (row, col) logits read: the last token, or every token from
    ``first_read`` on (candidate scoring)."""
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rr, cc = [], []
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        for c in range(len(r) - 1 if first_read is None else first_read, len(r)):
            rr.append(i), cc.append(c)
    return ids, mask, torch.tensor(rr), torch.tensor(cc)


def time_steps(model, loss_at, reps: int, engine: ForwardEngine) -> list[float]:
    """Seconds per MeZO step; step t's closure is ``loss_at(t)`` (a new batch each step, as in training: the
    frozen-layer state is then computed once per step, not once per run). Engine counters cover the timed steps."""
    opt = MeZO(models.trainable_parameters(model), lr=1e-4, eps=1e-3, seed=0)
    out = []
    for t in range(reps + 1):
        if t == 1:                               # step 0 warms up the allocator and caches
            engine.reset_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            opt.step(lambda: loss_at(t))
        if t:
            out.append(time.perf_counter() - t0)
    return out


def step_rows(model, batches, engine: ForwardEngine, reps: int) -> tuple[list[float], ForwardEngine]:
    def loss(t):
        ids, mask, rr, cc = batches[t]
        return float(engine.logits_at(model, ids, mask, rr, cc).float().logsumexp(-1).mean())
    return time_steps(model, loss, reps, engine), engine


def record(rows_out, sweep, x, mode, ts, engine, tokens):
    med = statistics.median(ts)
    rows_out.append({"sweep": sweep, "x": x, "mode": mode, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "tokens_per_s": 2 * tokens / med, "ideal_saving": engine.stats.saved_fraction,
                     "attention": "+".join(sorted(engine.stats.kernels)),
                     "prefix_hit_rate": engine.stats.prefix_hit_rate})
    print(f"{sweep:7s} x={x!s:>6} {mode:5s} {med * 1e3:8.1f} ms [{min(ts) * 1e3:.1f}..{max(ts) * 1e3:.1f}] "
          f"ideal saving {engine.stats.saved_fraction:.3f}", flush=True)


def run(args) -> list[dict]:
    out: list[dict] = []
    base, tok, _ = models.load_model("smollm2-135m")
    base.to(args.device)            # every loss is read back as a float, which also synchronizes a GPU
    vocab = base.config.vocab_size
    fracs = [0.0, 0.5] if args.quick else [0.0, 0.25, 0.5, 0.75, 0.9]
    steps = range(args.reps + 1)
    model = lora_model(base, 0)
    for f in fracs:
        batches = [encode(synthetic(16, 64, round(f * 64), vocab, t)) for t in steps]
        for mode, make in MODES.items():
            ts, eng = step_rows(model, batches, make(), args.reps)
            record(out, "prefix", f, mode, ts, eng, batches[0][0].numel())
    for C in ([1, 4] if args.quick else [1, 2, 4, 8]):
        batches = [encode(*candidates(8, C, 48, 3, vocab, t)) for t in steps]
        for mode, make in MODES.items():
            ts, eng = step_rows(model, batches, make(), args.reps)
            record(out, "cands", C, mode, ts, eng, batches[0][0].numel())
    batches = [encode(synthetic(16, 64, 0, vocab, t)) for t in steps]
    for k in ([0, 20] if args.quick else [0, 8, 15, 22, 29]):
        mk = lora_model(base, k)
        for mode, make in MODES.items():
            ts, eng = step_rows(mk, batches, make(), args.reps)
            record(out, "frozen", k, mode, ts, eng, batches[0][0].numel())
    if not args.quick:
        sst2(out, model, tok, args)
    return out


def sst2(out, model, tok, args) -> None:
    task = tasks.get_task("sst2")
    splits = data.load_splits("sst2", data.resolve_data_dir(args.data_dir), "kshot", 16, 0)
    for chat in (False, True):
        for mode, make in MODES.items():
            obj = objectives.CausalLMObjective(tok, task, max_length=64, chat=chat, engine=make())
            encs = [obj.encode(random.Random(t).sample(splits.train, 16)) for t in range(args.reps + 1)]
            ts = time_steps(model, lambda t: float(obj.forward(model, encs[t]).loss), args.reps, obj.engine)
            record(out, "sst2", "chat" if chat else "plain", mode, ts, obj.engine, encs[0]["input_ids"].numel())
    ex = splits.test[:96]
    for mode, make in MODES.items():          # one pass over 96 examples, each with a fresh engine (cold cache)
        ts = []
        for _ in range(2):
            obj = objectives.CausalLMObjective(tok, task, max_length=64, chat=True, engine=make())
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(ex), 16):
                    obj(model, ex[i:i + 16])
            ts.append(time.perf_counter() - t0)
        record(out, "eval", "chat, 96 ex", mode, ts, obj.engine, 0)


def _short(kernels: str) -> str:
    """'aten._scaled_dot_product_flash_attention_for_cpu.default' -> 'sdpa:flash_attention_for_cpu'."""
    return kernels.replace("aten._scaled_dot_product_", "sdpa:").replace(".default", "")


def table(rows: list[dict]) -> str:
    lines = ["| sweep | x | plain ms | reuse ms [min..max] | tokens/s plain → reuse | ideal saving | measured "
             "| measured/ideal | attention kernel (plain / reuse) | eval-cache hits |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["sweep"], r["x"], r["mode"]): r for r in rows}
    for (sweep, x, mode), r in by.items():
        if mode != "reuse":
            continue
        p = by[(sweep, x, "plain")]
        meas = 1 - r["median_s"] / p["median_s"]
        ideal = r["ideal_saving"]
        ratio = f"{meas / ideal:.2f}" if ideal > 0.02 else "–"
        tps = f"{p['tokens_per_s']:.0f} → {r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "–"
        lines.append(f"| {sweep} | {x} | {p['median_s'] * 1e3:.0f} | {r['median_s'] * 1e3:.0f} "
                     f"[{r['min_s'] * 1e3:.0f}..{r['max_s'] * 1e3:.0f}] | {tps} | {ideal:.3f} | {meas:.3f} | {ratio} "
                     f"| {_short(p['attention'])} / {_short(r['attention'])} | {r['prefix_hit_rate']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="a few points, no SST-2 (smoke run)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = ap.parse_args()
    dev = args.device
    rows = run(args)
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(here, "out"), exist_ok=True)
    with open(os.path.join(here, "out", f"forward_{dev}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from plot_forward import plot
    png = os.path.join(here, f"forward_{dev}.png")
    plot(rows, png)
    head = (f"`python bench/bench_forward.py --device {dev} --reps {args.reps}` — {device_label(dev)}, "
            f"torch {torch.__version__}, {datetime.date.today()}. SmolLM2-135M-Instruct (real weights, fp32), "
            f"LoRA q/v r=8, one MeZO step = 2 forwards; median of {args.reps} steps after one warm-up, "
            f"[min..max]. Plot: `bench/forward_{dev}.png`.\n\n")
    if not args.quick:
        replace_section(args.results, f"forward-{dev}", head + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
