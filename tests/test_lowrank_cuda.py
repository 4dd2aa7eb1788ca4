"""The CUDA kernel of the fused low-rank update (csrc/cuda/lowrank.cu; issue 21), gpu marker: skipped here without a
GPU, run by bench/gpu_check.sh (`pytest -m gpu`).

- == the reference (mezo_kernels/perturb/lowrank.py, on the CPU) bit for bit given the device Gaussian stream
  (_C_cuda.randn4x), in fp32/fp16/bf16, nearest and stochastic, odd shapes (the masked path) and n % 8 == 0 (the
  16-byte path), ranks with their own unrolled kernel (1, 4, 16) and the any-rank one (2, 3), bases that are
  multiples of 8, of 4 and neither (one or two SR Philox calls per 8 columns);
- == the Triton backend bit for bit (both read the device stream);
- lr = 0 keeps bf16 bits, blocks equal the unsharded update's block, memory around the tensor is untouched, the
  known answers, `auto` picks it; the extension checks its own arguments.
"""
import pytest
import torch

from mezo_kernels import kernels, rng
from mezo_kernels.perturb import lowrank as L
from mezo_kernels.rng.lowrank import uses_lowrank

from test_lowrank_kernels import _TRITON_WHY, DTYPES, SEED_U, SEED_V, SHAPES, bits_equal, reference, weights

_CUDA_WHY = (kernels.lowrank_unsupported_reason("cuda", torch.device("cuda")) if torch.cuda.is_available()
             else "no CUDA GPU")
# odd shapes (masked scalar path), and shapes with n % 8 == 0 (16-byte path; 576: a SmolLM2 row) and several tiles
CUDA_SHAPES = SHAPES + [(130, 264), (64, 576), (200, 72), (7, 4104)]


def cuda_normal(seed, g0, n, device=None):
    """z(seed, g0 .. g0 + n - 1) from _C_cuda.randn4x (the device stream the CUDA kernel reads), on the CPU."""
    Cc = kernels._REGISTRY["cuda"].module()
    k0, k1 = g0 >> 2, (g0 + n - 1) >> 2
    out = torch.empty(4 * (k1 - k0 + 1), device="cuda")
    Cc.randn4x(seed, k0, k1 - k0 + 1, out.data_ptr(), torch.cuda.current_stream().cuda_stream)
    return out[g0 & 3:(g0 & 3) + n].cpu()


def cuda_cases():
    for shape in CUDA_SHAPES:
        for r in (1, 2, 3, 4, 16):     # 1, 4, 16: their own unrolled kernels; 2, 3: the any-rank kernel
            if uses_lowrank(shape, r):
                yield shape, r


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_WHY is not None, reason=str(_CUDA_WHY))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,r", list(cuda_cases()))
def test_cuda_matches_reference_bit_for_bit(shape, r, dtype, rounding):
    """Given the device Gaussian stream, the CUDA kernel lands on the reference's bits (computed on the CPU), for
    bases that are multiples of 8 (one SR Philox call per 8 columns), of 4, and neither."""
    for base in (13, 64, 2**33 + 6):
        w = weights(shape, dtype, seed=r)
        alpha, beta = 1.0 - 1e-3 * 0.1, -1e-3 * 2.7
        want = reference(w, r, base, alpha, beta, rounding, cuda_normal)
        got = L.lowrank_axpby_(w.cuda(), SEED_U, SEED_V, base, r, alpha, beta, rounding, "cuda").cpu()
        assert bits_equal(got, want), (shape, r, dtype, rounding, base)


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_WHY is not None, reason=str(_CUDA_WHY))
def test_cuda_semantics():
    """lr = 0 keeps bf16 bits; a block with full_shape/start equals that block of the full update; memory around
    the tensor is untouched; the known answers; the weights of an op that failed its checks are unchanged."""
    dev = torch.device("cuda")
    w = weights((33, 17), torch.bfloat16).to(dev)
    for rounding in ("nearest", "stochastic"):
        got = L.lowrank_update_(w.clone(), SEED_U, SEED_V, 9, 2, 0.0, 3.5, weight_decay=0.1, rounding=rounding,
                                backend="cuda")
        assert bits_equal(got.cpu(), w.cpu())
    M, N, r, base = 70, 136, 4, 5
    w = weights((M, N), torch.bfloat16).to(dev)
    full = L.lowrank_update_(w.clone(), SEED_U, SEED_V, base, r, 0.01, 1.5, rounding="stochastic", backend="cuda")
    for (r0, r1), (c0, c1) in [((3, 68), (0, N)), ((0, M), (8, 72)), ((69, 70), (135, 136)), ((5, 40), (3, 101))]:
        blk = w[r0:r1, c0:c1].clone()
        L.lowrank_update_(blk, SEED_U, SEED_V, base, r, 0.01, 1.5, rounding="stochastic", backend="cuda",
                          full_shape=(M, N), start=(r0, c0))
        assert bits_equal(blk.cpu(), full[r0:r1, c0:c1].cpu()), (r0, c0)
    guard = 37
    for m, n in [(33, 17), (64, 576)]:
        buf = torch.full((m * n + 2 * guard,), float("nan"), dtype=torch.float16, device=dev)
        x = buf[guard:guard + m * n].view(m, n)
        x.copy_(weights((m, n), torch.float16))
        L.lowrank_update_(x, SEED_U, SEED_V, 3, 2, 0.01, 1.0, rounding="stochastic", backend="cuda")
        assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[guard + m * n:]).all()
        assert not torch.isnan(x).any()
    z = L.lowrank_perturb_(torch.zeros(5, 7, device=dev), 42, 42, 8, 2, 1.0, backend="cuda").cpu()
    assert z[0, 0].item() == pytest.approx(0.22768469154834747, rel=1e-6, abs=1e-6)
    assert z[4, 6].item() == pytest.approx(1.1686354875564575, rel=1e-6, abs=1e-6)
    z = L.lowrank_perturb_(torch.zeros(64, 48, device=dev), 7, 9, 0, 1, 1.0, backend="cuda").cpu()
    torch.testing.assert_close(z, rng.lowrank.lowrank_direction(7, 9, 0, (64, 48), 1), rtol=1e-6, atol=1e-6)
    kernels._LOWRANK_CHOICES.clear()
    assert kernels.choose_lowrank("auto", dev) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_WHY is not None or _TRITON_WHY is not None, reason=str(_CUDA_WHY or _TRITON_WHY))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_equals_triton_bit_for_bit(dtype):
    """Both read the device stream (philox.h == the Triton device functions), so their updates are the same bits."""
    for shape, r, base in [((33, 17), 2, 7), ((130, 264), 4, 64), ((64, 576), 16, 3), ((40, 9), 3, 0)]:
        w = weights(shape, dtype, seed=2).cuda()
        for rounding in ("nearest", "stochastic"):
            a = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, base, r, 0.999, -0.4, rounding, "cuda")
            b = L.lowrank_axpby_(w.clone(), SEED_U, SEED_V, base, r, 0.999, -0.4, rounding, "triton")
            assert bits_equal(a.cpu(), b.cpu()), (shape, r, rounding)


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_WHY is not None, reason=str(_CUDA_WHY))
def test_cuda_extension_checks_its_arguments():
    Cc = kernels._REGISTRY["cuda"].module()
    w = torch.zeros(8, 9, device="cuda")
    need = Cc.lowrank_scratch(8, 9, 1)
    assert need == 1 * (64 + 64)
    s = torch.empty(need, dtype=torch.float64, device="cuda")
    args = dict(w_ptr=w.data_ptr(), m=8, n=9, row0=0, col0=0, M=8, N=9, r=1, base=0, dtype=0, stochastic=False,
                seed_u=1, seed_v=1, alpha=1.0, beta=1.0, scratch_ptr=s.data_ptr(), scratch_len=need)
    for bad, match in [(dict(r=0), "lowrank_r"), (dict(r=5), "dense"), (dict(w_ptr=0), "null"),
                       (dict(scratch_len=need - 1), "scratch"), (dict(scratch_ptr=0), "scratch"),
                       (dict(row0=1), "not inside"), (dict(dtype=3), "dtype")]:
        with pytest.raises(ValueError, match=match):
            Cc.lowrank_update(**{**args, **bad})
    with pytest.raises(ValueError, match="<= 65536"):
        Cc.lowrank_update(**{**args, "m": 2**20, "n": 2**20, "M": 2**20, "N": 2**20, "r": 65537})
