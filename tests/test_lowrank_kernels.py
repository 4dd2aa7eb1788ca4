"""The fused low-rank update of one 2-d tensor (issue 21, mezo_kernels/perturb/lowrank.py): W <- round(fma(U Vᵀ/√r,
beta, alpha W)), U and V regenerated inside the op.

- C++ CPU == the pure-PyTorch reference bit for bit when both use the CPU's Gaussian stream (the C++ `normals`),
  in fp32, fp16 and bf16, nearest and stochastic rounding, for odd shapes and bases that are not multiples of 4;
- Triton (interpreter here) == the reference bit for bit given Triton's own stream, and within tolerance of the
  torch backend (rng.normal);
- lr = 0 leaves bf16 weights bit-identical; weight decay is fused; nothing outside the tensor is touched;
- the known answers of docs/rng_spec.md on every backend; shards (blocks) equal the unsharded update's block;
- CUDA: tests/test_lowrank_cuda.py (gpu marker);
- bad input is a clear TypeError / ValueError.
"""
import math

import pytest
import torch

from mezo_kernels import kernels, rng
from mezo_kernels.perturb import lowrank as L
from mezo_kernels.rng.lowrank import uses_lowrank

from conftest import TOL

C = pytest.importorskip("mezo_kernels._C")
needs_cpu_op = pytest.mark.skipif(kernels.lowrank_unsupported_reason("cpu", torch.device("cpu")) is not None,
                                  reason=str(kernels.lowrank_unsupported_reason("cpu", torch.device("cpu"))))
_TRITON_WHY = kernels.lowrank_unsupported_reason("triton", torch.device("cpu"))
needs_triton = pytest.mark.skipif(_TRITON_WHY is not None, reason=str(_TRITON_WHY))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SHAPES = [(5, 7), (33, 17), (2, 129), (257, 3), (64, 300)]
SEED_U, SEED_V = 2**64 - 7, 12345


def cpu_normal(seed, g0, n, device=None):
    out = torch.empty(n, dtype=torch.float32)
    C.normals(seed, g0, n, out.data_ptr())
    return out


def triton_normal(seed, g0, n, device=None):
    from mezo_kernels.triton.lowrank import normals
    return normals(seed, g0, n)


def bits_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def reference(w, r, base, alpha, beta, rounding, normal, seed_u=SEED_U, seed_v=SEED_V, full=None, start=(0, 0)):
    full = tuple(w.shape) if full is None else full
    u, v = L.lowrank_factors_block(seed_u, seed_v, base, r, full, start, w.shape, normal=normal)
    return L.lowrank_update_reference(w, u, v, alpha, beta, rounding, seed_u, base, full, start)


def cases():
    for shape in SHAPES:
        for r in (1, 2, 4, 16):
            if uses_lowrank(shape, r):
                yield shape, r


# ------------------------------------------------------------------------------------------------ C++ == reference
@needs_cpu_op
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", list(cases()))
def test_cpu_matches_reference_bit_for_bit(shape, r, dtype, rounding):
    for base in (13, 2**33 + 6):
        w = weights(shape, dtype, seed=r)
        alpha, beta = 1.0 - 1e-3 * 0.1, -1e-3 * 2.7
        want = reference(w, r, base, alpha, beta, rounding, cpu_normal)
        got = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, base, r, alpha, beta, rounding, "cpu")
        assert bits_equal(got, want), (shape, r, dtype, rounding, base)
        assert not bits_equal(got, w)


@needs_cpu_op
def test_cpu_factors_are_the_cpu_gaussian_stream():
    """`normals` at any start == randn4x's values (bitwise), within 1e-6 of the spec's float64 evaluation."""
    for g0, n in [(0, 5), (3, 130), (2**33 + 1, 517), (7, 1)]:
        k0, k1 = g0 >> 2, (g0 + n - 1) >> 2
        full = torch.empty(4 * (k1 - k0 + 1))
        C.randn4x(SEED_U, k0, k1 - k0 + 1, full.data_ptr())
        got = cpu_normal(SEED_U, g0, n)
        assert torch.equal(got, full[g0 & 3:(g0 & 3) + n])
        torch.testing.assert_close(got.double(), rng.normal_f64(SEED_U, g0, n), rtol=1e-6, atol=1e-6)


@needs_cpu_op
@pytest.mark.parametrize("shape", [(300, 1000), (5, 40_000)])
def test_cpu_threads_do_not_change_bits(shape):
    """The parallel pass (row units, or row segments for long rows) gives the bits of one thread and of the
    reference."""
    w = weights(shape, torch.bfloat16)
    want = reference(w, 4, 101, 0.999, 0.01, "stochastic", cpu_normal)
    nt = C.num_threads()
    try:
        for t in (1, 2, 3):
            C.set_num_threads(t)
            got = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 101, 4, 0.999, 0.01, "stochastic", "cpu")
            assert bits_equal(got, want), t
    finally:
        C.set_num_threads(nt)


def test_torch_backend_is_the_reference_with_the_spec_stream():
    w = weights((33, 17), torch.float16)
    want = reference(w, 2, 5, 0.99, 0.3, "stochastic", rng.normal)
    got = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 5, 2, 0.99, 0.3, "stochastic", "torch")
    assert bits_equal(got, want)


@needs_cpu_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_and_torch_backends_agree_within_tolerance(dtype):
    """Across backends the Gaussian values agree within the spec's 1e-6: so do the updates (one rounding apart)."""
    w = weights((64, 300), dtype)
    a = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 6, 4, 1.0, 0.5, "nearest", "cpu")
    b = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 6, 4, 1.0, 0.5, "nearest", "torch")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol * 2, rtol=rtol)


# ------------------------------------------------------------------------------------------------ semantics
def _backends():
    out = ["torch"]
    out.append(pytest.param("cpu", marks=needs_cpu_op))
    out.append(pytest.param("triton", marks=needs_triton))
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_lr_zero_leaves_bf16_weights_bit_identical(backend, rounding):
    w = weights((33, 17), torch.bfloat16)
    assert not (w == 0).any()          # -0 + (-0 * z) may become +0: real weights have no zeros here
    got = L.lowrank_update_(w.clone(), SEED_U, SEED_V, 9, 2, 0.0, 3.5, weight_decay=0.1, rounding=rounding,
                            backend=backend)
    assert bits_equal(got, w)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_decay_is_fused(backend, dtype):
    """lowrank_update_ is alpha = 1 - lr*wd, beta = -lr*grad in one pass; grad = 0 is the pure decay."""
    normal = {"torch": rng.normal, "cpu": cpu_normal, "triton": triton_normal}[backend]
    w = weights((5, 7), dtype)
    lr, g, wd = 0.01, -1.7, 0.3
    got = L.lowrank_update_(w.clone(), SEED_U, SEED_V, 1, 2, lr, g, weight_decay=wd, backend=backend)
    assert bits_equal(got, reference(w, 2, 1, 1 - lr * wd, -lr * g, "nearest", normal))
    decayed = L.lowrank_update_(w.clone(), SEED_U, SEED_V, 1, 2, lr, 0.0, weight_decay=wd, backend=backend)
    assert bits_equal(decayed, (w.float() * torch.tensor(1 - lr * wd, dtype=torch.float32)).to(dtype))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_memory_around_the_tensor_is_untouched(backend, dtype):
    (m, n), guard = ((33, 17) if backend != "triton" else (9, 13)), 37
    buf = torch.full((m * n + 2 * guard,), float("nan"), dtype=dtype)
    w = buf[guard:guard + m * n].view(m, n)
    w.copy_(weights((m, n), dtype))
    before = w.clone()
    L.lowrank_update_(w, SEED_U, SEED_V, 3, 2, 0.01, 1.0, rounding="stochastic", backend=backend)
    assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + m * n:]).all()
    assert not torch.isnan(w).any() and not bits_equal(w, before)


@pytest.mark.parametrize("backend", _backends())
def test_known_answers_on_every_backend(backend):
    """z itself (perturb of zeros by 1: fma(z, 1, 0) = z) at the spec's known answers (docs/rng_spec.md)."""
    z = L.lowrank_perturb_(torch.zeros(5, 7), 42, 42, 8, 2, 1.0, backend=backend)
    assert z[0, 0].item() == pytest.approx(0.22768469154834747, rel=1e-6, abs=1e-6)
    assert z[4, 6].item() == pytest.approx(1.1686354875564575, rel=1e-6, abs=1e-6)
    z = L.lowrank_perturb_(torch.zeros(64, 48), 7, 9, 0, 1, 1.0, backend=backend)
    assert z[3, 5].item() == pytest.approx(-0.3242994546890259, rel=1e-6, abs=1e-6)
    torch.testing.assert_close(z, rng.lowrank.lowrank_direction(7, 9, 0, (64, 48), 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_perturb_then_restore_roundtrip_is_close_in_fp32(backend):
    w = weights((9, 13), torch.float32)
    x = L.lowrank_perturb_(w.clone(), SEED_U, SEED_V, 2, 2, 1e-3, backend=backend)
    x = L.lowrank_perturb_(x, SEED_U, SEED_V, 2, 2, -1e-3, backend=backend)
    torch.testing.assert_close(x, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_reproduce_the_unsharded_update(backend, dtype):
    """A Shard(0) (rows) or Shard(1) (columns) block with full_shape/start gets the bits of that block of the
    full update, SR bits included."""
    M, N, r, base = 12, 10, 2, 5
    w = weights((M, N), dtype)
    full = L.lowrank_update_(w.clone(), SEED_U, SEED_V, base, r, 0.01, 1.5, rounding="stochastic", backend=backend)
    for (r0, r1), (c0, c1) in [((3, 8), (0, N)), ((0, M), (4, 7)), ((11, 12), (9, 10))]:
        blk = w[r0:r1, c0:c1].clone()           # a copy: a row block is contiguous already
        L.lowrank_update_(blk, SEED_U, SEED_V, base, r, 0.01, 1.5, rounding="stochastic", backend=backend,
                          full_shape=(M, N), start=(r0, c0))
        assert bits_equal(blk, full[r0:r1, c0:c1]), (r0, c0)


# ------------------------------------------------------------------------------------------------ Triton
@needs_triton
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", [((5, 7), 2), ((33, 17), 4), ((2, 129), 1), ((40, 9), 3)])
def test_triton_matches_reference(shape, r, dtype, rounding):
    """Bit for bit with the reference given Triton's own Gaussian stream; within tolerance of the torch backend."""
    w = weights(shape, dtype, seed=1)
    got = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 7, r, 0.999, -0.4, rounding, "triton")
    assert bits_equal(got, reference(w, r, 7, 0.999, -0.4, rounding, triton_normal))
    tor = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, 7, r, 0.999, -0.4, rounding, "torch")
    atol, rtol = TOL[dtype]
    if rounding == "nearest" or dtype == torch.float32:
        torch.testing.assert_close(got.float(), tor.float(), atol=atol * 2, rtol=rtol)
    else:   # an ulp of z may flip a stochastic decision: one spacing apart at most, and rarely
        spacing = torch.where(tor.float() == 0, 1.0, tor.float().abs()) * (2.0 ** -7 if dtype == torch.bfloat16
                                                                            else 2.0 ** -10)
        assert ((got.float() - tor.float()).abs() <= spacing * 1.01).all()
        assert (got != tor).float().mean() < 0.05


# ------------------------------------------------------------------------------------------------ bad input
def test_dense_shapes_are_refused_naming_the_dense_path():
    for shape, r in [((1, 129), 1), ((4, 4), 2), ((33, 17), 16)]:
        with pytest.raises(ValueError, match="dense"):
            L.lowrank_update_(torch.zeros(shape), 1, 1, 0, r, 0.1, 1.0)
    for shape in [(10,), (2, 3, 4)]:
        with pytest.raises(ValueError, match="dense Gaussian path"):
            L.lowrank_update_(torch.zeros(shape), 1, 1, 0, 1, 0.1, 1.0)


def test_bad_input_is_a_clear_error():
    w = torch.zeros(8, 9)
    with pytest.raises(ValueError, match="lowrank_r"):
        L.lowrank_update_(w, 1, 1, 0, 0, 0.1, 1.0)
    with pytest.raises(TypeError, match="lowrank_r"):
        L.lowrank_update_(w, 1, 1, 0, 1.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        L.lowrank_update_(torch.zeros(9, 8).T, 1, 1, 0, 1, 0.1, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        L.lowrank_update_(w.double(), 1, 1, 0, 1, 0.1, 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        L.lowrank_update_(w.numpy(), 1, 1, 0, 1, 0.1, 1.0)
    with pytest.raises(ValueError, match="rounding"):
        L.lowrank_update_(w, 1, 1, 0, 1, 0.1, 1.0, rounding="up")
    with pytest.raises(ValueError, match="base"):
        L.lowrank_update_(w, 1, 1, -1, 1, 0.1, 1.0)
    with pytest.raises(ValueError, match="seed"):
        L.lowrank_update_(w, -2**64, 1, 0, 1, 0.1, 1.0)
    with pytest.raises(TypeError, match="lr"):
        L.lowrank_update_(w, 1, 1, 0, 1, float("nan"), 1.0)
    with pytest.raises(ValueError, match="not inside"):
        L.lowrank_update_(w, 1, 1, 0, 1, 0.1, 1.0, full_shape=(8, 9), start=(1, 0))
    with pytest.raises(ValueError, match="cuda"):
        L.lowrank_update_(w, 1, 1, 0, 1, 0.1, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        L.lowrank_update_(w, 1, 1, 0, 1, 0.1, 1.0, backend="fast")
    assert torch.equal(w, torch.zeros(8, 9))


@needs_cpu_op
def test_extension_checks_its_arguments():
    w = torch.zeros(8, 9)
    args = dict(w_ptr=w.data_ptr(), m=8, n=9, row0=0, col0=0, M=8, N=9, r=1, base=0, dtype=0, stochastic=False,
                seed_u=1, seed_v=1, alpha=1.0, beta=1.0)
    for bad, match in [(dict(r=0), "lowrank_r"), (dict(r=5), "dense"), (dict(w_ptr=0), "null"),
                       (dict(row0=1), "not inside"), (dict(dtype=3), "dtype"), (dict(base=-1), "base")]:
        with pytest.raises(ValueError, match=match):
            C.lowrank_update(**{**args, **bad})


def test_backend_choice_is_one_decision(monkeypatch):
    dev = torch.device("cpu")
    kernels._LOWRANK_CHOICES.clear()
    want = "cpu" if kernels.lowrank_unsupported_reason("cpu", dev) is None else "torch"
    assert kernels.choose_lowrank("auto", dev) == want
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.choose_lowrank("cpu", dev) == "torch"      # the environment overrides the argument
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MEZO_BACKEND"):
        kernels.choose_lowrank("auto", dev)
    kernels._LOWRANK_CHOICES.clear()
