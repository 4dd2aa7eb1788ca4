"""Forward engine: attention kernels with log-sum-exp, shared-prefix KV reuse, frozen-layer reuse, eval cache.

Knows models (transformers modules), never the perturbation kernels: staleness is ruled out by the parameters'
own version counters, which every in-place write bumps.
"""
from .attention import attend, kernel_for, merge, sdpa_kernels_used
from .engine import EngineStats, ForwardEngine
from .plan import Plan, plan_prefixes

__all__ = ["ForwardEngine", "EngineStats", "Plan", "plan_prefixes", "attend", "merge", "kernel_for",
           "sdpa_kernels_used"]
