"""The optimizer layer: ``MeZO`` (a ``torch.optim.Optimizer``) and ``replay`` (``replaying.py``), composed of its
settings (``settings.py``), its step (``steps.py``) and its record (``state.py``); param groups, the seed log
(``seeds.jsonl``) and shard bases. It never imports transformers or peft."""
from .mezo import MeZO, StepResult, no_decay, projected_grad
from .replaying import replay

__all__ = ["MeZO", "StepResult", "replay", "no_decay", "projected_grad"]
