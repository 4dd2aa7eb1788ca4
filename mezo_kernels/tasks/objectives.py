"""Prompt-based classification objectives for forward-only (MeZO) training: one forward gives the smooth
cross-entropy loss *and* the predictions for accuracy / F1.

Every objective has one signature, ``objective(model, batch) -> ObjectiveOutput`` with ``batch`` a sequence of
:class:`~mezo_kernels.tasks.records.Example`; the objective keeps the tokenizer and task, the model (possibly a peft
wrapper) is passed on each call.

* :class:`MaskedLMObjective` (LM-BFF): class scores = MLM logits at the mask position over the label words'
  token ids, ``[B, C]``; loss = cross-entropy over them.
* :class:`CausalLMObjective` (MeZO's OPT experiments): class score = sum of the continuation's token
  log-probs given the prompt (divided by its token count when ``length_normalize``); loss = cross-entropy over
  the candidates' scores.

Neither forces ``torch.no_grad()``: MeZO callers wrap the call in it, gradient checks do not.

A scalar to minimize comes from :func:`scalar_objective` (one process) or from a :class:`Reduction` handed to
``distributed.DataParallelLoss`` (the ranks exchange per-example tensors, the reduction turns them into the
scalar). User objectives ``fn(model, batch)`` may return a float or an ``ObjectiveOutput``.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Protocol, Sequence, Union

import torch
from torch import nn

from . import lmbff
from .records import Example, Task
from .metrics import ObjectiveKind, ObjectiveOutput, Reduction, accuracy, f1, from_scores, objective_value, scalar_objective
from ..models import model_kind, unwrap

__all__ = ["MaskedLMObjective", "CausalLMObjective", "make_objective", "label_word_ids", "LogitsAt",
           # the output and what is computed from it (metrics.py), re-exported: one import for callers
           "ObjectiveOutput", "ObjectiveKind", "from_scores", "accuracy", "f1", "objective_value",
           "scalar_objective", "Reduction"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def label_word_ids(tokenizer: Any, word: str, leading_space: bool) -> int:
    """The single token id of ``word`` as it appears inside a sentence.

    With ``leading_space`` the word is encoded as ``" " + word``: byte-level BPE (RoBERTa, GPT-2, Llama-3 style)
    gives the word-initial token ``"Ġgreat"``; WordPiece / SentencePiece tokenizers drop or mark the space
    themselves (``"great"``, ``"▁great"``). Raises ValueError when the word is not exactly one token.
    """
    text = (" " + word) if leading_space else word
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        toks = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"label word {word!r} must be a single token for a masked-LM objective; "
                         f"{text!r} tokenizes to {toks}")
    return int(ids[0])


def _truncate(tokenizer: Any, ex: Example, budget: int, render: Callable[[Example], str]) -> Example:
    """Shorten the longer text field of ``ex`` (from its end) until ``render(ex)`` fits ``budget`` tokens."""
    for _ in range(8):
        over = len(tokenizer(render(ex))["input_ids"]) - budget
        if over <= 0:
            return ex
        field = "text_b" if ex.text_b is not None and len(ex.text_b) > len(ex.text_a) else "text_a"
        ids = tokenizer(getattr(ex, field), add_special_tokens=False)["input_ids"]
        keep = max(len(ids) - over - 1, 1)
        short = tokenizer.decode(ids[:keep]).strip()
        ex = Example(short, ex.text_b, ex.label) if field == "text_a" else Example(ex.text_a, short, ex.label)
    return ex


class LogitsAt(Protocol):
    """What a causal objective runs the model through (the forward engine is one):
    ``logits_at(model, input_ids [R, T], attention_mask [R, T], rows [N], cols [N]) -> [N, V]`` logits of row
    ``rows[i]`` at column ``cols[i]``."""

    def logits_at(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor: ...


class MaskedLMObjective:
    """LM-BFF objective for a masked LM: ``obj(model, batch) -> ObjectiveOutput``.

    ``encode(batch)`` -> dict of ``input_ids``/``attention_mask`` [B, T] (right padded, at most ``max_length``;
    long texts are cut so the mask survives), ``mask_pos`` [B], ``labels`` [B]. ``forward(model, enc)`` runs the
    model: logits [B, T, V] -> scores ``logits[b, mask_pos[b], word_ids]`` [B, C] -> cross-entropy.
    """

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 128) -> None:
        if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; a masked-LM objective needs one "
                             "(use CausalLMObjective for causal LMs)")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        space = task.mask_has_leading_space()
        self.word_ids = torch.tensor([label_word_ids(tokenizer, w, space) for w in task.words])
        if len(set(self.word_ids.tolist())) != task.num_classes:
            raise ValueError(f"label words {task.words} map to repeated token ids {self.word_ids.tolist()}")
        self.parts = lmbff.parse(task.template) if lmbff.is_lmbff(task.template) else None

    def _render(self, ex: Example) -> str:
        return self.task.format_masked(ex, self.tokenizer.mask_token)

    def encode(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Tokenize a batch; see the class docstring for the shapes."""
        tok = self.tokenizer
        if self.parts is not None:              # LM-BFF template: its parts tokenized one by one (lmbff.py)
            texts = [self.task.format_masked(ex, tok.mask_token) for ex in batch]
            enc = tok.pad({"input_ids": [lmbff.encode(tok, self.parts, [ex.text_a, ex.text_b], self.max_length)
                                         for ex in batch]}, padding=True, return_tensors="pt")
        else:
            texts = [self._render(_truncate(tok, ex, self.max_length, self._render)) for ex in batch]
            enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        ids = enc["input_ids"]
        is_mask = ids == tok.mask_token_id
        counts = is_mask.sum(1)
        if not bool((counts == 1).all()):
            bad = int((counts != 1).nonzero()[0, 0])
            raise ValueError(f"example {bad} has {int(counts[bad])} mask tokens after tokenization: {texts[bad]!r}")
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mask_pos": is_mask.float().argmax(1),
                "labels": torch.tensor([ex.label for ex in batch], dtype=torch.long)}

    def forward(self, model: nn.Module, enc: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Run ``model`` on an encoded batch and score it."""
        dev = _device(model)
        logits = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        rows = torch.arange(logits.shape[0], device=dev)
        at_mask = logits[rows, enc["mask_pos"].to(dev)]               # [B, V]
        scores = at_mask[:, self.word_ids.to(dev)]                     # [B, C]
        return from_scores(scores, enc["labels"].to(dev))

    def __call__(self, model: nn.Module, batch: Sequence[Example]) -> ObjectiveOutput:
        return self.forward(model, self.encode(batch))


class CausalLMObjective:
    """MeZO/OPT candidate-scoring objective for a causal LM: ``obj(model, batch) -> ObjectiveOutput``.

    For example b and candidate c: row = ``prompt_ids + cont_ids``; score[b, c] = sum over the continuation's
    tokens t of ``log_softmax(logits[pos(t) - 1])[t]``, divided by ``len(cont_ids)`` when ``length_normalize``.
    All (example, candidate) rows go through one forward, right padded (pad = eos when the tokenizer has none).
    When every candidate is a single token, the rows of one example share their prompt and only one row per
    example is run (identical result, C times less work). Prompts are cut from the left to fit ``max_length``.

    ``chat=True`` wraps prompts in the tokenizer's chat template (instruct models); off by default.
    ``engine``: what runs the model (:class:`LogitsAt`, e.g. a ``forward.ForwardEngine``, which lets rows sharing
    a prompt prefix share its computation); None runs the plain transformers forward. Whoever builds the
    objective chooses.
    ``encode`` -> dict of ``input_ids``/``attention_mask`` [R, T], ``tgt_r``/``tgt_pos``/``tgt_ids``/``tgt_row``
    [N] (the row and position predicting each continuation token, the token, the (b, c) slot ``b * C + c``),
    ``cont_len`` [B*C], ``labels`` [B].
    """

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 128, length_normalize: bool = True,
                 chat: bool = False, engine: LogitsAt | None = None) -> None:
        self.tokenizer, self.task, self.engine = tokenizer, task, engine
        self.max_length, self.length_normalize, self.chat = max_length, length_normalize, chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"chat=True but tokenizer {type(tokenizer).__name__} has no chat template")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)

    def _prompt_ids(self, ex: Example, budget: int) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        cp = self.task.format_causal(ex, tok if self.chat else None)
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in cp.candidates]
        for c, ids in zip(cp.candidates, conts):
            if not ids:
                raise ValueError(f"candidate {c!r} tokenizes to nothing")
        special = not self.chat  # a chat template already carries its own special tokens
        ids = tok(cp.prompt, add_special_tokens=special)["input_ids"]
        room = budget - max(len(c) for c in conts)
        if room < 1:
            raise ValueError(f"max_length={budget} leaves no room for the prompt")
        if len(ids) > room:
            n_lead = 1 if (special and tok.bos_token_id is not None and ids[0] == tok.bos_token_id) else 0
            ids = ids[:n_lead] + ids[len(ids) - (room - n_lead):]
        return ids, conts

    def encode(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Tokenize a batch; see the class docstring for the shapes."""
        C = self.task.num_classes
        per = [self._prompt_ids(ex, self.max_length) for ex in batch]
        shared = all(len(c) == 1 for _, conts in per for c in conts)
        rows: list[list[int]] = []
        tgt_pos, tgt_ids, tgt_row, cont_len = [], [], [], []
        for b, (p, conts) in enumerate(per):
            if shared:  # one row per example: the prompt; all candidates are read at its last position
                rows.append(p)
            for c, cont in enumerate(conts):
                if not shared:
                    rows.append(p + cont)
                r = len(rows) - 1
                for j, t in enumerate(cont):
                    tgt_pos.append((r, len(p) - 1 + j))
                    tgt_ids.append(t)
                    tgt_row.append(b * C + c)
                cont_len.append(len(cont))
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
            attn[i, :len(r)] = 1
        pos = torch.tensor(tgt_pos, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attn, "tgt_r": pos[:, 0], "tgt_pos": pos[:, 1],
                "tgt_ids": torch.tensor(tgt_ids), "tgt_row": torch.tensor(tgt_row),
                "cont_len": torch.tensor(cont_len, dtype=torch.float32),
                "labels": torch.tensor([ex.label for ex in batch], dtype=torch.long)}

    def _logits_at(self, model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        args = enc["input_ids"], enc["attention_mask"], enc["tgt_r"], enc["tgt_pos"]
        if self.engine is not None:
            return self.engine.logits_at(model, *args)
        dev = _device(model)
        ids, mask, rows, cols = (t.to(dev) for t in args)
        return model(input_ids=ids, attention_mask=mask).logits[rows, cols]

    def forward(self, model: nn.Module, enc: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Run ``model`` on an encoded batch (through the engine, if any) and score it."""
        dev = _device(model)
        sel = self._logits_at(model, enc).float()                                      # [N, V]
        tok_lp = sel.log_softmax(-1).gather(1, enc["tgt_ids"].to(dev)[:, None])[:, 0]   # [N]
        B, C = len(enc["labels"]), self.task.num_classes
        scores = torch.zeros(B * C, dtype=torch.float32, device=dev).index_add(0, enc["tgt_row"].to(dev), tok_lp)
        if self.length_normalize:
            scores = scores / enc["cont_len"].to(dev)
        return from_scores(scores.view(B, C), enc["labels"].to(dev))

    def __call__(self, model: nn.Module, batch: Sequence[Example]) -> ObjectiveOutput:
        return self.forward(model, self.encode(batch))


Objective = Union[MaskedLMObjective, CausalLMObjective]


def make_objective(model: nn.Module, tokenizer: Any, task: Task, kind: Literal["auto", "masked", "causal"] = "auto",
                   **kwargs: Any) -> Objective:
    """A :class:`MaskedLMObjective` or :class:`CausalLMObjective` for ``model`` (used only to check its head:
    the objective is called with the model later); ``kind="auto"`` decides from the model's head class (seen
    through a peft wrapper). ``kwargs`` go to the objective's constructor (``engine=`` for a causal one)."""
    if kind not in ("auto", "masked", "causal"):
        raise ValueError(f"unknown objective kind {kind!r}; use 'auto', 'masked' or 'causal'")
    detected = model_kind(model)
    if kind == "auto" and detected == "unknown":
        raise ValueError(f"cannot tell whether {type(unwrap(model)).__name__} is a masked or causal LM; "
                         "pass kind='masked' or kind='causal'")
    if kind != "auto" and detected not in ("unknown", kind):
        raise ValueError(f"model {type(unwrap(model)).__name__} is a {detected} LM, not a {kind} LM; "
                         f"use kind='{detected}' or kind='auto'")
    kind = detected if kind == "auto" else kind
    cls = MaskedLMObjective if kind == "masked" else CausalLMObjective
    return cls(tokenizer, task, **kwargs)
