"""``--shard``: how a torchrun job spreads the model over its ranks, on torch's own engines.

* ``none``: every rank holds the whole model (data parallel: each rank evaluates its slice of the batch and the ranks
  exchange per-example losses, data_parallel.py).
* ``fsdp``: FSDP2 (``fully_shard``) on every decoder layer, then on the root, over a 1-D mesh of all ranks: every
  parameter becomes a ``DTensor`` with ``Shard(0)``. The batch is split over the ranks as with ``none``. The root is
  resharded after each forward too (``reshard_after_forward=True``), so between forwards every rank holds its shards
  only: what the optimizer writes there is what the next forward gathers.
* ``tp``: tensor parallelism over all ranks with the Llama plan (q/k/v/gate/up ``ColwiseParallel``, o/down
  ``RowwiseParallel``, through ``parallelize_module``); embeddings, norms and the LM head stay replicated. Every rank
  runs the whole batch. The TP size (the world size) must divide the attention and KV head counts. A peft LoRA
  layer on a planned projection is split to match its base: column-wise, ``B`` is split like the base (its rows,
  the output features) and ``A`` is replicated; row-wise, ``A`` is split like the base (its columns, the input
  features, with the all-reduce after it) and ``B`` is replicated. Each rank's delta then adds to its own part of
  the base output, as in one process.

MeZO perturbs and updates each rank's shard with the global element indices, so z, the updates and the seed log are
those of one process: a sharded run's log replays on any world size (``mezo-kernels replay``, ``--resume``).
Outputs are gathered on rank 0 (``DTensor.full_tensor()``) and saved as one process saves them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import models

__all__ = ["TP_PLANS", "check_model", "check_tp", "shard_model", "is_sharded", "full_state_dict"]

# tensor-parallel plans by model_type: module path inside a decoder layer -> the split of its weight
TP_PLANS: dict[str, dict[str, str]] = {
    "llama": {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"},
}


def check_tp(config, tp: int, name: str) -> None:
    """ValueError unless a model of transformers ``config`` (named ``name`` in messages) can run tensor parallel
    over ``tp`` ranks: a plan for its architecture, and ``tp`` dividing its attention and KV head counts."""
    mtype = getattr(config, "model_type", None)
    if mtype not in TP_PLANS:
        raise ValueError(f"--shard tp: no tensor-parallel plan for model {name} (model_type {mtype!r}); plans exist "
                         f"for {', '.join(TP_PLANS)}: use --shard fsdp or --shard none")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % tp or kv % tp:
        raise ValueError(f"--shard tp over {tp} ranks: model {name} has {heads} attention heads and {kv} KV heads, "
                         f"and the TP size ({tp}, the world size) must divide both; use a world size that divides "
                         f"{math.gcd(heads, kv)}, or --shard fsdp")


def check_model(model_name: str, shard: str, world_size: int) -> None:
    """What ``--shard`` needs of the model, checked from its config alone (before any weight is loaded)."""
    if shard == "tp" and world_size > 1:
        check_tp(models.load_config(model_name), world_size, model_name)


def _layers(lm: nn.Module) -> nn.ModuleList:
    """The transformer's list of layers (Llama ``model.layers``, OPT ``model.decoder.layers``, BERT
    ``encoder.layer``): the first ``ModuleList`` with ``num_hidden_layers`` entries."""
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    for m in lm.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"{type(lm).__name__}: no list of {n} layers found to shard")


def shard_model(model: nn.Module, shard: str, world_size: int) -> nn.Module:
    """``model`` (a transformers model, or peft's wrapper of one) sharded in place as ``shard`` says, over a 1-D
    mesh of the ``world_size`` ranks of the process group; ``"none"`` leaves it alone. Every rank must call it."""
    if shard == "none":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(next(model.parameters()).device.type, (world_size,))
    lm = models.unwrap(model)
    if shard == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in _layers(lm):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        return model
    if shard != "tp":
        raise ValueError(f"shard must be none, fsdp or tp, got {shard!r}")
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    check_tp(lm.config, world_size, type(lm).__name__)
    style = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in _layers(lm):
        plan = {}
        for path, how in TP_PLANS[lm.config.model_type].items():
            for sub, split in _tp_split(layer.get_submodule(path), how):
                plan[f"{path}{sub}"] = style[split]()
        parallelize_module(layer, mesh, plan)
    return model


def _tp_split(module: nn.Module, how: str) -> list[tuple[str, str]]:
    """``(subpath, split)`` for a planned projection: itself, or for a peft LoRA layer (``base_layer`` with
    ``lora_A``/``lora_B`` per adapter) its base and the adapter matrix that must be split to match it (module
    docstring)."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not (hasattr(module, "base_layer") and isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict)):
        return [("", how)]
    if any(getattr(module, "use_dora", {}).values()) or getattr(module, "lora_embedding_A", None):
        raise ValueError(f"--shard tp: {type(module).__name__} uses DoRA or embedding adapters, which have no "
                         "tensor-parallel plan; use --shard fsdp")
    split = "lora_B" if how == "colwise" else "lora_A"
    return [(".base_layer", how)] + [(f".{split}.{name}", how) for name in (lora_a if split == "lora_A" else lora_b)]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a shard of a parameter, or a replica on a mesh)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full_state_dict(model: nn.Module, names: Sequence[str] | None, keep: bool) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with every sharded tensor gathered (``full_tensor()``), on the CPU; ``names``: only
    these keys (None: all). Every rank must call it (the gathers are collectives, one tensor at a time); the ranks
    with ``keep`` False return None and hold no gathered tensor longer than one gather."""
    wanted = None if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor | None] = {}   # a tied weight (one tensor, two keys): gathered once, still tied
    for key, value in model.state_dict(keep_vars=True).items():
        if wanted is not None and key not in wanted:
            continue
        if id(value) not in seen:
            full = value.full_tensor() if is_sharded(value) else value
            seen[id(value)] = full.detach().to("cpu") if keep else None
        if keep:
            out[key] = seen[id(value)]
    return out if keep else None
