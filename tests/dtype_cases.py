"""The faked CPU of the ``--dtype auto`` tests (tests/test_dtype_auto*.py): flag sets and the ``cpu`` fixture."""
import pytest
import torch

from mezo_kernels.train import dtype as dtypes

AMX = frozenset({"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
NO_BF16 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})   # the 4x-slower box


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(flags, (fp32 s, bf16 s))`` fakes the CPU's flags and the timed forwards (unpinning ``auto``);
    returns the list of the timing calls made from then on (the seq length of each)."""
    monkeypatch.delenv(dtypes.ENV_VAR, raising=False)

    def fake(flags, times=(1.0, 1.0)):
        calls: list = []
        monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))

        def timed(model, batch=4, seq=64, reps=3):
            assert isinstance(model, torch.nn.Module) and next(model.parameters()).dtype == torch.float32
            calls.append(seq)
            return times
        monkeypatch.setattr(dtypes, "forward_times", timed)
        return calls
    return fake
