"""Shared helpers of the sign / stochastic-rounding / perturbed-copy tests: backends that serve a feature."""
import pytest
import torch

from mezo_kernels import rng
from mezo_kernels.kernels import NAMES, unsupported_reason
from conftest import DEVICE

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def feature_backends(mode, dist="gaussian"):
    """Every backend as a pytest param; those that cannot run ``mode`` with ``dist`` here skip, saying why."""
    out = []
    for n in NAMES:
        why = unsupported_reason(n, DEVICE, mode, rng.distribution_code(dist))
        out.append(pytest.param(n, marks=pytest.mark.skip(reason=why)) if why else n)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0.0 != 0.0 and NaN payloads count)."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, ref.dtype, got.shape, ref.shape)
    diff = (bits(got.cpu()) != bits(ref.cpu())).nonzero().reshape(-1)
    assert diff.numel() == 0, (f"{what}: {diff.numel()} of {got.numel()} elements differ, e.g. index {int(diff[0])}: "
                               f"{float(got.reshape(-1)[diff[0]])!r} vs {float(ref.reshape(-1)[diff[0]])!r}")
