"""The Triton RNG device code (``mezo_kernels/triton/philox.py``) against the spec's known answers and the
pure-PyTorch reference: Philox words, seed words, the randn4x normals (and Triton's own ``tl.randn4x``).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set here before the first import of
mezo_kernels.triton, as the conftest does)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the Triton backend is untestable here")

from mezo_kernels import rng  # noqa: E402
from mezo_kernels.triton import philox as P  # noqa: E402
from test_triton_kernel import DEV, _WHY  # noqa: E402  (the device the Triton backend runs on here)

pytestmark = pytest.mark.skipif(DEV is None, reason=f"triton backend unusable here: {_WHY}")


# ------------------------------------------------------------------------------------------- Philox words
def test_philox_known_answers():
    kat = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for (k0, k1), ctr, words in kat:
        got = P.philox_words(k0 | (k1 << 32), torch.tensor(ctr, dtype=torch.int64, device=DEV))
        assert got.tolist() == list(words)


SPEC_TABLE = {(0, 0): (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8, 0.0465515),
              (0, 1): (0xF8E4CCA4, 0x5CB200DB, 0xB1A574EB, 0x097EFF67, -0.3883614),
              (0, 2): (0x04FAA329, 0x51C732A6, 0x241513AD, 0x459135E4, -1.6379520),
              (0, 3): (0xC990EF29, 0x6A4474A6, 0x9AC9134F, 0x6D413E04, 0.6315316),
              (42, 0): (0x9CEAF053, 0x77F5493B, 0x12BF50AD, 0x5742B3D7, 0.6606134),
              (42, 1): (0xFCDB2127, 0x53BA6CFD, 0x838F5A6E, 0x744E06FB, -1.5427135)}


def _counters(k):
    zero = torch.zeros_like(k)
    return torch.stack((k & 0xFFFFFFFF, k >> 32, zero, zero), dim=-1).to(DEV)


def test_philox_spec_table():
    for (seed, k), row in SPEC_TABLE.items():
        got = P.philox_words(seed, _counters(torch.tensor([k])))
        assert got[0].tolist() == list(row[:4]), (seed, k)
        assert abs(P.randn4x(seed, k, 1, DEV)[0].item() - row[4]) < 1e-6, (seed, k)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1, -1, -(2**63)])
def test_philox_words_match_reference(seed):
    k = torch.cat((torch.arange(0, 6), torch.arange(2**32 - 3, 2**32 + 3),
                   torch.tensor([2**33 + 7, 2**62 + 1, 2**63 - 1])))
    got = P.philox_words(seed, _counters(k))
    assert torch.equal(got.cpu(), rng.philox_words(seed, k))


def test_seed_words_are_int32():
    # One Triton signature for every seed: both halves always land in the signed int32 range.
    for seed in (0, 1, 2**31, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1, -1, -(2**63)):
        lo, hi = P.seed_words(seed)
        assert -(2**31) <= lo < 2**31 and -(2**31) <= hi < 2**31
        s = rng.check_seed(seed)
        assert (lo & 0xFFFFFFFF, hi & 0xFFFFFFFF) == (s & 0xFFFFFFFF, s >> 32)
    with pytest.raises(ValueError, match="seed"):
        P.seed_words(2**64)


# ------------------------------------------------------------------------------------------- normals
@pytest.mark.parametrize("seed", [0, 42, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("k_start", [0, 2**32 - 100, 2**40 + 3])
def test_randn4x_matches_float64_reference(seed, k_start):
    n = 257
    got = P.randn4x(seed, k_start, n, DEV).cpu().double()
    ref = rng.normal_f64(seed, 4 * k_start, 4 * n)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [42, 2**40 + 7])
def test_randn4x_equals_tl_randn4x(seed):
    """The spec's claim: the four z of counter k are tl.randn4x(seed, k) (Triton >= 3.4, int64 offsets)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _ref_kernel(out_ptr, seed, k_start, BLOCK: tl.constexpr):
        q = tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(seed, k_start.to(tl.int64) + q)
        tl.store(out_ptr + 4 * q, n0)
        tl.store(out_ptr + 4 * q + 1, n1)
        tl.store(out_ptr + 4 * q + 2, n2)
        tl.store(out_ptr + 4 * q + 3, n3)

    for k_start in (0, 2**32 - 8):
        ref = torch.empty(4 * 64, dtype=torch.float32, device=DEV)
        _ref_kernel[(1,)](ref, seed, k_start, BLOCK=64)
        torch.testing.assert_close(P.randn4x(seed, k_start, 64, DEV), ref, rtol=0, atol=0)
