"""Forward engine: cascade attention vs the matmul-softmax reference, the prefix planner, equality of every reuse
path with the plain forward, and that a cached result can never outlive a weight change."""
import random

import pytest
import torch

from mezo_kernels import models
from mezo_kernels.forward.engine import ForwardEngine
from mezo_kernels.forward.attention import attend, merge
from mezo_kernels.forward.plan import plan_prefixes
from mezo_kernels._compat import sdpa_kernels_used
from mezo_kernels.forward.attention import reference

ATOL_F32 = 3e-5          # logits of the tiny models are O(1); split softmax changes the summation order only


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("L", [1, 3, 17])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa"])
def test_attend_causal_matches_reference(L, heads):
    H, hkv = heads
    g = torch.Generator().manual_seed(L * 7 + H)
    q, k, v = (torch.randn(2, h, L, 16, generator=g, dtype=torch.float64) for h in (H, hkv, hkv))
    out, lse = attend(q, k, v, causal=True, scale=0.25)
    ref, ref_lse = reference(q, k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1), True, None, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=1e-6)   # lse comes back as float32


@pytest.mark.parametrize("S", [1, 17, 40])
def test_split_keys_merge_to_full_attention(S):
    """Attention over [prefix keys | suffix keys] = merge(prefix part, causal suffix part), GQA folded."""
    g = torch.Generator().manual_seed(S)
    H, hkv, L, D = 6, 2, 5, 8
    q = torch.randn(3, H, L, D, generator=g, dtype=torch.float64)
    kp, vp = (torch.randn(3, hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (torch.randn(3, hkv, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    o1, l1 = attend(q, kp, vp, causal=False, scale=D ** -0.5)
    o2, l2 = attend(q, ks, vs, causal=True, scale=D ** -0.5)
    k_all = torch.cat([kp, ks], 2).repeat_interleave(H // hkv, 1)
    v_all = torch.cat([vp, vs], 2).repeat_interleave(H // hkv, 1)
    mask = torch.zeros(L, S + L, dtype=torch.float64)
    mask[:, S:] = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    ref, _ = reference(q, k_all, v_all, False, mask, D ** -0.5)
    torch.testing.assert_close(merge(o1, l1, o2, l2)[0], ref, atol=1e-6, rtol=1e-6)


def test_attend_key_len_masks_padding_keys():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 4, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    k[0, :, 5:], v[0, :, 5:] = 1e4, 1e9     # poison the padding keys of entry 0 (finite: 0 * nan is nan)
    out, _ = attend(q, k, v, causal=False, scale=0.3, key_len=torch.tensor([5, 9]))
    ref0, _ = reference(q[:1], k[:1, :, :5], v[:1, :, :5], False, None, 0.3)
    ref1, _ = reference(q[1:], k[1:], v[1:], False, None, 0.3)
    torch.testing.assert_close(out, torch.cat([ref0, ref1]), atol=1e-5, rtol=1e-5)


def test_attend_rejects_bad_shapes():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        attend(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), causal=True, scale=1.0)
    with pytest.raises(ValueError, match="square"):
        attend(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), causal=True, scale=1.0)


# ------------------------------------------------------------------------------------------------ planner
def _saving(plan, rows):
    """Token-layer work a plan saves: every row's covered prefix minus the segment tokens run once."""
    return sum(plan.plen) - sum(len(s.tokens) for s in plan.segments)


def _check_plan(plan, rows, limits):
    for r, row in enumerate(rows):
        assert plan.plen[r] <= limits[r]
        if plan.owner[r] >= 0:
            seg = plan.segments[plan.owner[r]]
            assert tuple(row[:plan.plen[r]]) == seg.path and seg.start + len(seg.tokens) == plan.plen[r]
            chain = plan.chain(plan.owner[r])
            assert [plan.segments[s].level for s in chain] == list(range(len(chain)))
        else:
            assert plan.plen[r] == 0


def test_plan_nests_template_and_example_prompts():
    template = list(range(100, 110))                        # 10 tokens shared by all 6 rows
    rows = [template + [200 + e] * 6 + [300 + c] for e in range(3) for c in range(2)]
    plan = plan_prefixes(rows, min_prefix=4)
    # level 0: the template once (saves 5 x 10); level 1: each example's 6 tokens once (saves 3 x 6)
    assert [s.level for s in plan.segments] == [0, 1, 1, 1] and plan.plen == [16] * 6
    assert _saving(plan, rows) == 50 + 18
    _check_plan(plan, rows, [16] * 6)
    flat = plan_prefixes(rows, min_prefix=4, max_levels=1)
    assert [len(s.tokens) for s in flat.segments] == [10] and _saving(flat, rows) == 50


def test_plan_respects_limits_and_min_prefix():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [9, 9, 9]]
    plan = plan_prefixes(rows, limits=[3, 6, 2], min_prefix=2)
    assert plan.plen == [3, 3, 0]
    assert plan_prefixes(rows, min_prefix=6).segments == []
    assert plan_prefixes([[1, 2, 3]] * 3, min_prefix=1).plen == [2, 2, 2]   # a row keeps >= 1 own token


def _brute_force(rows, min_prefix, max_levels):
    """Best saving over every assignment of nested segments (small cases): segments are trie nodes; a row's
    segments are the chosen nodes on its path."""
    nodes = sorted({tuple(r[:n]) for r in rows for n in range(1, len(r))})
    best = 0
    for mask in range(1 << len(nodes)):
        chosen = [nodes[i] for i in range(len(nodes)) if mask >> i & 1]
        saving, ok = 0, True
        for node in chosen:
            below = [r for r in rows if len(r) > len(node) and tuple(r[:len(node)]) == node]
            above = max((len(a) for a in chosen if len(a) < len(node) and node[:len(a)] == a), default=0)
            depth = sum(1 for a in chosen if len(a) < len(node) and node[:len(a)] == a)
            if len(below) < 2 or len(node) - above < min_prefix or depth >= max_levels:
                ok = False
                break
            saving += (len(below) - 1) * (len(node) - above)
        if ok:
            best = max(best, saving)
    return best


@pytest.mark.parametrize("max_levels", [1, 2, 3])
def test_plan_is_optimal_on_random_tries(max_levels):
    """The DP's saving equals the best over every set of nested segments (brute force on small cases)."""
    rnd = random.Random(max_levels)
    for _ in range(25):
        rows = [[rnd.choice([1, 2]) for _ in range(rnd.randint(2, 5))] for _ in range(rnd.randint(2, 5))]
        plan = plan_prefixes(rows, min_prefix=1, max_levels=max_levels)
        _check_plan(plan, rows, [len(r) - 1 for r in rows])
        assert _saving(plan, rows) == _brute_force(rows, 1, max_levels), rows


# ------------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def tiny():
    model, tok, _ = models.load_model("tiny-llama", seed=3)
    model = models.add_lora(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    return model


def _batch(rows, left=False):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def _requests(rows, mask, last=3):
    rr, cc = [], []
    for i, r in enumerate(rows):
        start = int(mask[i].int().argmax())
        for c in range(max(0, len(r) - last), len(r)):
            rr.append(i), cc.append(start + c)
    return torch.tensor(rr), torch.tensor(cc)


def _rows(seed, n=9, shared=12, vocab=500):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(10, vocab, (shared,), generator=g).tolist()
    rows = [pre + torch.randint(10, vocab, (int(torch.randint(1, 20, (), generator=g)),), generator=g).tolist()
            for _ in range(n - 2)]
    rows.append(rows[0][:shared + 3] + [11, 12])                        # a second-level share
    rows.append(torch.randint(10, vocab, (5,), generator=g).tolist())   # shares nothing
    return rows


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("seed", [0, 1])
def test_engine_equals_plain_forward(tiny, left, seed):
    rows = _rows(seed)
    ids, mask = _batch(rows, left)
    rr, cc = _requests(rows, mask)
    with torch.no_grad():
        ref = ForwardEngine.plain().logits_at(tiny, *_batch(rows), *_requests(rows, _batch(rows)[1]))
        eng = ForwardEngine(eval_cache=False)
        out = eng.logits_at(tiny, ids, mask, rr, cc)
    assert eng.stats.saved_fraction > 0.2 and eng.stats.fallback is None
    torch.testing.assert_close(out, ref, atol=ATOL_F32, rtol=1e-5)


def test_engine_float64_is_tight():
    model, _, _ = models.load_model("tiny-llama", seed=4, dtype=torch.float64)
    rows = _rows(7)
    ids, mask = _batch(rows)
    rr, cc = _requests(rows, mask, last=5)
    with torch.no_grad():
        ref = ForwardEngine.plain().logits_at(model, ids, mask, rr, cc)
        out = ForwardEngine().logits_at(model, ids, mask, rr, cc)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_engine_nested_template_prompts_candidates(tiny, left):
    """A template shared by all rows, each example's prompt shared by its 3 candidates (2 levels of segments),
    identical rows, and a row that shares nothing: logits equal the plain forward's."""
    g = torch.Generator().manual_seed(9)
    template = torch.randint(10, 500, (12,), generator=g).tolist()
    rows = []
    for e in range(4):
        prompt = template + torch.randint(10, 500, (8 + e,), generator=g).tolist()
        rows += [prompt + [50 + c, 60 + c] for c in range(3)]
    rows += [rows[0][:-1] + [99]] * 2 + [[7, 8, 9]]
    ids, mask = _batch(rows, left)
    rr, cc = _requests(rows, mask, last=3)
    with torch.no_grad():
        ref = ForwardEngine.plain().logits_at(tiny, *_batch(rows), *_requests(rows, _batch(rows)[1], last=3))
        eng = ForwardEngine(eval_cache=False)
        out = eng.logits_at(tiny, ids, mask, rr, cc)
    assert eng.stats.prefix_cache_lookups >= 5            # the template + one segment per example (+ nested)
    torch.testing.assert_close(out, ref, atol=ATOL_F32, rtol=1e-5)


def test_engine_bad_input(tiny):
    ids, mask = _batch([[5, 6, 7], [5, 6]])
    eng = ForwardEngine()
    with pytest.raises(ValueError, match="padding column"):
        eng.logits_at(tiny, ids, mask, torch.tensor([1]), torch.tensor([2]))
    holey = mask.clone()
    holey[0, 1] = 0
    with pytest.raises(ValueError, match="contiguous"):
        eng.logits_at(tiny, ids, holey, torch.tensor([0]), torch.tensor([0]))


# the fused SDPA kernels of each device (aten op names); the math fallback is none of them
_FUSED_SDPA = {"cpu": {"aten._scaled_dot_product_flash_attention_for_cpu.default"},
               "cuda": {"aten._scaled_dot_product_flash_attention.default",
                        "aten._scaled_dot_product_efficient_attention.default",
                        "aten._scaled_dot_product_cudnn_attention.default"}}


def _expected_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """What the reuse forward should run: CPU flash for every dtype; on CUDA FlashAttention for fp16/bf16 and the
    memory-efficient kernel for fp32 (FlashAttention has no fp32)."""
    if device.type == "cpu":
        return "cpu-flash"
    return "cuda-flash" if dtype in (torch.float16, torch.bfloat16) else "cuda-efficient"


def test_reports_the_attention_kernel(tiny):
    rows = _rows(2)
    ids, mask = _batch(rows)
    plain, reuse = ForwardEngine.plain(), ForwardEngine()
    with torch.no_grad():
        plain.logits_at(tiny, ids, mask, *_requests(rows, mask))
        reuse.logits_at(tiny, ids, mask, *_requests(rows, mask))
    p = next(tiny.parameters())
    assert plain.stats.kernels and plain.stats.kernels <= _FUSED_SDPA[p.device.type]
    assert reuse.stats.kernels == {_expected_kernel(p.device, p.dtype)}
    assert reuse.stats.attention_fallback is None and reuse.stats.as_dict()["attention_fallback"] is None
    _, seen = sdpa_kernels_used(lambda: tiny(input_ids=ids, attention_mask=mask))
    assert seen and set(seen) <= _FUSED_SDPA[p.device.type]


def test_attention_fallback_is_warned_and_reported(tiny, monkeypatch):
    """A kernel that refuses its input (as the CUDA memory-efficient one does for some alignments) is replaced
    by the reference: the result is the same, a RuntimeWarning says so once, and the stats name the kernel that
    ran and why. Simulated on any device by steering the kernel choice to one that refuses."""
    from mezo_kernels import _compat
    from mezo_kernels.forward import attention

    def refuse(kernel, *args, **kwargs):
        raise RuntimeError("kernel refused: misaligned bias")

    monkeypatch.setattr(attention, "kernel_for", lambda device, dtype: "cuda-efficient")
    monkeypatch.setattr(_compat, "attention_with_lse", refuse)
    monkeypatch.setattr(attention, "_warned", set())
    rows = _rows(2)
    ids, mask = _batch(rows)
    eng = ForwardEngine()
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="cuda-efficient refused") as caught:
            got = eng.logits_at(tiny, ids, mask, *_requests(rows, mask))
        ref = ForwardEngine.plain().logits_at(tiny, ids, mask, *_requests(rows, mask))
    assert sum("fell back" in str(w.message) for w in caught) == 1       # once, though every layer fell back
    assert eng.stats.kernels == {"math"}
    assert "misaligned bias" in eng.stats.as_dict()["attention_fallback"]
    torch.testing.assert_close(got, ref, atol=ATOL_F32, rtol=1e-5)


def test_attention_version_break_is_not_swallowed(monkeypatch):
    """A result of the wrong shape from aten (an upgrade changed it) raises, even where refusals fall back."""
    from mezo_kernels import _compat
    from mezo_kernels.forward import attention

    def changed(kernel, q, k, v, **kwargs):
        raise _compat.CompatError("cuda-efficient: returned [(1,)]")

    monkeypatch.setattr(attention, "kernel_for", lambda device, dtype: "cuda-efficient")
    monkeypatch.setattr(_compat, "attention_with_lse", changed)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(_compat.CompatError, match="returned"):
        attend(q, q, q, causal=True, scale=0.3)


def test_unsupported_model_falls_back_to_plain():
    model, _, _ = models.load_model("tiny-opt", seed=0)
    ids, mask = _batch([[5, 6, 7, 8], [5, 6, 7, 9]])
    eng = ForwardEngine()
    with torch.no_grad():
        out = eng.logits_at(model, ids, mask, torch.tensor([0, 1]), torch.tensor([3, 3]))
        ref = model(input_ids=ids, attention_mask=mask).logits[[0, 1], [3, 3]]
    assert "opt" in eng.stats.fallback
    torch.testing.assert_close(out, ref)
