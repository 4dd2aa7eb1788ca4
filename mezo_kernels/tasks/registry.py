"""The task registry: the built-in tasks (SST-2, RTE), written as task specs like any user's, and the one place a
``--task`` value becomes a :class:`~mezo_kernels.tasks.records.Task` (a registered name, or a spec file).
"""
from __future__ import annotations

from typing import Any, Mapping

from .records import Task, canonical_task_name
from .spec import is_spec_path, load_task_spec, task_from_dict

__all__ = ["TASKS", "get_task", "task_names", "register_task"]


# The built-in tasks are task specs like any user's (taskspec.py reads both).
TASKS: dict[str, Task] = {t.name: t for t in map(task_from_dict, [
    {"name": "sst2",
     "verbalizer": {0: "terrible", 1: "great"},
     "template": "*cls**sent_0*_It_was*mask*.*sep+*",
     "causal_template": "{text_a} It was {mask}",
     "columns": {"text_a": "sentence", "label": "label"},
     "description": "GLUE SST-2 sentiment; masked: LM-BFF's template '<S> It was<mask>.'; causal: MeZO's OPT "
                    "template"},
    {"name": "rte",
     "verbalizer": {"entailment": "Yes", "not_entailment": "No"},   # classes 0, 1 (files may hold 0 / 1)
     "template": "*cls**sent-_0*?*mask*,*+sentl_1**sep+*",
     "causal_template": '{text_a}\nDoes this mean that "{text_b}" is true? Yes or No?\n{mask}',
     "columns": {"text_a": "sentence1", "text_b": "sentence2", "label": "label"},
     "description": "GLUE RTE entailment; masked: LM-BFF's template '<premise minus its last character>?<mask>, "
                    "<hypothesis, first letter lower-cased>'; causal: MeZO's OPT template"},
])}


def task_names() -> list[str]:
    """The registered task names, sorted (the CLI's ``--task`` choices besides spec files)."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case, ``-`` and ``_`` ignored), or the task spec in the file ``name``
    (``.json``, ``.yaml``, ``.yml``; see taskspec.py). ValueError listing the known tasks for anything else."""
    key = canonical_task_name(str(name))
    if key in TASKS:
        return TASKS[key]
    if is_spec_path(name):
        return load_task_spec(name)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}, or a task spec file "
                     "(.json, .yaml)")


def register_task(task: Task | Mapping[str, Any]) -> Task:
    """Add a task (a :class:`Task` or a spec dict) to the registry, so that ``--task NAME`` and
    ``TrainConfig(task=NAME)`` find it in this process. Returns the task."""
    t = task if isinstance(task, Task) else task_from_dict(task)
    TASKS[canonical_task_name(t.name)] = t
    return t
