"""The Triton backend against the pure-PyTorch reference (``mezo_kernels.rng``) and the spec's known answers.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (CI); with compiled Triton on a GPU the same
tests run on CUDA tensors. TRITON_INTERPRET is read when @triton.jit decorates, i.e. when mezo_kernels.triton is
first imported, so it is set here before that import (the conftest does the same).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the Triton backend is untestable here")

from mezo_kernels import rng  # noqa: E402
from mezo_kernels.rng import bits as rng_bits
from mezo_kernels.triton import CHUNK  # noqa: E402
from mezo_kernels.triton.axpby import available, launch
from mezo_kernels.triton import philox as P  # noqa: E402


def _pick_device():
    why_cpu = available(torch.device("cpu"))
    if why_cpu is None:
        return torch.device("cpu"), None
    if torch.cuda.is_available() and available(torch.device("cuda")) is None:
        return torch.device("cuda"), None
    return None, why_cpu


DEV, _WHY = _pick_device()
pytestmark = pytest.mark.skipif(DEV is None, reason=f"triton backend unusable here: {_WHY}")

MODES = list(rng.KernelMode)
AXPBY, MASTER_UPDATE, MASTER_VIEW, FILL = (rng.KernelMode.AXPBY, rng.KernelMode.MASTER_UPDATE,
                                           rng.KernelMode.MASTER_VIEW, rng.KernelMode.FILL)
OUT, AXPBY_SR = rng.KernelMode.OUT, rng.KernelMode.AXPBY_SR
GAUSSIAN, SIGN = rng.Distribution.GAUSSIAN, rng.Distribution.SIGN
READS_D = (AXPBY, AXPBY_SR)             # the modes that read the destination
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 3, 17, 4097, 2 * CHUNK + 5)
GUARD = 67
SEED = 0x5EED_0F_2024
ALPHA, BETA, GAMMA = 0.9, 0.75, -0.5   # large enough that z visibly moves fp16/bf16 results
# 1 ulp of the dtype relative to the value (fp16: 2**-10, bf16: 2**-7); fp32: the spec's 1e-6 on z.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2**-10, atol=1e-6),
       torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ------------------------------------------------------------------------------------------- helpers
def guarded(n, dtype, values=None):
    """(buffer, view): a length-n view in the middle of a NaN-poisoned buffer; the view gets ``values`` if given."""
    buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype, device=DEV)
    view = buf[GUARD:GUARD + n]
    if values is not None:
        view.copy_(values)
    return buf, view


def guard_bits(buf):
    b = buf.view(INT_VIEW[buf.dtype])
    return torch.cat((b[:GUARD], b[-GUARD:])).clone()


def plan(tensors, bases, masters=None):
    """meta [4, T] and chunks [C, 2] as in docs/kernel_abi.md, for chunk size CHUNK."""
    masters = masters or [None] * len(tensors)
    meta = torch.tensor([[t.data_ptr() for t in tensors], [t.numel() for t in tensors], list(bases),
                         [0 if m is None else m.data_ptr() for m in masters]], dtype=torch.int64, device=DEV)
    rows = [(i, s) for i, t in enumerate(tensors) for s in range(0, t.numel(), CHUNK)]
    chunks = torch.tensor(rows, dtype=torch.int64, device=DEV).reshape(-1, 2)
    return meta, chunks


def run(tensors, bases, dtype, mode, seed=SEED, masters=None, aligned=None, dist=GAUSSIAN):
    """One launch; ``masters`` fills meta[3] (fp32 masters, or mode OUT's sources)."""
    meta, chunks = plan(tensors, bases, masters)
    if aligned is None:
        aligned = all(b % 4 == 0 for b in bases)
    launch(meta, chunks, len(tensors), chunks.shape[0], dtype, mode, seed, ALPHA, BETA, GAMMA, aligned, dist=dist)
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def z_triton(seed, base, n):
    """z[base : base + n] from the Triton randn4x test kernel (fp32, bit-exact within the backend)."""
    k0 = base // 4
    k1 = (base + n + 3) // 4
    return P.randn4x(seed, k0, k1 - k0, DEV)[base - 4 * k0:base - 4 * k0 + n]


def assert_close_dtype(out, ref, dtype):
    torch.testing.assert_close(out.double(), ref.double(), **TOL[dtype])
    if dtype != torch.float32:
        # Sharper than 1 ulp: only fp32 values within a few ulp of a rounding tie may round differently.
        # (A truncating fp32 -> bf16 conversion, which the interpreter has, would differ in ~half the elements.)
        frac = (out.float() != ref.float()).double().mean().item()
        assert frac < 0.01, f"{frac:.2%} of elements differ from the reference rounding"


# ------------------------------------------------------------------------------------------- the update
def reference(mode, dtype, init, minit, z, base, dist=GAUSSIAN):
    """(d, m) the spec gives for one tensor: ``init`` the destination's (or OUT's source's) values, ``minit`` the
    master's; ``m`` is None for the modes without a master."""
    if mode == FILL:
        return z.to(dtype), None
    if mode in (AXPBY, OUT):
        return rng.fma_update(init, z, ALPHA, BETA).to(dtype), None
    if mode == AXPBY_SR:
        return rng.stochastic_round(rng.fma_update(init, z, ALPHA, BETA), dtype, SEED, base), None
    assert mode in (MASTER_UPDATE, MASTER_VIEW), f"no reference for mode {mode.name}"
    mref = rng.fma_update(minit, z, ALPHA, BETA) if mode == MASTER_UPDATE else minit
    return rng.fma_update(mref, z, 1.0, GAMMA).to(dtype), mref


def run_guarded(mode, dtype, sizes, bases, dist, seed_gen, aligned=None):
    """Launch ``mode`` on NaN-guarded buffers; returns (outputs, row-3 buffers or None, inits, minits)."""
    gen = torch.Generator().manual_seed(seed_gen)
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    minit = [torch.randn(n, generator=gen) for n in sizes]
    # d is read only by AXPBY / AXPBY_SR; for the other modes it stays NaN poison, which must never leak.
    d = [guarded(n, dtype, init[i].to(DEV) if mode in READS_D else None) for i, n in enumerate(sizes)]
    if mode.uses_master:
        m = [guarded(n, torch.float32, minit[i].to(DEV)) for i, n in enumerate(sizes)]
    elif mode.uses_source:
        m = [guarded(n, dtype, init[i].to(DEV)) for i, n in enumerate(sizes)]
    else:
        m = None
    before = [guard_bits(b) for b, _ in d] + ([guard_bits(b) for b, _ in m] if m else [])
    run([v for _, v in d], bases, dtype, mode, masters=[v for _, v in m] if m else None, aligned=aligned, dist=dist)
    after = [guard_bits(b) for b, _ in d] + ([guard_bits(b) for b, _ in m] if m else [])
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "guard memory was written"
    if mode.uses_source:
        assert all(torch.equal(v.cpu(), x) for (_, v), x in zip(m, init)), "mode OUT wrote its source"
    return [v.cpu() for _, v in d], ([v.cpu() for _, v in m] if m else None), init, minit


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modes_multi_tensor_guarded(dtype, mode):
    """All sizes in one launch (default, aligned bases); NaN guards around every buffer must keep their bits."""
    bases = rng.default_bases(SIZES)
    outs, ms, init, minit = run_guarded(mode, dtype, SIZES, bases, GAUSSIAN, mode * 10 + DTYPES.index(dtype))
    for i, (n, base) in enumerate(zip(SIZES, bases)):
        ref, mref = reference(mode, dtype, init[i], minit[i], rng.normal(SEED, base, n), base)
        if mode == MASTER_UPDATE:
            torch.testing.assert_close(ms[i], mref, rtol=1e-6, atol=1e-6)
        elif mode == MASTER_VIEW:
            assert torch.equal(ms[i], minit[i]), "MASTER_VIEW modified the master"
        assert_close_dtype(outs[i], ref, dtype)


SMALL = (1, 3, 17, 4097)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_stream_every_mode_bit_exact(dtype, mode):
    """Signs are exact, so every mode equals the reference bit for bit: default bases (vector path and
    aligned=False), and explicit bases that straddle 128-element counters."""
    cases = [(rng.default_bases(SMALL), None), (rng.default_bases(SMALL), False), ((1, 127, 2**33 + 130, 6), None)]
    for bases, aligned in cases:
        outs, ms, init, minit = run_guarded(mode, dtype, SMALL, bases, SIGN, 100 + mode, aligned)
        for i, (n, base) in enumerate(zip(SMALL, bases)):
            ref, mref = reference(mode, dtype, init[i], minit[i], rng.signs(SEED, base, n), base, SIGN)
            assert torch.equal(outs[i].view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype])), (mode.name, base)
            if mref is not None:
                assert torch.equal(ms[i], mref), (mode.name, base)


# (x, beta): with sign directions y = x +- beta exactly, which puts y on each branch of the rounding: ties,
# just above a representable value, carries into the exponent, fp16 subnormals, |y| < 2**-24, fp32 subnormals,
# zero, Inf/NaN, past fp16's largest finite value
SR_EDGES = [(1.0, 2**-8), (1.0, 2**-11), (1.0, 2**-23), (2 - 2**-7, 2**-7 - 2**-23), (2 - 2**-10, 2**-10 - 2**-23),
            (2**-24, 2**-25), (2**-20, 2**-26), (0.0, 2**-26), (0.0, 1e-40), (0.0, 0.0), (float("inf"), 1.0),
            (float("nan"), 1.0), (65504.0, 15.0), (-1.5, 2**-12)]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # interpreter: 65536 -> fp16 inf
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_edge_values_any_base(dtype):
    n = 600
    for x, beta in SR_EDGES:
        for base in (3, 2**35 + 8):
            buf, d = guarded(n, dtype, torch.full((n,), x, dtype=dtype))
            meta, chunks = plan([d], [base])
            launch(meta, chunks, 1, chunks.shape[0], dtype, AXPBY_SR, SEED, 1.0, beta, 0.0, base % 4 == 0, dist=SIGN)
            y = rng.fma_update(torch.full((n,), x, dtype=dtype), rng.signs(SEED, base, n), 1.0, beta)
            ref = rng.stochastic_round(y, dtype, SEED, base)
            got = d.cpu()
            if x != x:   # NaN payloads are not part of the spec: NaN in, NaN out
                assert bool(got.isnan().all()) and bool(ref.isnan().all())
            else:
                assert torch.equal(got.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype])), (x, beta, base)
            g = torch.cat((buf[:GUARD], buf[-GUARD:]))
            assert bool(torch.isnan(g).all()), "guard memory was written"


@pytest.mark.parametrize("group,nbits", [(rng.SIGN_GROUP, 1), (rng.SR_GROUP, 16)])
@pytest.mark.parametrize("seed,g0", [(0, 0), (SEED, 77), (2**64 - 1, 2**40 + 125)])
def test_stream_bits_match_reference(group, nbits, seed, g0):
    got = P.bits(seed, g0, 3001, group, nbits, DEV).cpu()
    assert torch.equal(got, rng_bits.stream_bits(seed, g0, 3001, group, nbits, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_is_bit_exact_within_backend(dtype):
    """FILL equals the randn4x test kernel's z rounded by torch (RTNE): checks layout, interleave and rounding."""
    bases = rng.default_bases(SIZES)
    d = [guarded(n, dtype) for n in SIZES]
    run([v for _, v in d], bases, dtype, FILL)
    for (_, v), base, n in zip(d, bases, SIZES):
        assert torch.equal(v, z_triton(SEED, base, n).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [AXPBY, FILL], ids=lambda m: m.name)
def test_unaligned_explicit_bases(dtype, mode):
    sizes, bases = (17, 4097, CHUNK + 3, 3, 1), (1, 3, 2**33 + 2, 2**32 - 1, 6)
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    d = [guarded(n, dtype, init[i].to(DEV) if mode == AXPBY else None) for i, n in enumerate(sizes)]
    before = [guard_bits(b) for b, _ in d]
    run([v for _, v in d], bases, dtype, mode)
    assert all(torch.equal(x, guard_bits(b)) for x, (b, _) in zip(before, d)), "guard memory was written"
    for i, (n, base) in enumerate(zip(sizes, bases)):
        z = rng.normal(SEED, base, n)
        ref = z if mode == FILL else rng.fma_update(init[i], z, ALPHA, BETA)
        assert_close_dtype(d[i][1].cpu(), ref.to(dtype), dtype)
        if mode == FILL:  # the per-element path gives the same bits as the counter path
            assert torch.equal(d[i][1], z_triton(SEED, base, n).to(dtype))


def test_aligned_and_per_element_paths_agree():
    """With aligned bases the kernel compiled for an ALIGNED group and the one for any base must give the same bits."""
    bases = rng.default_bases(SIZES)
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen).to(DEV) for n in SIZES]
    outs = []
    for aligned in (True, False):
        ts = [x.clone() for x in init]
        run(ts, bases, torch.float32, AXPBY, aligned=aligned)
        outs.append(ts)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# A mixed group: bases that are multiples of 4 (A, D) and not (B: o = 1, C: o = 3). B's and C's last chunks have
# elements past their shifted windows (the per-element tail); every buffer is 16-byte aligned.
MIXED = ((2 * CHUNK, 0), (2 * CHUNK, 2 * CHUNK + 1), (CHUNK - 1, 4 * CHUNK + 3), (CHUNK, 6 * CHUNK))


@pytest.mark.skipif(DEV.type != "cpu", reason="counts the interpreter's calls of the kernel's device functions")
@pytest.mark.parametrize("dtype,mode", [(torch.float32, FILL), (torch.bfloat16, FILL), (torch.bfloat16, AXPBY_SR),
                                        (torch.float16, MASTER_UPDATE)], ids=lambda v: getattr(v, "name", str(v)))
def test_mixed_group_keeps_vector_path_for_aligned_tensors(monkeypatch, dtype, mode):
    """One launch for the group (aligned=False): the tensors whose base is a multiple of 4 still take the unmasked
    vector update for each full chunk, the others the masked one, and every element gets the spec's bits."""
    from mezo_kernels.triton import axpby
    calls = []
    original = axpby._update

    def recording(*args):
        calls.append(bool(args[10]))   # MASKED
        return original(*args)
    monkeypatch.setattr(axpby, "_update", recording)
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(n, generator=gen).to(dtype) for n, _ in MIXED]
    minit = [torch.randn(n, generator=gen) for n, _ in MIXED]
    d = [x.clone() for x in init]
    m = [x.clone() for x in minit] if mode.uses_master else None
    assert all(t.data_ptr() % 16 == 0 for t in d + (m or []))
    run(d, [b for _, b in MIXED], dtype, mode, masters=m, aligned=False)
    full_aligned = sum(n // CHUNK for n, b in MIXED if b % 4 == 0)
    masked = sum(-(-n // CHUNK) + (n % CHUNK == 0 or n % CHUNK > CHUNK - b % 4) for n, b in MIXED if b % 4)
    assert calls.count(False) == full_aligned and calls.count(True) == masked, calls
    for i, (n, base) in enumerate(MIXED):
        z = z_triton(SEED, base, n)
        if mode == FILL:
            ref = z.to(dtype)
        elif mode == AXPBY_SR:
            ref = rng.stochastic_round(rng.fma_update(init[i], z, ALPHA, BETA), dtype, SEED, base)
        else:
            mref = rng.fma_update(minit[i], z, ALPHA, BETA)
            torch.testing.assert_close(m[i], mref, rtol=1e-6, atol=1e-6)
            ref = rng.fma_update(m[i], z, 1.0, GAMMA).to(dtype)
        assert torch.equal(d[i].view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype])), (mode.name, base)


def test_shards_reproduce_unsharded():
    n, base = 2 * CHUNK + 5, 8
    full = torch.full((n,), float("nan"), device=DEV)
    run([full], [base], torch.float32, FILL)
    cuts = (0, 1001, 5002, n)          # shard bases 8, 1009, 5010: not multiples of 4
    shards = [torch.full((b - a,), float("nan"), device=DEV) for a, b in zip(cuts, cuts[1:])]
    run(shards, [base + a for a in cuts[:-1]], torch.float32, FILL)
    assert torch.equal(torch.cat(shards), full)


def test_new_seed_changes_z_and_same_seed_repeats():
    a, b, c = (torch.zeros(33, device=DEV) for _ in range(3))
    run([a], [0], torch.float32, FILL, seed=2**64 - 1)
    run([b], [0], torch.float32, FILL, seed=2**64 - 1)
    run([c], [0], torch.float32, FILL, seed=2**64 - 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------- API surface
def test_available_and_validation():
    assert available(DEV) is None
    assert isinstance(available(torch.device("meta")), str)
    t = torch.zeros(5, device=DEV)
    meta, chunks = plan([t], [0])
    with pytest.raises(ValueError, match="mode"):
        launch(meta, chunks, 1, 1, torch.float32, len(MODES), 0, 1.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="mode"):
        launch(meta, chunks, 1, 1, torch.float32, True, 0, 1.0, 0.0, 0.0, True)
    with pytest.raises(TypeError, match="dtype"):
        launch(meta, chunks, 1, 1, torch.float64, 0, 0, 1.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="dist"):
        launch(meta, chunks, 1, 1, torch.float32, 0, 0, 1.0, 0.0, 0.0, True, dist=len(rng.Distribution))
    with pytest.raises(ValueError, match="meta"):
        launch(meta[:, :0], chunks, 1, 1, torch.float32, 0, 0, 1.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="chunks"):
        launch(meta, chunks[:, :1], 1, 1, torch.float32, 0, 0, 1.0, 0.0, 0.0, True)
    launch(meta, chunks[:0], 1, 0, torch.float32, 0, 0, 1.0, 0.0, 0.0, True)  # nothing to do is fine
    assert CHUNK % 4 == 0 and CHUNK & (CHUNK - 1) == 0
