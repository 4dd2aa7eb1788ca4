"""The step benchmark's loss as an objective the batched ± pass can run (``mezo_kernels.train.batched_pm``).

``batched_pm`` stacks an encoding once per row group (``tile_encoding``), runs one forward and splits the output
per group: it needs ``encode(batch)`` and ``forward(model, enc)`` returning ``logits`` [G*N, C] and ``labels``
[G*N] whose group g is rows ``g*N .. (g+1)*N - 1``. Here a "row" is one predicted token: the batch is the token
tensor ``ids`` [B, S] itself, and the forward returns the shifted next-token logits [R*(S-1), vocab] (fp32) with
their labels ``ids[:, 1:]``, flattened row-major, so group g's slice is exactly its B rows' tokens and its mean
cross-entropy is the causal-LM loss that ``model(input_ids=ids, labels=ids).loss`` gives for those rows (the loss
of every other method of the benchmark).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable

import torch


class TokenLM:
    """Causal-LM loss on a token batch, in the objective interface of ``batched_pm``.

    ``on_forward(seconds)``, if given, receives the time of each model forward (synchronized on a GPU), so a
    batched step still splits into forwards and the rest."""

    engine = None                     # the plain transformers forward (no forward-engine reuse)

    def __init__(self, on_forward: Callable[[float], None] | None = None):
        self.on_forward = on_forward

    def encode(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ids``: int64 [B, S], S >= 2."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"TokenLM needs an int64 token tensor [B, S] with S >= 2, got "
                             f"{getattr(ids, 'shape', type(ids).__name__)}")
        return {"input_ids": ids}

    def forward(self, model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> SimpleNamespace:
        ids = enc["input_ids"]
        cuda = ids.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        if cuda:
            torch.cuda.synchronize()
        if self.on_forward is not None:
            self.on_forward(time.perf_counter() - t0)
        scores = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return SimpleNamespace(logits=scores, labels=ids[:, 1:].reshape(-1))


def batched_step(model: torch.nn.Module, ids: torch.Tensor, opt, on_forward=None) -> Callable[[], dict]:
    """A step function: ``opt.step_batched`` with every ± pass of ``opt.n_directions`` directions in one forward
    of ``2 * n * B`` rows. ``opt``: a ``MeZO`` with ``perturb="virtual"`` over LoRA adapters of ``model``."""
    from mezo_kernels.train.batched_pm import make_pm_fn
    pm_fn = make_pm_fn(model, TokenLM(on_forward), ids, opt.param_sets)

    def step():
        with torch.no_grad():
            r = opt.step_batched(pm_fn)
        return {"loss": r.loss_plus, "loss_minus": r.loss_minus, "seed": r.seed, "g": r.grad}
    return step
