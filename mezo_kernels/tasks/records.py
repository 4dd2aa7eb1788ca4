"""Prompt templates and verbalizers (label words) that turn a classification task into a language-model objective.

A task is scored the LM-BFF / MeZO way:

* masked LMs (RoBERTa, BERT): the template is filled with the example and a mask token; the logits at the mask
  position restricted to the label words' token ids are the class scores.
* causal LMs (OPT, Llama, SmolLM2): the prompt is the filled template *up to* the ``{mask}`` slot; each class's
  candidate continuation is the label word (with the whitespace that precedes the slot, e.g. ``" great"``), and
  its score is the (length-normalised) log-probability of the continuation given the prompt.

Templates are ``str.format`` strings with the slots ``{text_a}``, ``{text_b}`` and ``{mask}``. A template
without a ``{mask}`` slot is rejected. Causal templates must not have text slots after ``{mask}``: text after the
slot is dropped for causal scoring (SST-2's trailing ``" ."``), so a template such as RTE's
``"{text_a} ? {mask} , {text_b}"`` needs a separate ``causal_template`` (the MeZO OPT template is used for RTE).
A masked-LM ``template`` may also be written in LM-BFF's template language (``*cls**sent_0*_It_was*mask*.*sep+*``,
see lmbff.py); it is then tokenized part by part exactly as LM-BFF does, and needs a ``causal_template``. The
built-in SST-2 and RTE tasks use LM-BFF's templates for masked LMs and MeZO's ``large_models/templates.py`` prompts
for causal LMs.

This module holds the records (:class:`Task`, :class:`Example`) and imports nothing of the package but the LM-BFF
template parser. The readers that build them sit above it: ``spec.py`` (task specs), ``registry.py`` (the built-in
tasks, :func:`~mezo_kernels.tasks.registry.get_task`), ``files.py`` and ``data.py`` (examples from data files).
"""
from __future__ import annotations

import enum
import string
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import lmbff

__all__ = ["Task", "Example", "Columns", "TaskFieldError", "CausalPrompt", "canonical_task_name", "SPLIT_FILES",
           "ObjectiveKind"]

_SLOTS = {"text_a", "text_b", "mask"}
SPLIT_FILES = ("train", "dev")         # the data files of a task folder: <split>.tsv


class ObjectiveKind(enum.StrEnum):
    """The scalars a run can minimize, spelled once: the CLI's ``--objective`` choices, ``TrainConfig`` and task
    spec validation, and ``metrics.objective_value`` / ``Reduction`` all derive from this enum. A member is its
    string (``ObjectiveKind.CE == "ce"``)."""

    CE = "ce"                        # the mean cross-entropy
    NEG_ACCURACY = "neg_accuracy"    # -accuracy
    NEG_F1 = "neg_f1"                # -F1 of class 1

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The spellings, in declaration order: ``("ce", "neg_accuracy", "neg_f1")``."""
        return tuple(k.value for k in cls)

    @classmethod
    def parse(cls, value: object, alternative: str = "") -> "ObjectiveKind":
        """The member spelled ``value``; ValueError listing the spellings (and ``alternative``, e.g. "or a
        callable") for anything else."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            choices = ", ".join(repr(v) for v in cls.values())
            raise ValueError(f"unknown objective {value!r}; use {choices}{alternative}") from None


class TaskFieldError(ValueError):
    """A task record or spec with a bad field: ``where`` (the task or the spec file), ``field`` and ``why``."""

    def __init__(self, where: str, field_name: str, why: str) -> None:
        super().__init__(f"{where}: field {field_name!r}: {why}")
        self.where, self.field, self.why = where, field_name, why


def canonical_task_name(name: str) -> str:
    """``"SST-2"``, ``"sst_2"`` -> ``"sst2"``."""
    return name.lower().replace("-", "").replace("_", "")


def _slots(template: str) -> list[str]:
    """Slot names of a format string, in order; ValueError for unknown or positional slots."""
    names = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in _SLOTS:
            raise ValueError(f"template {template!r} has slot {{{name}}}; allowed slots are {sorted(_SLOTS)}")
        names.append(name)
    return names


def _template_problem(template: str) -> str | None:
    """Why ``template`` is not a usable template, or None."""
    if lmbff.is_lmbff(template):                 # LM-BFF's own template language (masked LMs)
        try:
            lmbff.parse(template)
        except ValueError as e:
            return str(e)
        return None
    try:
        names = _slots(template)
    except ValueError as e:
        return str(e)
    if names.count("mask") != 1:
        return f"must contain exactly one {{mask}} slot (found {names.count('mask')} in {template!r})"
    if "text_a" not in names:
        return f"has no {{text_a}} slot: {template!r}"
    return None


@dataclass(frozen=True)
class CausalPrompt:
    """One example's causal-LM view: ``prompt`` text and one ``candidates[c]`` continuation per class c."""

    prompt: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Columns:
    """Header names of the columns one data file is read from: ``text_a``, ``text_b`` (None for a
    single-sentence task) and ``label``; other columns of the file are ignored."""

    text_a: str
    text_b: str | None = None
    label: str = "label"


@dataclass(frozen=True)
class Task:
    """A prompt-based classification task: everything the package knows about it, in one record.

    Attributes:
        name: canonical task name (``"sst2"``, ``"rte"``).
        label_words: verbalizer ``{label: word}``; labels must be ``0..C-1`` (C, the class count, is its size).
            Words are given without leading space; the objective adds the tokenizer's word-boundary convention.
        template: masked-LM template with ``{text_a}``, optional ``{text_b}``, and one ``{mask}``.
        causal_template: template for causal LMs; ``None`` means ``template`` cut at the ``{mask}`` slot.
        num_text_fields: 1 for single-sentence tasks, 2 for sentence-pair tasks.
        columns: ``{split: Columns}`` for the data files ``<split>.tsv`` (``SPLIT_FILES``); empty for a task
            without data files (built in code and fed examples directly).
        label_names: label values a data file may hold instead of the integer (``{"entailment": 0}``).
        objective: the training objective the task suggests (an :class:`ObjectiveKind` spelling), or None (the
            caller's).
        description: one line for humans.
        source: the spec file the task was read from (None: built in code or a spec mapping); a task from a
            file has no folder of its own in a data directory unless one is given.

    A bad field raises :class:`TaskFieldError` (a ValueError) naming it.
    """

    name: str
    label_words: Mapping[int, str]
    template: str
    causal_template: str | None = None
    num_text_fields: int = 1
    columns: Mapping[str, Columns] = field(default_factory=dict, compare=False)
    label_names: Mapping[str, int] = field(default_factory=dict, compare=False)
    objective: str | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        def bad(fld: str, why: str) -> TaskFieldError:
            return TaskFieldError(f"task {self.name!r}", fld, why)

        if sorted(self.label_words) != list(range(len(self.label_words))) or len(self.label_words) < 2:
            raise bad("label_words", f"labels must be 0..C-1 with C >= 2, got {sorted(self.label_words)}")
        for lab, word in self.label_words.items():
            if not isinstance(word, str) or not word or word != word.strip():
                raise bad("label_words", f"label word {word!r} for label {lab} must be a non-empty string with "
                                         "no surrounding whitespace")
        if self.num_text_fields not in (1, 2):
            raise bad("num_text_fields", f"must be 1 or 2, got {self.num_text_fields!r}")
        for fld in ("template", "causal_template"):
            t = getattr(self, fld)
            why = None if t is None else _template_problem(t)
            if why:
                raise bad(fld, why)
        ct = self.causal_template if self.causal_template is not None else self.template
        if lmbff.is_lmbff(ct):
            raise bad("causal_template", f"{ct!r} is an LM-BFF (masked-LM) template; causal LMs need a "
                                         "causal_template with {text_a}/{text_b} slots ending in {mask}")
        if any(n in ("text_a", "text_b") for n in _slots(ct.split("{mask}", 1)[1])):
            raise bad("causal_template" if self.causal_template is not None else "template",
                      f"{ct!r} has text slots after {{mask}}; causal scoring drops everything after the slot, "
                      "give a causal_template ending in {mask}")
        for split, cols in self.columns.items():
            if split not in SPLIT_FILES or not isinstance(cols, Columns):
                raise bad("columns", f"must map splits {SPLIT_FILES} to Columns, got {split!r}: {cols!r}")
            if (cols.text_b is not None) != (self.num_text_fields == 2):
                raise bad("columns", f"columns[{split!r}].text_b is {cols.text_b!r} but num_text_fields is "
                                     f"{self.num_text_fields}")
        for text, lab in self.label_names.items():
            if lab not in self.label_words:
                raise bad("label_names", f"label_names[{text!r}] = {lab!r} is not a label")
        if self.objective is not None and self.objective not in ObjectiveKind.values():
            raise bad("objective", f"{self.objective!r} is not one of {', '.join(ObjectiveKind.values())}")

    def label_of(self, value: Any) -> int | None:
        """The class (``0..C-1``) of a label value read from a data file, or None when it is not one.

        A value is looked up among ``label_names`` first (as text: ``1`` and ``"1"`` are the same); an integer
        ``0..C-1`` is also the class itself, unless the label names are integers themselves (a verbalizer
        ``{1: ..., 2: ..., 3: ...}``), which would make a bare integer ambiguous."""
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = value.strip() if isinstance(value, str) else str(value)
        if text in self.label_names:
            return self.label_names[text]
        if any(_is_int(n) for n in self.label_names):
            return None
        try:
            c = int(text)
        except ValueError:
            return None
        return c if 0 <= c < self.num_classes else None

    def columns_for(self, split: str) -> Columns:
        """The columns of data file ``<split>.tsv``; ValueError when the task has none for it."""
        if split not in self.columns:
            raise ValueError(f"task {self.name!r} has no data columns for split {split!r} "
                             f"(it has {sorted(self.columns) or 'none'})")
        return self.columns[split]

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.label_words)

    @property
    def words(self) -> list[str]:
        """Label words in label order: ``words[c]`` verbalizes class c."""
        return [self.label_words[c] for c in range(self.num_classes)]

    def _fields(self, ex: Example) -> dict[str, Any]:
        if self.num_text_fields == 2 and ex.text_b is None:
            raise ValueError(f"task {self.name!r} needs text_b, example has none: {ex!r}")
        return {"text_a": ex.text_a, "text_b": ex.text_b if ex.text_b is not None else ""}

    def format_masked(self, ex: Example, mask_token: str) -> str:
        """The masked-LM input text with ``mask_token`` in the slot (e.g. ``"... It was <mask> ."``); for an
        LM-BFF template, a readable rendering (its ids come from ``lmbff.encode``, part by part)."""
        if lmbff.is_lmbff(self.template):
            f = self._fields(ex)
            return lmbff.render(lmbff.parse(self.template), [f["text_a"], f["text_b"]], mask_token)
        return self.template.format(mask=mask_token, **self._fields(ex))

    def mask_has_leading_space(self) -> bool:
        """Whether the masked template puts whitespace right before ``{mask}`` (so the label word is a
        word-initial token, ``"Ġgreat"`` for byte-level BPE). LM-BFF templates: always (LM-BFF's rule)."""
        if lmbff.is_lmbff(self.template):
            return True
        head = self.template.split("{mask}", 1)[0]
        return head == "" or head[-1].isspace()

    def format_causal(self, ex: Example, chat_tokenizer: Any = None) -> CausalPrompt:
        """The causal-LM prompt and candidate continuations for one example.

        Trailing spaces of the text before the slot move into the continuations (``"... It was"`` +
        ``" great"``), the usual convention for BPE tokenizers. Newlines stay in the prompt. With
        ``chat_tokenizer`` (an instruct model's tokenizer with a chat template), the prompt is wrapped as a user
        turn with the assistant header appended, and the candidates are the bare label words.
        """
        ct = self.causal_template if self.causal_template is not None else self.template
        head = ct.split("{mask}", 1)[0].format(**self._fields(ex))
        prompt = head.rstrip(" ")
        sep = head[len(prompt):]
        if chat_tokenizer is not None:
            msgs = [{"role": "user", "content": prompt.strip()}]
            wrapped = chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return CausalPrompt(wrapped, tuple(self.words))
        return CausalPrompt(prompt, tuple(sep + w for w in self.words))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Example:
    """One classification example: ``text_a`` (sentence / premise), ``text_b`` (hypothesis or None), label."""

    text_a: str
    text_b: str | None
    label: int
