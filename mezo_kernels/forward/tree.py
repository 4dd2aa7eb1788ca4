"""The module tree a model computes with, besides its weights: which modules, parameters and buffers it is made of,
and the switches that change what those modules compute (train/eval mode, peft adapters enabled, active, merged,
scaled).

The forward engine caches results computed from a model, so it keys them on this as well as on the weights'
versions: injecting, merging or unloading an adapter, ``disable_adapter()``, or assigning a new module
(``layers[0].self_attn.q_proj = ...``) changes the tree without necessarily changing any weight's version, and the
engine's layer-by-layer runner holds module objects that such a change replaces.

Two parts, both from one pass over ``model.modules()``:

* ``ids``: the identity (``id`` and class) of every module, parameter and buffer, in order. A :class:`ModuleTree`
  holds the objects themselves, so none of them can be freed while it lives: a live object's ``id`` is unique, so
  equal ``ids`` mean the very same objects (no collision through an id reused after garbage collection). The engine
  keeps one tree and drops its runner and caches when ``ids`` change (which also frees the old modules' weights).
* ``state``: plain values (bools, strings, floats), part of the cache keys. Switches flipped and flipped back
  (``disable_adapter()`` blocks, batched ± passes) make the old keys valid again; nothing stale can match.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn


_TUNER: dict[type, bool] = {}        # class -> whether it is a peft tuner layer (looked up once per class)


def _is_tuner(cls: type) -> bool:
    flag = _TUNER.get(cls)
    if flag is None:                 # BaseTunerLayer declares merged_adapters on the class
        flag = _TUNER[cls] = hasattr(cls, "merged_adapters")
    return flag


def module_state(modules: Iterable[nn.Module]) -> tuple:
    """Per module (in order) what decides its output besides its weights: the train/eval flag and, for a peft tuner
    layer, whether adapters are disabled, which are active, which merged, and their scales."""
    return tuple(_tuner_state(m) if _is_tuner(type(m)) else m.training for m in modules)


def _tuner_state(m: nn.Module) -> tuple:
    scaling = getattr(m, "scaling", None)
    scales = tuple((k, v) for k, v in scaling.items() if isinstance(v, (int, float))) if isinstance(scaling, dict) \
        else ()
    return (m.training, bool(getattr(m, "_disable_adapters", False)), tuple(getattr(m, "active_adapters", ())),
            tuple(m.merged_adapters), scales)


class ModuleTree:
    """``model``'s module tree now. ``ids``: identities of every module, parameter and buffer (compare two trees with
    ``a.ids == b.ids`` while ``a`` lives); ``state``: :func:`module_state` of every module."""

    __slots__ = ("objects", "ids", "state")

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())    # deduplicated; a tied weight appears under each module that holds it
        objects = list(modules)
        for m in modules:
            if m._parameters:
                objects += m._parameters.values()
            if m._buffers:
                objects += m._buffers.values()
        self.objects = objects             # held so that no id in ``ids`` can be reused by another object
        # ids first, then classes (a module's class can be reassigned); map() keeps this pass in C
        self.ids = (*map(id, objects), *map(type, modules))
        self.state = module_state(modules)

    def same_objects(self, other: "ModuleTree | None") -> bool:
        """Whether ``other`` (alive) is made of the very same modules, parameters and buffers."""
        return other is not None and other.ids == self.ids
