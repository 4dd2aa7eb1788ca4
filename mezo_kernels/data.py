"""GLUE TSV reading and the MeZO paper's few-shot split protocols.

Files are tab-separated with a header row and no quoting (``csv.QUOTE_NONE``). Columns are found by header name,
so both the ``label<TAB>sentence`` order of the shared SST-2 copy and GLUE's ``sentence<TAB>label`` work:

* SST-2: ``sentence``, ``label`` (0 negative, 1 positive)
* RTE: ``sentence1``, ``sentence2``, ``label`` (0 entailment, 1 not_entailment; the strings are accepted too),
  other columns (``idx``) are ignored.

The data is never copied: pass its folder with a flag or ``MEZO_DATA_DIR`` (see :func:`resolve_data_dir`).
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Example", "Splits", "read_glue_tsv", "resolve_data_dir", "load_splits", "canonical_task_name",
           "DATA_DIR_ENV"]

DATA_DIR_ENV = "MEZO_DATA_DIR"

# task -> (text_a column, text_b column or None, label column)
_COLUMNS: dict[str, tuple[str, str | None, str]] = {
    "sst2": ("sentence", None, "label"),
    "rte": ("sentence1", "sentence2", "label"),
}
_LABEL_NAMES = {"entailment": 0, "not_entailment": 1}
_NUM_CLASSES = {"sst2": 2, "rte": 2}


@dataclass(frozen=True)
class Example:
    """One classification example: ``text_a`` (sentence / premise), ``text_b`` (hypothesis or None), label."""

    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class Splits:
    """Train / dev / test example lists of one task under one protocol and seed."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]


def canonical_task_name(name: str) -> str:
    """``"SST-2"``, ``"sst_2"`` -> ``"sst2"``."""
    return name.lower().replace("-", "").replace("_", "")


def _columns(task: str) -> tuple[str, str | None, str]:
    key = canonical_task_name(task)
    if key not in _COLUMNS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(_COLUMNS))}")
    return _COLUMNS[key]


def read_glue_tsv(path: str | os.PathLike, task: str) -> list[Example]:
    """Read a GLUE TSV file of ``task`` into examples, in file order.

    Blank lines are skipped. Raises ValueError naming the file and the 1-based line number for a missing or
    wrong header, a row with the wrong number of columns, a label that is not a valid class, or an empty text.
    """
    path = Path(path)
    col_a, col_b, col_y = _columns(task)
    n_classes = _NUM_CLASSES[canonical_task_name(task)]
    out: list[Example] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        want = [c for c in (col_a, col_b, col_y) if c is not None]
        if header is None or any(c not in header for c in want):
            raise ValueError(f"{path}:1: missing header: expected columns {want} for task {task!r}, "
                             f"got {header!r}")
        if len(set(header)) != len(header):
            raise ValueError(f"{path}:1: duplicate column names in header {header!r}")
        ia, iy = header.index(col_a), header.index(col_y)
        ib = header.index(col_b) if col_b is not None else None
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: expected {len(header)} tab-separated columns "
                                 f"({', '.join(header)}), got {len(row)}")
            raw = row[iy].strip()
            if raw in _LABEL_NAMES:
                label = _LABEL_NAMES[raw]
            else:
                try:
                    label = int(raw)
                except ValueError:
                    label = -1
            if not 0 <= label < n_classes:
                raise ValueError(f"{path}:{line}: bad label {row[iy]!r}; expected an integer in 0..{n_classes - 1}")
            text_a = row[ia].strip()
            text_b = row[ib].strip() if ib is not None else None
            if not text_a or (ib is not None and not text_b):
                empty = col_a if not text_a else col_b
                raise ValueError(f"{path}:{line}: empty text in column {empty!r}")
            out.append(Example(text_a, text_b, label))
    return out


def resolve_data_dir(arg: str | os.PathLike | None) -> Path:
    """The data folder: ``arg`` (a command-line flag) if given, else ``$MEZO_DATA_DIR``, else ``../shared/data``
    (from the working directory) when it holds ``sst2/``.

    Raises ValueError when neither is set, FileNotFoundError when the folder does not exist; both messages say
    how to set it.
    """
    how = f"pass --data-dir DIR or set {DATA_DIR_ENV}=DIR (the folder holding sst2/ and rte/ with train.tsv, dev.tsv)"
    if arg is None or str(arg) == "":
        env = os.environ.get(DATA_DIR_ENV, "")
        if not env:
            # the project's own layout (a checkout beside shared/): lets `mezo-kernels train` run with no options
            beside = Path.cwd().parent / "shared" / "data"
            if (beside / "sst2").is_dir():
                return beside
            raise ValueError(f"no data directory given (and no ../shared/data): {how}")
        arg, source = env, f"${DATA_DIR_ENV}"
    else:
        source = "the data-dir argument"
    p = Path(arg).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"data directory {str(p)!r} (from {source}) does not exist: {how}")
    return p


def _sample_kshot(examples: list[Example], k: int, rng: random.Random, what: str
                  ) -> tuple[list[Example], list[Example]]:
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    train_idx: list[int] = []
    dev_idx: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        if len(idx) < 2 * k:
            raise ValueError(f"{what}: class {label} has {len(idx)} examples, k-shot needs 2*k = {2 * k} "
                             "(k for train and k for dev)")
        pick = rng.sample(idx, 2 * k)
        train_idx += pick[:k]
        dev_idx += pick[k:]
    rng.shuffle(train_idx)
    rng.shuffle(dev_idx)
    return [examples[i] for i in train_idx], [examples[i] for i in dev_idx]


def load_splits(task: str, data_dir: str | os.PathLike | None, protocol: Literal["kshot", "opt"] = "kshot",
                k: int = 16, seed: int = 0, *, opt_sizes: tuple[int, int, int] = (1000, 500, 1000)) -> Splits:
    """Sample the train/dev/test splits of ``task`` from ``data_dir/<task>/{train,dev}.tsv``.

    * ``"kshot"`` (the MeZO paper's RoBERTa protocol, after LM-BFF): ``k`` examples per class for train and
      another ``k`` per class for dev, disjoint, both sampled from the train file; test = the whole dev file.
    * ``"opt"`` (the paper's OPT protocol): ``opt_sizes = (1000, 500, 1000)``: 1000 train and 500 dev sampled
      disjointly from the train file, 1000 test sampled from the dev file (kept in file order); each is capped by
      what the file holds (SST-2's 872-row dev gives an 872-example test set).

    Deterministic given ``seed`` (``random.Random(seed)``; the same file gives the same splits on every
    platform). Train and dev come shuffled.
    """
    key = canonical_task_name(task)
    _columns(key)
    root = resolve_data_dir(data_dir) / key
    train_file, dev_file = root / "train.tsv", root / "dev.tsv"
    pool = read_glue_tsv(train_file, key)
    heldout = read_glue_tsv(dev_file, key)
    rng = random.Random(seed)
    if protocol == "kshot":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        train, dev = _sample_kshot(pool, k, rng, str(train_file))
        return Splits(train, dev, list(heldout))
    if protocol == "opt":
        n_train, n_dev, n_test = opt_sizes
        perm = list(range(len(pool)))
        rng.shuffle(perm)
        n_train = min(n_train, len(perm))
        n_dev = min(n_dev, len(perm) - n_train)
        train = [pool[i] for i in perm[:n_train]]
        dev = [pool[i] for i in perm[n_train:n_train + n_dev]]
        test_idx = sorted(rng.sample(range(len(heldout)), min(n_test, len(heldout))))
        return Splits(train, dev, [heldout[i] for i in test_idx])
    raise ValueError(f"unknown protocol {protocol!r}; use 'kshot' or 'opt'")
