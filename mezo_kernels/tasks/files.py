"""Local data files of any task spec, read through the ``datasets`` library into examples.

Formats go by suffix: ``.jsonl`` / ``.json`` (JSON Lines, or one JSON array), ``.csv``, ``.tsv`` (tab-separated,
read without quoting as GLUE's files are) and ``.parquet``. Columns are found by name (the task's ``columns``);
other columns are ignored. Rows keep file order.

Nothing goes to the network: the files are read with ``datasets``' packaged builders directly
(``Dataset.from_json`` / ``from_csv`` / ``from_parquet``, not ``load_dataset``, which pings the hub to count
downloads), with ``datasets``' offline switch on while they run, into memory and a throwaway cache folder.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .records import Example, Task

__all__ = ["read_data_file", "FORMATS"]

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def read_data_file(path: str | os.PathLike, task: Task, split: str = "train") -> list:
    """The examples (:class:`~mezo_kernels.tasks.records.Example`) of one data file, in file order, read with ``task``'s columns for
    ``split`` (``"train"`` or ``"dev"``) and its labels (:meth:`Task.label_of`).

    FileNotFoundError for a missing file; ValueError naming the file for an unknown suffix, an empty file, a
    file that does not parse, a missing column (with the columns it has), and, with the 1-based row and the
    column, an empty text or a label that is not one of the task's."""
    where = os.fspath(path)
    p = Path(path).expanduser()
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{where}: unknown data file type {p.suffix!r}; use one of {', '.join(FORMATS)}")
    if not p.is_file():
        raise FileNotFoundError(f"data file {where} does not exist")
    if p.stat().st_size == 0 or (fmt != "parquet" and not p.read_bytes().strip()):
        raise ValueError(f"{where}: the data file is empty")
    cols = task.columns_for(split)
    roles = [("text_a", cols.text_a), ("text_b", cols.text_b), ("label", cols.label)]
    table = _read(p, fmt, where, [n for _, n in roles if n is not None])
    for role, name in roles:
        if name is not None and name not in table.column_names:
            raise ValueError(f"{where}: missing column {name!r} (the task's columns.{role}); the file has columns "
                             f"{table.column_names}")
    if table.num_rows == 0:
        raise ValueError(f"{where}: the data file has no rows")
    rows = table.select_columns([n for _, n in roles if n is not None]).to_dict()
    out = []
    for i in range(table.num_rows):
        at = f"{where}: row {i + 1}"
        text_a = _text(rows[cols.text_a][i], f"{at}, column {cols.text_a!r}")
        text_b = None if cols.text_b is None else _text(rows[cols.text_b][i], f"{at}, column {cols.text_b!r}")
        out.append(Example(text_a, text_b, _label(task, rows[cols.label][i], f"{at}, column {cols.label!r}")))
    return out


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, at: str) -> str:
    if isinstance(value, (list, dict)):
        raise ValueError(f"{at}: expected text, got {type(value).__name__} {value!r}")
    text = "" if _missing(value) else str(value).strip()
    if not text:
        raise ValueError(f"{at}: empty text")
    return text


def _label(task: Task, value: Any, at: str) -> int:
    if _missing(value):
        raise ValueError(f"{at}: missing label")
    c = task.label_of(value)
    if c is None:
        known = list(task.label_names) or list(range(task.num_classes))
        raise ValueError(f"{at}: unknown label value {value!r}; the task's label values are {known}")
    return c


def _read(p: Path, fmt: str, where: str, columns: list[str]):
    """The file as a ``datasets.Dataset``; ValueError naming the file (and the parser's reason) when it does
    not parse. CSV/TSV ``columns`` stay the file's text (no number parsing, ``NA`` is text), as GLUE's reader
    keeps them."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {where} needs the 'datasets' package (part of the 'hf' extra): "
                          'pip install -e ".[hf]"') from None
    with tempfile.TemporaryDirectory(prefix="mezo-data-") as cache, _offline_and_quiet(datasets):
        kw = {"cache_dir": cache, "keep_in_memory": True}
        try:
            if fmt == "json":
                return datasets.Dataset.from_json(str(p), **kw)
            if fmt == "parquet":
                return datasets.Dataset.from_parquet(str(p), **kw)
            sep = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
            return datasets.Dataset.from_csv(str(p), keep_default_na=False, converters=dict.fromkeys(columns, str),
                                             **sep, **kw)
        except Exception as e:   # the builders raise many types (arrow, pandas, json); all mean "does not parse"
            root = e
            for _ in range(20):          # the innermost exception says what was wrong with the file
                if (root.__cause__ or root.__context__) is None:
                    break
                root = root.__cause__ or root.__context__
            why = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
            raise ValueError(f"{where}: could not be read as {fmt}: {why}") from None


@contextlib.contextmanager
def _offline_and_quiet(datasets: Any) -> Iterator[None]:
    """``datasets`` offline (no hub requests) and without progress bars or info logs, restored afterwards."""
    cfg = datasets.config
    saved = (cfg.HF_HUB_OFFLINE, cfg.HF_DATASETS_OFFLINE, datasets.is_progress_bar_enabled(),
             datasets.logging.get_verbosity())
    cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        cfg.HF_HUB_OFFLINE, cfg.HF_DATASETS_OFFLINE = saved[0], saved[1]
        if saved[2]:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(saved[3])
