"""Integrations: ``transformers.Trainer`` (``MeZOTrainer``) and TRL (``MeZOSFTTrainer``, imported only when asked
for). Needs the ``hf`` extra."""
from .trainer import MeZOHooks, MeZOTrainer, ObjectiveModel, StepBatches, TrainerMeZO, collate_examples

__all__ = ["MeZOTrainer", "MeZOHooks", "MeZOSFTTrainer", "TrainerMeZO", "ObjectiveModel", "collate_examples",
           "StepBatches"]


def __getattr__(name: str):
    if name == "MeZOSFTTrainer":                     # TRL is imported only when asked for
        from .trl import MeZOSFTTrainer
        return MeZOSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
