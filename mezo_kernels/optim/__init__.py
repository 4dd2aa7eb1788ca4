"""The optimizer layer: ``MeZO`` (a ``torch.optim.Optimizer``), ``replay`` and its state, param groups, the seed
log (``seeds.jsonl``) and shard bases. It never imports transformers or peft."""
from .mezo import MeZO, StepResult, no_decay, projected_grad
from .state import replay

__all__ = ["MeZO", "StepResult", "replay", "no_decay", "projected_grad"]
