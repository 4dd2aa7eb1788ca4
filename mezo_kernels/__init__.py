"""mezo-kernels: fused seeded perturbations for zeroth-order (MeZO) fine-tuning.

Public API: the optimizer ``MeZO`` (a ``torch.optim.Optimizer``) with ``replay`` (weights rebuilt bit for bit from
a seed log) and ``StepResult``; the perturbation API ``ParamSet``, ``fill_normal_``, ``fill_sign_``, ``backends``; ``VirtualPerturbation``
(the +/- passes seen by a model's modules without writing its weights).
The RNG spec lives in ``mezo_kernels.rng``; the ``transformers.Trainer`` / TRL integration in ``mezo_kernels.hf``.
"""
from .kernels import backends
from .optim import MeZO, StepResult, replay
from .perturb import ParamSet, fill_normal_, fill_sign_
from .virtual import VirtualPerturbation

__all__ = ["MeZO", "StepResult", "replay", "ParamSet", "fill_normal_", "fill_sign_", "backends",
           "VirtualPerturbation"]
__version__ = "0.1.0"
