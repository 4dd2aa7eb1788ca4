"""Stochastic rounding (mode AXPBY_SR, ``ParamSet.update_(rounding="stochastic")``) against the spec.

Hand-computed cases fix the rule (which neighbours, which threshold q, which random bits r); a statistical test
checks that it is unbiased; every backend that serves the mode matches ``rng.stochastic_round`` bit for bit.
"""
import pytest
import torch

import mezo_kernels as mk
from mezo_kernels import rng
from mezo_kernels.rng import KernelMode
from conftest import DEVICE
from kernel_cases import assert_same_bits, bits, feature_backends

SEED = 0xC0FFEE_1234_5678
F16, BF16 = torch.float16, torch.bfloat16


def _f(bits32: int) -> float:
    return torch.tensor([bits32], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


# (name, y as fp32 bits, dtype, q = threshold in [0, 2**16], toward-zero neighbour, away neighbour) -- by hand
CASES = [
    ("bf16 halfway 1+2^-8", 0x3F808000, BF16, 0x8000, 1.0, 1.0 + 2**-7),
    ("bf16 just above 1.0", 0x3F800001, BF16, 1, 1.0, 1.0 + 2**-7),
    ("bf16 carry into the exponent", 0x3FFFFFFF, BF16, 0xFFFF, 2 - 2**-7, 2.0),
    ("bf16 negative quarter", 0xBFC04000, BF16, 0x4000, -1.5, -1.5 - 2**-7),
    ("bf16 exact value", 0x3FC00000, BF16, 0, 1.5, 1.5),
    ("fp16 halfway 1+2^-11", 0x3F801000, F16, 0x8000, 1.0, 1.0 + 2**-10),
    ("fp16 carry into the exponent", 0x3FFFFFFF, F16, 0xFFF8, 2 - 2**-10, 2.0),
    ("fp16 subnormal, e=-24", 0x33C00000, F16, 0x8000, 2**-24, 2**-23),
    ("fp16 subnormal, e=-20, a quarter", 0x35820000, F16, 0x4000, 2**-20, 2**-20 + 2**-24),
    ("fp16 below 2^-24 (e=-26)", 0x32800000, F16, 0x4000, 0.0, 2**-24),
    ("fp16 below 2^-24, negative", 0xB2800000, F16, 0x4000, -0.0, -(2**-24)),
    ("fp32 subnormal to fp16", 0x00000005, F16, 0, 0.0, 2**-24),
    ("fp16 past the largest finite", 0x477FEF00, F16, 30720, 65504.0, float("inf")),
]


@pytest.mark.parametrize("name,b,dtype,q,lo,hi", CASES, ids=[c[0] for c in CASES])
def test_hand_computed_cases(name, b, dtype, q, lo, hi):
    y = _f(b)
    n = 512                                   # 512 global indices: 512 draws of r for the same y
    r = rng.sr_bits(SEED, 1000, n)
    got = rng.stochastic_round(torch.full((n,), y), dtype, SEED, 1000)
    expect = torch.where(r < q, torch.tensor(hi), torch.tensor(lo)).to(dtype)
    assert_same_bits(got, expect, name)
    if 0x800 <= q <= 0xF800:                  # then both outcomes occur among 512 draws (fails with p < 1e-13)
        assert len(set(got.float().tolist())) == 2, name


def test_specials_round_to_nearest():
    y = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e5])
    for dtype in (F16, BF16):
        got = rng.stochastic_round(y, dtype, SEED, 0)
        assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == -float("inf")
        assert_same_bits(got[3:5], y[3:5].to(dtype), "signed zeros")
    assert rng.stochastic_round(y[5:], F16, SEED, 0).isinf().all()          # past fp16's range
    assert rng.stochastic_round(y[5:], BF16, SEED, 0).isfinite().all()


def _spacing(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 spacing of ``dtype`` at |y| (subnormal spacing below the smallest normal)."""
    fi = torch.finfo(dtype)
    mant = {F16: 10, BF16: 7}[dtype]
    e = torch.floor(torch.log2(y.double().abs().clamp_min(fi.tiny)))
    return torch.exp2(e - mant)


def test_fp32_is_identity_and_result_is_a_neighbour():
    y = torch.randn(4096) * torch.logspace(-30, 4, 4096)
    assert_same_bits(rng.stochastic_round(y, torch.float32, SEED, 0), y, "fp32")
    for dtype in (F16, BF16):
        keep = y.abs() < 60000
        got = rng.stochastic_round(y[keep], dtype, SEED, 7).double()
        sp = _spacing(y[keep], dtype)
        assert bool(((got - y[keep].double()).abs() < sp).all()), dtype        # one of the two neighbours ...
        assert bool((torch.remainder(got, sp) == 0).all()), dtype               # ... on the dtype's grid


def test_sr_bits_layout_from_the_words():
    s = rng.sr_seed(SEED)
    assert s == rng.splitmix64(SEED ^ int.from_bytes(b"SR_ROUND", "big")) and s != SEED
    g0, n = 8 * 1000 + 3, 21
    r = rng.sr_bits(SEED, g0, n).tolist()
    for i, g in enumerate(range(g0, g0 + n)):
        w = rng.words_table(s, [g >> 3])[0][(g & 7) >> 1]
        assert r[i] == (w >> (16 * (g & 1))) & 0xFFFF, g
    assert rng.sr_bits(SEED, g0 + 5, 9).tolist() == r[5:14]


@pytest.mark.parametrize("y,dtype", [(1.0 + 2**-9 + 2**-12, BF16), (-3.0 - 2**-13, F16), (1.3e-6, F16),
                                     (2.2e-8, F16)])
def test_unbiased(y, dtype):
    n = 1 << 17
    got = rng.stochastic_round(torch.full((n,), y), dtype, SEED, 12345).double()
    vals = sorted(set(got.tolist()))
    assert len(vals) == 2, vals
    spacing = vals[1] - vals[0]
    p = (y - vals[0]) / spacing
    sd = spacing * (p * (1 - p) / n) ** 0.5
    assert abs(got.mean().item() - y) < 5 * sd + spacing * 2**-16, (got.mean().item(), y, sd)
    # round to nearest is biased here, by far more than the noise
    assert abs(torch.tensor([y]).to(dtype).double().item() - y) > 20 * sd


# ------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, F16, BF16])
@pytest.mark.parametrize("backend", feature_backends(KernelMode.AXPBY_SR, "rademacher"))
def test_update_stochastic_matches_reference(backend, dtype, dist):
    sizes, bases = (1, 3, 17, 4097), [5, 8, 1003, 2**33 + 6]     # explicit bases, most not multiples of 4
    gen = torch.Generator().manual_seed(11)
    theta = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in sizes]
    ps = mk.ParamSet([t.clone() for t in theta], bases=bases, backend=backend, exact_restore=False,
                     distribution=dist)
    lr, grad, wd = 2e-3, 1.7, 0.1
    ps.update_(SEED, lr, grad, weight_decay=wd, rounding="stochastic")
    alpha, beta = 1 - lr * wd, -lr * grad
    for t0, t, base in zip(theta, ps.tensors, bases):
        z = rng.direction(SEED, base, t.numel(), DEVICE, dist)
        ref = rng.stochastic_round(rng.fma_update(t0, z, alpha, beta), dtype, SEED, base)
        if dist == "rademacher":
            assert_same_bits(t, ref, backend)
        else:   # a backend's gaussian z may differ from the reference by an ulp, which can move a rounding
            assert (bits(t.cpu()) != bits(ref.cpu())).double().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, F16, BF16])
def test_lr_zero_steps_leave_weights_bit_identical(dtype):
    """1,000 stochastic-rounding steps with lr = 0, no masters: fma(z, 0, theta) = theta, so sround keeps it."""
    gen = torch.Generator().manual_seed(5)
    ts = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in (3, 17, 130)]
    ts[2][::7] = 2**-20 * torch.randn(19, generator=gen).to(dtype)     # fp16 subnormals, tiny bf16
    before = [t.clone() for t in ts]
    ps = mk.ParamSet(ts, exact_restore=False)
    for step in range(1000):
        ps.update_(rng.seed_for(SEED, step), 0.0, float(step % 7) - 3.0, weight_decay=0.1, rounding="stochastic")
    for a, b in zip(before, ps.tensors):
        assert_same_bits(b, a, str(dtype))


@pytest.mark.parametrize("dtype,w", [(BF16, 1.5), (F16, 1.5)])
def test_tiny_update_survives_in_expectation(dtype, w):
    """Per-element steps of an eighth of a spacing: lost entirely to round-to-nearest, kept on average by SR."""
    n = 4096
    spacing = 2**-7 if dtype == BF16 else 2**-10
    lr, grad = spacing / 8, 1.0                    # with sign directions every |step| is exactly spacing / 8
    outs = {}
    for rounding in ("nearest", "stochastic"):
        ps = mk.ParamSet([torch.full((n,), w, dtype=dtype, device=DEVICE)], exact_restore=False,
                         distribution="rademacher")
        ps.update_(SEED, lr, grad, rounding=rounding)
        outs[rounding] = ps.tensors[0].double()
    z = rng.signs(SEED, 0, n, DEVICE).double()
    step = -lr * grad * z
    assert bool((outs["nearest"] == w).all()), "round-to-nearest kept a step under half a spacing"
    ratio = ((outs["stochastic"] - w) / step).mean().item()     # 8 with p = 1/8, else 0: mean 1, sd 0.041
    assert abs(ratio - 1.0) < 0.25, ratio


def test_rounding_argument_is_checked():
    ps = mk.ParamSet([torch.zeros(4, dtype=BF16)], exact_restore=False)
    with pytest.raises(ValueError, match="rounding"):
        ps.update_(1, 0.1, 1.0, rounding="stochastik")
    with pytest.raises(TypeError, match="rounding"):
        ps.update_(1, 0.1, 1.0, rounding=None)
    ps.perturb_(1, 1e-3)
    with pytest.raises(RuntimeError, match="perturbed"):
        ps.update_(1, 0.1, 1.0)
    with pytest.raises(TypeError, match="float32"):
        rng.stochastic_round(torch.zeros(2, dtype=torch.float64), BF16, 0)
    with pytest.raises(TypeError, match="dtype"):
        rng.stochastic_round(torch.zeros(2), torch.int8, 0)
