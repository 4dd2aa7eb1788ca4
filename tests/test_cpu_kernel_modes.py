"""Every kernel mode x dtype x distribution of the native extensions, bit for bit against the spec (mezo_kernels/rng.py).

The sign stream is exact on every backend, so with it a whole launch is compared with rng.signs / rng.stochastic_round
and the ABI's formula bit for bit. Gaussian z is the backend's own (randn4x; within the spec's tolerance of rng.normal,
tests/test_ext_build.py), and the mode arithmetic on it is compared bit for bit. Odd sizes, explicit bases that are
not multiples of 4/8/128, pointers that are not 16-byte aligned, and poisoned guard memory around every tensor.
The CUDA extension runs the same cases under the ``gpu`` marker.
"""
import importlib

import pytest
import torch

from mezo_kernels import rng

M, D, Dist = rng.KernelMode, rng.DTypeCode, rng.Distribution
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 17, 4097]
BASES = [5, 2**33 + 3, 130, 7]        # none a multiple of 4: quads, SR pairs and sign counters all split
SEEDS = [0, 77, 2**64 - 3]
GUARD = 64                             # poisoned elements before and after every tensor


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _fma32(z: torch.Tensor, beta: float, ax: torch.Tensor) -> torch.Tensor:
    """Exact fp32 fma(z, beta, ax) for float32 z and ax (beta rounded to fp32 first), as float32.

    z*beta is exact in float64; the float64 sum s can round, and rounding s to fp32 then differs from one rounding only
    when s lies exactly halfway between two fp32 values: there the sign of the sum's error (TwoSum) decides."""
    p = z.double() * torch.tensor(beta, dtype=torch.float32).double()
    a = ax.double()
    s = p + a
    bb = s - p
    err = (p - (s - bb)) + (a - bb)
    r = s.float()
    other = torch.nextafter(r, torch.where(s > r.double(), torch.tensor(float("inf")), torch.tensor(-float("inf"))))
    tie = (r.double() + other.double()) / 2 == s
    hi, lo = torch.maximum(r, other), torch.minimum(r, other)
    fix = torch.where(err > 0, hi, lo)
    return torch.where(tie & (err != 0) & torch.isfinite(s), fix, r)


def _ext(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{name} not built ({e})")


class Backend:
    def __init__(self, mod, device):
        self.C, self.device = mod, torch.device(device)

    def stream(self):
        return () if self.device.type == "cpu" else (torch.cuda.current_stream(self.device).cuda_stream,)

    def z(self, seed: int, base: int, n: int, dist: Dist) -> torch.Tensor:
        """z[base : base + n] as this backend computes it (float32 on the CPU)."""
        if dist == Dist.SIGN:
            return rng.signs(seed, base, n)
        k0, k1 = base >> 2, (base + n - 1) >> 2
        out = torch.empty(4 * (k1 - k0 + 1), dtype=torch.float32, device=self.device)
        self.C.randn4x(seed, k0, k1 - k0 + 1, out.data_ptr(), *self.stream())
        return out.cpu()[base & 3: (base & 3) + n]

    def launch(self, dsts, bases, dtype, mode, dist, seed, a, b, g, aux=None):
        T, ch = len(dsts), self.C.chunk_size()
        meta = torch.zeros(4, T, dtype=torch.int64)
        for i, t in enumerate(dsts):
            meta[:, i] = torch.tensor([t.data_ptr(), t.numel(), bases[i], aux[i].data_ptr() if aux else 0])
        chunks = torch.tensor([(i, s) for i, t in enumerate(dsts) for s in range(0, t.numel(), ch)],
                              dtype=torch.int64).reshape(-1, 2)
        meta, chunks = meta.to(self.device), chunks.to(self.device)
        self.C.axpby(meta.data_ptr(), T, chunks.data_ptr(), chunks.shape[0], ch, int(rng.DTYPE_CODES[dtype]),
                     int(mode), int(dist), seed, a, b, g, *self.stream())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@pytest.fixture(scope="module")
def cpu():
    return Backend(_ext("mezo_kernels._C"), "cpu")


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return Backend(_ext("mezo_kernels._C_cuda"), "cuda")


def _guarded(values: torch.Tensor, dtype, device, offset: int):
    """(buffer, view): values (float32) converted to dtype inside a buffer with GUARD poison elements on each side;
    offset extra elements shift the view off 16-byte alignment."""
    n = values.numel()
    buf = torch.full((2 * GUARD + offset + n,), float("nan"), dtype=dtype)
    _bits(buf)[: GUARD + offset] = 0x5A5A if dtype != torch.float32 else 0x5A5A5A5A
    view = buf[GUARD + offset: GUARD + offset + n]
    view.copy_(values.to(dtype))
    buf = buf.to(device)
    return buf, buf[GUARD + offset: GUARD + offset + n]


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Values over many binades, incl. fp16 subnormals and values below 2**-24, zeros and large values."""
    g = torch.Generator().manual_seed(seed % 2**31 + n)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 14, (n,), generator=g).float())
    x[::7] = 0.0
    return x


def _reference(mode, dtype, dist, seed, base, z, d0, aux0, a, b, g):
    """(d, aux) after the launch, per the ABI table (docs/kernel_abi.md) and rng.stochastic_round."""
    a32 = torch.tensor(a, dtype=torch.float32)
    if mode in (M.AXPBY, M.AXPBY_SR):
        y = _fma32(z, b, d0.float() * a32)
        if mode == M.AXPBY_SR and dtype != torch.float32:
            return rng.stochastic_round(y, dtype, seed, base), aux0
        return y.to(dtype), aux0
    if mode == M.OUT:
        return _fma32(z, b, aux0.float() * a32).to(dtype), aux0
    if mode == M.FILL:
        return z.to(dtype), aux0
    if mode == M.MASTER_VIEW:
        return _fma32(z, g, aux0).to(dtype), aux0
    m = _fma32(z, b, aux0 * a32)
    return _fma32(z, g, m).to(dtype), m


def _check_modes(be: Backend, mode, dtype, dist, seed):
    a, b, g = 1.0009765625, -3.0e-3, 7.5e-4
    dsts, auxs, bufs, refs = [], [], [], []
    for i, (n, base) in enumerate(zip(SIZES, BASES)):
        off = i % 3
        aux_dtype = torch.float32 if rng.KernelMode(mode).uses_master else dtype
        dbuf, d = _guarded(_inputs(n, seed + i), dtype, be.device, off)
        abuf, x = _guarded(_inputs(n, seed + 100 + i), aux_dtype, be.device, 2 - off)
        z = be.z(seed, base, n, dist)
        refs.append(_reference(mode, dtype, dist, seed, base, z, d.cpu(), x.cpu(), a, b, g))
        dsts.append(d)
        auxs.append(x)
        bufs.append((dbuf.clone(), dbuf, abuf.clone(), abuf))
    uses_aux = rng.KernelMode(mode).uses_master or rng.KernelMode(mode).uses_source
    be.launch(dsts, BASES, dtype, mode, dist, seed, a, b, g, aux=auxs if uses_aux else None)
    for (ref_d, ref_x), d, x, (d0buf, dbuf, a0buf, abuf), n in zip(refs, dsts, auxs, bufs, SIZES):
        got, want = _bits(d.cpu()), _bits(ref_d.contiguous())
        nan = torch.isnan(ref_d.float())
        assert torch.equal(torch.isnan(d.cpu().float()), nan), f"NaN pattern differs (n={n})"
        bad = (got != want) & ~nan
        assert not bad.any(), f"n={n}: {int(bad.sum())} elements differ, first at {int(bad.nonzero()[0])}"
        assert torch.equal(_bits(x.cpu()), _bits(ref_x.contiguous())), f"master/source wrong (n={n})"
        for before, after in ((d0buf, dbuf), (a0buf, abuf)):
            span = slice(before.numel() - GUARD, None)
            assert torch.equal(_bits(before.cpu())[:GUARD], _bits(after.cpu())[:GUARD]), "guard before written"
            assert torch.equal(_bits(before.cpu())[span], _bits(after.cpu())[span]), "guard after written"


@pytest.mark.parametrize("dist", list(Dist), ids=lambda d: d.label)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(M), ids=lambda m: m.name)
@pytest.mark.parametrize("ext", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mode_dtype_dist_bitwise(request, ext, mode, dtype, dist):
    backend = request.getfixturevalue(ext)
    for seed in SEEDS:
        _check_modes(backend, mode, dtype, dist, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sign_launch_equals_cpu(cpu, cuda, dtype):
    """The sign stream is exact: a whole AXPBY_SR launch gives the same bits on both backends."""
    base, n = 2**20 + 1, 3 * cuda.C.chunk_size() + 5
    x = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    xc, xg = x.clone(), x.clone().cuda()
    cpu.launch([xc], [base], dtype, M.AXPBY_SR, Dist.SIGN, 99, 0.999, 1e-3, 0.0)
    cuda.launch([xg], [base], dtype, M.AXPBY_SR, Dist.SIGN, 99, 0.999, 1e-3, 0.0)
    assert torch.equal(_bits(xc), _bits(xg.cpu()))


def test_sign_fill_known_answers(cpu):
    """docs/rng_spec.md "Signs": seed 0, counter 0 gives z[0..3] = -1, +1, -1, +1 and z[32] = -1."""
    t = torch.full((129,), float("nan"))
    cpu.launch([t], [0], torch.float32, M.FILL, Dist.SIGN, 0, 0.0, 0.0, 0.0)
    assert t[:4].tolist() == [-1.0, 1.0, -1.0, 1.0] and t[32].item() == -1.0
    assert torch.equal(t, rng.signs(0, 0, 129))


def test_stochastic_rounding_of_special_values(cpu):
    """NaN, +-inf, fp16 overflow, subnormals and values below 2**-24 go through AXPBY_SR as rng.stochastic_round."""
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 65504.0, -65504.0, 65519.0, 6.0e-8, -6.0e-8,
                         2.0**-25, 3.0e-5, -2.0**-14, 0.0, -0.0, 1.0, 3.0e38, -1.0e-38] * 9)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(vals.numel(), dtype=torch.float32)
        d = torch.empty(vals.numel(), dtype=dtype)
        # MASTER_VIEW cannot stochastically round; AXPBY_SR from fp32 values needs d = y exactly: use sign z with
        # beta = 0 and alpha = 1 on values already in dtype, then alpha != 1 to leave the grid
        for alpha in (1.0, 1.0 + 2.0**-9, 0.7):
            d.copy_(vals.to(dtype))
            x.copy_(_fma32(rng.signs(5, 11, x.numel()), 0.0, d.float() * torch.tensor(alpha)))  # z * 0 = +-0
            cpu.launch([d], [11], dtype, M.AXPBY_SR, Dist.SIGN, 5, alpha, 0.0, 0.0)
            want = rng.stochastic_round(x, dtype, 5, 11)
            nan = torch.isnan(want.float())
            assert torch.equal(torch.isnan(d.float()), nan)
            assert torch.equal(_bits(d)[~nan], _bits(want)[~nan]), (dtype, alpha)


def test_out_rejects_missing_or_overlapping_source(cpu):
    x = torch.zeros(64)
    for aux, word in ((None, "source"), ([x[8:40]], "overlaps")):
        with pytest.raises(ValueError, match=word):
            cpu.launch([x[:32]], [0], torch.float32, M.OUT, Dist.GAUSSIAN, 1, 1.0, 1e-3, 0.0, aux=aux)
