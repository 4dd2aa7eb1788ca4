"""Which rows share which prefixes: a trie over token ids and an optimal nesting of shared segments.

A *segment* is a run of tokens shared by several rows: it runs once, and the rows (and deeper segments) below it
attend to its K/V. Segments nest: a chat template shared by the whole batch (level 0), then each example's prompt
shared by its candidates (level 1), then each row's own tokens. :func:`plan_prefixes` picks the segments that save
the most token-layer work, ``sum over segments (n_rows - 1) * length``, by dynamic programming over the trie: each
node is either a segment (its rows run its span once) or not, given the depth of the nearest segment above it.

A row's segments never reach a position whose logits are needed (``limits``): those positions must be in the row's
own part, where the engine reads hidden states. Segments shorter than ``min_prefix`` tokens save less than the extra
kernel launches cost; at most ``max_levels`` segments nest (each level is one more attention part per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence


@dataclass(frozen=True)
class Segment:
    """tokens: the segment's own tokens, at absolute positions ``start ..``; parent: index of the segment it
    continues (-1: none); level: nesting depth (0 = a root); path: every token from position 0 to its end."""

    tokens: tuple[int, ...]
    start: int
    parent: int
    level: int
    path: tuple[int, ...]


@dataclass
class Plan:
    """segments: parents before children. owner[r]: the deepest segment row r continues, or -1.
    plen[r]: how many leading tokens of row r its segments cover (0 without one)."""

    segments: list[Segment]
    owner: list[int]
    plen: list[int]

    @property
    def levels(self) -> int:
        return 1 + max((s.level for s in self.segments), default=-1)

    def chain(self, seg: int) -> list[int]:
        """``seg`` and its ancestors, root first."""
        out = []
        while seg >= 0:
            out.append(seg)
            seg = self.segments[seg].parent
        return out[::-1]


class _Node:
    __slots__ = ("children", "rows", "depth")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _Node] = {}
        self.rows: list[int] = []
        self.depth = depth


def _compressed_trie(rows: Sequence[Sequence[int]], limits: Sequence[int]) -> _Node:
    """Trie of the rows cut at their limits, with single-child chains of one row set merged into their deepest
    node: a segment ending higher on such a chain would cover the same rows for fewer tokens."""
    root = _Node(0)
    for r, (toks, lim) in enumerate(zip(rows, limits)):
        node = root
        node.rows.append(r)
        for t in toks[:lim]:
            node = node.children.setdefault(t, _Node(node.depth + 1))
            node.rows.append(r)

    def squash(node: _Node) -> _Node:
        while len(node.children) == 1:
            (child,) = node.children.values()
            if len(child.rows) != len(node.rows):
                break
            node = child
        node.children = {k: squash(c) for k, c in node.children.items()}
        return node

    root.children = {k: squash(c) for k, c in root.children.items()}
    return root


def plan_prefixes(rows: Sequence[Sequence[int]], limits: Sequence[int] | None = None, min_prefix: int = 4,
                  max_levels: int = 3) -> Plan:
    """Nest shared segments over ``rows`` (see the module docstring).

    limits[r]: the longest prefix row r may share (default and cap ``len(row) - 1``: one own token stays).
    """
    n = len(rows)
    lim = [len(r) - 1 for r in rows] if limits is None else [min(int(x), len(r) - 1) for x, r in zip(limits, rows)]
    if len(lim) != n:
        raise ValueError(f"{len(lim)} limits for {n} rows")
    root = _compressed_trie(rows, lim)

    @lru_cache(maxsize=None)
    def best(node: _Node, above: int, level: int) -> int:
        """Most work saved in node's subtree, the nearest segment above ending at depth ``above``."""
        skip = sum(best(c, above, level) for c in node.children.values())
        if level < max_levels and len(node.rows) > 1 and node.depth - above >= min_prefix:
            take = (len(node.rows) - 1) * (node.depth - above) + sum(
                best(c, node.depth, level + 1) for c in node.children.values())
            return max(take, skip)
        return skip

    segments: list[Segment] = []
    owner, plen = [-1] * n, [0] * n

    def build(node: _Node, above: int, level: int, parent: int) -> None:
        skip = sum(best(c, above, level) for c in node.children.values())
        if best(node, above, level) > skip:         # a tie keeps the flatter plan: fewer kernel launches
            r0 = node.rows[0]
            path = tuple(rows[r0][:node.depth])
            start = above
            segments.append(Segment(path[start:], start, parent, level, path))
            idx = len(segments) - 1
            for r in node.rows:
                owner[r], plen[r] = idx, node.depth
            above, level, parent = node.depth, level + 1, idx
        for c in node.children.values():
            build(c, above, level, parent)

    build(root, 0, 0, -1)
    best.cache_clear()
    return Plan(segments, owner, plen)
