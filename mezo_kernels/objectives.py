"""Prompt-based classification objectives for forward-only (MeZO) training: one forward gives the smooth
cross-entropy loss *and* the predictions for accuracy / F1.

* :class:`MaskedLMObjective` (LM-BFF): class scores = MLM logits at the mask position over the label words'
  token ids, ``[B, C]``; loss = cross-entropy over them.
* :class:`CausalLMObjective` (MeZO's OPT experiments): class score = sum of the continuation's token
  log-probs given the prompt (divided by its token count when ``length_normalize``); loss = cross-entropy over
  the candidates' scores.

Neither forces ``torch.no_grad()``: MeZO callers wrap the call in it, gradient checks do not.

User objectives: anything accepted by :func:`scalar_objective` -- a callable ``fn(model, batch) -> float`` or
``fn(model, batch) -> ObjectiveOutput`` where ``batch`` is a sequence of :class:`~mezo_kernels.data.Example`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import Example
from .forward import ForwardEngine, unwrap
from .tasks import Task

__all__ = ["ObjectiveOutput", "MaskedLMObjective", "CausalLMObjective", "accuracy", "f1", "objective_value",
           "scalar_objective", "make_objective", "model_kind", "label_word_ids"]

ObjectiveKind = Literal["ce", "neg_accuracy", "neg_f1"]


@dataclass
class ObjectiveOutput:
    """Result of one objective forward over a batch of B examples with C classes.

    loss: scalar float32 tensor, mean of ``per_example``.
    per_example: [B] float32 cross-entropy of each example.
    logits: [B, C] float32 class scores (label-word logits or candidate log-prob scores).
    preds: [B] int64 argmax of ``logits``.
    labels: [B] int64 gold labels.
    """

    loss: torch.Tensor
    per_example: torch.Tensor
    logits: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor


def from_scores(scores: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
    """The output for class ``scores`` [B, C] and gold ``labels`` [B]: CE per example, its mean, argmax."""
    scores = scores.float()
    per = F.cross_entropy(scores, labels, reduction="none")
    return ObjectiveOutput(per.mean(), per, scores, scores.argmax(-1), labels)


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


class MaskedLMObjective:
    """LM-BFF objective for a masked LM.

    ``encode(batch)`` -> dict of ``input_ids``/``attention_mask`` [B, T] (right padded, at most ``max_length``;
    long texts are cut so the mask survives), ``mask_pos`` [B], ``labels`` [B]. ``forward(enc)`` runs the model:
    logits [B, T, V] -> scores ``logits[b, mask_pos[b], word_ids]`` [B, C] -> cross-entropy.
    ``obj(batch)`` does both; pass ``model=`` to score with another module (e.g. a peft wrapper).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, task: Task, max_length: int = 128) -> None:
        if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; a masked-LM objective needs one "
                             "(use CausalLMObjective for causal LMs)")
        kind = model_kind(model)
        if kind == "causal":
            raise ValueError(f"model {type(model).__name__} is a causal LM, not a masked LM; "
                             "use CausalLMObjective or make_objective")
        self.model, self.tokenizer, self.task, self.max_length = model, tokenizer, task, max_length
        space = task.mask_has_leading_space()
        self.word_ids = torch.tensor([label_word_ids(tokenizer, w, space) for w in task.words])
        if len(set(self.word_ids.tolist())) != task.num_classes:
            raise ValueError(f"label words {task.words} map to repeated token ids {self.word_ids.tolist()}")

    def _render(self, ex: Example) -> str:
        return self.task.format_masked(ex, self.tokenizer.mask_token)

    def encode(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Tokenize a batch; see the class docstring for the shapes."""
        tok = self.tokenizer
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

    def forward(self, enc: dict[str, torch.Tensor], model: nn.Module | None = None) -> ObjectiveOutput:
        """Run the model on an encoded batch and score it."""
        model = model if model is not None else self.model
        dev = _device(model)
        logits = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).logits
        rows = torch.arange(logits.shape[0], device=dev)
        at_mask = logits[rows, enc["mask_pos"].to(dev)]               # [B, V]
        scores = at_mask[:, self.word_ids.to(dev)]                     # [B, C]
        return from_scores(scores, enc["labels"].to(dev))

    def __call__(self, batch: Sequence[Example], model: nn.Module | None = None) -> ObjectiveOutput:
        return self.forward(self.encode(batch), model)


class CausalLMObjective:
    """MeZO/OPT candidate-scoring objective for a causal LM.

    For example b and candidate c: row = ``prompt_ids + cont_ids``; score[b, c] = sum over the continuation's
    tokens t of ``log_softmax(logits[pos(t) - 1])[t]``, divided by ``len(cont_ids)`` when ``length_normalize``.
    All (example, candidate) rows go through one forward, right padded (pad = eos when the tokenizer has none).
    When every candidate is a single token, the rows of one example share their prompt and only one row per
    example is run (identical result, C times less work). Prompts are cut from the left to fit ``max_length``.

    ``chat=True`` wraps prompts in the tokenizer's chat template (instruct models); off by default.
    ``engine``: the :class:`~mezo_kernels.forward.ForwardEngine` that runs the model (default: every exact reuse
    on; ``ForwardEngine.plain()`` for the plain forward). Rows sharing a prompt prefix (a chat template, the
    candidates of one example) then share its computation.
    ``encode`` -> dict of ``input_ids``/``attention_mask`` [R, T], ``tgt_pos``/``tgt_ids``/``tgt_row`` [N] (the
    position predicting each continuation token, the token, the (b, c) slot ``b * C + c``), ``cont_len`` [B*C],
    ``labels`` [B].
    """

    def __init__(self, model: nn.Module, tokenizer: Any, task: Task, max_length: int = 128,
                 length_normalize: bool = True, chat: bool = False, engine: ForwardEngine | None = None) -> None:
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.engine = engine if engine is not None else ForwardEngine()
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

    def forward(self, enc: dict[str, torch.Tensor], model: nn.Module | None = None) -> ObjectiveOutput:
        """Run the model on an encoded batch (through the forward engine) and score it."""
        model = model if model is not None else self.model
        dev = _device(model)
        sel = self.engine.logits_at(model, enc["input_ids"], enc["attention_mask"], enc["tgt_r"],
                                    enc["tgt_pos"]).float()                            # [N, V]
        tok_lp = sel.log_softmax(-1).gather(1, enc["tgt_ids"].to(dev)[:, None])[:, 0]   # [N]
        B, C = len(enc["labels"]), self.task.num_classes
        scores = torch.zeros(B * C, dtype=torch.float32, device=dev).index_add(0, enc["tgt_row"].to(dev), tok_lp)
        if self.length_normalize:
            scores = scores / enc["cont_len"].to(dev)
        return from_scores(scores.view(B, C), enc["labels"].to(dev))

    def __call__(self, batch: Sequence[Example], model: nn.Module | None = None) -> ObjectiveOutput:
        return self.forward(self.encode(batch), model)


def model_kind(model: nn.Module) -> Literal["masked", "causal", "unknown"]:
    """``"masked"`` for a ``*ForMaskedLM``, ``"causal"`` for a ``*ForCausalLM`` (also inside peft wrappers)."""
    from transformers.models.auto import modeling_auto as ma

    name = type(unwrap(model)).__name__
    if name in set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) or name.endswith("ForMaskedLM"):
        return "masked"
    causal = {v for v in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(v, str)}
    if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return "unknown"


Objective = Union[MaskedLMObjective, CausalLMObjective]


def make_objective(model: nn.Module, tokenizer: Any, task: Task, kind: Literal["auto", "masked", "causal"] = "auto",
                   **kwargs: Any) -> Objective:
    """A :class:`MaskedLMObjective` or :class:`CausalLMObjective` for ``model``; ``kind="auto"`` decides from
    the model's head class (seen through a peft wrapper). ``kwargs`` go to the objective's constructor."""
    if kind == "auto":
        detected = model_kind(model)
        if detected == "unknown":
            raise ValueError(f"cannot tell whether {type(unwrap(model)).__name__} is a masked or causal LM; "
                             "pass kind='masked' or kind='causal'")
        kind = detected
    if kind == "masked":
        return MaskedLMObjective(model, tokenizer, task, **kwargs)
    if kind == "causal":
        return CausalLMObjective(model, tokenizer, task, **kwargs)
    raise ValueError(f"unknown objective kind {kind!r}; use 'auto', 'masked' or 'causal'")


def accuracy(out: ObjectiveOutput) -> float:
    """Fraction of ``preds == labels`` (0.0 for an empty batch)."""
    n = out.labels.numel()
    return float((out.preds == out.labels).sum().item()) / n if n else 0.0


def f1(out: ObjectiveOutput, positive: int = 1, zero_division: float = 1.0) -> float:
    """Binary F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)``.

    When the batch has no positive labels and no positive predictions (0/0) the result is ``zero_division``
    (default 1.0: nothing to find and nothing wrongly found).
    """
    p, y = out.preds == positive, out.labels == positive
    tp = int((p & y).sum().item())
    denom = 2 * tp + int((p & ~y).sum().item()) + int((~p & y).sum().item())
    return 2 * tp / denom if denom else float(zero_division)


def objective_value(out: ObjectiveOutput, kind: ObjectiveKind = "ce") -> float:
    """A float to minimize: ``"ce"`` the mean cross-entropy, ``"neg_accuracy"`` -accuracy,
    ``"neg_f1"`` -F1 of class 1."""
    if kind == "ce":
        return float(out.loss.item())
    if kind == "neg_accuracy":
        return -accuracy(out)
    if kind == "neg_f1":
        return -f1(out)
    raise ValueError(f"unknown objective {kind!r}; use 'ce', 'neg_accuracy', 'neg_f1' or a callable")


UserObjective = Callable[[nn.Module, Sequence[Example]], Union[float, ObjectiveOutput]]


def scalar_objective(objective: Objective | UserObjective, kind: ObjectiveKind = "ce"
                     ) -> Callable[[nn.Module, Sequence[Example]], float]:
    """``fn(model, batch) -> float`` to minimize.

    ``objective`` is a built-in objective (scored with ``kind``) or a user callable
    ``fn(model, batch) -> float | ObjectiveOutput``; an ``ObjectiveOutput`` is reduced with ``kind``, a number
    is used as is (lower is better). The model passed in is the one to run (it may be a peft wrapper).
    """
    if isinstance(objective, (MaskedLMObjective, CausalLMObjective)):
        obj = objective
        return lambda model, batch: objective_value(obj(batch, model=model), kind)
    if not callable(objective):
        raise TypeError(f"objective must be a MaskedLMObjective, CausalLMObjective or callable, got {objective!r}")
    fn = objective

    def call(model: nn.Module, batch: Sequence[Example]) -> float:
        r = fn(model, batch)
        return objective_value(r, kind) if isinstance(r, ObjectiveOutput) else float(r)

    return call
