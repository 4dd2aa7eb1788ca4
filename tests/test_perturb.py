"""ParamSet and fill_normal_ on every backend present, against the spec module (mezo_kernels.rng)."""
import pytest
import torch

import mezo_kernels as mk
from mezo_kernels import rng
from mezo_kernels.kernels import unavailable_reason
from conftest import DEVICE, backend_params, guarded, guards_intact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 17, 4097]
Z_TOL = 1e-6   # the spec: every backend's z is within Z_TOL + Z_TOL * |z| of the float64 reference


def fresh_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item()) * 4 + 3   # large, odd: exercises both key words


def assert_rounded_once(got: torch.Tensor, ref: torch.Tensor, z: torch.Tensor, zscale: float) -> None:
    """``got`` (any float dtype) is the float64 value ``ref`` rounded once to got's dtype.

    Allowed: half an ulp of the dtype, plus the backend's z error (``zscale * Z_TOL * (1 + |z|)``) and, for
    fp16/bf16, the fp32 rounding of the kernel's intermediate result. So a value near a rounding tie may go either
    way (the documented 1-ulp tie allowance), but a second rounding, up to a full ulp off, fails."""
    fi = torch.finfo(got.dtype)
    ref, z = ref.double().reshape(-1), z.double().reshape(-1)
    mag = ref.abs().clamp_min(fi.tiny)
    half_ulp = 0.5 * fi.eps * torch.exp2(torch.floor(torch.log2(mag)))
    slack = abs(zscale) * Z_TOL * (1 + z.abs())
    if got.dtype != torch.float32:
        slack = slack + 2.0**-24 * ref.abs()
    err = (got.double().reshape(-1) - ref).abs()
    bad = (err > half_ulp + slack).nonzero().reshape(-1)
    assert bad.numel() == 0, (f"{bad.numel()} of {ref.numel()} elements are not rounded once, e.g. index "
                              f"{int(bad[0])}: got {float(got.reshape(-1)[bad[0]])!r}, exact {float(ref[bad[0]])!r}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_normal_matches_spec(backend, n, dtype):
    seed, base = fresh_seed(), int(torch.randint(0, 2**40, (1,)))
    buf, t = guarded(n, dtype)
    mk.fill_normal_(t, seed, base, backend=backend)
    ref = rng.normal_f64(seed, base, n, DEVICE)
    if dtype == torch.float32:
        torch.testing.assert_close(t.double(), ref, atol=Z_TOL, rtol=Z_TOL)
    else:
        assert_rounded_once(t, ref, ref, 1.0)
    assert guards_intact(buf, n), "a kernel wrote outside its tensor"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_matches_reference_multi_tensor(backend, dtype):
    seed, alpha, beta = fresh_seed(), 0.875, 3e-2
    bufs, views = zip(*(guarded(n, dtype) for n in SIZES))
    for v in views:
        v.copy_(torch.randn(v.shape, device=DEVICE))
    before = [v.clone() for v in views]
    ps = mk.ParamSet(list(views), backend=backend, exact_restore=False)
    ps.axpby_(seed, alpha, beta)
    beta32 = float(torch.tensor(beta, dtype=torch.float32))
    for b, v, base, buf, n in zip(before, views, ps.bases, bufs, SIZES):
        z = rng.normal_f64(seed, base, n, DEVICE)
        ax = (b.float() * torch.tensor(alpha, dtype=torch.float32)).double()   # the ABI: alpha*d is an fp32 product
        assert_rounded_once(v, ax + beta32 * z, z, beta32)
        assert guards_intact(buf, n)
    assert ps.launches == 1


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("block", [1, 3, 17, 4097])
def test_partition_invariance(backend, block):
    """One flat tensor equals its elements split into many tensors with matching (unaligned) bases."""
    n, seed, base0 = (9001 if backend != "triton" else 601), fresh_seed(), 5   # interpreter: ~1 ms a program
    flat = torch.randn(n, device=DEVICE)
    parts = [p.clone() for p in flat.split(block)]
    bases = [base0 + i * block for i in range(len(parts))]
    mk.ParamSet([flat], bases=[base0], backend=backend).axpby_(seed, 1.0, 0.5)
    mk.ParamSet(parts, bases=bases, backend=backend).axpby_(seed, 1.0, 0.5)
    assert torch.equal(torch.cat(parts), flat)


@pytest.mark.parametrize("backend", backend_params())
def test_repeatable_bit_for_bit(backend):
    x = torch.randn(4097, device=DEVICE).bfloat16()
    outs = []
    for _ in range(2):
        y = [x.clone(), x.float().clone()]
        ps = mk.ParamSet(y, backend=backend)
        ps.perturb_(123, 1e-2).perturb_(123, -1e-2)
        ps.restore_update_(123, lr=1e-3, grad=2.5, weight_decay=0.1)
        outs.append(y)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("exact", [False, True])
def test_mezo_step_math(backend, exact):
    """+eps, -eps, fused restore+update equals (1 - lr*wd)*theta - lr*g*z, in plain and in master mode."""
    seed, eps, lr, g, wd = fresh_seed(), 1e-2, 1e-2, 3.0, 0.5
    theta = torch.randn(1001, device=DEVICE)
    x = theta.clone()
    ps = mk.ParamSet([x], backend=backend, exact_restore=exact)
    ps.perturb_(seed, eps)
    torch.testing.assert_close(x, theta + eps * rng.normal(seed, 0, 1001, DEVICE), atol=2e-7, rtol=2e-7)
    ps.perturb_(seed, -eps)
    ps.restore_update_(seed, lr, g, wd)
    expect = (1 - lr * wd) * theta - lr * g * rng.normal(seed, 0, 1001, DEVICE)
    torch.testing.assert_close(x, expect, atol=1e-6, rtol=1e-6)
    assert ps.perturbation is None


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_restore_1000_cycles(backend, dtype):
    cycles = {"triton": 50, "torch": 100}.get(backend, 1000)   # interpreter and int64 Philox are slow
    x = torch.randn(3, 17, device=DEVICE).to(dtype)
    y = torch.randn(4097, device=DEVICE).to(dtype)
    x0, y0 = x.clone(), y.clone()
    ps = mk.ParamSet([x, y], backend=backend)
    assert ps.exact_restore
    for c in range(cycles):
        ps.perturb_(c, 1e-2).perturb_(c, -1e-2).restore_()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # the perturbed view is round(master + eps*z): one rounding, never accumulated
    ps.perturb_(9, 1e-2)
    eps32 = float(torch.tensor(1e-2, dtype=torch.float32))
    z = rng.normal_f64(9, ps.bases[1], 4097, DEVICE)
    assert_rounded_once(y, y0.double() + eps32 * z, z, eps32)
    ps.restore_()


@pytest.mark.parametrize("backend", backend_params())
def test_dtype_groups_share_one_stream(backend):
    """z depends on the global index only: a bf16 tensor sees the same z as an fp32 one at the same base."""
    a, b = torch.zeros(17, device=DEVICE), torch.zeros(17, device=DEVICE, dtype=torch.bfloat16)
    ps = mk.ParamSet([a, b], bases=[8, 8], backend=backend, exact_restore=False)
    ps.axpby_(5, 1.0, 1.0)
    assert ps.launches == 2    # one per dtype group
    assert torch.equal(a.bfloat16(), b)


def test_perturbed_context_restores_on_error():
    x = torch.randn(33)
    x0 = x.clone()
    ps = mk.ParamSet([x], exact_restore=True)
    with pytest.raises(ZeroDivisionError):
        with ps.perturbed(1, 0.1):
            assert not torch.equal(x, x0)
            1 / 0
    assert torch.equal(x, x0) and ps.perturbation is None


def test_storage_replacement_is_noticed():
    p = torch.nn.Parameter(torch.zeros(8))
    ps = mk.ParamSet([p], backend="torch")
    p.data = torch.zeros(8)
    ps.axpby_(1, 1.0, 1.0)                       # rebuilt: the new storage is the one updated
    assert torch.equal(p.data, rng.normal(1, 0, 8))
    ps.perturb_(2, 0.1)
    p.data = torch.zeros(8)
    with pytest.raises(RuntimeError, match="replaced"):
        ps.restore_()


def test_version_and_state_guards():
    x = torch.randn(5)
    ps = mk.ParamSet([x], backend="torch")
    v = ps.version
    ps.perturb_(3, 0.1)
    assert ps.version == v + 1
    with pytest.raises(RuntimeError, match="restore"):
        ps.axpby_(3, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="seed 3"):
        ps.perturb_(4, 0.1)
    ps.restore_()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        mk.ParamSet([])
    with pytest.raises(ValueError, match="not contiguous"):
        mk.ParamSet([torch.randn(4, 3).t()])
    with pytest.raises(TypeError, match="unsupported dtype"):
        mk.ParamSet([torch.randn(4, dtype=torch.float64)])
    with pytest.raises(TypeError, match="unsupported dtype"):
        mk.ParamSet([torch.arange(4)])
    with pytest.raises(ValueError, match="mixed devices"):
        mk.ParamSet([torch.randn(4), torch.randn(4, device="meta")])
    with pytest.raises(TypeError, match="torch.Tensor"):
        mk.ParamSet([[1.0, 2.0]])
    with pytest.raises(ValueError, match="requires_grad"):
        mk.ParamSet([("w", torch.nn.Parameter(torch.randn(3), requires_grad=False))], require_grad=True)
    x = torch.randn(4)
    with pytest.raises(ValueError, match="twice"):
        mk.ParamSet([x, x])
    with pytest.raises(ValueError, match="bases"):
        mk.ParamSet([x], bases=[0, 4])
    with pytest.raises(ValueError, match="bases"):
        mk.ParamSet([x], bases=[-4])
    ps = mk.ParamSet([x])
    with pytest.raises(ValueError, match="seed"):
        ps.axpby_(2**64, 1.0, 1.0)
    with pytest.raises(TypeError, match="seed"):
        ps.perturb_(0.5, 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        mk.ParamSet([x], backend="fast")
    with pytest.raises(ValueError, match="base"):
        mk.fill_normal_(torch.empty(3), 0, base=-1)
    with pytest.raises(ValueError, match="not contiguous"):
        mk.fill_normal_(torch.empty(4, 3).t(), 0)


def test_env_var_overrides_backend(monkeypatch):
    monkeypatch.setenv("MEZO_BACKEND", "torch")
    assert mk.ParamSet([torch.randn(3)], backend="auto").backend == "torch"
    monkeypatch.setenv("MEZO_BACKEND", "cuda")   # the CUDA backend never serves CPU tensors
    with pytest.raises(ValueError, match=r"'cuda' \(from \$MEZO_BACKEND\) is unavailable for cpu"):
        mk.ParamSet([torch.randn(3)], backend="torch")


@pytest.mark.gpu
def test_env_var_selects_cuda_backend_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("MEZO_BACKEND", "cuda")
    x = torch.randn(3, device="cuda")
    why = unavailable_reason("cuda", x.device)
    if why is None:
        assert mk.ParamSet([x], backend="torch").backend == "cuda"
    else:   # extension not built on this machine: the override must say so rather than fall back
        with pytest.raises(ValueError, match="MEZO_BACKEND"):
            mk.ParamSet([x], backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_and_triton_backends_agree_bit_for_bit(dtype):
    """Same instructions on the same words (csrc/philox.h, triton/philox.py): the same bits, in every mode."""
    dev = torch.device("cuda")
    for name in ("cuda", "triton"):
        if unavailable_reason(name, dev) is not None:
            pytest.skip(f"{name} backend unavailable: {unavailable_reason(name, dev)}")
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(n, generator=gen).to(dtype).to(dev) for n in SIZES]
    outs = []
    for name in ("cuda", "triton"):
        ts = [x.clone() for x in init]
        ps = mk.ParamSet(ts, backend=name, exact_restore=dtype != torch.float32)
        ps.axpby_(2**63 + 5, 0.875, 3e-2).perturb_(77, 1e-2)
        f = torch.empty(4097, dtype=dtype, device=dev)
        mk.fill_normal_(f, 77, base=5, backend=name)
        outs.append(ts + [f] + [m for m in ps.masters() if m is not None])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_backends_lists_every_name_with_a_reason():
    b = mk.backends()
    assert set(b) == {"triton", "cuda", "cpu", "torch"}
    assert b["torch"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in b.values())
