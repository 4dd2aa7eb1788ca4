"""Task specs: a prompt task described as plain data, in a JSON or YAML file or a Python dict.

A spec has these fields (only ``template``, ``verbalizer`` and ``columns`` are needed in a file)::

    name: reviews                         # default: the file name without its suffix
    columns: {text_a: review, label: stars}   # text_b: a second text column for sentence-pair tasks
    template: "{text_a} It was {mask} ."  # masked LMs; one {mask} slot
    causal_template: "{text_a} It was {mask}"   # optional; causal LMs score the words after the cut at {mask}
    verbalizer: {negative: terrible, positive: great}   # label value in the data -> word
    objective: ce                         # optional: an ObjectiveKind (the default of --objective)
    description: one line for humans      # optional

``verbalizer`` keys are the label values of the data files, integers or strings. When they are exactly the
integers ``0..C-1`` they are the classes; otherwise the classes are numbered ``0..C-1`` in the verbalizer's order
(F1 is reported for class 1, the second entry). ``label_words`` (keyed ``0..C-1``) with ``label_names``
(``{value: class}``) is the same thing spelled as the :class:`~mezo_kernels.tasks.records.Task` record's fields.
``columns`` may also be given per data file of a GLUE-style folder (``{train: {...}, dev: {...}}``).

Every error is a :class:`~mezo_kernels.tasks.records.TaskFieldError` (a ValueError) that names the file (or the task) and
the field: ``spec.yaml: field 'template': must contain exactly one {mask} slot (found 0 in ...)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .records import SPLIT_FILES, Columns, Task, TaskFieldError

__all__ = ["task_from_dict", "load_task_spec", "is_spec_path", "SPEC_SUFFIXES", "SPEC_FIELDS"]

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
SPEC_FIELDS = ("name", "columns", "template", "causal_template", "verbalizer", "label_words", "label_names",
               "num_text_fields", "objective", "description")


def is_spec_path(name: Any) -> bool:
    """Whether ``name`` (a ``--task`` value) names a spec file rather than a registered task: it ends in
    ``.json``/``.yaml``/``.yml`` or is an existing file."""
    text = os.fspath(name) if isinstance(name, (str, os.PathLike)) else ""
    return bool(text) and (text.lower().endswith(SPEC_SUFFIXES) or Path(text).expanduser().is_file())


def load_task_spec(path: str | os.PathLike) -> Task:
    """The task described by the JSON or YAML file ``path``; its ``name`` defaults to the file's stem.

    FileNotFoundError when it does not exist; ValueError (a :class:`TaskFieldError` for a bad field) naming the
    file, and the line for a file that does not parse."""
    p = Path(path).expanduser()
    where = os.fspath(path)
    if not p.is_file():
        raise FileNotFoundError(f"task spec file {where} does not exist")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{where}: the task spec file is empty")
    if p.suffix.lower() == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{e.lineno}: not valid JSON: {e.msg}") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{where}: reading a YAML task spec needs PyYAML (part of the 'hf' extra): "
                              'pip install -e ".[hf]", or write the spec as JSON') from None
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    else:
        raise ValueError(f"{where}: a task spec file must end in {', '.join(SPEC_SUFFIXES)}")
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a task spec must be a mapping of fields ({', '.join(SPEC_FIELDS)}), "
                         f"got {type(spec).__name__}")
    if "columns" not in spec:
        raise TaskFieldError(where, "columns", "missing: the data files' column names, e.g. "
                                               "{text_a: sentence, label: label} (text_b for a second text)")
    return task_from_dict({"name": p.stem, **spec}, where, source=where)


def task_from_dict(spec: Mapping[str, Any], where: str | None = None, *, source: str | None = None) -> Task:
    """The :class:`Task` a spec mapping describes (see the module docstring). ``where`` names the spec in
    errors (default ``task spec '<name>'``); ``source``: the file it was read from (``Task.source``)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where or 'task spec'}: a task spec must be a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    where = where or f"task spec {name!r}"

    def bad(fld: str, why: str) -> TaskFieldError:
        return TaskFieldError(where, fld, why)

    unknown = sorted(set(spec) - set(SPEC_FIELDS), key=str)
    if unknown:
        raise bad(str(unknown[0]), f"unknown field (known: {', '.join(SPEC_FIELDS)})")
    if "verbalizer" not in spec and "label_words" not in spec:
        raise bad("verbalizer", "missing: map each label value of the data to its word")
    if "verbalizer" in spec and ("label_words" in spec or "label_names" in spec):
        raise bad("verbalizer", "give either 'verbalizer' or 'label_words' with 'label_names', not both")
    for req in ("name", "template"):
        if req not in spec:
            raise bad(req, "missing")
    for fld in ("name", "template", "causal_template", "description", "objective"):
        if fld in spec and not isinstance(spec[fld], str) and not (fld in ("causal_template", "objective")
                                                                   and spec[fld] is None):
            raise bad(fld, f"expected a string, got {type(spec[fld]).__name__}")
    kw = {k: v for k, v in spec.items() if k != "verbalizer"}
    kw["source"] = source
    if "verbalizer" in spec:
        kw["label_words"], kw["label_names"] = _verbalizer(bad, spec["verbalizer"])
    else:
        kw["label_words"] = _label_words(bad, spec["label_words"])
        names = spec.get("label_names", {})
        if not isinstance(names, Mapping) or not all(isinstance(k, str) and type(v) is int for k, v in names.items()):
            raise bad("label_names", f"expected a mapping string -> integer label, got {names!r}")
    if "columns" in spec:
        kw["columns"] = _columns(bad, spec["columns"])
        kw.setdefault("num_text_fields", 2 if any(c.text_b for c in kw["columns"].values()) else 1)
    if "num_text_fields" in kw and type(kw["num_text_fields"]) is not int:
        raise bad("num_text_fields", f"expected 1 or 2, got {kw['num_text_fields']!r}")
    try:
        return Task(**kw)
    except TaskFieldError as e:
        # a spec that gave a verbalizer has no label_words/label_names fields: name the one it wrote
        fld = "verbalizer" if "verbalizer" in spec and e.field in ("label_words", "label_names") else e.field
        raise bad(fld, e.why) from None


def _label_words(bad, words: Any) -> dict[int, Any]:
    if not isinstance(words, Mapping):
        raise bad("label_words", f"expected a mapping label -> word, got {type(words).__name__}")
    try:
        return {int(k): v for k, v in words.items()}
    except (TypeError, ValueError):
        raise bad("label_words", f"labels must be integers, got {sorted(map(str, words))}") from None


def _verbalizer(bad, verb: Any) -> tuple[dict[int, Any], dict[str, int]]:
    """(label_words, label_names) of a ``{label value: word}`` mapping."""
    if not isinstance(verb, Mapping) or len(verb) < 2:
        raise bad("verbalizer", f"expected a mapping of at least 2 label values to words, got {verb!r}")
    for key in verb:
        if isinstance(key, bool):
            raise bad("verbalizer", f"label value {key!r} is a boolean (YAML reads yes/no/on/off/true/false as "
                                    "booleans); quote it")
        if not isinstance(key, (int, str)) or (isinstance(key, str) and not key.strip()):
            raise bad("verbalizer", f"label values must be integers or non-empty strings, got {key!r}")
    texts = [str(k).strip() for k in verb]
    if len(set(texts)) != len(texts):
        raise bad("verbalizer", f"label values repeat: {texts}")
    words = list(verb.values())
    if all(isinstance(k, int) for k in verb) and sorted(verb) == list(range(len(verb))):
        return {k: verb[k] for k in sorted(verb)}, {}
    return dict(enumerate(words)), {t: i for i, t in enumerate(texts)}


def _columns(bad, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise bad("columns", f"expected a mapping of text_a/text_b/label to column names, got "
                             f"{type(value).__name__}")
    per_split = set(value) <= set(SPLIT_FILES) and bool(value)
    raw = dict(value) if per_split else {s: value for s in SPLIT_FILES}
    out = {}
    for split, cols in raw.items():
        at = f"columns.{split}" if per_split else "columns"
        if not isinstance(cols, Mapping):
            raise bad(at, f"expected a mapping of text_a/text_b/label, got {cols!r}")
        unknown = set(cols) - {"text_a", "text_b", "label"}
        if unknown or "text_a" not in cols:
            why = f"unknown keys {sorted(map(str, unknown))}" if unknown else "missing 'text_a'"
            raise bad(at, f"{why} (keys: text_a, text_b, label)")
        for k, v in cols.items():
            if not (isinstance(v, str) and v) and not (k == "text_b" and v is None):
                raise bad(f"{at}.{k}", f"expected a column name, got {v!r}")
        out[split] = Columns(cols["text_a"], cols.get("text_b"), cols.get("label", "label"))
    return out
