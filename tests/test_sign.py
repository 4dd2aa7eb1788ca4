"""The sign (Rademacher) stream: the spec's known answers, the reference, and every backend bit for bit."""
import pytest
import torch

import mezo_kernels as mk
from mezo_kernels import kernels as dispatch, rng
from mezo_kernels.rng import Distribution, KernelMode
from conftest import DEVICE, guarded, guards_intact
from kernel_cases import assert_same_bits, feature_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 17, 4097]
SEED = 0x5EED_0F_5165


def test_spec_known_answers():
    # docs/rng_spec.md "Signs": seed 0, k 0, w0 = 6627e8d5 -> z[0..3] = -1, +1, -1, +1; z[32] = -1
    assert rng.signs(0, 0, 4).tolist() == [-1.0, 1.0, -1.0, 1.0]
    assert rng.signs(0, 32, 1).tolist() == [-1.0]
    assert rng.signs(0, 0, 4).dtype == torch.float32


@pytest.mark.parametrize("seed,g0", [(0, 0), (42, 128 * 5 + 77), (2**64 - 1, 2**40 + 3)])
def test_signs_are_the_bits_of_the_words(seed, g0):
    n = 300
    z = rng.signs(seed, g0, n).tolist()
    for i, g in enumerate(range(g0, g0 + n)):
        w = rng.words_table(seed, [g >> 7])[0][(g & 127) >> 5]
        assert z[i] == 1.0 - 2.0 * ((w >> (g & 31)) & 1), g
    assert rng.signs(seed, g0 + 129, 50).tolist() == z[129:179]      # any window of the same stream


def test_direction_and_distribution_names():
    assert torch.equal(rng.direction(7, 4, 40, distribution="rademacher"), rng.signs(7, 4, 40))
    assert torch.equal(rng.direction(7, 4, 40), rng.normal(7, 4, 40))
    assert rng.distribution_code("rademacher") is Distribution.SIGN
    assert rng.distribution_code(0) is Distribution.GAUSSIAN
    with pytest.raises(ValueError, match="unknown distribution 'sign'"):
        rng.distribution_code("sign")
    with pytest.raises(TypeError, match="distribution"):
        rng.distribution_code(1.0)


def test_sign_statistics():
    z = rng.signs(SEED, 0, 1 << 16)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / 256                 # 5 sd of the mean of 2**16 fair signs
    assert abs((z[1:] * z[:-1]).mean().item()) < 5 / 256  # neighbours uncorrelated


@pytest.mark.parametrize("backend", feature_backends(KernelMode.FILL, "rademacher"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_fill_sign_bit_exact(backend, dtype, n):
    for base in (0, 5, 128 * 3 + 127):
        buf, t = guarded(n, dtype)
        assert mk.fill_sign_(t, SEED, base, backend=backend) is t
        assert_same_bits(t, rng.signs(SEED, base, n, DEVICE).to(dtype), f"{backend} base {base}")
        assert guards_intact(buf, n), "a kernel wrote outside its tensor"


@pytest.mark.parametrize("backend", feature_backends(KernelMode.MASTER_VIEW, "rademacher"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_paramset_sign_perturb_and_restore(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    theta = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in SIZES]
    for exact in (False, True):
        ps = mk.ParamSet([t.clone() for t in theta], backend=backend, distribution="rademacher",
                         exact_restore=exact)
        assert ps.distribution == "rademacher"
        ps.perturb_(SEED, 1e-2)
        for t0, t, base in zip(theta, ps.tensors, ps.bases):
            ref = rng.fma_update(t0, rng.signs(SEED, base, t.numel(), DEVICE), 1.0, 1e-2).to(dtype)
            assert_same_bits(t, ref, f"{backend} +eps")
        ps.perturb_(SEED, -1e-2).restore_()
        if exact:   # masters: restore is bit-exact (without, in-place arithmetic may drift by an ulp)
            for t0, t in zip(theta, ps.tensors):
                assert_same_bits(t, t0, f"{backend} restore")


def test_paramset_distribution_argument():
    assert mk.ParamSet([torch.zeros(3)]).distribution == "gaussian"
    with pytest.raises(ValueError, match="unknown distribution 'uniform'"):
        mk.ParamSet([torch.zeros(3)], distribution="uniform")
    with pytest.raises(TypeError, match="distribution"):
        mk.ParamSet([torch.zeros(3)], distribution=None)
    assert "rademacher" in repr(mk.ParamSet([torch.zeros(3)], distribution="rademacher", backend="torch"))


# ------------------------------------------------------------------------------------------- dispatch
class _OldExtension:
    """An extension built before distributions: no ``dist`` argument, four modes."""

    def __init__(self, with_dist: bool):
        self.calls, self.with_dist = [], with_dist

    def chunk_size(self):
        return 4096

    def spec_codes(self):
        codes = {"modes": {m.name: int(m) for m in list(KernelMode)[:4]}}
        if self.with_dist:
            codes = {"modes": {m.name: int(m) for m in KernelMode},
                     "distributions": {d.label: int(d) for d in Distribution}}
        return codes

    def axpby(self, *args):
        self.calls.append(args)


@pytest.mark.parametrize("with_dist", [False, True])
def test_extension_signature_follows_its_build(monkeypatch, with_dist):
    fake = _OldExtension(with_dist)
    ext = dispatch._Ext("cpu", "mezo_kernels._fake")
    monkeypatch.setattr(ext, "_mod", fake)
    monkeypatch.setattr(ext, "_loaded", True)
    monkeypatch.setitem(dispatch._REGISTRY, "cpu", ext)
    monkeypatch.setattr(dispatch, "_CHOICES", {})                  # decisions about the real extension: not here
    cpu = torch.device("cpu")
    SIGN, GAUSSIAN = Distribution.SIGN, Distribution.GAUSSIAN
    t = torch.zeros(8)
    g = mk.perturb.plan._Group([t], [0], None)
    ext.launch(g, 9, 1.0, 0.5, 0.0, KernelMode.AXPBY)
    assert len(fake.calls[-1]) == (12 if with_dist else 11)          # dist sits after mode when supported
    if with_dist:
        assert fake.calls[-1][7:9] == (int(Distribution.GAUSSIAN), 9)
        assert dispatch.choose("cpu", cpu, KernelMode.OUT, SIGN) is ext
    else:
        assert fake.calls[-1][7] == 9
        with pytest.raises(ValueError, match="without the rademacher distribution"):
            ext.launch(g, 9, 1.0, 0.5, 0.0, KernelMode.AXPBY, Distribution.SIGN)
        with pytest.raises(ValueError, match="'cpu'.*without the rademacher distribution"):
            dispatch.choose("cpu", cpu, KernelMode.AXPBY, SIGN)
        with pytest.raises(ValueError, match="without kernel mode OUT"):
            dispatch.choose("cpu", cpu, KernelMode.OUT, GAUSSIAN)
        monkeypatch.setattr(dispatch, "_WARNED", set())
        with pytest.warns(RuntimeWarning, match="'cpu' is present but .* without the rademacher.*using 'torch'"):
            assert dispatch.choose("auto", cpu, KernelMode.AXPBY, SIGN).name == "torch"
        assert dispatch.choose("auto", cpu, KernelMode.AXPBY, GAUSSIAN) is ext
