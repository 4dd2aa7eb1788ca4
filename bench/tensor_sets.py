"""Tensor sets the benchmarks perturb: real LoRA shapes and one large full-parameter tensor.

Shapes follow peft's LoRA layout: ``lora_A`` is [r, in_features], ``lora_B`` is [out_features, r].
"""
from __future__ import annotations

import torch

# (in, out) per target module
_SMOLLM2_135M = {"layers": 30, "q_proj": (576, 576), "v_proj": (576, 192)}
_LLAMA_7B = {"layers": 32, "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
             "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
             "down_proj": (11008, 4096)}


def lora_shapes(arch: dict, targets: tuple[str, ...], r: int = 8) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(arch["layers"]):
        for name in targets:
            fin, fout = arch[name]
            shapes += [(r, fin), (fout, r)]
    return shapes


def tensor_sets(device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    """name -> list of shapes. The large tensor is >= 1.6e7 elements on the CPU and >= 1e8 on a GPU."""
    big = 2**24 if device.type == "cpu" else 2**27
    return {
        "smollm2-135m-lora-qv-r8": lora_shapes(_SMOLLM2_135M, ("q_proj", "v_proj")),
        "llama7b-lora-qv-r8": lora_shapes(_LLAMA_7B, ("q_proj", "v_proj")),
        "llama7b-lora-all-r8": lora_shapes(_LLAMA_7B, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj")),
        f"full-{big}": [(big,)],
    }


def make(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).to(dtype=dtype, device=device) for s in shapes]
