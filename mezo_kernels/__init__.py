"""mezo-kernels: fused seeded perturbations for zeroth-order (MeZO) fine-tuning.

Public API: ``ParamSet``, ``fill_normal_``, ``backends``. The RNG spec lives in ``mezo_kernels.rng``.
"""
from .dispatch import backends
from .perturb import ParamSet, fill_normal_

__all__ = ["ParamSet", "fill_normal_", "backends"]
__version__ = "0.1.0"
