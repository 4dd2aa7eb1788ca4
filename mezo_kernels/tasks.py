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
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Mapping

from .data import Example, canonical_task_name

__all__ = ["Task", "get_task", "TASKS", "CausalPrompt"]

_SLOTS = {"text_a", "text_b", "mask"}


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


def _check_template(template: str, what: str) -> None:
    names = _slots(template)
    if names.count("mask") != 1:
        raise ValueError(f"{what} {template!r} must contain exactly one {{mask}} slot (found {names.count('mask')})")
    if "text_a" not in names:
        raise ValueError(f"{what} {template!r} has no {{text_a}} slot")


@dataclass(frozen=True)
class CausalPrompt:
    """One example's causal-LM view: ``prompt`` text and one ``candidates[c]`` continuation per class c."""

    prompt: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """A prompt-based classification task.

    Attributes:
        name: canonical task name (``"sst2"``, ``"rte"``).
        label_words: verbalizer ``{label: word}``; labels must be ``0..C-1``. Words are given without leading
            space; the objective adds the tokenizer's word-boundary convention (BPE ``"Ġgreat"``).
        template: masked-LM template with ``{text_a}``, optional ``{text_b}``, and one ``{mask}``.
        causal_template: template for causal LMs; ``None`` means ``template`` cut at the ``{mask}`` slot.
        num_text_fields: 1 for single-sentence tasks, 2 for sentence-pair tasks.
    """

    name: str
    label_words: Mapping[int, str]
    template: str
    causal_template: str | None = None
    num_text_fields: int = 1
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if sorted(self.label_words) != list(range(len(self.label_words))) or len(self.label_words) < 2:
            raise ValueError(f"task {self.name!r}: labels must be 0..C-1 with C >= 2, got {sorted(self.label_words)}")
        for lab, word in self.label_words.items():
            if not word or word != word.strip():
                raise ValueError(f"task {self.name!r}: label word {word!r} for label {lab} must be non-empty "
                                 "and have no surrounding whitespace")
        _check_template(self.template, f"task {self.name!r}: template")
        ct = self.causal_template if self.causal_template is not None else self.template
        _check_template(ct, f"task {self.name!r}: causal template")
        tail = ct.split("{mask}", 1)[1]
        if any(n in ("text_a", "text_b") for n in _slots(tail)):
            raise ValueError(f"task {self.name!r}: causal template {ct!r} has text slots after {{mask}}; "
                             "causal scoring drops everything after the slot, pass a causal_template ending in {mask}")

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
        """The masked-LM input text with ``mask_token`` in the slot (e.g. ``"... It was <mask> ."``)."""
        return self.template.format(mask=mask_token, **self._fields(ex))

    def mask_has_leading_space(self) -> bool:
        """Whether the masked template puts whitespace right before ``{mask}`` (so the label word is a
        word-initial token, ``"Ġgreat"`` for byte-level BPE)."""
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


TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        label_words={0: "terrible", 1: "great"},
        template="{text_a} It was {mask} .",
        causal_template="{text_a} It was {mask}",
        description="GLUE SST-2 sentiment, LM-BFF template '<S> It was <mask> .'",
    ),
    "rte": Task(
        name="rte",
        label_words={0: "Yes", 1: "No"},  # 0 = entailment
        template="{text_a} ? {mask} , {text_b}",
        causal_template='{text_a}\nDoes this mean that "{text_b}" is true? Yes or No?\n{mask}',
        num_text_fields=2,
        description="GLUE RTE entailment, LM-BFF template '<premise> ? <mask> , <hypothesis>'; causal: MeZO's OPT "
                    "template",
    ),
}


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (case, ``-`` and ``_`` ignored); ValueError listing the known ones."""
    key = canonical_task_name(name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]
