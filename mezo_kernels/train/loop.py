"""The thin MeZO training loop: batches -> objective -> optimizer -> eval.

It composes (data, tasks, models, objectives, forward, optim) and the run context (run.py: ranks, printing,
files, resume, communication stats) and computes nothing itself. A run writes ``config.json``, ``seeds.jsonl``
(replay log), ``metrics.jsonl``, ``evals.jsonl``, ``adapter/`` (LoRA or a causal LM's prefix: peft format; a
masked LM's prefix: ``prefix/masked.py``'s; ``model/`` in full-parameter mode), ``curves.png`` and ``summary.json``
to ``output_dir``. Batches depend only on (seed, step), so a resumed run sees
the same data as an uninterrupted one.

``select_on="dev"`` keeps the weights of the best evaluation on the k-shot dev split (selection.py) and reports
those; the seed log still holds every step, and ``summary.json``'s ``best_step`` says how many of them give the
reported weights. ``max_minutes`` is a wall-clock budget for the training loop of one invocation (periodic
evaluations included, set-up and the before/after evaluations not), checked after each step, so at least one step
runs; ``summary.json`` then says ``stopped_by: "time"``, and ``--resume`` continues from the seed log.

Under ``torchrun`` (WORLD_SIZE > 1) every rank builds the same model and draws the same global batch. With
``shard="none"`` (data parallel, ``data_parallel.py``) or ``"fsdp"`` (sharding.py) each rank evaluates its slice and
the ranks all-gather the per-example losses; with ``"tp"`` every rank runs the whole batch and takes rank 0's loss.
Either way every rank gets the same g and applies the same update to what it holds (sharded tensors: its shard, with
the global element indices). Only rank 0 writes files and prints; every rank evaluates the whole evaluation split
(identical weights give identical metrics, and sharded forwards need every rank). A sharded run's weights are
gathered on rank 0 and saved as one process saves them.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..tasks import data
from .. import models
from ..tasks import objectives
from ..tasks import registry as tasks
from ..tasks.records import Example, Task
from ..forward import ForwardEngine
from ..prefix import add_prefix, is_masked_prefix, load_masked_prefix
from ..optim import MeZO
from . import dtype as dtypes
from . import sharding
from .config import TrainConfig
from .files import replaced_dir
from .run import Run, examples_digest
from .selection import BestWeights

__all__ = ["build", "evaluate", "batch_for", "train", "save_weights", "load_adapter"]


def build(cfg: TrainConfig, adapter: str | Path | None = None, *, task: Task | None = None, loaded=None):
    """(model, tokenizer, task, objective, trainable params) with the seeded initial weights of ``cfg``, and the
    peft ``adapter`` folder on top when given. Causal objectives get a forward engine (``cfg.prefix_reuse``: every
    exact reuse; else the plain forward, which still reports its stats). ``task``: the record of ``cfg.task`` when
    the caller has resolved it already (else it is resolved here). ``loaded``: ``(model, tokenizer, kind)`` of
    ``cfg.model`` already loaded in its dtype (``dtype.load_model``); else it is loaded here, ``cfg.dtype`` ``auto``
    resolved by ``dtype.choose``."""
    task = tasks.get_task(cfg.task) if task is None else task
    if loaded is None:
        loaded = dtypes.load_model(cfg.model, cfg.dtype, seed=cfg.seed, seq=cfg.max_length)[:3]
    model, tok, kind = loaded
    if cfg.prefix_tokens is not None:          # MeZO-prefix in place of LoRA, from real tokens drawn with the seed
        model = add_prefix(model, cfg.prefix_tokens, seed=cfg.seed)
    elif cfg.lora:
        torch.manual_seed(cfg.seed)            # peft draws LoRA A from the global generator
        model = models.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                first_layer=cfg.lora_first_layer)
    if adapter is not None:
        model = load_adapter(model, adapter)
    kw: dict = {"max_length": cfg.max_length}
    if kind == "causal":
        kw.update(chat=cfg.chat, engine=ForwardEngine() if cfg.prefix_reuse else ForwardEngine.plain())
    obj = objectives.make_objective(model, tok, task, kind=kind, **kw)
    return model, tok, task, obj, models.trainable_parameters(model)


def evaluate(model, objective, examples: Sequence[Example], batch_size: int = 32) -> dict:
    """Accuracy, F1, mean CE and n over ``examples`` (no gradients)."""
    if not examples:
        raise ValueError("nothing to evaluate: the split is empty")
    # batches of similar length pad less (about half the tokens on SST-2); the metrics do not depend on order
    ordered = sorted(examples, key=lambda e: len(e.text_a) + len(e.text_b or ""))
    outs = []
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            outs.append(objective(model, ordered[i:i + batch_size]))
    cat = objectives.from_scores(torch.cat([o.logits for o in outs]), torch.cat([o.labels for o in outs]))
    return {"accuracy": objectives.accuracy(cat), "f1": objectives.f1(cat),
            "loss": float(cat.per_example.mean()), "n": len(examples)}


def batch_for(train: Sequence[Example], step: int, seed: int, size: int) -> list[Example]:
    """The batch of ``step``: a function of (seed, step) only, so resume and replay see the same data."""
    r = random.Random(seed * 1_000_003 + step)
    return r.sample(list(train), min(size, len(train)))


def train(cfg: TrainConfig, progress: bool = True, ddp: bool | None = None,
          clock: Callable[[], float] = time.monotonic, task: Task | None = None) -> dict:
    """Run MeZO fine-tuning as configured; returns the summary (also written to ``summary.json``).

    ``ddp``: None (default) turns data parallelism on when launched by torchrun with WORLD_SIZE > 1; False
    ignores the torchrun environment (every process trains alone). ``clock``: seconds, for ``max_minutes``.
    ``task``: the record of ``cfg.task`` when the caller has resolved it already (the CLI has); else it is
    resolved here, once, and handed down."""
    task = tasks.get_task(cfg.task) if task is None else task
    with Run.start(cfg, progress, ddp) as run:
        return _train(cfg, run, task, clock)


def _train(cfg: TrainConfig, run: Run, task: Task, clock: Callable[[], float] = time.monotonic) -> dict:
    splits = data.load_task_splits(task, cfg.data_dir, cfg.protocol, cfg.k, cfg.seed, train_file=cfg.train_file,
                                   eval_file=cfg.eval_file, test_file=cfg.test_file)
    recorded = run.recorded_dtype() if cfg.dtype == "auto" else None     # --resume: never decided again
    *loaded, choice = dtypes.load_model(cfg.model, cfg.dtype, seed=cfg.seed, seq=cfg.max_length, recorded=recorded,
                                        decide=run.main, share=run.shared)
    cfg = run.use_dtype(choice)                                    # the resolved dtype, recorded from here on
    model, _, _, obj, _ = build(cfg, task=task, loaded=loaded)
    model = sharding.shard_model(model, cfg.shard, run.info.world_size)
    params = models.trainable_parameters(model)          # after sharding: the DTensors that replaced the weights
    loss_fn = run.loss_fn(obj, cfg.objective, params)
    opt = MeZO(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, seed=cfg.seed, backend=cfg.backend,
               n_directions=cfg.n_directions, schedule=cfg.schedule, total_steps=cfg.steps,
               perturb="virtual" if cfg.batched_pm else cfg.perturb, model=model, distribution=cfg.distribution,
               lowrank_r=cfg.lowrank_r, lowrank_lazy=cfg.lowrank_lazy,
               loss_group=False)        # loss_fn reduces over the ranks already (per-example all-gather, broadcast)
    step_on = _stepper(cfg, opt, model, obj, loss_fn)
    best = BestWeights(params) if cfg.select_on else None
    resumed = run.begin(opt, best, examples_digest(splits.train, splits.dev))
    final_eval = data.subsample(getattr(splits, cfg.final_split), cfg.eval_max, cfg.seed)
    periodic = data.subsample(getattr(splits, cfg.eval_split), cfg.eval_max, cfg.seed + 1)
    summary: dict = {"config": run.config, "dtype": cfg.dtype, "dtype_choice": choice.as_dict(),
                     "backend": opt.param_sets[0].backend,
                     "trainable": sum(p.numel() for _, p in params)}
    if not resumed:
        summary["before"] = run.log_eval(0, cfg.final_split, evaluate(model, obj, final_eval, cfg.eval_batch_size),
                                         "before")
    t_start, zero, started = time.perf_counter(), opt.zero_grad_steps, clock()
    budget, stopped_by = (cfg.max_minutes * 60 if cfg.max_minutes else None), "steps"
    with run.stepping(opt):
        while opt.step_count < cfg.steps:
            step = opt.step_count
            batch = batch_for(splits.train, step, cfg.seed, cfg.batch_size)
            t0 = time.perf_counter()
            with torch.no_grad():
                res = step_on(batch)
            run.log_step(step, opt, res, time.perf_counter() - t0)
            done = opt.step_count
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                ev = run.log_eval(done, cfg.eval_split, evaluate(model, obj, periodic, cfg.eval_batch_size))
                if best is not None:
                    best.offer(done, ev)
            if budget is not None and done < cfg.steps and run.agree(clock() - started >= budget):
                stopped_by = "time"
                run.say(f"stopped by the time budget (max_minutes={cfg.max_minutes}) after {done} of "
                        f"{cfg.steps} steps; --resume continues")
                break
    train_s = time.perf_counter() - t_start
    if best is not None:
        summary.update(_select(cfg, run, best, opt.step_count, lambda: evaluate(model, obj, periodic,
                                                                               cfg.eval_batch_size)))
    summary["after"] = evaluate(model, obj, final_eval, cfg.eval_batch_size)
    summary.update(steps=opt.step_count, stopped_by=stopped_by, train_seconds=round(train_s, 1),
                   zero_grad_rate=opt.zero_grad_steps / max(1, opt.step_count),
                   skipped_directions=opt.skipped_directions, new_zero_grad_steps=opt.zero_grad_steps - zero)
    engine = getattr(obj, "engine", None)
    if engine is not None:
        summary["forward"] = engine.stats.as_dict()
    gathered = None
    if cfg.shard != "none" and run.multi:               # every rank takes part in the gathers
        gathered = sharding.full_state_dict(model, [n for n, _ in params] if cfg.lora else None, keep=run.main)
    return run.finish(summary, lambda out: save_weights(model, out, cfg.lora, gathered))


def _stepper(cfg: TrainConfig, opt: MeZO, model, obj, loss_fn) -> Callable[[list], object]:
    """``batch -> StepResult``: the sequential step, or with ``batched_pm`` every +/- pass in one forward (a
    single-process run: ``TrainConfig.check_world_size`` refused more processes before anything loaded)."""
    if not cfg.batched_pm:
        return lambda batch: opt.step(lambda: loss_fn(model, batch))
    from .batched_pm import pm_fn_factory
    pm_for = pm_fn_factory(model, obj, opt.param_sets, kind=cfg.objective)
    return lambda batch: opt.step_batched(pm_for(batch))


def _select(cfg: TrainConfig, run: Run, best: BestWeights, step: int, dev_eval: Callable[[], dict]) -> dict:
    """End of a ``select_on`` run: evaluate the last weights on the selection split unless that was just done,
    put the best weights back, and return the summary's selection fields."""
    if best.last_step != step and step > 0:
        best.offer(step, run.log_eval(step, cfg.eval_split, dev_eval()))
    best.restore()
    sel = best.summary()
    if sel["best"] is None:
        run.say("no evaluation to select on: reporting the last weights")
    else:
        run.say(f"selected the weights after step {sel['best_step']} ({cfg.eval_split} accuracy "
                f"{sel['best']['accuracy']:.4f}, loss {sel['best']['loss']:.4f})")
    return {"selected_on": cfg.eval_split, "best_step": sel["best_step"], "best_dev": sel["best"],
            "selection_candidates": sel["candidates"]}


def save_weights(model, out: Path, lora: bool, state_dict: dict | None = None) -> Path:
    """Save the adapter (LoRA: ``out/adapter``) or the whole model (``out/model``) in transformers' format,
    atomically (the folder is complete or absent). ``state_dict``: the tensors to save instead of the model's own
    (a sharded model's, gathered: ``sharding.full_state_dict``)."""
    target = out / ("adapter" if lora else "model")
    with replaced_dir(target) as tmp:
        model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))
    return target


def load_adapter(model, path: str | Path):
    """``model`` with the adapter saved in ``path`` (e.g. a run's ``adapter/``: peft's, or a masked LM's learned
    prefix) on top, in eval mode."""
    if is_masked_prefix(path):
        return load_masked_prefix(model, path)
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, str(path))
    model.eval()
    return model
