"""The native extensions themselves: CUDA sources compile, Philox known answers, randn4x accuracy, bit-exact
fp16/bf16 rounding, and argument validation. Reference: docs/rng_spec.md and mezo_kernels/rng/."""
import glob
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mezo_kernels import rng

M, D = rng.KernelMode, rng.DTypeCode
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME")
    if not found and home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        found = os.path.join(home, "bin", "nvcc")
    return found


@pytest.fixture(scope="module")
def C():
    return pytest.importorskip("mezo_kernels._C", reason="CPU extension not built (MEZO_SKIP_EXT=1?)")


# ------------------------------------------------------------------------------------- CUDA compiles (no GPU)
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found on PATH or in $CUDA_HOME/bin")
@pytest.mark.parametrize("src", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cuda_sources_compile_for_sm90(src, tmp_path):
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", "-gencode=arch=compute_90,code=sm_90", "-Werror", "all-warnings",
           "-I", os.path.join(ROOT, "csrc"), "-o", str(tmp_path / "k.o"), src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0


# ------------------------------------------------------------------------------------- known answers
KAT_BLOCKS = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KAT_STREAM = [  # seed, k, words, z[4k]
    (0, 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), 0.0465515),
    (0, 1, (0xF8E4CCA4, 0x5CB200DB, 0xB1A574EB, 0x097EFF67), -0.3883614),
    (0, 2, (0x04FAA329, 0x51C732A6, 0x241513AD, 0x459135E4), -1.6379520),
    (0, 3, (0xC990EF29, 0x6A4474A6, 0x9AC9134F, 0x6D413E04), 0.6315316),
    (42, 0, (0x9CEAF053, 0x77F5493B, 0x12BF50AD, 0x5742B3D7), 0.6606134),
    (42, 1, (0xFCDB2127, 0x53BA6CFD, 0x838F5A6E, 0x744E06FB), -1.5427135),
]


@pytest.mark.parametrize("key,ctr,words", KAT_BLOCKS)
def test_philox_block_known_answers(C, key, ctr, words):
    assert tuple(C.philox4x32_10(*key, *ctr)) == words


@pytest.mark.parametrize("seed,k,words,z0", KAT_STREAM)
def test_philox_words_and_z_known_answers(C, seed, k, words, z0):
    w = torch.empty(4, dtype=torch.int32)
    C.philox_words(seed, k, 1, w.data_ptr())
    assert tuple(int(x) & 0xFFFFFFFF for x in w) == words
    z = torch.empty(4, dtype=torch.float32)
    C.randn4x(seed, k, 1, z.data_ptr())
    assert abs(z[0].item() - z0) <= 1e-6 + 1e-6 * abs(z0)


def _words(C, seed, k, n):
    w = torch.empty(4 * n, dtype=torch.int32)
    C.philox_words(seed, k, n, w.data_ptr())
    return w.long() & 0xFFFFFFFF


@pytest.mark.parametrize("seed", [0, 42, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("k", [0, 2**32 - 37, 2**40 + 3])
def test_philox_words_match_reference(C, seed, k):
    n = 1000  # crosses the 2**32 boundary of the low counter word for k = 2**32 - 37
    ref = rng.philox_words(seed, torch.arange(k, k + n, dtype=torch.int64)).reshape(-1)
    assert torch.equal(_words(C, seed, k, n), ref)


def test_negative_seed_is_twos_complement(C):
    assert torch.equal(_words(C, -1, 5, 8), _words(C, 2**64 - 1, 5, 8))


# ------------------------------------------------------------------------------------- normals
@pytest.mark.parametrize("seed", [0, 42, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("k", [0, 2**32 - 50_000, 2**40 + 1])
def test_randn4x_vs_float64_reference(C, seed, k):
    n = 84_000  # x 12 cases: ~10**6 counters, 4 * 10**6 normals
    z = torch.empty(4 * n, dtype=torch.float32)
    C.randn4x(seed, k, n, z.data_ptr())
    ref = rng.normal_f64(seed, 4 * k, 4 * n)
    torch.testing.assert_close(z.double(), ref, rtol=1e-6, atol=1e-6)


def test_randn4x_partial_block_and_wrap(C):
    """n not a multiple of the SIMD block; counters wrapping past 2**64 - 1 to 0."""
    full = torch.empty(4 * 64, dtype=torch.float32)
    C.randn4x(9, 2**64 - 32, 64, full.data_ptr())
    part = torch.full((4 * 7 + 1,), float("nan"))
    C.randn4x(9, 2**64 - 32 + 3, 7, part.data_ptr())
    assert torch.equal(part[:-1], full[12:40]) and torch.isnan(part[-1])
    zero = torch.empty(4, dtype=torch.float32)
    C.randn4x(9, 0, 1, zero.data_ptr())
    assert torch.equal(full[128:132], zero)


def _plan(C, tensors, bases, masters=None):
    T, ch = len(tensors), C.chunk_size()
    meta = torch.zeros(4, T, dtype=torch.int64)
    for i, t in enumerate(tensors):
        meta[:, i] = torch.tensor([t.data_ptr(), t.numel(), bases[i], masters[i].data_ptr() if masters else 0])
    chunks = torch.tensor([(i, s) for i, t in enumerate(tensors) for s in range(0, t.numel(), ch)],
                          dtype=torch.int64).reshape(-1, 2)
    return meta, chunks


def _launch(C, meta, chunks, dtype, mode, seed, a=1.0, b=0.0, g=0.0, dist=rng.Distribution.GAUSSIAN):
    C.axpby(meta.data_ptr(), meta.shape[1], chunks.data_ptr(), chunks.shape[0], C.chunk_size(), dtype, mode, dist,
            seed, a, b, g)


def test_fill_is_randn4x_at_any_base_and_thread_count(C):
    """FILL writes exactly randn4x's z (bitwise) for odd bases, chunk-crossing sizes, 1 or 2 threads."""
    sizes, bases = [1, 3, 7, 2 * C.chunk_size() + 5], [5, 2**33 + 3, 4 * 2**40 + 2, 1]
    nthreads = C.num_threads()
    try:
        outs = []
        for nt in (1, 2):
            C.set_num_threads(nt)
            ts = [torch.full((n,), float("nan")) for n in sizes]
            meta, chunks = _plan(C, ts, bases)
            _launch(C, meta, chunks, D.FLOAT32, M.FILL, 1234)
            outs.append(ts)
    finally:
        C.set_num_threads(nthreads)
    for t1, t2, n, base in zip(*outs, sizes, bases):
        assert torch.equal(t1, t2)
        k0, k1 = base >> 2, (base + n - 1) >> 2
        z = torch.empty(4 * (k1 - k0 + 1), dtype=torch.float32)
        C.randn4x(1234, k0, k1 - k0 + 1, z.data_ptr())
        assert torch.equal(t1, z[base & 3: (base & 3) + n])


def _fill(n: int, seed: int) -> torch.Tensor:
    # torch.empty, not zeros: torch's own OpenMP fill of a large tensor hangs in a forked child
    C = pytest.importorskip("mezo_kernels._C")
    x = torch.empty(n)
    meta, chunks = _plan(C, [x], [1])
    _launch(C, meta, chunks, D.FLOAT32, M.FILL, seed)
    return x


def _fill_bytes(n: int, seed: int) -> bytes:
    return _fill(n, seed).numpy().tobytes()


def test_thread_pool_concurrent_callers_and_fork(C):
    """Launches large enough for the thread pool, from four Python threads at once (one job at a time uses the
    pool, the others run on their own thread) and from a forked child (which has none of the parent's workers),
    give the bits of lone launches."""
    n = 6 * C.chunk_size() + 3
    want = [_fill(n, s) for s in range(8)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda s: _fill(n, s), range(8)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_fill_bytes, (n, 3)).get(timeout=120)
    assert child == want[3].numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_round_like_torch(C, dtype):
    code = rng.DTYPE_CODES[dtype]
    # every 16-bit pattern survives load -> fma(z, 0, 1 * x) -> store (NaNs stay NaN, -0 may become +0)
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    x = allbits.clone()
    meta, chunks = _plan(C, [x], [0])
    _launch(C, meta, chunks, code, M.AXPBY, 3, a=1.0, b=0.0)
    nan = torch.isnan(allbits)
    assert torch.equal(torch.isnan(x), nan)
    assert torch.equal(x[~nan].float(), allbits[~nan].float())
    # stores: MASTER_VIEW with gamma = 0 gives round(m) for arbitrary fp32 m (ties, subnormals, overflow)
    gen = torch.Generator().manual_seed(0)
    m = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32).view(
        torch.float32)
    m = torch.cat([m[~torch.isnan(m)], torch.tensor([65504.0, 65520.0, 65519.99, 2.0**-25, 2.0**-24 * 1.5,
                                                      3.0e38, float("inf"), -float("inf"), 0.0])])
    d = torch.empty(m.numel(), dtype=dtype)
    meta, chunks = _plan(C, [d], [0], [m])
    _launch(C, meta, chunks, code, M.MASTER_VIEW, 3, g=0.0)
    assert torch.equal(d.view(torch.int16), m.to(dtype).view(torch.int16))


# ------------------------------------------------------------------------------------- validation
def test_argument_validation(C):
    x, m = torch.zeros(10), torch.zeros(10)
    meta, chunks = _plan(C, [x], [0], [m])
    p, cp, cs = meta.data_ptr(), chunks.data_ptr(), C.chunk_size()
    ok = dict(meta_ptr=p, num_tensors=1, chunks_ptr=cp, num_chunks=1, chunk_size=cs, dtype=D.FLOAT32, mode=M.AXPBY,
              dist=rng.Distribution.GAUSSIAN, seed=1, alpha=1.0, beta=0.0, gamma=0.0)
    C.axpby(**ok)
    bad = [({"dtype": len(D)}, "dtype"), ({"dtype": -1}, "dtype"), ({"mode": len(M)}, "mode"), ({"mode": -1}, "mode"),
           ({"dist": len(rng.Distribution)}, "dist"), ({"dist": -1}, "dist"),
           ({"num_tensors": 0}, "num_tensors"), ({"chunk_size": cs + 2}, "chunk_size"),
           ({"chunk_size": 0}, "chunk_size"), ({"meta_ptr": 0}, "meta_ptr"), ({"seed": 2**64}, "seed"),
           ({"seed": -(2**63) - 1}, "seed"), ({"num_chunks": -1}, "num_chunks")]
    for kw, word in bad:
        with pytest.raises(ValueError, match=word):
            C.axpby(**{**ok, **kw})
    meta_nomaster, _ = _plan(C, [x], [0])
    with pytest.raises(ValueError, match="master"):
        C.axpby(**{**ok, "meta_ptr": meta_nomaster.data_ptr(), "mode": M.MASTER_UPDATE})
    for row, word in [(torch.tensor([[1, 0]]), "tensor index"), (torch.tensor([[0, 12]]), "start"),
                      (torch.tensor([[0, 2]]), "start")]:
        with pytest.raises(ValueError, match=word):
            C.axpby(**{**ok, "chunks_ptr": row.data_ptr()})
    out = torch.empty(4)
    with pytest.raises(ValueError, match="n must be"):
        C.randn4x(0, 0, -1, out.data_ptr())
    with pytest.raises(ValueError, match="k_start"):
        C.philox_words(0, -1, 1, out.data_ptr())
    with pytest.raises(ValueError, match="null"):
        C.randn4x(0, 0, 1, 0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        C.set_num_threads(0)
    assert isinstance(C.build_info(), str) and C.chunk_size() % 4 == 0 and C.num_threads() >= 1
