"""The spec module against the spec's own tables, plus the properties every backend inherits from it."""
import math

import pytest
import torch

from mezo_kernels import rng

KAT = [((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
TABLE = [(0, 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), 0.0465515),
         (0, 1, (0xF8E4CCA4, 0x5CB200DB, 0xB1A574EB, 0x097EFF67), -0.3883614),
         (0, 2, (0x04FAA329, 0x51C732A6, 0x241513AD, 0x459135E4), -1.6379520),
         (0, 3, (0xC990EF29, 0x6A4474A6, 0x9AC9134F, 0x6D413E04), 0.6315316),
         (42, 0, (0x9CEAF053, 0x77F5493B, 0x12BF50AD, 0x5742B3D7), 0.6606134),
         (42, 1, (0xFCDB2127, 0x53BA6CFD, 0x838F5A6E, 0x744E06FB), -1.5427135)]


@pytest.mark.parametrize("key,ctr,words", KAT)
def test_philox_known_answers(key, ctr, words):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    assert tuple(int(w) for w in rng.philox4x32_10(*key, *c)) == words


@pytest.mark.parametrize("seed,k,words,z", TABLE)
def test_words_and_normals_table(seed, k, words, z):
    assert rng.words_table(seed, [k])[0] == words
    assert abs(float(rng.normal_f64(seed, 4 * k, 1)[0]) - z) < 5e-7


def test_uniform_is_triton_formula_bit_exact():
    w = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x12345678, 0x9ABCDEF0], dtype=torch.int64)
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)   # bits 0x2FFFFFFF
    x = [v if v < 2**31 else 2**32 - 1 - v for v in w.tolist()]
    expect = torch.tensor(x, dtype=torch.int64).to(torch.float32) * scale
    assert torch.equal(rng.uniform(w), expect)
    assert float(rng.uniform(torch.tensor([2**31 - 1])).item()) <= 1 - 2**-24


def test_seed_conversion_and_range():
    assert rng.check_seed(-1) == 2**64 - 1
    assert rng.split_seed(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert rng.split_seed(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            rng.check_seed(bad)
    for bad in (1.5, "3", None, True):
        with pytest.raises(TypeError, match="seed"):
            rng.check_seed(bad)


def test_large_seeds_and_counters_beyond_2_32():
    # the high key word and the high counter word both matter
    a = rng.normal(2**63 + 5, 2**34 + 8, 64)
    assert not torch.equal(a, rng.normal(5, 2**34 + 8, 64))
    assert not torch.equal(a, rng.normal(2**63 + 5, 8, 64))
    k = torch.tensor([2**32 - 1, 2**32, 2**40 + 3], dtype=torch.int64)
    w = rng.philox_words(7, k)
    for i, kk in enumerate(k.tolist()):
        c = [torch.tensor([v], dtype=torch.int64) for v in (kk & 0xFFFFFFFF, kk >> 32, 0, 0)]
        assert [int(x) for x in rng.philox4x32_10(7, 0, *c)] == w[i].tolist()


@pytest.mark.parametrize("base,n", [(0, 1), (1, 3), (3, 17), (5, 4097), (2**33 + 2, 9)])
def test_normal_windows_are_slices_of_one_stream(base, n):
    part = rng.normal_f64(11, base, n)
    start = 0 if base <= 10**6 else base - 5      # far bases: a wider window that starts on another lane
    wider = rng.normal_f64(11, start, base - start + n + 3)
    assert torch.equal(part, wider[base - start:base - start + n])
    assert torch.equal(rng.normal(11, base, n), part.float())


def test_default_bases_round_up_to_4():
    assert rng.default_bases([1, 3, 4, 5, 8]) == [0, 4, 8, 12, 20]
    assert rng.default_bases([]) == []


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 17])
def test_statistics_of_a_million_draws(seed):
    stats = pytest.importorskip("scipy.stats")
    n = 10**6
    z = rng.normal(seed, 0, n).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert z.abs().max().item() < 5.7   # u1 >= 1e-7 bounds |z| by sqrt(-2 ln 1e-7) = 5.68
    # the four lanes of a counter are each standard normal and uncorrelated
    lanes = z.view(-1, 4)
    corr = torch.corrcoef(lanes.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 5 / math.sqrt(n / 4)


def test_fma_update_rounds_once_in_fp32():
    x = torch.randn(1000)
    z = torch.randn(1000)
    got = rng.fma_update(x, z, 0.75, 1e-3)
    exact = (x.double() * 0.75).float().double() + z.double() * torch.tensor(1e-3).float().double()
    assert torch.equal(got, exact.float())


# ------------------------------------------------------------------------------------------- signs, SR stream
def test_sign_known_answers_from_the_table_words():
    # seed 42, k 0: w0 = 9ceaf053; bits 0..7 of 0x53 are 1,1,0,0,1,0,1,0 -> z = 1 - 2b
    assert rng.signs(42, 0, 8).tolist() == [-1, -1, 1, 1, -1, 1, -1, 1]
    # seed 0, k 1 (g = 128 ..): w0 = f8e4cca4, bit 0 = 0, bit 2 = 1
    assert rng.signs(0, 128, 3).tolist() == [1, 1, -1]


def test_sr_stream_known_answers():
    """Pinned values of the stochastic-rounding stream (docs/kernel_abi.md): other backends test against these."""
    assert rng.sr_seed(0) == 0xB80732780EAEA367 and rng.sr_seed(42) == 0x51F67B0884410340
    assert rng.sr_bits(0, 0, 8).tolist() == [0x2F34, 0x4CE8, 0x2EC5, 0x4C2D, 0x9D24, 0x8A7A, 0x187F, 0x54F3]
    assert rng.sr_bits(42, 13, 3).tolist() == [0x7149, 0x15CB, 0x3D03]
    w = rng.words_table(rng.sr_seed(0), [0])[0]              # the same, read off the words: r[g] = halves of w
    assert [(w[g >> 1] >> (16 * (g & 1))) & 0xFFFF for g in range(8)] == rng.sr_bits(0, 0, 8).tolist()
