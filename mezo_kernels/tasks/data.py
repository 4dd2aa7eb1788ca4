"""GLUE TSV reading and the MeZO paper's few-shot split protocols, for a task's GLUE folder or for data files of
any format (read by datafiles.py: JSONL, CSV, TSV, parquet through ``datasets``).

Files are tab-separated with a header row and no quoting (``csv.QUOTE_NONE``). Columns are found by header name
(the task record's ``columns``, see tasks.py), so both the ``label<TAB>sentence`` order of the shared SST-2 copy and
GLUE's ``sentence<TAB>label`` work; other columns (``idx``) are ignored, and a task's ``label_names`` (RTE's
``entailment``/``not_entailment``) are accepted in place of the integer labels.

The data is never copied: pass its folder with a flag or ``MEZO_DATA_DIR`` (see :func:`find_data_dir`); a task's
folder is ``<dir>/sst2/`` or GLUE's own ``<dir>/SST-2/`` (:func:`task_dir`). With no folder at all, GLUE SST-2 and
RTE come from the hub through ``datasets`` (glue_hub.py), or one error line says how to get them.
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from .files import read_data_file
from .glue_hub import GLUE_FOLDERS, GLUE_HUB_ID, has_glue, load_glue
from .records import Example, Task, canonical_task_name
from .registry import get_task
from .spec import is_spec_path

__all__ = ["Splits", "read_glue_tsv", "read_data_file", "resolve_data_dir", "find_data_dir", "task_dir",
           "load_splits", "load_task_splits", "canonical_task_name", "subsample", "DATA_DIR_ENV"]

DATA_DIR_ENV = "MEZO_DATA_DIR"
_HOW = (f"pass --data-dir DIR or set {DATA_DIR_ENV}=DIR (the folder holding sst2/ and rte/ with "
        "train.tsv, dev.tsv)")


@dataclass(frozen=True)
class Splits:
    """Train / dev / test example lists of one task under one protocol and seed."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]


def read_glue_tsv(path: str | os.PathLike, task: str | Task, split: str = "train") -> list[Example]:
    """Read a GLUE TSV file of ``task`` (a name or a :class:`Task`) into examples, in file order, with the
    task's columns for ``split``.

    Blank lines are skipped. Raises ValueError naming the file and the 1-based line number for a missing or
    wrong header, a row with the wrong number of columns, a label that is not a valid class, or an empty text.
    """
    return _read_tsv(Path(path), task if isinstance(task, Task) else get_task(task), split)


def _read_tsv(path: Path, spec: Task, split: str) -> list[Example]:
    task = spec.name
    cols = spec.columns_for(split)
    col_a, col_b, col_y = cols.text_a, cols.text_b, cols.label
    n_classes = spec.num_classes
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
            label = spec.label_of(row[iy])
            if label is None:
                raise ValueError(f"{path}:{line}: bad label {row[iy]!r}; expected an integer in 0..{n_classes - 1}")
            text_a = row[ia].strip()
            text_b = row[ib].strip() if ib is not None else None
            if not text_a or (ib is not None and not text_b):
                empty = col_a if not text_a else col_b
                raise ValueError(f"{path}:{line}: empty text in column {empty!r}")
            out.append(Example(text_a, text_b, label))
    return out


def find_data_dir(arg: str | os.PathLike | None) -> Path | None:
    """The data folder: ``arg`` (a command-line flag) if given, else ``$MEZO_DATA_DIR``, else ``../shared/data``
    (from the working directory) when it holds ``sst2/``; None when none of them is given or found.

    FileNotFoundError when the folder given by ``arg`` or the environment does not exist.
    """
    if arg is None or str(arg) == "":
        env = os.environ.get(DATA_DIR_ENV, "")
        if not env:
            # the project's own layout (a checkout beside shared/): lets `mezo-kernels train` run with no options
            beside = Path.cwd().parent / "shared" / "data"
            return beside if (beside / "sst2").is_dir() else None
        arg, source = env, f"${DATA_DIR_ENV}"
    else:
        source = "the data-dir argument"
    p = Path(arg).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"data directory {str(p)!r} (from {source}) does not exist: {_HOW}")
    return p


def resolve_data_dir(arg: str | os.PathLike | None) -> Path:
    """:func:`find_data_dir`, or ValueError when no folder is given or found; both errors say how to set it.

    (:func:`load_splits` instead fetches GLUE SST-2 / RTE through ``datasets`` when there is no folder.)
    """
    p = find_data_dir(arg)
    if p is None:
        raise ValueError(f"no data directory given (and no ../shared/data): {_HOW}")
    return p


def task_dir(root: Path, task: Task) -> Path:
    """The folder of ``task`` in the data folder ``root``: ``root/<name>`` (``sst2``, ``rte``), or GLUE's own
    download name (``SST-2``, ``RTE``) when only that exists. FileNotFoundError naming both when neither holds
    ``train.tsv``."""
    names = [task.name] + ([GLUE_FOLDERS[task.name]] if task.name in GLUE_FOLDERS else [])
    for name in names:
        if (root / name / "train.tsv").is_file():
            return root / name
    raise FileNotFoundError(f"data directory {str(root)!r} has no {' or '.join(n + '/train.tsv' for n in names)}: "
                            f"it holds one folder per task with train.tsv and dev.tsv (GLUE TSVs)")


def _task_examples(task: Task, data_dir: str | os.PathLike | None) -> tuple[list[Example], list[Example], str]:
    """(train pool, held-out rows, what to call the pool in errors) of ``task``: the TSVs of its folder in the
    data folder, or, when no folder is given or found, GLUE SST-2 / RTE through ``datasets`` (glue_hub.py; one
    line naming both ways when that cannot work)."""
    root = find_data_dir(data_dir)
    if root is None and has_glue(task):
        pool, heldout = load_glue(task)
        return pool, heldout, f"{GLUE_HUB_ID} ({task.name}) train"
    folder = task_dir(resolve_data_dir(data_dir) if root is None else root, task)
    train_file = folder / "train.tsv"
    return _read_tsv(train_file, task, "train"), _read_tsv(folder / "dev.tsv", task, "dev"), str(train_file)


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


def load_splits(task: str | Task, data_dir: str | os.PathLike | None, protocol: Literal["kshot", "opt"] = "kshot",
                k: int = 16, seed: int = 0, *, opt_sizes: tuple[int, int, int] = (1000, 500, 1000)) -> Splits:
    """Sample the train/dev/test splits of ``task`` from ``data_dir/<task>/{train,dev}.tsv`` (no folder given or
    found: GLUE's train / validation rows through ``datasets``, see glue_hub.py).

    * ``"kshot"`` (the MeZO paper's RoBERTa protocol, after LM-BFF): ``k`` examples per class for train and
      another ``k`` per class for dev, disjoint, both sampled from the train file; test = the whole dev file.
    * ``"opt"`` (the paper's OPT protocol): ``opt_sizes = (1000, 500, 1000)``: 1000 train and 500 dev sampled
      disjointly from the train file, 1000 test sampled from the dev file (kept in file order); each is capped by
      what the file holds (SST-2's 872-row dev gives an 872-example test set).

    Deterministic given ``seed`` (``random.Random(seed)``; the same file gives the same splits on every
    platform). Train and dev come shuffled.
    """
    spec = task if isinstance(task, Task) else get_task(task)
    pool, heldout, what = _task_examples(spec, data_dir)
    return _protocol_splits(pool, heldout, protocol, k, seed, opt_sizes, what)


def load_task_splits(task: str | Task, data_dir: str | os.PathLike | None = None,
                     protocol: Literal["kshot", "opt"] = "kshot", k: int = 16, seed: int = 0, *,
                     train_file: str | os.PathLike | None = None, eval_file: str | os.PathLike | None = None,
                     test_file: str | os.PathLike | None = None,
                     opt_sizes: tuple[int, int, int] = (1000, 500, 1000)) -> Splits:
    """The splits of a run: from data files (JSONL, CSV, TSV, parquet; :mod:`~mezo_kernels.datafiles`) when
    any file is given, else :func:`load_splits` from the task's folder in ``data_dir``.

    With files the protocol works as with a GLUE folder, the reported file playing ``dev.tsv``:

    * train: sampled from ``train_file`` (kshot: ``k`` per class; opt: 1000);
    * dev (periodic evaluation): ``eval_file`` when ``test_file`` is given too; else sampled from ``train_file``
      (kshot: another ``k`` per class; opt: 500), disjoint from train;
    * test (the before/after, reported split): ``test_file``, else ``eval_file`` (opt: 1000 rows sampled).

    Without ``train_file`` (evaluation only, kshot protocol) train and dev are empty. The same files and seed
    give the same splits.
    """
    if train_file is None and eval_file is None and test_file is None:
        spec_file = task.source if isinstance(task, Task) else (task if is_spec_path(task) else None)
        if data_dir is None and spec_file is not None:
            raise ValueError(f"task spec {spec_file}: give its data with --train-file and --eval-file (.jsonl, .json, "
                             ".csv, .tsv, .parquet), or --data-dir DIR holding <name>/train.tsv and dev.tsv")
        return load_splits(task, data_dir, protocol, k, seed, opt_sizes=opt_sizes)
    spec = task if isinstance(task, Task) else get_task(task)
    reported = test_file if test_file is not None else eval_file
    if reported is None:
        raise ValueError("no evaluation data: give --eval-file (the reported split; also --test-file to report on "
                         "a separate file, then --eval-file is the dev split)")
    heldout = read_data_file(reported, spec, "dev")
    if train_file is None:
        if protocol != "kshot":
            raise ValueError(f"--protocol {protocol} samples the test rows after the train rows: give --train-file")
        return Splits([], [], heldout)
    pool = read_data_file(train_file, spec, "train")
    s = _protocol_splits(pool, heldout, protocol, k, seed, opt_sizes, str(train_file))
    if test_file is not None and eval_file is not None:
        s = Splits(s.train, read_data_file(eval_file, spec, "dev"), s.test)
    return s


def _protocol_splits(pool: list[Example], heldout: list[Example], protocol: str, k: int, seed: int,
                     opt_sizes: tuple[int, int, int], what: str) -> Splits:
    """Train/dev sampled from ``pool`` and test from ``heldout`` by ``protocol`` (see :func:`load_splits`)."""
    rng = random.Random(seed)
    if protocol == "kshot":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        train, dev = _sample_kshot(pool, k, rng, what)
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


def subsample(examples: Sequence[Example], cap: int, seed: int) -> list[Example]:
    """At most ``cap`` of ``examples`` (0: all): a ``random.Random(seed)`` sample when there are more."""
    if cap and len(examples) > cap:
        return random.Random(seed).sample(list(examples), cap)
    return list(examples)
