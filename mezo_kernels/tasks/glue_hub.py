"""GLUE SST-2 and RTE from the Hugging Face hub, for a user without a data folder.

When no data folder is given or found (:func:`~mezo_kernels.tasks.data.find_data_dir`), :func:`load_glue` fetches
the task with one ``datasets.load_dataset(GLUE_HUB_ID, config)`` call, which keeps the rows in datasets' cache
(later runs read them from there), and turns them into :class:`~mezo_kernels.tasks.records.Example` records with
the task's own columns and labels: GLUE ``train`` is the pool that train and dev are sampled from, GLUE
``validation`` the reported split: the same rows as ``train.tsv`` / ``dev.tsv`` of a GLUE data folder.

Offline (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` set) nothing is attempted, and a call that fails to reach
the hub ends the same way: one :class:`DataUnavailableError` line naming both ways to get the data.
This module holds no other network code.
"""
from __future__ import annotations

import os

from .records import Example, Task

__all__ = ["GLUE_HUB_ID", "GLUE_CONFIGS", "GLUE_FOLDERS", "OFFLINE_ENV", "DataUnavailableError", "has_glue",
           "offline_reason", "unavailable_message", "load_glue"]

GLUE_HUB_ID = "nyu-mll/glue"                      # GLUE on the hub (the old id "glue" redirects here)
GLUE_CONFIGS = {"sst2": "sst2", "rte": "rte"}     # task name -> GLUE config
GLUE_FOLDERS = {"sst2": "SST-2", "rte": "RTE"}    # task name -> folder name in GLUE's own download
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_SPLITS = {"train": "train", "dev": "validation"}  # our split file -> GLUE split (GLUE test has no labels)
_TRUE = {"1", "on", "yes", "true"}
# exception class names (anywhere in the cause chain) that mean "the hub could not be reached"
_NETWORK_NAMES = ("Connect", "Timeout", "Offline", "LocalEntryNotFound", "NameResolution", "MaxRetry")


class DataUnavailableError(ValueError):
    """No data folder and no way to fetch GLUE; the message says how to get the data (one line)."""


def has_glue(task: Task) -> bool:
    """Whether ``task`` is one of the GLUE tasks this module can fetch (SST-2, RTE)."""
    return task.name in GLUE_CONFIGS


def offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (say) when an offline switch of datasets / huggingface_hub is on, else None."""
    for name in OFFLINE_ENV:
        value = os.environ.get(name, "").strip()
        if value.lower() in _TRUE:
            return f"{name}={value}"
    return None


def unavailable_message(task: str, why: str) -> str:
    """The one-line error of a run that has neither a data folder nor the hub."""
    folder = GLUE_FOLDERS.get(task, task)
    return (f"no data for task {task!r}: no data folder was given or found, and GLUE cannot be fetched ({why}). "
            f"Either pass --data-dir DIR or set MEZO_DATA_DIR=DIR, DIR holding the GLUE TSVs {task}/train.tsv and "
            f"{task}/dev.tsv (or GLUE's own {folder}/), or go online (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE unset) "
            f"so that `datasets` can fetch {GLUE_HUB_ID!r} ({GLUE_CONFIGS.get(task, task)}) into its cache")


def _network_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception in its cause chain) says the hub could not be reached."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or any(n in type(e).__name__ for n in _NETWORK_NAMES):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_glue(task: Task) -> tuple[list[Example], list[Example]]:
    """(GLUE train, GLUE validation) of ``task`` (``sst2`` or ``rte``) as examples, in the hub's row order.

    Raises :class:`DataUnavailableError` when offline (checked before anything is imported or fetched), when
    ``datasets`` is not installed, or when the hub cannot be reached; other errors propagate."""
    if not has_glue(task):
        raise ValueError(f"task {task.name!r} is not a GLUE task this package can fetch ({', '.join(GLUE_CONFIGS)})")
    why = offline_reason()
    if why is not None:
        raise DataUnavailableError(unavailable_message(task.name, why))
    try:
        import datasets
    except ImportError:
        raise DataUnavailableError(unavailable_message(
            task.name, "the `datasets` package is not installed: pip install -e '.[hf]'")) from None
    try:
        ds = datasets.load_dataset(GLUE_HUB_ID, GLUE_CONFIGS[task.name])
    except Exception as e:     # noqa: BLE001 -- only a network failure becomes the one-line error
        if _network_failure(e):
            raise DataUnavailableError(unavailable_message(task.name, f"{type(e).__name__}: {e}")) from e
        raise
    return tuple(_examples(ds[glue_split], task, split) for split, glue_split in _SPLITS.items())  # type: ignore


def _examples(rows, task: Task, split: str) -> list[Example]:
    """Rows of one GLUE split (a ``datasets.Dataset``, or any mapping of column -> list) as examples."""
    cols = task.columns_for(split)
    have = list(rows.column_names) if hasattr(rows, "column_names") else list(rows)
    for c in (cols.text_a, cols.text_b, cols.label):
        if c is not None and c not in have:
            raise ValueError(f"{GLUE_HUB_ID} ({GLUE_CONFIGS[task.name]}): no column {c!r} for task {task.name!r} "
                             f"(columns: {have})")
    text_a, labels = rows[cols.text_a], rows[cols.label]
    text_b = rows[cols.text_b] if cols.text_b is not None else [None] * len(labels)
    out = []
    for i, (a, b, y) in enumerate(zip(text_a, text_b, labels)):
        label = task.label_of(y)
        if label is None:
            raise ValueError(f"{GLUE_HUB_ID} ({GLUE_CONFIGS[task.name]}) {_SPLITS[split]} row {i}: bad label {y!r}")
        out.append(Example(a.strip(), b.strip() if b is not None else None, label))
    return out
