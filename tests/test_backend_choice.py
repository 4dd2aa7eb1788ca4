"""One backend decision per (backend, mode, distribution, device), asked by every path; the seed checked once, at
the public API; the distribution parsed once, when the set is built."""
import warnings

import pytest
import torch
from torch import nn

import mezo_kernels as mk
from mezo_kernels import kernels as dispatch, rng
from mezo_kernels.rng import Distribution, KernelMode
from mezo_kernels.virtual import VirtualPerturbation
from mezo_kernels.virtual.slices import perturbed_rows
from kernel_cases import assert_same_bits

SEED, EPS = 0x5EED_0F_C401CE, 0.125
CPU = torch.device("cpu")
NO_OUT = "backend 'cpu' is unavailable for cpu: mezo_kernels._fake was built without kernel mode OUT"


class _NoOutExtension:
    """A C++ extension built before mode OUT: every other mode and both distributions."""

    def __init__(self):
        self.calls = []

    def chunk_size(self):
        return 4096

    def spec_codes(self):
        return {"modes": {m.name: int(m) for m in KernelMode if m != KernelMode.OUT},
                "distributions": {d.label: int(d) for d in Distribution}}

    def axpby(self, *args):
        self.calls.append(args)


@pytest.fixture
def no_out(monkeypatch):
    """The "cpu" backend replaced by an extension without mode OUT (decisions and warnings start afresh)."""
    fake = _NoOutExtension()
    ext = dispatch._Ext("cpu", "mezo_kernels._fake")
    monkeypatch.setattr(ext, "_mod", fake)
    monkeypatch.setattr(ext, "_loaded", True)
    monkeypatch.setitem(dispatch._REGISTRY, "cpu", ext)
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.delenv("MEZO_BACKEND", raising=False)
    return fake


def _tensors():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(7, generator=g), torch.randn(6, 5, generator=g).to(torch.bfloat16)]


def _out_paths(ps, backend):
    """Every way to ask for mode OUT: one tensor, the whole set, rows by range and by index, a sliced forward."""
    lin = nn.Linear(5, 6, bias=False).to(torch.bfloat16)
    lin.weight.data = ps.tensors[1]                      # the module owns the set's 2-d tensor
    one = mk.ParamSet([("w", lin.weight)], backend=backend)
    vp = VirtualPerturbation(lin, [one], slice_bytes=24)   # 10-byte rows, 12-byte blocks: one row per slice
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def forward():
        with torch.no_grad(), vp.perturbed(SEED, EPS):
            return lin(x)

    return {"perturbed_copy": lambda: [ps.perturbed_copy(SEED, EPS, 1)],
            "perturbed_copies": lambda: ps.perturbed_copies(SEED, EPS),
            "rows(range)": lambda: [perturbed_rows(ps, SEED, EPS, 1, range(2, 5))],
            "rows(tensor)": lambda: [perturbed_rows(ps, SEED, EPS, 1, torch.tensor([4, 0]))],
            "sliced forward": lambda: [forward()]}


def test_named_backend_without_the_mode_refuses_alike_on_every_path(no_out):
    ps = mk.ParamSet(_tensors(), backend="cpu")
    assert ps.backend == "cpu"                           # the in-place modes are served
    texts = {}
    for what, call in _out_paths(ps, "cpu").items():
        with pytest.raises(ValueError) as e:
            call()
        texts[what] = str(e.value)
    assert set(texts.values()) == {texts["perturbed_copy"]}, texts
    assert texts["perturbed_copy"].startswith(NO_OUT)
    assert no_out.calls == []


def test_env_override_without_the_mode_refuses_alike_on_every_path(no_out, monkeypatch):
    monkeypatch.setenv("MEZO_BACKEND", "cpu")
    ps = mk.ParamSet(_tensors(), backend="auto")
    texts = set()
    for call in _out_paths(ps, "auto").values():
        with pytest.raises(ValueError, match=r"'cpu' \(from \$MEZO_BACKEND\)") as e:
            call()
        texts.add(str(e.value))
    assert len(texts) == 1


def test_auto_falls_back_alike_on_every_path(no_out):
    ts = _tensors()
    ps, ref = mk.ParamSet(ts, backend="auto"), mk.ParamSet([t.clone() for t in ts], backend="torch")
    assert ps.backend == "cpu"
    paths, want = _out_paths(ps, "auto"), _out_paths(ref, "torch")
    first = True
    for what, call in paths.items():
        if first:       # said once: the fallback may be far slower
            with pytest.warns(RuntimeWarning, match="'cpu' is present but .*without kernel mode OUT.*using 'torch'"):
                got = call()
            first = False
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = call()
        for g, w in zip(got, want[what]()):
            assert_same_bits(g, w, what)
    assert no_out.calls == []                             # mode OUT never reached the extension


def test_the_decision_is_made_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_CHOICES", {})
    asked = []
    decide = dispatch._decide

    def counting(name, from_env, device, mode, dist):
        asked.append(mode)
        return decide(name, from_env, device, mode, dist)

    monkeypatch.setattr(dispatch, "_decide", counting)
    ps = mk.ParamSet(_tensors(), backend="torch")
    assert sorted(asked) == [KernelMode.AXPBY, KernelMode.MASTER_UPDATE, KernelMode.MASTER_VIEW]
    for call in _out_paths(ps, "torch").values():        # 6 slices in the sliced forward alone
        call()
    for r in range(6):
        perturbed_rows(ps, SEED, EPS, 1, range(r, r + 1))
    mk.ParamSet(_tensors(), backend="torch").perturbed_copy(SEED, EPS, 0)   # another set: the same decision
    assert asked.count(KernelMode.OUT) == 1 and len(asked) == 4, asked
    for seed in range(3):                                # one decision per distribution
        mk.fill_normal_(torch.empty(9), seed, backend="torch")
        mk.fill_sign_(torch.empty(9), seed, backend="torch")
    assert asked[4:] == [KernelMode.FILL, KernelMode.FILL], asked


def test_choose_checks_its_backend_argument():
    with pytest.raises(TypeError, match="backend must be a str"):
        dispatch.choose(["cpu"], CPU, KernelMode.AXPBY, Distribution.GAUSSIAN)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        dispatch.choose("fast", CPU, KernelMode.AXPBY, Distribution.GAUSSIAN)
    with pytest.raises(TypeError, match="backend must be a str"):
        mk.fill_normal_(torch.empty(3), 0, backend=None)


# ------------------------------------------------------------------------------------------- checked once
def _count(monkeypatch, name):
    """Count calls to rng.<name> wherever the package and the spec reach it."""
    calls = []
    real = getattr(rng, name)

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    for mod in (rng, rng.philox, rng.bits):
        monkeypatch.setattr(mod, name, counting, raising=False)
    return calls


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_seed_checked_once_and_distribution_parsed_once(monkeypatch, backend):
    why = dispatch.unavailable_reason(backend, CPU)
    if why:
        pytest.skip(why)
    parses = _count(monkeypatch, "distribution_code")
    ps = mk.ParamSet(_tensors(), backend=backend, distribution="rademacher")
    assert len(parses) == 1
    seeds = _count(monkeypatch, "check_seed")
    calls = {"perturb_": lambda: ps.perturb_(-3, EPS), "restore_": ps.restore_,
             "update_": lambda: ps.update_(SEED, 1e-3, 0.5),
             "perturbed_copy": lambda: ps.perturbed_copy(SEED, EPS, 1),
             "perturbed_copies": lambda: ps.perturbed_copies(SEED, EPS),
             "perturbed_rows": lambda: perturbed_rows(ps, SEED, EPS, 1, range(1, 3)),
             "fill_sign_": lambda: mk.fill_sign_(torch.empty(9), SEED, backend=backend)}
    for what, call in calls.items():
        seeds.clear()
        launches = ps.launches
        call()
        assert len(seeds) == (what != "restore_"), (what, len(seeds), ps.launches - launches)
    assert len(parses) == 1


def test_bad_seeds_are_named_on_every_public_path():
    ps = mk.ParamSet(_tensors(), backend="torch")
    for bad, err in ((0.5, TypeError), (2**64, ValueError), (True, TypeError)):
        for call in (lambda: ps.perturbed_copy(bad, EPS, 0), lambda: ps.perturbed_copies(bad, EPS),
                     lambda: perturbed_rows(ps, bad, EPS, 1, range(2)), lambda: ps.perturb_(bad, EPS),
                     lambda: mk.fill_normal_(torch.empty(3), bad)):
            with pytest.raises(err, match="seed"):
                call()
    lin = nn.Linear(2, 2)
    vp = VirtualPerturbation(lin, [mk.ParamSet(list(lin.parameters()), backend="torch")])
    with pytest.raises(TypeError, match="seed"):
        with vp.perturbed(0.5, EPS):
            pass
