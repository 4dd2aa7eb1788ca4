"""The replay log on disk: ``seeds.jsonl``.

Line 1 is a header ``{"mezo_seed_log": 1, "config": MeZO.config(), ...extra}``; every further line is one direction
of one step: ``{"step", "seed", "g", "lr", "wd"[, "skip"]}``. Lines are appended and flushed as training goes, so a
killed run keeps every step it finished; a partly written last line (the kill) is dropped on reading, any other
malformed line is an error naming its line number.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

FORMAT = 1
_KEYS = ("step", "seed", "g", "lr", "wd")


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
            self._rewrite({"mezo_seed_log": FORMAT, "config": config, **(extra or {})}, [])
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
    return json.dumps({k: rec[k] for k in (*_KEYS, "skip") if k in rec}, separators=(",", ":")) + "\n"


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
