"""The run context: everything a training run does besides training. It knows which rank it is and which process
group it joined, prints, owns the files in ``output_dir``, resumes, and counts the bytes the ranks exchange, so
that the trainer's loop has no rank branches.

Files (rank 0 writes them, in this order): ``config.json``; ``seeds.jsonl`` (the replay log, through
:class:`~mezo_kernels.seedlog.SeedLogWriter`); ``metrics.jsonl`` (one object per step); ``evals.jsonl`` (one object
per evaluation); ``adapter/`` or ``model/``; ``curves.png``; ``summary.json``, each written atomically (files.py).
On ``--resume`` rank 0 reads the run folder and hands the seed log to the other ranks, so no shared file system is
needed. The seed log is the checkpoint (batches are a function of (seed, step), z of the global element indices), so
a run may resume on another world size, under another ``--shard``, and in another folder (a copy of the run's).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import data_parallel as distributed
from . import sharding
from .config import TrainConfig
from .files import read_jsonl, write_text
from ..tasks import objectives
from ..optim.seedlog import SeedLogWriter, read_log

__all__ = ["Run"]

# settings a resumed run may change (none of them changes a logged step's bits, as the seed log replays on any
# layout); a linear schedule depends on the step count, a constant one does not
_FREE_ON_RESUME = ("resume", "eval_every", "prefix_reuse", "max_minutes", "output_dir", "shard", "world_size")
# where the data lives may change too (a run folder copied to another machine), as long as the examples a run
# samples its batches and its selection from are the same: ``data_digest`` compares them instead of the paths
_DATA_PATHS = ("data_dir", "train_file", "eval_file", "test_file")


class Run:
    """One training run as seen by one rank. ``cfg``: the run's (validated, read-only) config; ``info`` the rank's
    place in the process group (world size 1: a single process); ``progress``: show a progress bar (rank 0
    only)."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, progress: bool = True) -> None:
        self.cfg, self.info = cfg, info
        self.config = {**dataclasses.asdict(cfg), "world_size": info.world_size}
        self.out = Path(cfg.output_dir)
        self.multi, self.main = info.world_size > 1, info.rank == 0
        self.progress = progress and self.main
        self.comm: distributed.CommStats | None = None            # the loss exchange's counters (data parallel)
        self.resumed = False
        self._writer: SeedLogWriter | None = None
        self._metrics: Any = None
        self._bar: Any = None
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.multi and cfg.shard != "tp":       # tensor parallel: every rank runs the whole batch
            distributed.rank_slice(range(cfg.batch_size), 0, info.world_size)   # refuse an uneven split up front

    @classmethod
    @contextlib.contextmanager
    def start(cls, cfg: TrainConfig, progress: bool = True, ddp: bool | None = None) -> Iterator["Run"]:
        """The run of this process: joins torchrun's process group when launched with WORLD_SIZE > 1 (``ddp``
        None) and leaves it at the end if it joined it; ``ddp=False`` ignores the torchrun environment. Settings
        that cannot run on that many processes are refused here, before joining or loading anything (``--shard tp``
        reads the model's config for its head counts)."""
        owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        use_ddp = distributed.env_world_size() > 1 if ddp is None else ddp
        world = distributed.env_world_size() if use_ddp else 1
        cfg.check_world_size(world)
        sharding.check_model(cfg.model, cfg.shard, world)
        info = distributed.init_from_env() if use_ddp else distributed.DistInfo(0, 1, 0, None)
        try:
            yield cls(cfg, info, progress)
        finally:
            if info.world_size > 1 and owned:
                torch.distributed.destroy_process_group()

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def evals_path(self) -> Path:
        return self.out / "evals.jsonl"

    @property
    def log_path(self) -> Path:
        return self.out / "seeds.jsonl"

    # ------------------------------------------------------------------------------------------ set-up
    def recorded_dtype(self) -> str | None:
        """On ``--resume`` of a logged run: the dtype its ``config.json`` recorded (``float32`` before the setting
        existed), on every rank (rank 0 reads it); else None. A resumed run never decides ``auto`` again."""
        rec, error = None, None
        if self.main and self.cfg.resume and self.log_path.exists() and (self.out / "config.json").exists():
            try:
                rec = json.loads((self.out / "config.json").read_text()).get("dtype", "float32")
            except (ValueError, OSError) as e:  # raised on every rank below, instead of a hang in the broadcast
                error = e
        rec, error = self.shared((rec, error))
        if error is not None:
            raise error
        return rec

    def shared(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a decision taken from a local measurement must be the same on all)."""
        return distributed.broadcast_object(value) if self.multi else value

    def use_dtype(self, choice: Any) -> TrainConfig:
        """Make ``choice`` (a ``dtype.DtypeChoice``) the run's dtype: ``cfg.dtype``, ``config.json``, the seed log's
        header, ``summary.json`` and the progress bar name the resolved one. Returns the run's new config."""
        self.cfg = self.cfg.with_dtype(choice.dtype)
        self.config["dtype"] = choice.dtype
        self.say(f"dtype {choice.dtype} ({choice.reason})")
        return self.cfg

    def loss_fn(self, objective: Callable, kind: str, params: Sequence[tuple[str, torch.Tensor]]
                ) -> Callable[[Any, Sequence], float]:
        """``loss(model, batch) -> float``, the same bits on every rank: the objective reduced with ``kind`` in one
        process; data parallel (``--shard none|fsdp``), each rank's slice with the per-example rows exchanged;
        tensor parallel, the whole batch on every rank and rank 0's value. The replicated trainable weights are
        checked to be identical first (a sharded one is each rank's own part)."""
        if not self.multi:
            return objectives.scalar_objective(objective, kind)
        distributed.check_replicas([p for _, p in params if not sharding.is_sharded(p)], "initial trainable weights")
        if self.cfg.shard == "tp":
            loss: Any = distributed.BroadcastLoss(objectives.scalar_objective(objective, kind))
        else:
            loss = distributed.DataParallelLoss(objective, objectives.Reduction(kind))
        self.comm = loss.stats
        return loss

    def begin(self, opt: Any, best: Any = None, data_digest: str | None = None) -> bool:
        """Resume (replay the seed log onto the weights, on every rank) or start afresh, then open the run files.
        ``best`` (a ``selection.BestWeights``, for ``select_on``): on resume it learns the earlier selection-split
        evaluations, and the replay stops at the best one's step for it to copy the weights there.
        ``data_digest`` (:func:`examples_digest` of the train and dev examples) is recorded in ``config.json``;
        a resume with the same digest may read the data from other paths. Returns whether the run resumed."""
        if data_digest is not None:
            self.config["data_digest"] = data_digest
        resumed, records, evals, error = False, [], [], None
        if self.main:
            try:
                resumed, records = self._resume_state()
                evals = self._earlier_evals(records) if resumed and best is not None else []
            except (ValueError, OSError) as e:  # raised on every rank below, instead of a hang in the broadcast
                error = e
        if self.multi:
            resumed, records, evals, error = distributed.broadcast_object((resumed, records, evals, error))
        if error is not None:
            raise error
        if resumed:                             # bit-exact: the same weight ops in the same order
            cut = best.best_of(evals) if best is not None else None
            if cut is None:
                opt.replay_(records)
            else:
                opt.replay_([r for r in records if int(r["step"]) < cut])
                best.capture()
                opt.replay_([r for r in records if int(r["step"]) >= cut])
        self.resumed = resumed
        if not self.main:
            return resumed
        if resumed:
            _truncate_jsonl(self.metrics_path, opt.step_count)
            _truncate_jsonl(self.evals_path, None)           # a torn last line must not swallow the next record
        else:
            for p in (self.metrics_path, self.evals_path):
                p.unlink(missing_ok=True)
        write_text(self.out / "config.json", json.dumps(self.config, indent=1))
        extra = {"model": self.cfg.model, "task": self.cfg.task, "dtype": self.cfg.dtype,
                 **({"world_size": self.info.world_size, "shard": self.cfg.shard} if self.multi else {})}
        self._writer = SeedLogWriter(str(self.log_path), opt.config(), extra, resume=resumed)
        return resumed

    def _resume_state(self) -> tuple[bool, list[dict]]:
        """(resumed, seed-log records) for ``--resume``; ValueError when the logged run had other settings."""
        if not (self.cfg.resume and self.log_path.exists()):
            return False, []
        old = json.loads((self.out / "config.json").read_text())
        free = _FREE_ON_RESUME + (("steps",) if self.cfg.schedule == "constant" else ())
        # a run logged before digests existed keeps its paths; one with a digest keeps its examples
        free += _DATA_PATHS if "data_digest" in old and "data_digest" in self.config else ("data_digest",)
        changed = {k for k in self.config if k not in free and old.get(k) != self.config[k]}
        if changed:
            raise ValueError(f"--resume with different settings than the logged run: {sorted(changed)}")
        _, records = read_log(str(self.log_path))
        return True, records

    def _earlier_evals(self, records: Sequence[dict]) -> list[dict]:
        """The selection-split evaluations of the logged run that the seed log covers."""
        done = 1 + max((int(r["step"]) for r in records), default=-1)
        return [ev for ev in read_jsonl(self.evals_path)
                if ev.get("split") == self.cfg.eval_split and 0 < ev.get("step", 0) <= done]

    # ------------------------------------------------------------------------------------------ the loop
    @contextlib.contextmanager
    def stepping(self, opt: Any) -> Iterator[None]:
        """Around the training loop: the progress bar and ``metrics.jsonl`` are open inside; the seed log is
        closed after. Communication is counted from here."""
        from tqdm.auto import tqdm
        self._bar = tqdm(total=self.cfg.steps, initial=opt.step_count, disable=not self.progress, unit="step",
                         dynamic_ncols=True, desc=self.cfg.dtype)          # the dtype that runs
        self._comm_start = self._comm_last = self.comm.snapshot() if self.comm else None
        self._first_step = opt.step_count
        try:
            with (open(self.metrics_path, "a") if self.main else contextlib.nullcontext()) as self._metrics:
                yield
        finally:
            self._bar.close()
            self._bar = self._metrics = None
            if self._writer is not None:
                self._writer.close()

    def log_step(self, step: int, opt: Any, res: Any, seconds: float) -> None:
        """Record step ``step`` (``res``: its ``optim.StepResult``): seed log, metrics line, progress bar."""
        rec = {"step": step, "loss_plus": res.loss_plus, "loss_minus": res.loss_minus, "g": res.grad,
               "lr": opt.lr_at(step), "seconds": round(seconds, 4), "zero_grad": res.grad == 0.0,
               "skipped": res.skipped}
        if self.comm is not None:               # this step's exchange: nothing else uses the loss between steps
            c, self._comm_last = self.comm.since(self._comm_last), self.comm.snapshot()
            rec.update(comm_bytes_out=c.bytes_out, comm_bytes_in=c.bytes_in, comm_seconds=round(c.seconds, 6))
        if self.main:
            self._writer.append(opt.log[-opt.n_directions:])
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{(res.loss_plus + res.loss_minus) / 2:.4f}", g=f"{res.grad:+.3g}",
                              zero_g=f"{100.0 * opt.zero_grad_steps / opt.step_count:.0f}%", refresh=False)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a stop decision taken from a local clock must be the same on all)."""
        return bool(distributed.broadcast_object(flag)) if self.multi else flag

    def say(self, line: str) -> None:
        """Print a line on rank 0 (under the progress bar while it is open)."""
        if not self.main:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def log_eval(self, step: int, split: str, ev: dict, label: str | None = None) -> dict:
        """Append an evaluation to ``evals.jsonl`` and say it (``label`` "before"/"after": the final split's
        line; None: a periodic line under the progress bar). Returns ``ev``."""
        if not self.main:
            return ev
        _append(self.evals_path, {"step": step, "split": split, **ev})
        if label is None:
            self.say(f"step {step}: {split} accuracy {ev['accuracy']:.4f} loss {ev['loss']:.4f}")
        else:
            print(f"{label}: {self._split_name()} accuracy {ev['accuracy']:.4f} (n={ev['n']})", flush=True)
        return ev

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, summary: dict, save: Callable[[Path], Any]) -> dict:
        """Add the communication stats; on rank 0 log the final evaluation, ``save(output_dir)`` the weights,
        draw ``curves.png``, write ``summary.json`` and print the closing lines. Returns ``summary``."""
        if self.comm is not None:
            n = max(1, summary["steps"] - self._first_step)        # a resume replays the rest
            c = self.comm.since(self._comm_start)
            summary["distributed"] = {"world_size": self.info.world_size, "shard": self.cfg.shard,
                                      "backend": self.info.backend,
                                      "bytes_out_per_step": c.bytes_out / n, "bytes_in_per_step": c.bytes_in / n,
                                      "comm_seconds_per_step": c.seconds / n, "steps_timed": n}
        if not self.main:
            return summary
        _append(self.evals_path, {"step": summary["steps"], "split": self.cfg.final_split, **summary["after"]})
        save(self.out)
        from .plots import plot_curves
        plot_curves(str(self.metrics_path), str(self.evals_path), str(self.out / "curves.png"))
        write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        after = summary["after"]
        print(f"after: {self._split_name()} accuracy {after['accuracy']:.4f} (n={after['n']})", flush=True)
        if "forward" in summary:
            f = summary["forward"]
            why = "" if not f["fallback"] else f" ({f['fallback']})" if "plain forward" in f["fallback"] else \
                f" (plain forward: {f['fallback']})"
            print(f"forward engine: attention {', '.join(f['attention'])}; token-layer work saved "
                  f"{100 * f['saved_fraction']:.1f}%, frozen-layer hits {f['frozen_hits']}, eval-cache hits "
                  f"{f['prefix_cache_hits']}/{f['prefix_cache_lookups']}{why}", flush=True)
        return summary

    def _split_name(self) -> str:
        """Under the k-shot protocol the test split is the task's original GLUE dev set: say so."""
        glue = self.cfg.protocol == "kshot" and self.cfg.final_split == "test" and not (
            self.cfg.eval_file or self.cfg.test_file)                                     # data files: their own
        return f"{self.cfg.task} {self.cfg.final_split}" + (" (= GLUE dev set)" if glue else "")


def examples_digest(*splits: Sequence[Any]) -> str:
    """sha256 of the examples of ``splits`` (records with ``text_a``, ``text_b``, ``label``), in order."""
    h = hashlib.sha256()
    for split in splits:
        h.update(b"\x1e")
        for ex in split:
            h.update(json.dumps([ex.text_a, ex.text_b, ex.label], ensure_ascii=False).encode())
    return h.hexdigest()


def _append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_jsonl(path: Path, n: int | None) -> None:
    """Keep the first ``n`` records (None: all; metrics: the steps the seed log holds) of a log from a killed run,
    a torn line dropped, atomically."""
    if path.exists():
        write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path)[:n]))
