"""Models for the step benchmark (bench_step.py): which ones exist, how each is built, and how much memory a
(model, mode, method, batch, seq) needs, so that a worker can refuse a configuration instead of being OOM-killed.

* ``tiny-llama`` / ``tiny-opt``: mezo_kernels' 2-layer random models (tests, --quick).
* ``smollm2-135m``: SmolLM2-135M-Instruct with its real weights (``mezo_kernels.models.load_model``, a GGUF
  dequantized to fp32, about 10 s).
* ``llama-1b-rand``: the Llama-3.2-1B architecture (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
  8192, vocab 128256, tied embeddings, rope_theta 500000) with random weights.
* ``opt-1.3b-rand``: the OPT-1.3B architecture (hidden 2048, 24 layers, 32 heads, ffn 8192, vocab 50272,
  max_position 2048) with random weights. dropout is set to 0 (OPT's config has 0.1): backprop with gradient
  checkpointing runs in train() mode, and every method must compute the same function.

Random-weight models are built from a transformers config (no hub) with ``torch.manual_seed(seed)`` and
``AutoModelForCausalLM.from_config(cfg, dtype=...)``. Llama-3.2-1B's "llama3" rope scaling is left out: it changes
only the rotary frequencies, not the cost of a step.

Every (configuration, method) runs in its own process, so a model is built once per method. With a cache folder
the first build is saved (``save_pretrained``: SmolLM2 in fp32, random models per dtype and seed, 2.4 GB each for
the 1B ones in bf16) and later builds read it back, so a process does not pay GGUF parsing (~10 s) or random
initialisation of 1.2 B weights (~18 s on 2 cores) again.
"""
from __future__ import annotations

import os
import shutil

import torch

GB = 1024**3
TINY = ("tiny-llama", "tiny-opt")
RANDOM_ARCHS = {
    "llama-1b-rand": ("llama", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=128000,
        eos_token_id=128001)),
    "opt-1.3b-rand": ("opt", dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
        word_embed_proj_dim=2048, max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=True)),
}
MODELS = TINY + ("smollm2-135m",) + tuple(RANDOM_ARCHS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _config(name: str):
    from transformers import LlamaConfig, OPTConfig
    arch, kw = RANDOM_ARCHS[name]
    return (LlamaConfig if arch == "llama" else OPTConfig)(**kw)


def _materialize(model):
    """Copy every weight into anonymous memory. from_pretrained maps the safetensors file copy-on-write: weights
    would sit in the page cache, outside the RSS baseline, and be faulted in (and counted) during the first steps."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for mod in model.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.clone()
    return model


def _cached(path: str | None, dtype: torch.dtype, make):
    """``make()``'s model, saved under ``path`` the first time and read back (materialized) afterwards."""
    from transformers import AutoModelForCausalLM
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return _materialize(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True))
    model = make()
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        # a GGUF-loaded model is flagged as quantized (not serializable) though its weights are plain dequantized
        # tensors: drop the flag so that save_pretrained writes them as an ordinary checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        if os.path.exists(path):          # another worker got there first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)         # a rename: readers never see a partial folder
    return model


def build_model(name: str, dtype: torch.dtype, seed: int = 0, cache_dir: str | None = None):
    """The causal LM ``name`` in ``dtype``, eval() mode, every parameter requiring grad (full-parameter mode).

    With ``cache_dir``, SmolLM2 (fp32, cast on load) and the random models (per dtype and seed) are saved there on
    first use and loaded from there afterwards: the same weights, in 2-4 s instead of 10-20 s."""
    check_model(name)
    if name in TINY:
        from mezo_kernels.models import load_model
        model = load_model(name, seed=seed, dtype=dtype)[0]
    elif name == "smollm2-135m":
        from mezo_kernels.models import load_model
        path = os.path.join(cache_dir, f"{name}-fp32") if cache_dir else None
        model = _cached(path, dtype, lambda: load_model(name, dtype=torch.float32)[0]).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        def make():
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(_config(name), dtype=dtype)
        path = os.path.join(cache_dir, f"{name}-{str(dtype).split('.')[1]}-seed{seed}") if cache_dir else None
        model = _cached(path, dtype, make)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def meta_model(name: str):
    """A random-architecture model on the meta device (no memory): its parameter count and config, for the guard
    before building; None for the other models, whose memory is checked after loading (they are small)."""
    if name not in RANDOM_ARCHS:
        return None
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config(name))


def shape_of(c) -> dict:
    """hidden, layers, intermediate, vocab of a transformers config: what the activation estimate needs."""
    return dict(hidden=c.hidden_size, layers=c.num_hidden_layers, vocab=c.vocab_size,
                inter=getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", 4 * c.hidden_size))


def estimate_bytes(method: str, n_params: int, n_trainable: int, largest_trainable: int, elsize: int,
                   shape: dict, batch: int, seq: int, exact_masters: bool) -> int:
    """A generous estimate of a step's peak memory (weights included), for the memory guard only.

    weights: n_params * elsize. Activations, no grad: a layer's transients (about 8 x [B, S, max(4h, inter)])
    plus the logits and the fp32 loss copies (3 x [B, S, vocab] x 4 B). With grad: every layer keeps about
    (16 h + 3 inter) values per token (checkpointing: h per layer, plus one layer recomputed). Backprop adds a
    gradient and two AdamW moments per trainable weight; MeZO in bf16/fp16 keeps fp32 masters (4 B per trainable
    weight, built as two fp32 copies of a tensor at a time); the reference loop holds z, scale*z and the new and
    old tensor for its largest trainable tensor. Virtual perturbation holds a transient copy of (a slice of) one
    tensor at a time (counted as two of the largest); the batched methods run the no-grad forward over 2n x batch
    rows and hold 2n perturbed copies of the adapters; low-rank directions hold r*(m + n) factors per weight, counted
    as nothing. Times 1.15: checked against the measured footprints of
    SmolLM2 and the 1B Llama shape (the bare sum came within -17 %..+60 % of them).
    """
    tok, h, L, inter, V = batch * seq, shape["hidden"], shape["layers"], shape["inter"], shape["vocab"]
    logits = tok * V * (elsize + 3 * 4)
    nograd = 8 * tok * max(4 * h, inter) * elsize + logits
    groups = {"mezo-batched": 2, "mezo-batched-n4": 8}.get(method, 1)
    virtual = nograd + 2 * largest_trainable * elsize
    extra = {
        "inference": nograd,
        "mezo-inplace-master": nograd + ((4 * n_trainable + 8 * largest_trainable) if exact_masters else 0),
        "mezo-inplace-nomaster": nograd,
        "mezo-virtual": virtual,
        "mezo-n4": virtual,
        "mezo-batched": groups * nograd + groups * n_trainable * elsize,
        "mezo-batched-n4": groups * nograd + groups * n_trainable * elsize,
        "reference": nograd + 4 * largest_trainable * elsize,
        "backprop": 3 * n_trainable * elsize + L * tok * (16 * h + 3 * inter) * elsize + 2 * logits,
        "backprop-ckpt": 3 * n_trainable * elsize + L * tok * h * elsize + nograd + 2 * logits,
    }
    extra.update(dict.fromkeys(("mezo-lowrank-r1", "mezo-lowrank-r4", "mezo-lowrank-r16"), nograd))   # no copies
    extra = extra[method]
    return int(1.15 * (n_params * elsize + extra))


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (the kernel's estimate of what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def guard(need: int, already: int = 0, reserve: int = GB) -> str | None:
    """None when ``need - already`` bytes (``already``: what this process holds now and is counted in ``need``)
    fit in MemAvailable minus a reserve; else the skip reason."""
    have = mem_available()
    if need - already > have - reserve:
        return f"skipped: needs ~{need / GB:.1f} GB, have {(have + already) / GB:.1f} GB (MemAvailable)"
    return None
