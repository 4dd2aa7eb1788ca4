"""The run config: every setting of a training run, validated once, when it is built, and read-only afterwards.

``TrainConfig`` is a frozen dataclass: its ``__post_init__`` refuses settings that cannot run together (a
ValueError naming them), so a config that exists is a config that can run, and nothing downstream checks it
again. Code that needs other settings builds a new config (``dataclasses.replace(cfg, steps=10)``), which is
validated in turn. The one setting that depends on how the run is launched, the number of processes, is checked
by :meth:`TrainConfig.check_world_size` where the launch is decided (``run.Run.start``), before anything loads.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..tasks.records import ObjectiveKind
from .dtype import DEFAULT as DEFAULT_DTYPE, check_dtype

__all__ = ["TrainConfig", "SHARD_MODES"]

SHARD_MODES = ("none", "fsdp", "tp")   # --shard: replicated data parallel, FSDP2, tensor parallel


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (saved as ``config.json``); the defaults are the README demo's.
    Validated when built (ValueError naming the setting); frozen afterwards."""

    task: str = "sst2"
    model: str = "smollm2-135m"
    data_dir: str | None = None
    train_file: str | None = None       # data files of any format (data.load_task_splits); else data_dir
    eval_file: str | None = None
    test_file: str | None = None
    output_dir: str = "runs/demo"
    protocol: str = "kshot"
    k: int = 16
    steps: int = 450
    seed: int = 0
    lr: float = 2e-3                    # chosen on the k-shot dev split (bench/RESULTS.md, quality-smollm2)
    eps: float = 1e-2
    batch_size: int = 16
    n_directions: int = 1
    weight_decay: float = 0.0
    schedule: str = "constant"
    objective: str = ObjectiveKind.CE.value   # an ObjectiveKind spelling
    lora: bool = True                   # False: full-parameter MeZO
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    lora_first_layer: int = 0           # LoRA on layers >= this one; the frozen layers below run once per step
    prefix_tokens: int | None = None    # N >= 1: MeZO-prefix, N learned KV vectors per layer, in place of LoRA
    max_length: int = 64
    chat: bool = False
    prefix_reuse: bool = True           # forward engine reuse (prefix KV, frozen layers, eval cache); exact
    eval_every: int = 100
    eval_split: str = "dev"             # periodic evaluation split
    final_split: str = "test"           # before/after evaluation split (kshot: the original GLUE dev set)
    eval_max: int = 0                   # cap on evaluated examples per evaluation (0: all)
    eval_batch_size: int = 32
    select_on: str | None = None        # "dev": report the weights of the best dev evaluation (selection.py)
    # the demo's budget: what is not training (start-up, model load, the two 872-example evaluations, saving) took
    # 2.3 min of the demo's 13.8 min on the 2-core box it was timed on, so about 4 min on a 2-core box 1.7x
    # slower; 10 min of training (plus at most one step past the budget) ends such a box's run at about 14 min
    max_minutes: float | None = 10.0
    backend: str = "auto"
    perturb: str | None = None          # "virtual" | "inplace"; None: MeZO's default for the trainable dtype
    distribution: str = "gaussian"      # directions: "gaussian" | "rademacher" | "lowrank"
    lowrank_r: int | None = None        # lowrank: the rank (None: 1)
    lowrank_lazy: int | None = None     # lowrank: steps V is kept (None: 1)
    batched_pm: bool = False            # LoRA: +/- of every direction in one batched forward (virtual perturbation)
    dtype: str = DEFAULT_DTYPE          # "auto" | "float32" | "bfloat16" | "float16" (dtype.py); a run records the
    #                                     resolved one in config.json, so a config read back is never "auto"
    shard: str = "none"                 # several processes: "none" (data parallel), "fsdp" or "tp" (sharding.py)
    resume: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        """The config a run saved (``config.json``); keys this version does not know are ignored."""
        saved = json.loads(Path(path).read_text())
        saved.setdefault("dtype", "float32")      # written before the setting existed: those runs were fp32
        return cls(**{k: v for k, v in saved.items() if k in {f.name for f in fields(cls)}})

    def with_dtype(self, dtype: str) -> "TrainConfig":
        """This config with ``auto`` resolved to ``dtype``: the one field that changes is checked, nothing else is
        validated again (the rest was, when this config was built)."""
        new = copy.copy(self)
        object.__setattr__(new, "dtype", check_dtype(dtype, allow_auto=False))
        return new

    def _validate(self) -> None:
        """ValueError for settings that cannot run together (runs once, when the config is built)."""
        check_dtype(self.dtype)
        if self.distribution != "lowrank" and (self.lowrank_r is not None or self.lowrank_lazy is not None):
            raise ValueError(f"lowrank_r and lowrank_lazy are options of distribution 'lowrank', got distribution "
                             f"{self.distribution!r}")
        if self.objective not in ObjectiveKind.values():
            raise ValueError(f"objective must be one of {', '.join(ObjectiveKind.values())}, got {self.objective!r}")
        if self.select_on not in (None, "dev"):
            raise ValueError(f"select_on must be None or 'dev', got {self.select_on!r}")
        if self.select_on == "dev":
            if self.eval_split != "dev":
                raise ValueError(f"select_on='dev' selects on the periodic evaluations: eval_split must be 'dev', "
                                 f"got {self.eval_split!r}")
            if self.final_split == "dev":
                raise ValueError("select_on='dev' with final_split='dev' would report on the selection split; "
                                 "report on 'test'")
        if self.batched_pm and ((not self.lora and self.distribution != "lowrank") or self.perturb == "inplace"):
            raise ValueError("batched_pm runs the +/- passes of LoRA adapters (or, with distribution 'lowrank', of "
                             "any weights) in one forward with virtual perturbation: it needs lora=True or "
                             "distribution 'lowrank', and perturb 'virtual' (or unset)")
        if self.shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {', '.join(SHARD_MODES)}, got {self.shard!r}")
        if self.prefix_tokens is not None:
            self._check_prefix()
        m = self.max_minutes
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                              or m <= 0):
            raise ValueError(f"max_minutes must be a number > 0 or None (no budget), got {m!r}")

    def _check_prefix(self) -> None:
        """MeZO-prefix takes the place of the default LoRA: refuse what it cannot run with."""
        n = self.prefix_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"prefix_tokens must be an int >= 1 (the learned key/value vectors per layer), got {n!r}")
        if not self.lora:
            raise ValueError("prefix_tokens (MeZO-prefix) and lora=False (full-parameter MeZO) are two different "
                             "methods: choose one")
        defaults = {f.name: f.default for f in fields(self)}
        lora_set = [f"{k}={getattr(self, k)!r}" for k in ("lora_r", "lora_alpha", "lora_targets", "lora_first_layer")
                    if getattr(self, k) != defaults[k]]
        if lora_set:
            raise ValueError(f"prefix_tokens (MeZO-prefix) replaces LoRA, so LoRA settings cannot apply: "
                             f"{', '.join(lora_set)}; drop them or drop prefix_tokens")
        if self.batched_pm:
            raise ValueError("batched_pm batches LoRA adapters' +/- passes; MeZO-prefix has no adapter to batch: "
                             "drop batched_pm")
        if self.shard != "none":
            raise ValueError(f"prefix_tokens with shard={self.shard!r}: MeZO-prefix runs replicated (shard 'none')")

    def check_world_size(self, world_size: int) -> None:
        """ValueError when these settings cannot run on ``world_size`` processes (called where the launch is
        decided, before anything is loaded)."""
        if self.shard != "none" and world_size < 2:
            raise ValueError(f"shard={self.shard!r} splits the model over several processes, and this run has "
                             f"{world_size}: launch it with torchrun --nproc-per-node N (N > 1), or use --shard none "
                             "(a run may change --shard when it resumes)")
        if self.batched_pm and world_size > 1:
            raise ValueError(f"batched_pm is single-process, and this run has {world_size} processes (WORLD_SIZE): "
                             "data-parallel runs exchange per-rank losses per pass; drop --batched-pm or run one "
                             "process")
