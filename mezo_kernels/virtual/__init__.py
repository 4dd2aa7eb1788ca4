"""Perturbation seen inside the forward, never written to the stored weights: module hooks
(``perturbation``), sliced materialisation (``slices``), wrapped (tensor-parallel DTensor) parameters
(``sharded``), grouped LoRA for batched +/- (``grouped_lora``) and the registry of active perturbations that caches
key on (``state``)."""
from .perturbation import VirtualPerturbation
from .sharded import Wrapped

__all__ = ["VirtualPerturbation", "Wrapped"]
