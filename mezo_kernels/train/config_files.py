"""Run configs on disk (``configs/*.yaml``) and the ``mezo-kernels train`` flags, both turned into a
``TrainConfig``, built (and so validated) once, with the task record it names.

A config file is a YAML (or JSON) mapping of ``TrainConfig`` fields (``lr: 1.0e-6``, ``lora: false``, ...) plus an
optional ``meta`` mapping that the trainer ignores: where the settings come from, which of the paper and its
reference code the file follows where they differ, and ``smoke_model``, the tiny architecture the test suite runs
the file on. Fields the file leaves out keep ``TrainConfig``'s defaults (the README demo's), so a file states
every setting that differs from the demo, ``max_minutes: null`` included. Flags given on the command line win over
the file; a task spec's ``objective`` fills in where neither chose one.

MeZO-prefix (``prefix_tokens: N``) takes the place of LoRA: a LoRA setting given beside it, in the file or as a
flag, is a ValueError naming both (``TrainConfig`` cannot tell a default from a value typed equal to it).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from ..tasks.records import Task
from ..tasks.registry import get_task
from .config import TrainConfig

__all__ = ["load_config_file", "config_from_cli", "CLI_ONLY"]

# train flags that are not settings of the run
CLI_ONLY = frozenset({"cmd", "argv", "config", "no_progress", "ddp"})
_LORA = ("lora", "lora_r", "lora_alpha", "lora_targets", "lora_first_layer")   # fields --prefix-tokens replaces
_FLAG = {"lora": "--full-param"}                                                  # the flag that sets a field
_TYPES = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,), "dict": (dict,), "None": (type(None),),
          "list[str]": (list,)}


def _allowed(f: dataclasses.Field) -> tuple[type, ...]:
    """The Python types a field's annotation (``"float | None"``) admits."""
    out: tuple[type, ...] = ()
    for part in str(f.type).split("|"):
        out += _TYPES[part.strip()]
    return out


def _check_value(where: str, f: dataclasses.Field, v: Any) -> None:
    allowed = _allowed(f)
    ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
    if ok and isinstance(v, list):
        ok = all(isinstance(x, str) for x in v)
    if not ok:
        raise ValueError(f"{where}: field {f.name!r} must be {f.type}, got {v!r}")


def load_config_file(path: str | Path) -> tuple[dict, dict]:
    """``(fields, meta)`` of a config file: the ``TrainConfig`` fields it sets (checked by name and type) and its
    ``meta`` mapping. ValueError names the file and the field for anything unknown, mistyped or unsupported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        raw = json.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); or write it as JSON") from None
        raw = yaml.safe_load(text)
    else:
        raise ValueError(f"config file {path}: expected a .yaml, .yml or .json file")
    if not isinstance(raw, Mapping):
        raise ValueError(f"config file {path}: expected a mapping of TrainConfig fields, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    meta = raw.get("meta", {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"config file {path}: 'meta' must be a mapping, got {meta!r}")
    fields = {}
    for k, v in raw.items():
        if k == "meta":
            continue
        if k not in known:
            raise ValueError(f"config file {path}: unknown field {k!r} (TrainConfig fields: {', '.join(known)})")
        _check_value(f"config file {path}", known[k], v)
        fields[k] = float(v) if known[k].type.startswith("float") and isinstance(v, int) else v
    return fields, dict(meta)


def _from_flags(args: Mapping[str, Any]) -> dict:
    """``TrainConfig`` fields from parsed ``train`` flags (``argparse`` dests); flags absent from ``args`` are
    left out."""
    out = {}
    for k, v in args.items():
        if k in CLI_ONLY:
            continue
        if k == "full_param":
            out["lora"] = not v
        elif k == "no_prefix_reuse":
            out["prefix_reuse"] = not v
        elif k == "lora_targets":
            out[k] = v.split(",") if v else None
        elif k == "max_minutes":
            out[k] = v if v else None            # 0: no budget
        elif k == "select_on":
            out[k] = None if v in (None, "none") else v
        else:
            out[k] = v
    return out


def config_from_cli(args: Mapping[str, Any], explicit: set[str]) -> tuple[TrainConfig, Task]:
    """The ``TrainConfig`` of a ``train`` command and the task record it names, each made once: ``args`` (every
    flag with its default filled in) alone, or, with ``--config FILE``, the file's fields with the ``explicit``
    flags (those typed on the command line) on top. The task's ``objective`` (a task spec's) is the run's where
    neither a flag nor the file chose one. The task is resolved (a spec file read) here, and only here."""
    cfg_file = args.get("config")
    typed = _from_flags({k: v for k, v in args.items() if k in explicit})
    if cfg_file:
        fields, _ = load_config_file(cfg_file)
        chose_objective = "objective" in fields or "objective" in explicit
        given = {k: f"{k} in {cfg_file}" for k in fields}
        fields.update(typed)
    else:
        fields, chose_objective, given = _from_flags(args), "objective" in explicit, {}
    given.update({k: _FLAG.get(k, "--" + k.replace("_", "-")) for k in typed})
    clash = [given[k] for k in _LORA if k in given]
    if fields.get("prefix_tokens") is not None and clash:
        raise ValueError(f"{given['prefix_tokens']} (MeZO-prefix) replaces LoRA and full-parameter MeZO: it cannot "
                         f"be combined with {', '.join(clash)}")
    task = get_task(fields.get("task", TrainConfig.task))
    if not chose_objective and task.objective is not None:
        fields["objective"] = task.objective
    return TrainConfig(**fields), task
