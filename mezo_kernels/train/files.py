"""Atomic outputs: a run's files are whole or absent, never torn, whenever the process dies.

A file is written to a temporary name in its own folder, then ``os.replace``d over the target (atomic on POSIX and
Windows within one file system). A folder (``adapter/``, ``model/``) is written whole under a temporary name, then
swapped in: the old one is renamed aside first and removed after, so at every moment the target is either the
complete old folder, the complete new one, or (between the two renames) absent. Append-only logs
(``seeds.jsonl``, ``metrics.jsonl``, ``evals.jsonl``) are appended line by line instead; their readers drop a torn
last line.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["write_text", "replaced_file", "replaced_dir", "read_jsonl"]


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (created by the caller, so with the umask's permissions)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{tag}{path.suffix}")


@contextlib.contextmanager
def replaced_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s folder (same suffix) to write; on success it replaces ``path``."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text``, written atomically."""
    with replaced_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary folder next to ``path`` to fill; on success it takes ``path``'s place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = _sibling(path, "old") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file, without the lines a kill tore (any line that is not a JSON object:
    appends flush whole lines, so only the last one can be torn); [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln) if ln.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
