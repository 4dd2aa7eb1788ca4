"""Counters of the forward engine (``ForwardEngine.stats``): work done and saved, cache hits, kernels, fallbacks."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters since construction (or :meth:`ForwardEngine.reset_stats`). Token-layers count padded tokens
    times layers actually run; ``plain_token_layers`` is what the plain padded forward would have run."""

    forwards: int = 0
    plain_token_layers: int = 0
    run_token_layers: int = 0
    frozen_hits: int = 0
    frozen_misses: int = 0
    prefix_cache_lookups: int = 0      # groups needed by reuse forwards
    prefix_cache_hits: int = 0         # of which served from the eval cache
    kernels: set = field(default_factory=set)   # attention kernels that actually ran
    fallback: str | None = None        # why the plain forward ran, if it did
    attention_fallback: str | None = None   # why an attention kernel was replaced by the reference, if it was
    grouped_forwards: int = 0          # forwards whose rows were row groups (see row_groups)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.run_token_layers / self.plain_token_layers if self.plain_token_layers else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_lookups if self.prefix_cache_lookups else 0.0

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "saved_fraction": round(self.saved_fraction, 4),
                "frozen_hits": self.frozen_hits, "frozen_misses": self.frozen_misses,
                "prefix_cache_hits": self.prefix_cache_hits, "prefix_cache_lookups": self.prefix_cache_lookups,
                "prefix_hit_rate": round(self.prefix_hit_rate, 4), "attention": sorted(self.kernels),
                "fallback": self.fallback, "attention_fallback": self.attention_fallback,
                "grouped_forwards": self.grouped_forwards}
