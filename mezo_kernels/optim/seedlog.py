"""The replay log on disk: ``seeds.jsonl``.

Line 1 is a header ``{"mezo_seed_log": 1, "config": MeZO.config(), "perturb", "distribution", "rounding",
...extra}`` (the three modes spelled out, :func:`modes`); every further line is one direction
of one step: ``{"step", "seed", "g", "lr", "wd"[, "skip"][, "groups"]}`` (``groups``: ``[[lr, wd], ...]`` per param
group, written only when one ``lr``/``wd`` pair cannot stand for them all). Lines are appended and flushed as
training goes, so a killed run keeps every step it finished; a partly written last line (the kill) is dropped on
reading, any other malformed line is an error naming its line number.

A config leaves out the modes that are at their defaults (so logs written before the modes existed still match):
``perturb`` ``"inplace"``, ``distribution`` ``"gaussian"``, ``rounding`` ``"nearest"`` in place and
``"stochastic"`` for virtual perturbation. :func:`check_modes` refuses to replay a log under other modes.

In memory, ``MeZO.log`` is a :class:`SeedLog`: the records, carrying the run's config as the file's header does.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch

FORMAT = 1
_KEYS = ("step", "seed", "g", "lr", "wd")
_OPTIONAL = ("skip", "groups")
_MODE_KEYS = ("perturb", "distribution", "rounding", "lowrank_r", "lowrank_lazy")


def modes(config: dict) -> dict:
    """``{"perturb", "distribution", "rounding"}`` of a ``MeZO.config()``, the defaults filled in, plus
    ``lowrank_r`` and ``lowrank_lazy`` for low-rank directions (so a seed-log header names them; headers of the
    other distributions keep their bytes)."""
    perturb = config.get("perturb", "inplace")
    out = {"perturb": perturb, "distribution": config.get("distribution", "gaussian"),
           "rounding": config.get("rounding", "stochastic" if perturb == "virtual" else "nearest")}
    if out["distribution"] == "lowrank":
        out.update(lowrank_r=config.get("lowrank_r", 1), lowrank_lazy=config.get("lowrank_lazy", 1))
    return out


def check_modes(logged: dict, config: dict, what: str = "the log") -> None:
    """ValueError unless the configs ``logged`` (what a log was made with) and ``config`` (what would replay it)
    agree on the modes: another distribution draws other directions entirely, and another perturbation or
    rounding mode rounds differently, so the replay would not land on the logged run's bits."""
    a, b = modes(logged), modes(config)
    for k in _MODE_KEYS:
        if a.get(k) != b.get(k):
            raise ValueError(f"{what} was made with {k}={a.get(k)!r}, this optimizer uses {k}={b.get(k)!r}: a replay "
                             f"under another {k} would not reproduce the run; build it with {k}={a.get(k)!r}")


class SeedLog(list):
    """The records of a run (one dict per direction, in order) with the run's ``config`` (``MeZO.config()``), as a
    ``seeds.jsonl`` holds them under its header: ``MeZO.log`` is one, so ``replay(params, opt.log)`` needs nothing
    else. A list in every other respect: it iterates and indexes as the records, ``==`` compares the records only,
    and a slice keeps the config. ``config`` None: bare records."""

    def __init__(self, records: Iterable[dict] = (), config: dict | None = None):
        super().__init__(records)
        self.config = config

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return SeedLog(got, self.config) if isinstance(i, slice) else got

    def __reduce__(self):
        return SeedLog, (list(self), self.config)   # rebuilt from a list and a dict: torch.load(weights_only) reads it


# torch.save(opt.log) loads with torch.load's default weights_only=True (once this module is imported)
torch.serialization.add_safe_globals([SeedLog])


class SeedLogWriter:
    """Append-only writer. ``SeedLogWriter(path, config, extra)`` starts a log; ``resume=True`` keeps one."""

    def __init__(self, path: str, config: dict, extra: dict | None = None, resume: bool = False):
        self.path = path
        if resume and os.path.exists(path):
            head, records = read_log(path)
            if head["config"] != config:
                raise ValueError(f"{path}: logged config {head['config']} differs from this run's {config}")
            self._rewrite(head, records)   # drops a torn last line so appends start on a clean line
        else:
            self._rewrite({"mezo_seed_log": FORMAT, "config": config, **modes(config), **(extra or {})}, [])
        self._f = open(path, "a")

    def _rewrite(self, head: dict, records: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(head) + "\n")
            f.writelines(_line(r) for r in records)
        os.replace(tmp, self.path)

    def append(self, records: Iterable[dict]) -> None:
        self._f.writelines(_line(r) for r in records)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _line(rec: dict) -> str:
    return json.dumps({k: rec[k] for k in (*_KEYS, *_OPTIONAL) if k in rec}, separators=(",", ":")) + "\n"


def read_log(path: str) -> tuple[dict, list[dict]]:
    """(header, records). Raises ValueError naming the line for anything malformed but a torn last line."""
    with open(path) as f:
        lines = f.read().split("\n")
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: empty seed log (expected a header line)")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:1: header is not JSON ({e})") from None
    if not isinstance(head, dict) or head.get("mezo_seed_log") != FORMAT or "config" not in head:
        raise ValueError(f"{path}:1: not a mezo seed log header (format {FORMAT})")
    records = []
    body = lines[1:]
    for i, line in enumerate(body, start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not all(k in rec for k in _KEYS):
                raise ValueError(f"missing one of {_KEYS}")
        except (json.JSONDecodeError, ValueError) as e:
            if i == len(body) + 1 and not lines[-1:] == [""]:
                break                      # torn final line (no newline): the run was killed mid-write
            raise ValueError(f"{path}:{i}: malformed seed-log record ({e})") from None
        records.append(rec)
    return head, records


def load(log) -> tuple[dict | None, list[dict]]:
    """``(config or None, records)`` from any form of a replay log: a ``seeds.jsonl`` path, ``(header, records)``
    (header: a seed-log header or a config), a ``MeZO.state_dict()``, a :class:`SeedLog` (``MeZO.log``, its config
    if it carries one) or bare records (no config)."""
    if isinstance(log, SeedLog):
        return (dict(log.config) if log.config is not None else None), _records(log)
    if isinstance(log, (str, os.PathLike)):
        head, records = read_log(os.fspath(log))
        return head["config"], records
    if isinstance(log, dict):
        if "log" not in log or "config" not in log:
            raise ValueError("a dict log must be a MeZO.state_dict() (with 'config' and 'log')")
        return log["config"], list(log["log"])
    if isinstance(log, tuple) and len(log) == 2 and isinstance(log[0], dict):
        head, records = log
        return (head["config"] if "config" in head else head), list(records)
    if isinstance(log, Sequence) or hasattr(log, "__iter__"):
        return None, _records(log)
    raise TypeError(f"log must be a seeds.jsonl path, (header, records), a MeZO state_dict, MeZO.log or records, "
                    f"got {type(log).__name__}")


def _records(log: Iterable) -> list[dict]:
    records = list(log)
    if not all(isinstance(r, dict) and all(k in r for k in _KEYS) for r in records):
        raise ValueError(f"log records must be dicts with {_KEYS}")
    return records
