"""LM-BFF's template language for masked-LM prompts, and its part-by-part tokenization.

A template such as ``*cls**sent_0*_It_was*mask*.*sep+*`` (SST-2) or ``*cls**sent-_0*?*mask*,*+sentl_1**sep+*``
(RTE) is split at ``*``; the pieces are, as Gao et al. (2021) define them:

* ``cls``, ``mask``, ``sep``, ``sep+``: the tokenizer's special token (one id each);
* ``sent_i``: text field i (0: ``text_a``, 1: ``text_b``), with the modifiers ``+`` in front (a space before
  it), ``l`` after ``sent`` (first character lower-cased), ``u`` (upper-cased) and ``-`` before the ``_`` (last
  character dropped), e.g. ``sent-_0``, ``+sentl_1``, ``sentl-_0``;
* anything else: literal text with ``_`` standing for a space (``_It_was`` is " It was").

Each piece is tokenized on its own (``add_special_tokens=False``) and the ids are concatenated; a one-character
literal (``.``, ``?``, ``,``) is looked up as a vocabulary token rather than encoded, as the reference code does
(where the character is not in the vocabulary the reference would emit the unknown token; here it is encoded).
So ``It_was*mask*.`` gives ``ĠIt Ġwas <mask> .`` with the period as the bare ``.`` token, which no tokenization of
one whole rendered string reproduces in general (``said.?`` would merge). The label words are looked up with a
leading space (``Ġgreat``), as LM-BFF does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["Part", "parse", "is_lmbff", "encode", "encode_parts", "render", "SPECIALS"]

SPECIALS = ("cls", "mask", "sep", "sep+")
_SENT = re.compile(r"^(\+?)sent(l|u)?(-?)_(\d+)$")


@dataclass(frozen=True)
class Part:
    """One piece of a template: ``kind`` is ``"special"`` (``value`` cls/mask/sep/sep+), ``"sent"`` (``value``
    the field index; ``space``, ``case`` ("", "l", "u") and ``drop_last`` its modifiers) or ``"text"``
    (``value`` the literal, spaces restored)."""

    kind: str
    value: Any
    space: bool = False
    case: str = ""
    drop_last: bool = False

    def apply(self, text: str) -> str:
        """A text field as this ``sent`` part renders it."""
        if self.case == "l":
            text = text[:1].lower() + text[1:]
        elif self.case == "u":
            text = text[:1].upper() + text[1:]
        if self.drop_last:
            text = text[:-1]
        return (" " + text) if self.space else text


def is_lmbff(template: str) -> bool:
    """Whether ``template`` is written in LM-BFF's language (it starts with a ``*``-delimited piece)."""
    return isinstance(template, str) and template.startswith("*")


def parse(template: str) -> tuple[Part, ...]:
    """The parts of an LM-BFF template; ValueError unless it has exactly one ``*mask*``, a ``*sent_0*`` and no
    field index above 1."""
    parts = []
    for piece in template.split("*"):
        if piece == "":
            continue
        m = _SENT.match(piece)
        if piece in SPECIALS:
            parts.append(Part("special", piece))
        elif m:
            parts.append(Part("sent", int(m.group(4)), space=m.group(1) == "+", case=m.group(2) or "",
                              drop_last=m.group(3) == "-"))
        elif piece.startswith(("label_", "labelx_", "sent", "+sent")):
            raise ValueError(f"template {template!r}: piece {piece!r} is not supported (demonstration labels) or "
                             "not a sent_i variable")
        else:
            parts.append(Part("text", piece.replace("_", " ")))
    masks = sum(p.kind == "special" and p.value == "mask" for p in parts)
    if masks != 1:
        raise ValueError(f"template {template!r} must contain exactly one *mask* (found {masks})")
    fields = {p.value for p in parts if p.kind == "sent"}
    if 0 not in fields:
        raise ValueError(f"template {template!r} has no sent_0 variable")
    if not fields <= {0, 1}:
        raise ValueError(f"template {template!r} uses sentence {max(fields)}; only sent_0 and sent_1 exist")
    return tuple(parts)


def _special_id(tokenizer: Any, name: str) -> int:
    attr = {"cls": "cls_token_id", "mask": "mask_token_id", "sep": "sep_token_id", "sep+": "sep_token_id"}[name]
    tid = getattr(tokenizer, attr, None)
    if tid is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {attr[:-3]} (the template uses *{name}*)")
    return int(tid)


def encode_parts(tokenizer: Any, parts: Sequence[Part], texts: Sequence[str | None]) -> list[list[int]]:
    """The token ids of each part for one example (``texts``: its text fields), every part tokenized alone
    with ``add_special_tokens=False``, as LM-BFF does."""
    out: list[list[int]] = []
    for p in parts:
        if p.kind == "special":
            out.append([_special_id(tokenizer, p.value)])
        elif p.kind == "sent":
            if p.value >= len(texts) or texts[p.value] is None:
                raise ValueError(f"the template uses sent_{p.value} but the example has no text field {p.value}")
            out.append(list(tokenizer(p.apply(texts[p.value]), add_special_tokens=False)["input_ids"]))
        else:
            tid = tokenizer.convert_tokens_to_ids(p.value) if len(p.value) == 1 else None
            if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
                out.append(list(tokenizer(p.value, add_special_tokens=False)["input_ids"]))
            else:
                out.append([int(tid)])
    return out


def encode(tokenizer: Any, parts: Sequence[Part], texts: Sequence[str | None], max_length: int | None = None
           ) -> list[int]:
    """Token ids of one example: the parts' ids concatenated. With ``max_length``, the longest sentence part
    loses tokens from its end until the row fits (LM-BFF cuts the row's tail instead, which can cut the mask;
    rows that fit are identical). ValueError when even one token per sentence does not fit."""
    pieces = encode_parts(tokenizer, parts, texts)
    if max_length is not None:
        over = sum(map(len, pieces)) - max_length
        sents = [i for i, p in enumerate(parts) if p.kind == "sent"]
        while over > 0:                          # one token at a time from the currently longest sentence
            i = max(sents, key=lambda j: len(pieces[j]), default=None)
            if i is None or len(pieces[i]) <= 1:
                raise ValueError(f"max_length={max_length} leaves no room for the template's fixed parts")
            pieces[i].pop()
            over -= 1
    return [t for piece in pieces for t in piece]


def render(parts: Sequence[Part], texts: Sequence[str], mask_token: str = "<mask>", cls: str = "",
           sep: str = "") -> str:
    """The template as readable text (for humans and logs; the ids come from :func:`encode`)."""
    out = []
    for p in parts:
        if p.kind == "special":
            out.append({"cls": cls, "mask": mask_token, "sep": sep, "sep+": sep}[p.value])
        elif p.kind == "sent":
            out.append(p.apply(texts[p.value]))
        else:
            out.append(p.value)
    return "".join(out)
