"""Contract tests of ``mezo_kernels._compat``: each checks the behaviour of torch, transformers, peft, gguf or
Triton that the package relies on, so an upgrade that changes it fails here, by name, rather than elsewhere in
silence."""
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F

from mezo_kernels import _compat, models


def _reference(q, k, v, causal, bias, scale):
    """Matmul-softmax attention and its lse in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v.double(), s.logsumexp(-1)


# ---------------------------------------------------------------------------------------------- versions
def test_param_version_sees_every_kind_of_write():
    p = torch.nn.Parameter(torch.zeros(4))
    v0 = _compat.param_version([p])
    assert _compat.param_version([p]) == v0 and float(p.detach().sum()) == 0.0   # reading changes nothing
    with torch.no_grad():
        p.add_(1.0)
    v1 = _compat.param_version([p])
    assert v1 != v0
    p.data = p.data + 1.0                                                    # storage replaced
    v2 = _compat.param_version([p])
    assert v2 != v1
    _compat.bump_version([p])                                                # a raw-pointer kernel's write
    assert _compat.param_version([p]) != v2


def test_swap_parameter_shows_a_plain_tensor_and_keeps_names_and_hooks():
    lin = torch.nn.Linear(3, 2)
    theta, buf = lin.weight, torch.ones(2, 3)
    names = [n for n, _ in lin.named_parameters()]
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append(m.weight))
    assert _compat.swap_parameter(lin, "weight", buf) is theta
    out = lin(torch.ones(1, 3))                       # the forward reads the swapped-in tensor
    assert seen[-1] is buf and torch.allclose(out, torch.full((1, 2), 3.0) + lin.bias)
    assert [n for n, _ in lin.named_parameters()] == names and list(lin.state_dict()) == names
    assert _compat.swap_parameter(lin, "weight", theta) is buf and lin.weight is theta
    with pytest.raises(KeyError, match="no parameter 'scale'"):
        _compat.swap_parameter(lin, "scale", buf)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_flash_returns_out_and_lse(causal, dtype):
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 3, 5, 8
    S = L if causal else 11
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, S, D, generator=g, dtype=dtype) for _ in range(2))
    bias = None if causal else torch.zeros(B, 1, 1, S, dtype=dtype).masked_fill_(torch.arange(S) >= 7, -torch.inf)
    out, lse = _compat.attention_with_lse("cpu-flash", q, k, v, causal=causal, scale=0.3, bias=bias)
    ref, ref_lse = _reference(q, k, v, causal, bias, 0.3)
    assert out.dtype == dtype and out.shape == (B, H, L, D) and lse.shape == (B, H, L)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_attention_with_lse_rejects_unknown_kernels_and_flash_bias():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention kernel 'math'"):
        _compat.attention_with_lse("math", q, q, q, causal=True, scale=1.0)
    with pytest.raises(ValueError, match="no bias"):
        _compat.attention_with_lse("cuda-flash", q, q, q, causal=False, scale=1.0, bias=torch.zeros(1, 1, 2, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,dtype,masked", [("cuda-flash", torch.float16, False),
                                                 ("cuda-flash", torch.bfloat16, False),
                                                 ("cuda-efficient", torch.float32, False),
                                                 ("cuda-efficient", torch.float32, True),
                                                 ("cuda-efficient", torch.float16, True)])
def test_cuda_kernels_return_out_and_lse(kernel, dtype, masked):
    g = torch.Generator(device="cuda").manual_seed(5)
    B, H, L, S, D = 2, 4, 37, 64, 64           # L not a multiple of 32: the efficient kernel pads its lse
    causal = not masked
    S = L if causal else S
    q = torch.randn(B, H, L, D, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    bias = None
    if masked:
        bias = torch.zeros(B, 1, 1, S, device="cuda", dtype=dtype).masked_fill_(
            torch.arange(S, device="cuda") >= 40, -torch.inf).expand(B, H, L, S)
    out, lse = _compat.attention_with_lse(kernel, q, k, v, causal=causal, scale=D ** -0.5, bias=bias)
    ref, ref_lse = _reference(q, k, v, causal, bias, D ** -0.5)
    assert out.dtype == dtype and out.shape == (B, H, L, D) and lse.shape == (B, H, L)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_sdpa_recorder_names_the_kernel_that_ran():
    q = torch.randn(1, 2, 4, 8)
    out, seen = _compat.sdpa_kernels_used(F.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert seen == ["aten._scaled_dot_product_flash_attention_for_cpu.default"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
    _, none = _compat.sdpa_kernels_used(torch.add, q, q)
    assert none == []


# ---------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_kwargs_sets_the_weights_dtype(dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    kw = _compat.dtype_kwargs(dtype)
    assert list(kw) == ["dtype"]                 # the tested transformers (>= 5) all take dtype=
    model = AutoModelForCausalLM.from_config(cfg, **kw)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_lm_class_names():
    causal, masked = _compat.lm_class_names("causal"), _compat.lm_class_names("masked")
    assert causal["llama"] == "LlamaForCausalLM" and causal["opt"] == "OPTForCausalLM"
    assert masked["bert"] == "BertForMaskedLM" and masked["roberta"] == "RobertaForMaskedLM"
    assert "bert" not in causal or causal["bert"] != masked["bert"]
    assert all(isinstance(c, str) for c in (*causal.values(), *masked.values()))
    with pytest.raises(ValueError, match="'causal' or 'masked'"):
        _compat.lm_class_names("seq2seq")


def test_apply_rope_is_rotate_half():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)

    def rot(x):
        return torch.cat((-x[..., 4:], x[..., :4]), -1)

    qr, kr = _compat.apply_rope(q, k, cos, sin)
    torch.testing.assert_close(qr, q * cos[:, None] + rot(q) * sin[:, None])
    torch.testing.assert_close(kr, k * cos[:, None] + rot(k) * sin[:, None])


def test_llama_parts_in_order_equal_the_decoder_layer():
    """The parts, called in :class:`LlamaLayerParts`' order, compute what ``LlamaDecoderLayer`` computes."""
    lm, _, _ = models.load_model("tiny-llama", seed=1, dtype=torch.float64)
    assert _compat.llama_missing(lm) == []
    parts = _compat.llama_parts(lm)
    assert len(parts.layers) == len(parts.parts) == lm.config.num_hidden_layers
    assert parts.embed_tokens is lm.model.embed_tokens and parts.lm_head is lm.lm_head
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    h = parts.embed_tokens(ids)
    cos, sin = parts.rope(h, torch.arange(ids.shape[1])[None])
    assert cos.shape == sin.shape == (1, ids.shape[1], parts.parts[0].head_dim)
    for layer, p in zip(parts.layers, parts.parts):
        with torch.no_grad():
            want = layer(h, position_embeddings=(cos, sin))
            want = want[0] if isinstance(want, tuple) else want
            B, T, _ = h.shape
            x = p.input_norm(h)
            q, k, v = (proj(x).view(B, T, -1, p.head_dim).transpose(1, 2) for proj in (p.q_proj, p.k_proj, p.v_proj))
            q, k = _compat.apply_rope(q, k, cos, sin)
            rep = q.shape[1] // k.shape[1]
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               is_causal=True, scale=p.scaling)
            got = p.finish(h, o.transpose(1, 2).reshape(B, T, -1))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        h = want


def test_llama_parts_names_what_is_missing():
    lm, _, _ = models.load_model("tiny-llama", seed=1)
    del lm.model.layers[1].mlp
    assert _compat.llama_missing(lm) == ["model.layers[1].mlp"]
    with pytest.raises(ValueError, match=r"missing model\.layers\[1\]\.mlp"):
        _compat.llama_parts(lm)
    opt, _, _ = models.load_model("tiny-opt", seed=1)
    assert "model.rotary_emb" in _compat.llama_missing(opt)


# ---------------------------------------------------------------------------------------------- gguf
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_gguf_parse_once_memoizes_and_restores(tmp_path):
    import gguf
    import numpy as np
    import transformers.modeling_gguf_pytorch_utils as loader

    # the patch works only while transformers looks the names up in the gguf module when it calls them
    source = inspect.getsource(loader)
    for name in ("GGUFReader", "get_tensor_name_map"):
        assert name in source and not hasattr(loader, name)
    path = str(tmp_path / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    orig = gguf.GGUFReader, gguf.get_tensor_name_map
    with _compat.gguf_parse_once():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(path)
        assert a is b and [t.name for t in a.tensors] == ["w"]
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == orig
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


# ---------------------------------------------------------------------------------------------- prefix tuning
def test_peft_prefix_is_what_peft_feeds_the_cache():
    """peft's prefix tuning: the encoder on its tokens gives [1, P, layers*2*heads*head_dim] in the layout
    ``get_prompt`` reshapes into per-layer keys/values; None when disabled or for another adapter kind."""
    pytest.importorskip("peft")
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    m, _, _ = models.load_model("tiny-llama")
    assert _compat.peft_prefix(m) is None
    pm = get_peft_model(m, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    pp = _compat.peft_prefix(pm)
    assert (pp.layers, pp.heads, pp.head_dim) == (2, 2, 16) and pp.weight is pm.prompt_encoder.default.embedding.weight
    flat = pp.encoder(pp.tokens)
    assert torch.equal(flat[0], pp.weight)
    cache = pm.get_prompt(1)
    x = flat.view(1, 3, 4, 2, 16).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        own = _compat.output_cache(m(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=True))
    assert _compat.cache_kv(own, 1)[0].shape == (1, 2, 4, 16)
    for i in range(2):
        k, v = _compat.cache_kv(cache, i)
        assert torch.equal(k, x[2 * i]) and torch.equal(v, x[2 * i + 1])
    with pm.disable_adapter():
        assert _compat.peft_prefix(pm) is None
    lora = models.add_lora(models.load_model("tiny-llama")[0])
    assert _compat.peft_prefix(lora) is None


def test_attention_cache_kwarg_is_used_through_update():
    """A masked LM's self-attention takes a cache under this keyword and attends with what ``update`` returns."""
    m, _, _ = models.load_model("tiny-roberta")
    att = m.roberta.encoder.layer[0].attention.self
    name = _compat.attention_cache_kwarg(att)
    seen = []

    class Spy:
        def update(self, k, v, *a, **kw):
            seen.append(k.shape)
            return k, v

    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        plain = att(h)[0]
        spied = att(h, **{name: Spy()})[0]
    assert seen == [torch.Size([2, 4, 5, 16])] and torch.equal(plain, spied)
    with pytest.raises(_compat.CompatError, match="no KV cache argument"):
        _compat.attention_cache_kwarg(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_triton_interpreting_follows_the_env_at_decoration(monkeypatch, interpret):
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", interpret)

    @triton.jit
    def _noop_kernel(x):
        pass

    assert _compat.triton_interpreting(_noop_kernel) is (interpret == "1")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_specialize_types_and_keys():
    """The ahead-of-time compile tests build kernel signatures from this: ints specialize on 1 and 16-divisibility
    unless told not to, 64-bit ints are i64, and a pointer-like tensor is typed by its dtype."""
    assert _compat.triton_specialize(7, True, True)[0] == "i32"
    assert _compat.triton_specialize(2**40, True, True)[0] == "i64"
    assert _compat.triton_specialize(1, True, True)[0] == "constexpr"       # value 1 is folded in
    assert _compat.triton_specialize(1, False, True)[0] == "i32"            # unless do_not_specialize
    ty16, key16 = _compat.triton_specialize(32, True, True)
    ty7, key7 = _compat.triton_specialize(7, True, True)
    assert ty16 == ty7 == "i32" and key16 != key7                           # divisible by 16 vs not
    t = torch.zeros(8, dtype=torch.bfloat16)
    assert _compat.triton_specialize(t, True, True)[0] == "*bf16"
