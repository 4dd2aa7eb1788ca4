"""The thin MeZO training loop: batches -> objective -> optimizer -> eval, logs, plots.

It composes (data, tasks, models, objectives, optim, seedlog) and computes nothing itself. Everything a run
produces goes to ``output_dir``: ``config.json``, ``seeds.jsonl`` (replay log), ``metrics.jsonl`` (one object per
step), ``evals.jsonl``, ``adapter/`` (peft format; ``model/`` in full-parameter mode), ``curves.png``,
``summary.json``. Batches depend only on (seed, step), so a resumed run sees the same data as an uninterrupted one.

Under ``torchrun`` (WORLD_SIZE > 1) the loop is data parallel (``distributed.py``): every rank builds the same
model and draws the same global batch, evaluates its slice, and the ranks all-gather the per-example losses, so
every rank gets the same g and applies the same update. Only rank 0 writes files and prints; every rank evaluates
the whole evaluation split (identical weights give identical metrics).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import data, distributed, models, objectives, tasks
from .forward import ForwardEngine
from .optim import MeZO
from .seedlog import SeedLogWriter, read_log


@dataclass
class TrainConfig:
    task: str = "sst2"
    model: str = "smollm2-135m"
    data_dir: str | None = None
    output_dir: str = "runs/demo"
    protocol: str = "kshot"
    k: int = 16
    steps: int = 450
    seed: int = 0
    lr: float = 1e-3
    eps: float = 1e-2
    batch_size: int = 16
    n_directions: int = 1
    weight_decay: float = 0.0
    schedule: str = "constant"
    objective: str = "ce"               # ce | neg_accuracy | neg_f1
    lora: bool = True                   # False: full-parameter MeZO
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    lora_first_layer: int = 0           # LoRA on layers >= this one; the frozen layers below run once per step
    max_length: int = 64
    chat: bool = False
    prefix_reuse: bool = True           # forward engine reuse (prefix KV, frozen layers, eval cache); exact
    eval_every: int = 100
    eval_split: str = "dev"             # periodic evaluation split
    final_split: str = "test"           # before/after evaluation split (kshot: the original GLUE dev set)
    eval_max: int = 0                   # cap on evaluated examples per evaluation (0: all)
    eval_batch_size: int = 32
    backend: str = "auto"
    dtype: str = "float32"
    resume: bool = False
    extra: dict = field(default_factory=dict)


def build(cfg: TrainConfig):
    """(model, tokenizer, task, objective, trainable params) with the seeded initial weights of ``cfg``."""
    task = tasks.get_task(cfg.task)
    model, tok, kind = models.load_model(cfg.model, seed=cfg.seed, dtype=getattr(torch, cfg.dtype))
    if cfg.lora:
        torch.manual_seed(cfg.seed)            # peft draws LoRA A from the global generator
        model = models.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                first_layer=cfg.lora_first_layer)
    kw = {"max_length": cfg.max_length}
    if kind == "causal":
        kw["chat"] = cfg.chat
        kw["engine"] = ForwardEngine() if cfg.prefix_reuse else ForwardEngine.plain()
    obj = objectives.make_objective(model, tok, task, kind=kind, **kw)
    return model, tok, task, obj, models.trainable_parameters(model)


def evaluate(model, objective, examples: Sequence[data.Example], batch_size: int = 32) -> dict:
    """Accuracy, F1, mean CE and n over ``examples`` (no gradients)."""
    if not examples:
        raise ValueError("nothing to evaluate: the split is empty")
    # batches of similar length pad less (about half the tokens on SST-2); the metrics do not depend on order
    ordered = sorted(examples, key=lambda e: len(e.text_a) + len(e.text_b or ""))
    outs = []
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            outs.append(objective(ordered[i:i + batch_size], model=model))
    cat = objectives.from_scores(torch.cat([o.logits for o in outs]), torch.cat([o.labels for o in outs]))
    return {"accuracy": objectives.accuracy(cat), "f1": objectives.f1(cat),
            "loss": float(cat.per_example.mean()), "n": len(examples)}


def batch_for(train: Sequence[data.Example], step: int, seed: int, size: int) -> list[data.Example]:
    """The batch of ``step``: a function of (seed, step) only, so resume and replay see the same data."""
    r = random.Random(seed * 1_000_003 + step)
    return r.sample(list(train), min(size, len(train)))


def _capped(examples: list, cap: int, seed: int) -> list:
    if cap and len(examples) > cap:
        return random.Random(seed).sample(examples, cap)
    return examples


def train(cfg: TrainConfig, progress: bool = True, ddp: bool | None = None) -> dict:
    """Run MeZO fine-tuning as configured; returns the summary (also written to ``summary.json``).

    ``ddp``: None (default) turns data parallelism on when launched by torchrun with WORLD_SIZE > 1; False
    ignores the torchrun environment (every process trains alone)."""
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    use_ddp = distributed.env_world_size() > 1 if ddp is None else ddp
    info = distributed.init_from_env() if use_ddp else distributed.DistInfo(0, 1, 0, None)
    multi, main = info.world_size > 1, info.rank == 0
    try:
        return _train(cfg, progress and main, multi, main, info)
    finally:
        if multi and owned:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, multi: bool, main: bool, info: distributed.DistInfo) -> dict:
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if multi:
        distributed.rank_slice(range(cfg.batch_size), 0, info.world_size)   # refuse an uneven split up front
    splits = data.load_splits(cfg.task, data.resolve_data_dir(cfg.data_dir), cfg.protocol, cfg.k, cfg.seed)
    model, tok, task, obj, params = build(cfg)
    if multi:
        distributed.check_replicas([p for _, p in params], "initial trainable weights")
        loss_fn = distributed.DataParallelLoss(obj, cfg.objective)
    else:
        loss_fn = objectives.scalar_objective(obj, cfg.objective)
    opt = MeZO(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed, backend=cfg.backend,
               n_directions=cfg.n_directions, schedule=cfg.schedule, total_steps=cfg.steps)
    cfg_json = dataclasses.asdict(cfg)
    log_path, metrics_path, evals_path = out / "seeds.jsonl", out / "metrics.jsonl", out / "evals.jsonl"
    # rank 0 reads the run folder and hands the seed log to the others (no shared file system needed)
    resumed, records, error = False, [], None
    if main:
        try:
            resumed, records = _resume_state(cfg, cfg_json, out, log_path)
        except (ValueError, OSError) as e:      # raised on every rank below, instead of a hang in the broadcast
            error = e
    if multi:
        resumed, records, error = distributed.broadcast_object((resumed, records, error))
    if error is not None:
        raise error
    if resumed:
        opt.replay_(records)                    # bit-exact: the same weight ops in the same order
        if main:
            _truncate_jsonl(metrics_path, opt.step_count)
    elif main:
        for p in (metrics_path, evals_path):
            p.unlink(missing_ok=True)
    writer = None
    if main:
        (out / "config.json").write_text(json.dumps(cfg_json, indent=1))
        extra = {"model": cfg.model, "task": cfg.task, **({"world_size": info.world_size} if multi else {})}
        writer = SeedLogWriter(str(log_path), opt.config(), extra, resume=resumed)
    final_eval = _capped(getattr(splits, cfg.final_split), cfg.eval_max, cfg.seed)
    periodic = _capped(getattr(splits, cfg.eval_split), cfg.eval_max, cfg.seed + 1)
    summary: dict = {"config": cfg_json, "backend": opt.param_sets[0].backend,
                     "trainable": sum(p.numel() for _, p in params)}
    if not resumed:
        summary["before"] = evaluate(model, obj, final_eval, cfg.eval_batch_size)
        if main:
            _append(evals_path, {"step": 0, "split": cfg.final_split, **summary["before"]})
            print(f"before: {_split_name(cfg)} accuracy {summary['before']['accuracy']:.4f} "
                  f"(n={summary['before']['n']})", flush=True)
    bar = _bar(cfg.steps, opt.step_count, progress)
    t_start, zero = time.perf_counter(), opt.zero_grad_steps
    comm_start, first_step = (loss_fn.stats.snapshot() if multi else None), opt.step_count
    try:
        with (open(metrics_path, "a") if main else contextlib.nullcontext()) as mf:
            while opt.step_count < cfg.steps:
                step = opt.step_count
                batch = batch_for(splits.train, step, cfg.seed, cfg.batch_size)
                t0 = time.perf_counter()
                before_step = loss_fn.stats.snapshot() if multi else None
                with torch.no_grad():
                    res = opt.step(lambda: loss_fn(model, batch))
                dt = time.perf_counter() - t0
                rec = {"step": step, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus, "g": res.grad,
                       "lr": opt.lr_at(step), "seconds": round(dt, 4), "zero_grad": res.grad == 0.0,
                       "skipped": res.skipped}
                if multi:
                    c = loss_fn.stats.since(before_step)
                    rec.update(comm_bytes_out=c.bytes_out, comm_bytes_in=c.bytes_in, comm_seconds=round(c.seconds, 6))
                if main:
                    writer.append(opt.log[-cfg.n_directions:])
                    mf.write(json.dumps(rec) + "\n"); mf.flush()
                done = opt.step_count
                zr = 100.0 * opt.zero_grad_steps / done
                bar.update(1)
                bar.set_postfix(loss=f"{(res.loss_plus + res.loss_minus) / 2:.4f}", g=f"{res.grad:+.3g}",
                                zero_g=f"{zr:.0f}%", refresh=False)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    ev = evaluate(model, obj, periodic, cfg.eval_batch_size)
                    if main:
                        _append(evals_path, {"step": done, "split": cfg.eval_split, **ev})
                        bar.write(f"step {done}: {cfg.eval_split} accuracy {ev['accuracy']:.4f} "
                                  f"loss {ev['loss']:.4f}")
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    train_s = time.perf_counter() - t_start
    summary["after"] = evaluate(model, obj, final_eval, cfg.eval_batch_size)
    summary.update(steps=opt.step_count, train_seconds=round(train_s, 1),
                   zero_grad_rate=opt.zero_grad_steps / max(1, opt.step_count),
                   skipped_directions=opt.skipped_directions, new_zero_grad_steps=opt.zero_grad_steps - zero)
    engine = getattr(obj, "engine", None)
    if engine is not None:
        summary["forward"] = engine.stats.as_dict()
    if multi:
        c, n = loss_fn.stats.since(comm_start), max(1, opt.step_count - first_step)   # a resume replays the rest
        summary["distributed"] = {"world_size": info.world_size, "backend": info.backend,
                                  "bytes_out_per_step": c.bytes_out / n, "bytes_in_per_step": c.bytes_in / n,
                                  "comm_seconds_per_step": c.seconds / n, "steps_timed": n}
    if not main:
        return summary
    _append(evals_path, {"step": opt.step_count, "split": cfg.final_split, **summary["after"]})
    save_weights(model, out, cfg.lora)
    from .plots import plot_curves
    plot_curves(str(metrics_path), str(evals_path), str(out / "curves.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"after: {_split_name(cfg)} accuracy {summary['after']['accuracy']:.4f} (n={summary['after']['n']})",
          flush=True)
    if "forward" in summary:
        f = summary["forward"]
        why = f" (plain forward: {f['fallback']})" if f["fallback"] else ""
        print(f"forward engine: attention {', '.join(f['attention'])}; token-layer work saved "
              f"{100 * f['saved_fraction']:.1f}%, frozen-layer hits {f['frozen_hits']}, eval-cache hits "
              f"{f['prefix_cache_hits']}/{f['prefix_cache_lookups']}{why}", flush=True)
    return summary


def _resume_state(cfg: TrainConfig, cfg_json: dict, out: Path, log_path: Path) -> tuple[bool, list[dict]]:
    """(resumed, seed-log records) for ``--resume``; ValueError when the logged run had other settings."""
    if not (cfg.resume and log_path.exists()):
        return False, []
    old = json.loads((out / "config.json").read_text())
    free = ("resume", "eval_every", "prefix_reuse") + (("steps",) if cfg.schedule == "constant" else ())  # linear lr needs steps
    changed = {k for k in cfg_json if k not in free and old.get(k) != cfg_json[k]}
    if changed:
        raise ValueError(f"--resume with different settings than the logged run: {sorted(changed)}")
    _, records = read_log(str(log_path))
    return True, records


def _split_name(cfg: TrainConfig) -> str:
    """Under the k-shot protocol the test split is the task's original GLUE dev set: say so."""
    glue = cfg.protocol == "kshot" and cfg.final_split == "test"
    return f"{cfg.task} {cfg.final_split}" + (" (= GLUE dev set)" if glue else "")


def save_weights(model, out: Path, lora: bool) -> Path:
    target = out / ("adapter" if lora else "model")
    model.save_pretrained(str(target))
    return target


def _append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_jsonl(path: Path, n: int) -> None:
    """Keep the first ``n`` records (the steps the seed log holds) of a metrics file from a killed run."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()][:n]
        path.write_text("".join(ln + "\n" for ln in lines))


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
