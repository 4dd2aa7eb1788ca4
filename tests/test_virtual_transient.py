"""The virtual path's transient memory (#21, item 5): a pass holds at most one copy of the largest trainable tensor,
in the weights' dtype, and through the loss (where a forward peaks) no more than the next largest module's
buffers; the arena is a mapping of its own that returns its pages to the OS when the pass ends.

The figures are ``VirtualPerturbation``'s own accounting (``reserved_bytes``: the pass's whole arena, used or not,
plus the buffers outside it), deterministic where peak RSS is not: RSS also moves with the C allocator's state.
"""
import os

import pytest
import torch

from mezo_kernels.optim import MeZO
from mezo_kernels.perturb import ParamSet
from mezo_kernels.virtual import VirtualPerturbation
from mezo_kernels.virtual.arena import arena_bytes, host_buffer, own_buffer

MIB = 2**20


def _llama(vocab=1003, hidden=64, inter=96, layers=2, seed=0):
    """A tied-embedding Llama in bf16 whose largest tensor (the [vocab, hidden] table, also the LM head) is far
    below the slicing threshold: the 63M shape of the issue in small."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():                      # HF's init leaves norms at 1: random everywhere, so z matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return model


def _aligned(n):
    return -(-n // 64) * 64


@pytest.mark.parametrize("seed", [0, 1])
def test_a_pass_holds_one_copy_of_the_largest_tensor_at_most_and_less_through_the_loss(seed):
    model = _llama(seed=seed)
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(seed))
    params = [(n, p) for n, p in model.named_parameters()]
    sizes = sorted((p.numel() * p.element_size() for _, p in params), reverse=True)
    largest, second = sizes[0], sizes[1]
    assert largest > 4 * second                          # the embedding / LM head dominates, as in the issue
    opt = MeZO(params, lr=0.0, eps=1e-2, seed=seed, perturb="virtual", model=model, rounding="stochastic")
    vp = opt.virtual
    at_loss, losses = [], []

    def closure():
        loss = model(input_ids=ids, labels=ids).loss
        at_loss.append(vp.reserved_bytes)                # the forward is done and the loss computed: the peak
        losses.append(float(loss))
        return loss
    before = [p.detach().clone() for _, p in params]
    with torch.no_grad():
        r = opt.step(closure)
    # the whole pass never held more than one copy of the largest tensor in bf16 (before: a 32 MiB arena block
    # reserved for the embedding's rows, 256x the largest tensor here)
    assert 0 < vp.peak_reserved_bytes <= _aligned(largest)
    # through the loss only the arena is left, sized by the second largest module (an MLP projection)
    assert len(at_loss) == 2 and max(at_loss) <= _aligned(second) < largest
    assert vp.reserved_bytes == 0 and vp.live_bytes == 0
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before))       # lr = 0: bit-identical
    # the LM head, materialised in a buffer of its own, gives the loss at round(theta + eps*z) bit for bit
    ps = opt.param_sets[0]
    plus = ps.perturbed_copies(r.seed, 1e-2)
    from torch.func import functional_call
    with torch.no_grad():
        want = functional_call(model, {n: t for (n, _), t in zip(params, plus)}, (),
                               {"input_ids": ids, "labels": ids}).loss   # tied: the head reads it too
    assert losses[0] == float(want)


def test_the_accounting_counts_the_arena_whole_and_resets_after_an_error():
    model = _llama(vocab=517, seed=3)
    ps = ParamSet([p for p in model.parameters()], exact_restore=False)
    vp = VirtualPerturbation(model, [ps])
    ids = torch.tensor([[1, 5, 9, 5]])

    class Boom(Exception):
        pass

    seen = []

    def watch(m, a, o):                                  # an MLP projection: its weight sits in the arena
        seen.append((vp.reserved_bytes, vp.live_bytes))
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(watch)
    h2 = model.lm_head.register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(Boom()))
    with torch.no_grad(), pytest.raises(Boom), vp.perturbed(7, 0.1):
        model(input_ids=ids)
    h.remove(); h2.remove()
    down = model.model.layers[1].mlp.down_proj.weight
    # reserved = the arena, whole (the largest module but the LM head), while one projection's weight is live
    arena = _aligned(max(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n))
    assert seen == [(arena, down.numel() * down.element_size())]
    assert vp.peak_reserved_bytes >= _aligned(model.lm_head.weight.numel() * 2)   # the head had a buffer of its own
    assert vp.reserved_bytes == 0 and vp.live_bytes == 0
    vp.reset_peak()
    assert vp.peak_reserved_bytes == 0


@pytest.mark.parametrize("needs, cap, want", [
    ([320, 192, 64], 10**6, 192),          # the one largest (an LM head) gets its own buffer
    ([192, 192, 64], 10**6, 192),          # two share the largest size: both stay in the arena
    ([5000, 320, 192], 300, 192),          # 5000 left out as the largest, 320 above the cap
    ([64], 10**6, 64),                     # a lone module keeps its arena
    ([64], 10, 0),
    ([], 10**6, 0),
])
def test_arena_size_rule(needs, cap, want):
    assert arena_bytes(needs, cap) == want


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_a_host_buffer_gives_its_pages_back_when_the_last_view_dies():
    n = 64 * MIB
    base = _rss()
    buf = host_buffer(n, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and buf.shape == (n,) and buf.data_ptr() % 4096 == 0
    assert _rss() - base < 8 * MIB                       # mapped, not yet written: not resident
    view = buf[MIB:].view(torch.bfloat16)
    view.fill_(1.5)
    assert _rss() - base > n - 10 * MIB                  # written: resident
    del buf
    assert _rss() - base > n - 10 * MIB                  # a view keeps the mapping
    assert float(view[-1]) == 1.5
    del view
    assert _rss() - base < 8 * MIB                       # the last view gone: the pages are the OS's again


def test_own_buffer_shapes_dtypes_and_bad_sizes():
    small = own_buffer((3, 5), torch.float16, torch.device("cpu"))
    big = own_buffer((1025, 257), torch.bfloat16, torch.device("cpu"))      # >= 1 MiB: a mapping of its own
    for t, shape, dt in ((small, (3, 5), torch.float16), (big, (1025, 257), torch.bfloat16)):
        assert t.shape == shape and t.dtype == dt and t.is_contiguous()
    big.copy_(torch.arange(big.numel(), dtype=torch.float32).view(big.shape).to(torch.bfloat16))
    assert float(big[-1, -1]) == float(torch.tensor(big.numel() - 1.0).to(torch.bfloat16))
    assert own_buffer((0, 4), torch.float32, torch.device("cpu")).numel() == 0
    with pytest.raises(ValueError, match="nbytes"):
        host_buffer(0, torch.device("cpu"))
