"""The thin MeZO training loop: batches -> objective -> optimizer -> eval, logs, plots.

It composes (data, tasks, models, objectives, optim, seedlog) and computes nothing itself. Everything a run
produces goes to ``output_dir``: ``config.json``, ``seeds.jsonl`` (replay log), ``metrics.jsonl`` (one object per
step), ``evals.jsonl``, ``adapter/`` (peft format; ``model/`` in full-parameter mode), ``curves.png``,
``summary.json``. Batches depend only on (seed, step), so a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import data, models, objectives, tasks
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
    steps: int = 300
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
    max_length: int = 64
    chat: bool = False
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
        model = models.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    kw = {"max_length": cfg.max_length}
    if kind == "causal":
        kw["chat"] = cfg.chat
    obj = objectives.make_objective(model, tok, task, kind=kind, **kw)
    return model, tok, task, obj, models.trainable_parameters(model)


def evaluate(model, objective, examples: Sequence[data.Example], batch_size: int = 32) -> dict:
    """Accuracy, F1, mean CE and n over ``examples`` (no gradients)."""
    if not examples:
        raise ValueError("nothing to evaluate: the split is empty")
    outs = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            outs.append(objective(examples[i:i + batch_size], model=model))
    cat = objectives.ObjectiveOutput.__new__(objectives.ObjectiveOutput)
    for name in ("loss", "per_example", "logits", "preds", "labels"):
        vals = [getattr(o, name) for o in outs]
        setattr(cat, name, torch.stack(vals).mean() if name == "loss" else torch.cat(vals))
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


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run MeZO fine-tuning as configured; returns the summary (also written to ``summary.json``)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = data.load_splits(cfg.task, data.resolve_data_dir(cfg.data_dir), cfg.protocol, cfg.k, cfg.seed)
    model, tok, task, obj, params = build(cfg)
    loss_fn = objectives.scalar_objective(obj, cfg.objective)
    opt = MeZO(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed, backend=cfg.backend,
               n_directions=cfg.n_directions, schedule=cfg.schedule, total_steps=cfg.steps)
    cfg_json = dataclasses.asdict(cfg)
    log_path, metrics_path, evals_path = out / "seeds.jsonl", out / "metrics.jsonl", out / "evals.jsonl"
    resumed = cfg.resume and log_path.exists()
    if resumed:
        old = json.loads((out / "config.json").read_text())
        free = ("resume", "eval_every") + (("steps",) if cfg.schedule == "constant" else ())  # linear lr needs steps
        changed = {k for k in cfg_json if k not in free and old.get(k) != cfg_json[k]}
        if changed:
            raise ValueError(f"--resume with different settings than the logged run: {sorted(changed)}")
        _, records = read_log(str(log_path))
        opt.replay_(records)                    # bit-exact: the same weight ops in the same order
        _truncate_jsonl(metrics_path, opt.step_count)
    else:
        for p in (metrics_path, evals_path):
            p.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_json, indent=1))
    writer = SeedLogWriter(str(log_path), opt.config(), {"model": cfg.model, "task": cfg.task}, resume=resumed)
    final_eval = _capped(getattr(splits, cfg.final_split), cfg.eval_max, cfg.seed)
    periodic = _capped(getattr(splits, cfg.eval_split), cfg.eval_max, cfg.seed + 1)
    summary: dict = {"config": cfg_json, "backend": opt.param_sets[0].backend,
                     "trainable": sum(p.numel() for _, p in params)}
    if not resumed:
        summary["before"] = evaluate(model, obj, final_eval, cfg.eval_batch_size)
        _append(evals_path, {"step": 0, "split": cfg.final_split, **summary["before"]})
        print(f"before: {cfg.final_split} accuracy {summary['before']['accuracy']:.4f} "
              f"(n={summary['before']['n']})", flush=True)
    bar = _bar(cfg.steps, opt.step_count, progress)
    t_start, zero = time.perf_counter(), opt.zero_grad_steps
    try:
        with open(metrics_path, "a") as mf:
            while opt.step_count < cfg.steps:
                step = opt.step_count
                batch = batch_for(splits.train, step, cfg.seed, cfg.batch_size)
                t0 = time.perf_counter()
                with torch.no_grad():
                    res = opt.step(lambda: loss_fn(model, batch))
                dt = time.perf_counter() - t0
                writer.append(opt.log[-cfg.n_directions:])
                rec = {"step": step, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus, "g": res.grad,
                       "lr": opt.lr_at(step), "seconds": round(dt, 4), "zero_grad": res.grad == 0.0,
                       "skipped": res.skipped}
                mf.write(json.dumps(rec) + "\n"); mf.flush()
                done = opt.step_count
                zr = 100.0 * opt.zero_grad_steps / done
                bar.update(1)
                bar.set_postfix(loss=f"{(res.loss_plus + res.loss_minus) / 2:.4f}", g=f"{res.grad:+.3g}",
                                zero_g=f"{zr:.0f}%", refresh=False)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    ev = evaluate(model, obj, periodic, cfg.eval_batch_size)
                    _append(evals_path, {"step": done, "split": cfg.eval_split, **ev})
                    bar.write(f"step {done}: {cfg.eval_split} accuracy {ev['accuracy']:.4f} loss {ev['loss']:.4f}")
    finally:
        bar.close()
        writer.close()
    train_s = time.perf_counter() - t_start
    summary["after"] = evaluate(model, obj, final_eval, cfg.eval_batch_size)
    _append(evals_path, {"step": opt.step_count, "split": cfg.final_split, **summary["after"]})
    summary.update(steps=opt.step_count, train_seconds=round(train_s, 1),
                   zero_grad_rate=opt.zero_grad_steps / max(1, opt.step_count),
                   skipped_directions=opt.skipped_directions, new_zero_grad_steps=opt.zero_grad_steps - zero)
    save_weights(model, out, cfg.lora)
    from .plots import plot_curves
    plot_curves(str(metrics_path), str(evals_path), str(out / "curves.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"after: {cfg.final_split} accuracy {summary['after']['accuracy']:.4f} (n={summary['after']['n']})",
          flush=True)
    return summary


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
