"""``replay``: trained weights rebuilt in place from the initial weights and a seed log, bit for bit on the same
backend and mode, on any number of processes: a sharded run's log replays on plain full tensors in one process,
and on DTensors each rank replays its shard (the z of an element depends on its global index only)."""
from __future__ import annotations

from typing import Iterable

import torch

from . import seedlog
from .mezo import NO_FORWARDS, MeZO

__all__ = ["replay"]


def replay(params: Iterable, log, config: dict | None = None, backend: str = "auto",
           exact_restore: bool | None = None, model: torch.nn.Module | None = None) -> MeZO:
    """Rebuild trained weights in place from the initial ``params`` and a seed log, bit for bit on the same
    backend and mode.

    ``log``: ``MeZO.log`` (which carries its config), a ``seeds.jsonl`` path, ``(header, records)``, a
    ``MeZO.state_dict()``, or bare records with ``config``. ``config``: ``MeZO.config()`` of the run; default: the
    one the log carries (a ValueError when both are there and their modes differ: another distribution would
    replay other directions). ``model``: the module owning ``params``, needed for DTensor parameters
    (FSDP2's modules are resharded before every write) and to continue training a virtual-perturbation run
    (replay itself runs no forward). Returns the optimizer, ready to continue training
    (resume)."""
    logged, records = seedlog.load(log)
    if config is not None and logged is not None:
        seedlog.check_modes(logged, config)
    cfg = dict(config if config is not None else logged or {})
    if not cfg:
        raise ValueError("this log carries no config: pass config=MeZO.config() of the run that wrote it")
    if exact_restore is not None:
        cfg["exact_restore"] = exact_restore
    cfg.setdefault("perturb", "inplace")        # a config without the key was written in place
    if model is None and cfg.get("perturb") == "virtual":
        model = NO_FORWARDS
    return MeZO(params, backend=backend, model=model, **cfg).replay_(records)
