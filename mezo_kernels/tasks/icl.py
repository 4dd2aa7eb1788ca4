"""In-context learning (ICL): the no-training baseline of ``mezo-kernels eval --icl K`` and the quality bench.

K demonstrations are drawn from the train split, balanced over the classes: ``K // C`` per class, and the remainder
``K % C`` one more each to the first classes in label order (K = 5 on a 2-class task: 3 of class 0, 2 of class 1).
Within a class they are drawn without replacement by ``random.Random`` seeded with the run's seed; the K drawn are
then shuffled once, with the same generator, into one fixed order. A class with fewer train examples than it needs
is an error naming the class and both counts (:class:`NotEnoughDemonstrations`).

Prompt format (:func:`icl_prompt`, a pure function): every demonstration is the task's filled causal template
followed by its gold candidate continuation (``"<sentence> It was"`` + ``" great"`` on SST-2), the demonstrations and
the test prompt are joined by a blank line (``SEPARATOR = "\\n\\n"``), and the candidates are the test example's own::

    <demo 1 prompt><demo 1 gold word>\\n\\n<demo 2 prompt><demo 2 gold word>\\n\\n...<test prompt>  + each candidate

The same demonstrations, in the same order, come before every test prompt, so every row of a batch shares them as a
token prefix: :class:`ICLObjective` tokenizes the demonstration block (with the tokenizer's special tokens, e.g. BOS)
and the test prompt separately and concatenates the ids, so the shared prefix is exact token for token, and the
forward engine's prefix reuse computes the demonstrations once per batch (and its eval cache once per weight version,
across batches). An ICL prompt is never truncated: when the demonstrations, the longest test prompt and the longest
candidate do not fit ``max_length`` tokens, :class:`ICLPromptTooLong` says how many demonstrations would fit.
Chat templates (``--chat``) are not combined with ICL.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from .objectives import CausalLMObjective, LogitsAt
from .records import CausalPrompt, Example, Task
from ..models import unwrap

__all__ = ["SEPARATOR", "select_demonstrations", "demonstration_text", "demonstration_block", "icl_prompt",
           "ICLObjective", "icl_objective", "NotEnoughDemonstrations", "ICLPromptTooLong", "per_class_counts"]

SEPARATOR = "\n\n"


class NotEnoughDemonstrations(ValueError):
    """``K`` asks for more demonstrations of a class than the train split holds."""


class ICLPromptTooLong(ValueError):
    """The demonstrations plus a test prompt and its candidate do not fit the ICL length bound."""


def per_class_counts(k: int, num_classes: int) -> list[int]:
    """Demonstrations per class for K in total: ``K // C`` each, the remainder to the first classes."""
    if k < 1:
        raise ValueError(f"--icl K must be >= 1, got {k}")
    q, r = divmod(k, num_classes)
    return [q + (1 if c < r else 0) for c in range(num_classes)]


def select_demonstrations(task: Task, train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """K demonstrations from ``train``, balanced over the classes (:func:`per_class_counts`), seeded, in one fixed
    shuffled order. NotEnoughDemonstrations names the first class the train split is too small for."""
    need = per_class_counts(k, task.num_classes)
    by_class: list[list[Example]] = [[] for _ in range(task.num_classes)]
    for ex in train:
        by_class[ex.label].append(ex)
    for c, (n, have) in enumerate(zip(need, by_class)):
        if n > len(have):
            raise NotEnoughDemonstrations(
                f"--icl {k} needs {n} demonstrations of class {c} ({task.words[c]!r}) but the train split has "
                f"{len(have)} (per class: {[len(h) for h in by_class]}); use a smaller --icl, or a larger --k or "
                "--protocol opt for a larger train split")
    rng = random.Random(seed * 1_000_003 + 104_729)
    demos = [ex for c, n in enumerate(need) for ex in rng.sample(by_class[c], n)]
    rng.shuffle(demos)
    return demos


def demonstration_text(task: Task, ex: Example) -> str:
    """One demonstration: the filled causal template followed by its gold candidate continuation."""
    cp = task.format_causal(ex)
    return cp.prompt + cp.candidates[ex.label]


def demonstration_block(task: Task, demos: Sequence[Example], separator: str = SEPARATOR) -> str:
    """The text every ICL prompt starts with: the demonstrations, each followed by ``separator``."""
    return "".join(demonstration_text(task, d) + separator for d in demos)


def icl_prompt(task: Task, demos: Sequence[Example], example: Example, separator: str = SEPARATOR) -> CausalPrompt:
    """The ICL view of ``example``: the demonstration block, then its own causal prompt; its own candidates."""
    cp = task.format_causal(example)
    return CausalPrompt(demonstration_block(task, demos, separator) + cp.prompt, cp.candidates)


@dataclass(frozen=True)
class _Fit:
    prefix: int        # tokens of the demonstration block (special tokens included)
    tail: int          # the longest test prompt's tokens
    cont: int          # the longest candidate's tokens


class ICLObjective(CausalLMObjective):
    """:class:`CausalLMObjective` whose prompts are ICL prompts: ``demos`` (from :func:`select_demonstrations`)
    before every example. ``max_length`` bounds the whole row (demonstrations, test prompt and candidate); a row
    that does not fit is an :class:`ICLPromptTooLong` error, never a truncation. ``train``/``seed`` (the pool the
    demonstrations came from) let that error say how many balanced demonstrations would fit."""

    def __init__(self, tokenizer: Any, task: Task, demos: Sequence[Example], max_length: int,
                 length_normalize: bool = True, engine: LogitsAt | None = None, separator: str = SEPARATOR,
                 train: Sequence[Example] | None = None, seed: int = 0) -> None:
        super().__init__(tokenizer, task, max_length=max_length, length_normalize=length_normalize, chat=False,
                         engine=engine)
        self.demos, self.separator, self.train, self.seed = list(demos), separator, train, seed
        self.block = demonstration_block(task, self.demos, separator)
        self.prefix_ids = self._block_ids(self.block)

    def _block_ids(self, block: str) -> list[int]:
        return list(self.tokenizer(block, add_special_tokens=True)["input_ids"])

    def _tail(self, ex: Example) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        cp = self.task.format_causal(ex)
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in cp.candidates]
        for c, ids in zip(cp.candidates, conts):
            if not ids:
                raise ValueError(f"candidate {c!r} tokenizes to nothing")
        return tok(cp.prompt, add_special_tokens=False)["input_ids"], conts

    def _prompt_ids(self, ex: Example, budget: int) -> tuple[list[int], list[list[int]]]:
        tail, conts = self._tail(ex)
        fit = _Fit(len(self.prefix_ids), len(tail), max(len(c) for c in conts))
        if fit.prefix + fit.tail + fit.cont > budget:
            self._too_long(fit, budget)
        return self.prefix_ids + tail, conts

    def check_fits(self, examples: Sequence[Example]) -> dict:
        """Refuse (ICLPromptTooLong) unless every example's ICL row fits ``max_length``; else the token counts."""
        tails = [self._tail(ex) for ex in examples]
        fit = _Fit(len(self.prefix_ids), max((len(t) for t, _ in tails), default=0),
                   max((len(c) for _, cs in tails for c in cs), default=0))
        if fit.prefix + fit.tail + fit.cont > self.max_length:
            self._too_long(fit, self.max_length)
        return {"demonstration_tokens": fit.prefix, "longest_row_tokens": fit.prefix + fit.tail + fit.cont}

    def fitting_k(self, tail: int, cont: int) -> int:
        """The largest K' <= K whose balanced, seeded demonstrations (drawn as ``--icl K'`` would) fit next to a
        test prompt of ``tail`` tokens and a candidate of ``cont``; without the train pool, the largest number of
        leading demonstrations of this prompt that fit."""
        for j in range(len(self.demos) - 1, 0, -1):
            demos = select_demonstrations(self.task, self.train, j, self.seed) if self.train is not None \
                else self.demos[:j]
            if len(self._block_ids(demonstration_block(self.task, demos, self.separator))) + tail + cont \
                    <= self.max_length:
                return j
        return 0

    def _too_long(self, fit: _Fit, budget: int) -> None:
        j = self.fitting_k(fit.tail, fit.cont)
        raise ICLPromptTooLong(
            f"the ICL prompt does not fit --icl-max-length {budget}: {len(self.demos)} demonstrations "
            f"({fit.prefix} tokens) + the longest test prompt ({fit.tail}) + candidate ({fit.cont}) = "
            f"{fit.prefix + fit.tail + fit.cont} tokens; {j} demonstration{'s fit' if j != 1 else ' fits'} "
            f"({'use --icl ' + str(j) if j else 'not even one fits'}, or raise --icl-max-length); demonstrations "
            "are never cut in half")

    def info(self) -> dict:
        """What the eval JSON reports about the prompt: K, per class, separator, demonstration tokens."""
        counts = [0] * self.task.num_classes
        for d in self.demos:
            counts[d.label] += 1
        return {"k": len(self.demos), "per_class": counts, "separator": self.separator,
                "demonstration_tokens": len(self.prefix_ids), "max_length": self.max_length}


def icl_objective(base: Any, task: Task, train: Sequence[Example], k: int, seed: int, max_length: int | None,
                  model: Any = None) -> ICLObjective:
    """The ICL objective for ``--icl K``, built on ``base`` (the causal objective ``train.loop.build`` made: its
    tokenizer, length normalisation and forward engine). ``max_length`` None: the model's context
    (``config.max_position_embeddings``). A masked-LM objective, or a chat one, is refused."""
    if not isinstance(base, CausalLMObjective):
        raise ValueError("--icl needs a causal LM (candidates scored after the demonstrations); "
                         f"{type(base).__name__} is a masked-LM objective")
    if base.chat:
        raise ValueError("--icl does not combine with --chat: the demonstrations are plain text before the prompt")
    if max_length is None:
        cfg = getattr(unwrap(model), "config", None) if model is not None else None
        max_length = getattr(cfg, "max_position_embeddings", None)
        if not max_length:
            raise ValueError("the model's config has no max_position_embeddings: pass --icl-max-length")
    if max_length < 1:
        raise ValueError(f"--icl-max-length must be >= 1, got {max_length}")
    demos = select_demonstrations(task, train, k, seed)
    return ICLObjective(base.tokenizer, task, demos, int(max_length), length_normalize=base.length_normalize,
                        engine=base.engine, train=train, seed=seed)
