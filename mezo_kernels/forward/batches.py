"""The batches of one reuse forward: each nesting level's segment batch and the row batch, padded, and which
entries of a batch attend to which segments of the levels above (layouts), with each level's K/V stack."""
from __future__ import annotations

import torch

from .llama import GroupLayout
from .plan import Plan


def padded_work(plan: Plan, toks: list[list[int]]) -> int:
    """Token slots per layer the engine runs for ``plan``: each level's padded segment batch plus the padded rows."""
    work = len(toks) * max(len(t) - p for t, p in zip(toks, plan.plen))
    for d in range(plan.levels):
        lens = [len(s.tokens) for s in plan.segments if s.level == d]
        work += len(lens) * max(lens)
    return work


def layouts(plan: Plan, levels: list[list[int]], chains: list[list[int]], b: int, dev) -> list:
    """For a batch whose entry e sits below the segments ``chains[e]``: (level j, layout) for each level j < b
    that some entry attends to. The layout's groups are that level's segments, in the level's stack order."""
    out = []
    for j in range(min(b, len(levels))):
        members: dict[int, list[int]] = {}
        for e, chain in enumerate(chains):
            seg = next((s for s in chain if plan.segments[s].level == j), None)
            if seg is not None:
                members.setdefault(seg, []).append(e)
        if members:
            groups = [s for s in levels[j] if s in members]
            sel = [levels[j].index(s) for s in groups]
            lay = GroupLayout.build([members[s] for s in groups], [len(plan.segments[s].tokens) for s in groups],
                                    len(chains), dev)
            out.append((j, (lay, None if len(sel) == len(levels[j]) else torch.tensor(sel, device=dev))))
    return out


def part(kv, layout):
    """(k, v, layout) for one level: the level's K/V stack ``kv``, cut to the segments the layout uses."""
    (k, v), (lay, sel) = kv, layout
    return (k, v, lay) if sel is None else (k.index_select(0, sel), v.index_select(0, sel), lay)


def stack(plan: Plan, level: list[int], cached: dict, kf, vf, i: int):
    """Layer i's K/V of every segment of one level in level order, [G, Hkv, Pmax, D]; a view of the level batch's
    K/V when none of them is cached."""
    if not any(s in cached for s in level):
        return kf, vf
    P = max(len(plan.segments[s].tokens) for s in level)
    ks, vs, j = [], [], 0
    for s in level:
        if s in cached:
            k, v = cached[s][i]
        else:
            k, v = kf[j:j + 1], vf[j:j + 1]
            j += 1
        n = len(plan.segments[s].tokens)
        ks.append(torch.nn.functional.pad(k[:, :, :n], (0, 0, 0, P - n)))
        vs.append(torch.nn.functional.pad(v[:, :, :n], (0, 0, 0, P - n)))
    return torch.cat(ks), torch.cat(vs)


def pad(seqs: list[list[int]], offsets: list[int], dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, T] and positions [n, T] (``offset + index``; padding continues the count)."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    pos = torch.tensor(offsets, dtype=torch.long)[:, None] + torch.arange(T)[None, :]
    return ids.to(dev), pos.to(dev)


def plan_batches(plan: Plan, cached: dict, toks: list[list[int]], dev):
    """Everything one reuse forward of ``toks`` under ``plan`` runs: per nesting level its segments and those not
    in ``cached``; each fresh level's padded batch and the row batch, ``(ids, positions)``; per batch the (level,
    layout) pairs of the segments it attends to."""
    levels = [[s for s, seg in enumerate(plan.segments) if seg.level == d] for d in range(plan.levels)]
    fresh = [[s for s in lev if s not in cached] for lev in levels]
    batches = [pad([list(plan.segments[s].tokens) for s in f], [plan.segments[s].start for s in f], dev)
               for f in fresh]
    batches.append(pad([t[p:] for t, p in zip(toks, plan.plen)], plan.plen, dev))
    # entries of batch b (levels, then rows) attending to each segment of level j < b
    chains = [[plan.chain(plan.segments[s].parent) for s in f] for f in fresh]
    chains.append([plan.chain(o) for o in plan.owner])
    return levels, fresh, batches, [layouts(plan, levels, ch, b, dev) for b, ch in enumerate(chains)]
