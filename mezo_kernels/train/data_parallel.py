"""MeZO on ``torch.distributed``: data parallelism by exchanging losses.

Data parallel: every rank holds the same weights and the same seed sequence, evaluates its slice of the global
batch, and the ranks exchange only the per-example losses (an all-gather in rank order, so every rank reduces the
same [B] vector in the same order and gets the same g, bit for bit). Every rank then applies the identical update:
no gradient buffers, no parameter broadcasts after start-up. ``exchange="sum"`` exchanges one float64 per forward
instead (2 scalars per step with one direction). This module moves tensors only: what the per-example rows are
and how they become the scalar is the caller's reducer (``objectives.Reduction``).

Tensor parallel (``BroadcastLoss``): every rank computes the loss of the whole batch, its all-reduces inside the
forward, and rank 0's value is broadcast (8 bytes per forward), so every rank steps on the same bits even where
the ranks' reductions could round differently.

Launch with ``torchrun``; ``init_from_env`` reads RANK / WORLD_SIZE / LOCAL_RANK.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "env_world_size", "rank_slice", "CommStats", "Reducer",
           "DataParallelLoss", "BroadcastLoss", "broadcast_object", "check_replicas"]


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    backend: str | None      # None: a single process, no process group


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (a no-op for a single process).

    ``backend`` defaults to gloo on CPU-only machines and ``"cpu:gloo,cuda:nccl"`` where CUDA is present, so CPU
    tensors (the trainer's losses) go through gloo and CUDA tensors through NCCL. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                        str(dist.get_backend()))
    world = env_world_size()
    if world <= 1:
        return DistInfo(0, 1, 0, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    # env:// (MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun), with keys prefixed by the restart count: after a
    # torchrun restart the agent's store still holds the dead attempt's gloo addresses, and a new rank that read
    # them would try to connect to a process that no longer exists
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"mezo-kernels/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (start-up only: configs, resumed seed logs)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_replicas(tensors: Sequence[torch.Tensor], what: str = "weights") -> None:
    """Raise RuntimeError unless every rank holds bit-identical ``tensors`` (a hash per rank, once at start-up)."""
    if not _active():
        return
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"{what} differ between ranks (rank 0 vs ranks {bad}): MeZO data parallelism needs "
                           "identical replicas (same model, seed and dtype on every rank)")


def rank_slice(batch: Sequence, rank: int, world_size: int) -> Sequence:
    """Rank ``rank``'s contiguous 1/world_size of ``batch``; the world size must divide the batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(batch) % world_size:
        raise ValueError(f"the global batch of {len(batch)} examples does not split evenly over {world_size} ranks; "
                         f"use a batch size that is a multiple of the world size")
    n = len(batch) // world_size
    return batch[rank * n:(rank + 1) * n]


@dataclass
class CommStats:
    """What this rank exchanged: ``calls`` collectives, payload bytes it contributed (``bytes_out``) and received
    from the others (``bytes_in``), and the wall time spent inside the collectives."""
    calls: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0

    def snapshot(self) -> "CommStats":
        return CommStats(self.calls, self.bytes_out, self.bytes_in, self.seconds)

    def since(self, old: "CommStats") -> "CommStats":
        return CommStats(self.calls - old.calls, self.bytes_out - old.bytes_out, self.bytes_in - old.bytes_in,
                         self.seconds - old.seconds)


class Reducer(Protocol):
    """Turns per-example tensors into the scalar to minimize (``objectives.Reduction`` is one).

    ``rows(out)``: [K, b] float32 rows of one rank's output over its b examples (K fixed); ``value(rows)``: the
    float from the [K, B] rows of the whole batch, in batch order; ``additive``: ``value(rows)`` is the mean of
    row 0, so the ranks may exchange one partial sum instead of the rows."""

    additive: bool

    def rows(self, out: Any) -> torch.Tensor: ...

    def value(self, rows: torch.Tensor) -> float: ...


class DataParallelLoss:
    """``loss(model, global_batch) -> float``: this rank's slice, rows exchanged, the global value on every rank.

    Args:
        fn: ``fn(model, local_batch) -> out``; ``out`` is whatever ``reducer.rows`` reads.
        reducer: a :class:`Reducer`.
        exchange: ``"gather"`` (default): all-gather the [K, b] rows in fixed rank order, so every rank reduces the
            identical [K, B] tensor exactly as a single process would; ``"sum"``: all-reduce one float64 sum of
            row 0 per forward (additive reducers only; 8 bytes, but the summation order is the backend's).
    """

    def __init__(self, fn: Callable, reducer: Reducer, exchange: str = "gather", group=None):
        if exchange not in ("gather", "sum"):
            raise ValueError(f"exchange must be 'gather' or 'sum', got {exchange!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(model, batch), got {type(fn).__name__}")
        if not all(callable(getattr(reducer, m, None)) for m in ("rows", "value")):
            raise TypeError(f"reducer must have rows(out) and value(rows) methods, got {type(reducer).__name__}")
        if exchange == "sum" and not reducer.additive:
            raise ValueError("exchange='sum' averages row 0; this reducer is not additive (accuracy/F1 objectives "
                             "need exchange='gather')")
        self.fn, self.reducer, self.exchange, self.group = fn, reducer, exchange, group
        self.stats = CommStats()

    def __call__(self, model, batch: Sequence) -> float:
        if not _active():
            return self.reducer.value(self.reducer.rows(self.fn(model, batch)))
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        mine = self.reducer.rows(self.fn(model, rank_slice(batch, rank, world)))
        if self.exchange == "sum":
            buf = mine[0].double().sum().reshape(1)
            self._timed(lambda: dist.all_reduce(buf, group=self.group), buf.numel() * 8, buf.numel() * 8)
            return float(buf[0]) / len(batch)
        parts = [torch.empty_like(mine) for _ in range(world)]
        nbytes = mine.numel() * mine.element_size()
        self._timed(lambda: dist.all_gather(parts, mine, group=self.group), nbytes, nbytes * (world - 1))
        return self.reducer.value(torch.cat(parts, dim=1))         # rank order = global batch order

    def _timed(self, op: Callable[[], Any], out_bytes: int, in_bytes: int) -> None:
        t0 = time.perf_counter()
        op()
        self.stats.seconds += time.perf_counter() - t0             # blocking: gloo and CPU-side NCCL waits
        self.stats.calls += 1
        self.stats.bytes_out += out_bytes
        self.stats.bytes_in += in_bytes


class BroadcastLoss:
    """``loss(model, batch) -> float``: ``fn(model, batch)`` (a float) on every rank, rank 0's value returned on
    all (tensor parallelism: each rank holds part of every layer and runs the whole batch)."""

    def __init__(self, fn: Callable[[Any, Sequence], float], group=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(model, batch), got {type(fn).__name__}")
        self.fn, self.group, self.stats = fn, group, CommStats()

    def __call__(self, model, batch: Sequence) -> float:
        value = float(self.fn(model, batch))
        if not _active():
            return value
        buf = torch.tensor([value], dtype=torch.float64)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        t0 = time.perf_counter()
        dist.broadcast(buf, src=src, group=self.group)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        mine = dist.get_rank(self.group) == 0
        self.stats.bytes_out += 8 * (dist.get_world_size(self.group) - 1) if mine else 0
        self.stats.bytes_in += 0 if mine else 8
        return float(buf[0])
