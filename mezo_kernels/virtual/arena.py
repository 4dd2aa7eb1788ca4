"""The memory behind virtual perturbation's transient buffers: on the CPU a mapping of its own, not the C heap.

The arena of a ``VirtualPerturbation`` block (one allocation that every module's materialised weights share, see
``perturbation.py``) lives from the first materialisation of a ± pass to the end of the pass. Taken from
``torch.empty``, a CPU arena comes from the C allocator, which serves it from freed heap blocks when it has some:
memory the forward's activations would otherwise reuse, so the forward grows the heap by the arena's whole size,
pages never written included, and after the pass the freed arena stays resident as heap.

An anonymous mapping (``mmap``) holds exactly the pages written into it and returns them to the OS when the last
view of the tensor dies (``torch.frombuffer`` keeps the mapping alive as long as the storage), so the transient
memory is what the buffers use, only while they are used, whatever the heap's state. Buffers under 1 MiB keep
``torch.empty`` (a system call each would cost more than they weigh); other devices too (their caching allocators
already reuse blocks). Measured with the arena's size rule below (``bench/bench_transient.py``, RESULTS section
``virtual-transient-cpu``: a 63M Llama in bf16 whose largest tensor is 12 MiB): the virtual step's peak RSS over
inference went from +16.5 to +4.4 MiB with an allocator whose RSS follows live memory, and from +40.2 to +26.6 MiB
(medians of 3) with glibc as it comes, where the rest is heap fragmentation, not buffers held.
"""
from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

__all__ = ["arena_bytes", "host_buffer", "own_buffer"]
_OWN_MAPPING = 2**20     # bytes: a buffer outside the arena at least this large gets a mapping of its own


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-d uint8 tensor of ``nbytes`` (> 0) bytes on ``device``, contents undefined, page-aligned on the CPU.

    CPU: over an anonymous private mapping, released when this tensor and every view of it are gone. Other
    devices: ``torch.empty``."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes}")
    if torch.device(device).type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def own_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A transient buffer of ``shape`` and ``dtype`` outside the arena: on the CPU over a mapping of its own when it
    is at least 1 MiB (it is then released when its module returns, not kept as heap), else ``torch.empty``."""
    n = math.prod(shape) * dtype.itemsize
    if n < _OWN_MAPPING or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return host_buffer(n, device).view(dtype).view(shape)


def arena_bytes(needs: Sequence[int], cap: int) -> int:
    """The arena a pass reserves, given each hooked module's buffer bytes ``needs`` (aligned) and ``cap``: the
    largest need up to ``cap`` once the one module that needs more than every other one is left out.

    The arena lives through the whole pass, so through the loss, where a forward's memory peaks; whatever it
    holds adds to that peak. The module larger than every other one (an LM head tied to the embedding) would set
    its size alone for one use per pass: it gets its own buffer (:func:`own_buffer`), released when it returns,
    and the arena keeps the size of the next largest. Modules that share the largest size all stay in it."""
    order = sorted(needs, reverse=True)
    if len(order) > 1 and order[0] > order[1]:
        order = order[1:]
    return next((n for n in order if n <= cap), 0)
