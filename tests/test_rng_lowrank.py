"""The low-rank direction spec (docs/rng_spec.md, "Low-rank directions"): counters pinned by known answers, the
layout that lets a row or column shard read only its factors, the dense fallback, and the statistics of z."""
import math

import pytest
import torch

from mezo_kernels import rng
from mezo_kernels.rng.lowrank import check_rank, lowrank_direction, lowrank_factors, uses_lowrank

# computed once from the reference and written down: a change of counters or layout fails here
KNOWN_U = {(0, 0): -0.5904635787010193, (0, 1): -1.3269997835159302, (4, 0): -0.4032032787799835,
           (4, 1): 0.8308340311050415}
KNOWN_V = {(0, 0): -0.9206582903862, (0, 1): 0.16700862348079681, (6, 0): -1.2027719020843506,
           (6, 1): 1.4055017232894897}


def test_known_answers_pin_the_counters():
    u, v = lowrank_factors(42, 42, 8, 5, 7, 2)
    assert u.shape == (5, 2) and v.shape == (7, 2) and u.dtype == v.dtype == torch.float32
    for (i, k), want in KNOWN_U.items():
        assert u[i, k].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
    for (j, k), want in KNOWN_V.items():
        assert v[j, k].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
    z = lowrank_direction(42, 42, 8, (5, 7), 2)
    assert z[0, 0].item() == pytest.approx(0.22768469154834747, rel=1e-6)
    assert z[4, 6].item() == pytest.approx(1.1686354875564575, rel=1e-6)
    assert lowrank_direction(7, 9, 0, (64, 48), 1)[3, 5].item() == pytest.approx(-0.3242994546890259, rel=1e-6)


@pytest.mark.parametrize("m,n,r,base", [(5, 7, 2, 8), (13, 3, 1, 0), (33, 17, 4, 101)])
def test_factors_are_the_gaussian_stream_at_documented_indices(m, n, r, base):
    seed_u, seed_v = 2**64 - 5, 12345
    u, v = lowrank_factors(seed_u, seed_v, base, m, n, r)
    assert torch.equal(u.reshape(-1), rng.normal(seed_u, base, m * r))
    assert torch.equal(v.reshape(-1), rng.normal(seed_v, base + m * r, n * r))
    # a Shard(0) rank holding rows [lo, hi) reads exactly its rows of U from one contiguous range
    lo, hi = 1, min(m, 4)
    assert torch.equal(rng.normal(seed_u, base + lo * r, (hi - lo) * r).view(hi - lo, r), u[lo:hi])
    # ... and a Shard(1) rank its rows of V
    assert torch.equal(rng.normal(seed_v, base + m * r + lo * r, r).view(1, r), v[lo:lo + 1])


def test_z_is_the_scaled_product_rounded_once():
    m, n, r = 9, 11, 3
    u, v = lowrank_factors(5, 5, 4, m, n, r)
    want = (u.double() @ v.double().T / math.sqrt(r)).float()
    z = lowrank_direction(5, 5, 4, (m, n), r)
    assert torch.equal(z, want)
    assert torch.linalg.matrix_rank(z.double(), rtol=1e-5).item() == r      # rank r up to the fp32 rounding


def test_factors_stay_inside_the_tensors_own_index_range():
    for shape in [(5, 7), (64, 48), (3, 100)]:
        for r in (1, 2, 4):
            if uses_lowrank(shape, r):
                assert r * (shape[0] + shape[1]) < shape[0] * shape[1]


def test_dense_fallback_for_small_and_non_matrix_tensors():
    assert not uses_lowrank((4, 4), 2)                 # r(m+n) = 16 = m n: no saving
    assert uses_lowrank((5, 5), 2)
    assert not uses_lowrank((10,), 1) and not uses_lowrank((2, 3, 4), 1)
    for shape in [(4, 4), (10,), (2, 3, 4)]:
        numel = math.prod(shape)
        assert torch.equal(lowrank_direction(3, 99, 12, shape, 2), rng.normal(3, 12, numel).view(shape))


def test_entries_have_unit_variance():
    z = lowrank_direction(11, 11, 0, (400, 300), 4)
    assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1.0) < 0.05


def test_lazy_v_keeps_v_when_only_u_seed_changes():
    u1, v1 = lowrank_factors(1, 77, 0, 6, 5, 1)
    u2, v2 = lowrank_factors(2, 77, 0, 6, 5, 1)
    assert torch.equal(v1, v2) and not torch.equal(u1, u2)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_rank_is_refused_by_name(bad, exc):
    with pytest.raises(exc, match="lowrank_r"):
        check_rank(bad)
    with pytest.raises(exc, match="lowrank_r"):
        lowrank_factors(1, 1, 0, 4, 4, bad)
