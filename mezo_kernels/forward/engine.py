"""The forward engine: logits at chosen positions, computing as little as the weights allow, never stale.

* Prefix reuse: rows (and candidates) that share leading tokens are grouped (plan.py); each shared prefix runs once
  and its K/V serve every row of its group in place (llama.py, attention.py).
* Frozen-layer reuse: when the trainable weights start at layer k, the hidden states entering layer k depend only
  on frozen weights and the tokens; they are computed once per batch and reused by both MeZO passes and all n
  directions of a step.
* Eval cache: with fixed weights, a prefix computed for one batch serves later batches (e.g. a system prompt or
  few-shot demonstrations during evaluation).
* Row groups (``row_groups``, grouped.py): G copies of the same rows, each under its own weights (the batched ±
  step); frozen layers run once for all groups, shared prefixes once per group, the eval cache is left alone.

Every cached tensor is keyed by a *weight version* (``_compat.param_version``: address and version counter of
each parameter it depends on). PyTorch bumps the counter on every in-place write (and ``ParamSet`` bumps it after
each kernel launch), and a replaced tensor has another address, so a cache entry can never be used after a weight
it depends on changed. Virtual perturbation writes nothing, so the key also holds the active perturbation of every
parameter it depends on (``weight_state.key``): the +eps pass, the -eps pass and the unperturbed weights never share
an entry that depends on a trainable tensor, while a frozen-only state (frozen-layer reuse) stays shared. The key
also holds the module tree (tree.py): adapters injected, merged, unloaded or disabled, or a module replaced, change
what the model computes without always changing a weight's version. A tree made of other objects (or another model)
gets a new runner (it holds the modules it calls) and empty caches; switches (adapters on/off, train/eval) are in
the keys, the whole tree's for the eval cache, the frozen layers' own for the frozen-layer states. A prefix-tuned
model's learned KV prefix (learned.py) is one more attention part of every entry and part of the eval-cache key.
Caching happens only under ``torch.no_grad()``. Models other than Llama-family causal LMs run the plain forward, and
so do sharded models (DTensor parameters or FSDP modules: ``llama.sharded_reason``), whose forward needs FSDP's hooks
and tensor parallelism's local head counts; that choice depends on the module tree only, so every rank of a job
makes it alike and issues the same collectives.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..virtual import state as weight_state
from .._compat import param_version, sdpa_kernels_used
from ..models import unwrap
from .batches import padded_work, part, plan_batches, stack
from .grouped import check_groups, first_group, tile_plan, tile_states
from .learned import EnginePrefix
from .llama import LlamaRunner, sharded_reason, unsupported_reason
from .plan import Plan, plan_prefixes
from .stats import EngineStats
from .tree import ModuleTree, module_state


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens and the column where they start (left or right padding, contiguous mask)."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be [rows, tokens]")
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    lengths, starts = mask.sum(1), mask.int().argmax(1)
    rows = []
    for r in range(ids.shape[0]):
        n, s = int(lengths[r]), int(starts[r])
        if n == 0 or not bool(mask[r, s:s + n].all()):
            raise ValueError(f"row {r}: the attention mask must be one contiguous run of ones (left or right padding)")
        rows.append(ids[r, s:s + n].tolist())
    return rows, starts.tolist()


class ForwardEngine:
    """``logits_at(model, input_ids, attention_mask, rows, cols)`` -> [N, V] logits of row ``rows[i]`` at column
    ``cols[i]`` (columns index ``input_ids``; any padding side).

    prefix_reuse, frozen_reuse, eval_cache: the three reuses (module docstring); all off = the plain forward.
    min_prefix: shortest prefix worth grouping. cache_entries: eval-cache capacity (prefixes).
    """

    def __init__(self, prefix_reuse: bool = True, frozen_reuse: bool = True, eval_cache: bool = True,
                 min_prefix: int = 4, cache_entries: int = 64) -> None:
        self.prefix_reuse, self.frozen_reuse, self.eval_cache = prefix_reuse, frozen_reuse, eval_cache
        self.min_prefix, self.cache_entries = min_prefix, cache_entries
        self.stats = EngineStats()
        self._tree: ModuleTree | None = None                      # the module tree the runner and caches belong to
        self._runner_obj: LlamaRunner | None = None
        self._kv: OrderedDict[tuple, list] = OrderedDict()      # ((version, tree state), path) -> [(k, v)] per layer
        self._frozen: OrderedDict[tuple, tuple] = OrderedDict()  # (tokens, k, version, state) -> state at layer k
        self._groups: int | None = None                           # row groups of the next forwards (row_groups)

    @classmethod
    def plain(cls) -> "ForwardEngine":
        return cls(prefix_reuse=False, frozen_reuse=False, eval_cache=False)

    @property
    def reuses(self) -> bool:
        return self.prefix_reuse or self.frozen_reuse or self.eval_cache

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def clear(self) -> None:
        self._kv.clear()
        self._frozen.clear()

    @contextlib.contextmanager
    def row_groups(self, groups: int):
        """Within the block, ``logits_at`` takes its rows as ``groups`` row groups (grouped.py): G group-major
        blocks of the same rows, each run under its own weights (a grouped LoRA delta). Each group computes its
        own shared segments; the layers below the first trainable one run once for all groups; the eval cache is
        neither read nor written (the weight version cannot tell the groups' weights apart). Without reuse, or
        for a model the engine cannot run, the plain forward runs all rows and ``stats.fallback`` says why."""
        groups = check_groups(groups)
        if self._groups is not None:
            raise RuntimeError("row groups do not nest: this engine is already inside row_groups()")
        self._groups = groups
        try:
            yield self
        finally:
            self._groups = None

    # ----------------------------------------------------------------------------------------- entry point
    def logits_at(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        lm = unwrap(model)
        # sharded weights (FSDP, tensor parallel): the plain forward, on every rank alike (module tree only)
        why = "reuse is off" if not self.reuses else (sharded_reason(model) or unsupported_reason(lm))
        self.stats.forwards += 1
        G, first_ids, first_mask = self._groups or 1, input_ids, attention_mask
        if self._groups is not None:                # rows are G group-major copies: plan over the first
            self.stats.grouped_forwards += 1
            first_ids, first_mask = first_group(input_ids, attention_mask, G)
        if why:
            self.stats.fallback = why
            return self._plain(model, lm, input_ids, attention_mask, rows, cols)
        tree = ModuleTree(lm)
        runner = self._runner(lm, tree)
        toks, starts = _rows(first_ids, first_mask)
        R = len(toks)                                   # rows per group
        rows_all = rows.cpu()
        group, rows_c = rows_all // R, rows_all % R
        rel = cols.cpu() - torch.tensor(starts)[rows_c]
        lengths = torch.tensor([len(t) for t in toks])
        if bool(((rel < 0) | (rel >= lengths[rows_c])).any()):
            raise ValueError("a requested logit position is a padding column")
        need: dict[int, int] = {}                   # each row's first read position, in one pass
        for r, c in zip(rows_c.tolist(), rel.tolist()):
            need[r] = min(c, need.get(r, c))
        used = sorted(need)
        dev, dtype = next(lm.parameters()).device, next(lm.parameters()).dtype
        learned = EnginePrefix.of(model, dtype, dev)     # a prefix-tuned model's learned KV, once per forward
        h, where = self._run(runner, lm, tree, [toks[r] for r in used], [need[r] for r in used], dev, self._groups,
                             learned)
        index = {r: i for i, r in enumerate(used)}
        sr, sc = zip(*[where(g * len(used) + index[r], c)
                       for g, r, c in zip(group.tolist(), rows_c.tolist(), rel.tolist())])
        self.stats.plain_token_layers += input_ids.numel() * runner.num_layers
        return runner.logits(h[torch.tensor(sr, device=dev), torch.tensor(sc, device=dev)])

    # ----------------------------------------------------------------------------------------- plain forward
    def _plain(self, model, lm, input_ids, attention_mask, rows, cols) -> torch.Tensor:
        dev = next(lm.parameters()).device
        keep, where = torch.unique(cols, return_inverse=True)
        kw: dict[str, Any] = {}
        if _accepts(lm, "logits_to_keep"):        # the LM head runs only where logits are read
            kw["logits_to_keep"], cols = keep.to(dev), where
        call = lambda: model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), **kw).logits
        if not self.stats.kernels:                # find out once which SDPA kernel the model really uses
            logits, seen = sdpa_kernels_used(call)
            self.stats.kernels.update(seen or ["none (no SDPA call)"])
        else:
            logits = call()
        layers = getattr(lm.config, "num_hidden_layers", 1)
        self.stats.plain_token_layers += input_ids.numel() * layers
        self.stats.run_token_layers += input_ids.numel() * layers
        return logits[rows.to(dev), cols.to(dev)]

    def _runner(self, lm: nn.Module, tree: ModuleTree) -> LlamaRunner:
        # other modules, parameters or buffers (another model, an adapter injected or unloaded, a module assigned):
        # the runner would call the old modules and the caches were computed with them. Holding only the current
        # tree lets the old modules (and their weights) go; equal ids cannot collide while self._tree holds them
        if not tree.same_objects(self._tree):
            self.clear()
            self._tree, self._runner_obj = tree, LlamaRunner(lm)
            self._runner_obj.record = self._record_kernel
        return self._runner_obj

    def _record_kernel(self, kernel: str, fallback: str | None) -> None:
        self.stats.kernels.add(kernel)
        if fallback is not None:
            self.stats.attention_fallback = fallback

    # ----------------------------------------------------------------------------------------- reuse forward
    def _first_trainable(self, runner: LlamaRunner) -> int:
        if not self.frozen_reuse or any(p.requires_grad for p in runner.embed_tokens.parameters()):
            return 0
        for i, layer in enumerate(runner.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return runner.num_layers

    def _run(self, runner: LlamaRunner, lm: nn.Module, tree: ModuleTree, toks: list[list[int]], need: list[int],
             dev, groups: int | None = None, learned: EnginePrefix = EnginePrefix.NONE):
        """Hidden states of the row batch after the last layer, and f(row, col) -> (batch row, batch col).
        ``tree``: ``lm``'s module tree now. ``groups`` (row_groups): ``toks`` are one group's rows; the result
        holds G group-major copies. ``learned``: a learned prefix every entry attends to (no layer is frozen)."""
        caching = not torch.is_grad_enabled()
        L = runner.num_layers
        # the state entering layer k is cached; k = L would leave no layer to run, so the last one always runs
        k = min(self._first_trainable(runner), L - 1) if caching and not learned.length else 0
        frozen_key = None
        if k > 0:
            frozen_params, frozen_mods = [*runner.embed_tokens.parameters()], [*runner.embed_tokens.modules()]
            for layer in runner.layers[:k]:
                frozen_params += list(layer.parameters())
                frozen_mods += list(layer.modules())
            # the frozen layers' own switches only: the trainable layers' (a batched +/- pass turns peft's deltas
            # off there) do not reach the state entering layer k
            frozen_key = (tuple(map(tuple, toks)), tuple(need), k, _weights_key(frozen_params),
                          module_state(frozen_mods))
        cached_ok = caching and self.eval_cache
        version = (_weights_key(list(lm.parameters())), tree.state, learned.key()) if cached_ok else None
        if groups is not None:
            version = None          # the groups' weights are not the stored ones, which the version describes
        state = self._frozen.get(frozen_key) if frozen_key is not None else None
        if state is not None:
            self.stats.frozen_hits += 1
            (plan, cached, saved), start = state, k
            hidden = list(saved)                # the loop below rebinds entries; the cached list stays intact
        else:
            if frozen_key is not None:
                self.stats.frozen_misses += 1
            plan = Plan([], [-1] * len(toks), [0] * len(toks))
            if self.prefix_reuse:
                nested = plan_prefixes(toks, need, self.min_prefix)
                # the plan saves real tokens; batches run padded, so keep it only if the padded work shrinks too
                if padded_work(nested, toks) < padded_work(plan, toks):
                    plan = nested
            # eval-cache K/V are valid for this weight version only; a frozen-layer state outlives it (it is reused
            # after the trainable layers change), so it must hold every segment's own hidden states instead
            cached = {s: self._kv[(version, seg.path)] for s, seg in enumerate(plan.segments)
                      if frozen_key is None and (version, seg.path) in self._kv}
            for s in cached:                                  # least recently used goes first
                self._kv.move_to_end((version, plan.segments[s].path))
            hidden, start = None, 0
        self.stats.prefix_cache_lookups += len(plan.segments)
        self.stats.prefix_cache_hits += len(cached)
        one = plan
        # a trained embedding under row groups (full-parameter low-rank groups) differs per group from the start
        tiled = bool(groups is not None and groups > 1 and k == 0 and
                     any(p.requires_grad for p in runner.embed_tokens.parameters()))
        if tiled:
            plan = tile_plan(one, groups)
        levels, fresh, batches, parts_of = plan_batches(plan, cached, toks * (groups if tiled else 1), dev)
        if hidden is None:
            hidden = [runner.embed(ids) if ids.numel() else None for ids, _ in batches]
        ropes = _ropes(runner, hidden, batches, learned.length)
        kv_log: list[list] = [[] for _ in levels]            # per level, per layer: (k, v) of its fresh batch
        for i in range(start, L):
            if i == k and frozen_key is not None and state is None:
                self._remember(self._frozen, frozen_key, (plan, cached, list(hidden)), 2)
            if i == k and groups is not None and groups > 1 and not tiled:
                # from the first trainable layer on, weights differ between row groups: every segment and row
                # runs once per group (cached is empty: no eval cache under row groups, none in a frozen state)
                plan, hidden = tile_plan(one, groups), tile_states(hidden, groups)
                levels, fresh, batches, parts_of = plan_batches(plan, cached, toks * groups, dev)
                ropes = _ropes(runner, hidden, batches, learned.length)
            stacks = []
            for d in range(len(levels)):
                kf = vf = None
                if fresh[d]:
                    parts = [part(stacks[j], lay) for j, lay in parts_of[d]]
                    hidden[d], kf, vf = runner.layer(i, hidden[d], ropes[d], parts + learned.parts(i, hidden[d]),
                                                     kv_only=(i == L - 1))
                    kv_log[d].append((kf, vf))
                stacks.append(stack(plan, levels[d], cached, kf, vf, i))
            parts = [part(stacks[j], lay) for j, lay in parts_of[-1]]
            hidden[-1], _, _ = runner.layer(i, hidden[-1], ropes[-1], parts + learned.parts(i, hidden[-1]))
            self.stats.run_token_layers += sum(ids.numel() for ids, _ in batches)
        if caching and self.eval_cache and version is not None and start == 0:
            self._store_segments(version, plan, fresh, kv_log)
        return hidden[-1], lambda r, c: (r, c - one.plen[r % len(toks)])

    def _store_segments(self, version, plan: Plan, fresh: list[list[int]], kv_log) -> None:
        for stale in [key for key in self._kv if key[0] != version]:   # versions never come back: drop them
            del self._kv[stale]
        # deepest levels first: the shallow segments (a template every batch shares) are the likeliest to be
        # reused, so they are stored last and evicted last
        for f, log in reversed(list(zip(fresh, kv_log))):
            for j, s in enumerate(f):
                n = len(plan.segments[s].tokens)
                kv = [(kk[j:j + 1, :, :n], vv[j:j + 1, :, :n]) for kk, vv in log]
                self._remember(self._kv, (version, plan.segments[s].path), kv, self.cache_entries)

    @staticmethod
    def _remember(store: OrderedDict, key, value, cap: int) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > cap:
            store.popitem(last=False)


def _weights_key(params: list) -> tuple:
    """What the values of ``params`` are now: addresses and version counters, and any virtual perturbation."""
    return param_version(params), weight_state.key(params)


def _ropes(runner: LlamaRunner, hidden: list, batches: list, offset: int = 0) -> list:
    """Each batch's rotary cos/sin at its positions + ``offset`` (after a learned prefix; None: empty batch)."""
    return [runner.rope(h, pos + offset) if h is not None else None for h, (_, pos) in zip(hidden, batches)]


def _accepts(lm: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return False

