"""``ParamSet.perturbed_copy`` / ``perturbed_copies`` (kernel mode OUT): round(theta + offset*z) in another
buffer, with theta's bits and version counter untouched, on every backend that serves the mode."""
import pytest
import torch

import mezo_kernels as mk
from mezo_kernels import rng
from mezo_kernels._compat import param_version
from mezo_kernels.rng import KernelMode
from conftest import DEVICE, guarded, guards_intact
from kernel_cases import assert_same_bits, feature_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 17, 4097]
SEED, OFFSET = 0x0C0B_1E5, 3e-2


def _theta(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in sizes]


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", feature_backends(KernelMode.OUT, "rademacher"))
def test_copy_is_round_theta_plus_offset_z(backend, dtype, dist):
    for bases in (None, [1, 6, 130, 2**33 + 3]):            # default bases and unaligned explicit ones
        theta = _theta(dtype)
        ps = mk.ParamSet(theta, bases=bases, backend=backend, distribution=dist)
        snap = [t.clone() for t in theta]
        versions = param_version(theta)
        for i, (t, base) in enumerate(zip(theta, ps.bases)):
            buf, out = guarded(t.numel(), dtype)
            assert ps.perturbed_copy(SEED, OFFSET, i, out=out) is out
            assert guards_intact(buf, t.numel()), "a kernel wrote outside its tensor"
            z = rng.direction(SEED, base, t.numel(), DEVICE, dist)
            ref = rng.fma_update(snap[i], z, 1.0, OFFSET).to(dtype)
            if dist == "rademacher":
                assert_same_bits(out, ref, f"{backend} tensor {i}")
            else:   # gaussian z may be an ulp off the reference: compare with the same backend's in-place path
                inplace = mk.ParamSet([snap[i].clone()], bases=[base], backend=backend, exact_restore=False)
                inplace.perturb_(SEED, OFFSET)
                assert_same_bits(out, inplace.tensors[0], f"{backend} tensor {i} vs in place")
        for t, s in zip(theta, snap):
            assert_same_bits(t, s, "theta was written")
        assert param_version(theta) == versions, "theta's version counter moved"


@pytest.mark.parametrize("backend", feature_backends(KernelMode.OUT, "rademacher"))
def test_copies_equal_single_copies(backend):
    theta = _theta(torch.bfloat16, [17, 0, 4097]) + _theta(torch.float32, [3], seed=1)
    ps = mk.ParamSet(theta, backend=backend, distribution="rademacher")
    launches = ps.launches
    outs = ps.perturbed_copies(SEED, -OFFSET)
    assert ps.launches == launches + 2                    # one per dtype group
    assert [o.shape for o in outs] == [t.shape for t in theta]
    for i, o in enumerate(outs):
        assert_same_bits(o, ps.perturbed_copy(SEED, -OFFSET, i), f"tensor {i}")
    again = ps.perturbed_copies(SEED + 1, OFFSET)          # cached plans, new buffers: new values
    assert not torch.equal(again[0], outs[0]) and outs[0].data_ptr() != again[0].data_ptr()


def test_out_buffer_is_reused_and_refreshed():
    theta = _theta(torch.float16, [33])
    ps = mk.ParamSet(theta, backend="torch", distribution="rademacher")
    out = torch.empty_like(theta[0])
    a = ps.perturbed_copy(SEED, OFFSET, 0, out=out).clone()
    ps.perturbed_copy(SEED, -OFFSET, 0, out=out)
    assert not torch.equal(a, out)
    ps.perturbed_copy(SEED, OFFSET, 0, out=out)
    assert_same_bits(out, a, "same seed and offset")
    new = torch.empty_like(theta[0])                      # another buffer: the cached plan is retargeted
    assert_same_bits(ps.perturbed_copy(SEED, OFFSET, 0, out=new), a, "new buffer")


def test_copy_works_with_masters_and_after_update():
    theta = _theta(torch.bfloat16, [40])
    ps = mk.ParamSet(theta, backend="torch")              # bf16: fp32 masters by default
    ps.update_(SEED, 0.1, 1.0)
    z = rng.normal(SEED + 1, 0, 40)
    ref = rng.fma_update(ps.tensors[0], z, 1.0, OFFSET).to(torch.bfloat16)
    assert_same_bits(ps.perturbed_copy(SEED + 1, OFFSET, 0), ref, "after update_")


def test_errors_name_the_problem():
    theta = [torch.zeros(4, 3), torch.zeros(5, dtype=torch.float16)]
    ps = mk.ParamSet(theta, backend="torch")
    with pytest.raises(ValueError, match="index 2 out of range"):
        ps.perturbed_copy(SEED, OFFSET, 2)
    with pytest.raises(TypeError, match="index must be an int"):
        ps.perturbed_copy(SEED, OFFSET, "0")
    with pytest.raises(ValueError, match="shape"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=torch.zeros(12))
    with pytest.raises(TypeError, match="dtype"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="not contiguous"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match="device"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match="overlaps"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=theta[0])
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        ps.perturbed_copy(SEED, OFFSET, 0, out=[0.0] * 12)
    ps.perturb_(SEED, OFFSET)
    with pytest.raises(RuntimeError, match="restore_"):
        ps.perturbed_copy(SEED, OFFSET, 0)
    with pytest.raises(RuntimeError, match="restore_"):
        ps.perturbed_copies(SEED, OFFSET)
    ps.restore_()
    assert ps.perturbed_copy(SEED, OFFSET, -1).dtype == torch.float16      # negative index: from the end


def test_forced_backend_without_the_mode_is_a_value_error(monkeypatch):
    from mezo_kernels import kernels as dispatch
    ps = mk.ParamSet([torch.zeros(5)], backend="torch")
    monkeypatch.setattr(dispatch._Torch, "unsupported", staticmethod(lambda mode, dist: f"no {mode.name} here"))
    monkeypatch.setattr(dispatch, "_CHOICES", {})                  # forget what the real torch backend served
    with pytest.raises(ValueError, match="no OUT here"):
        ps.perturbed_copy(SEED, OFFSET, 0)
