"""Shared fixtures. TRITON_INTERPRET must be set before triton is first imported (it is read when @triton.jit
decorates), so that CI, which has no GPU, runs the Triton kernels through the interpreter."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MEZO_BACKEND", None)  # the tests choose backends explicitly
# `--dtype auto` times a forward of the model on a CPU with bf16 flags: pinned here (subprocesses inherit it) so that
# every test that does not ask for a dtype computes in fp32 on any machine; tests/test_dtype_auto.py unpins it
os.environ["MEZO_DTYPE_AUTO"] = "float32"
# the tests never reach a hub: models are built from configs or shipped in a package, data read from folders; a hub
# fallback tried here would wait out network time-outs on a machine without access (subprocesses inherit this)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from mezo_kernels.kernels import NAMES, unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    """Every ``@pytest.mark.gpu`` test skips, saying why, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu marker: no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def present_backends() -> list[str]:
    return [n for n in NAMES if unavailable_reason(n, DEVICE) is None]


def backend_params():
    """Every backend, with the missing ones shown as skips that say why."""
    out = []
    for n in NAMES:
        why = unavailable_reason(n, DEVICE)
        out.append(pytest.param(n, marks=pytest.mark.skip(reason=why)) if why else n)
    return out


def guarded(n: int, dtype: torch.dtype, guard: int = 67, fill: float = float("nan")):
    """A length-n view in the middle of a NaN-poisoned buffer: (buffer, view). Guards must stay poisoned."""
    buf = torch.full((n + 2 * guard,), fill, dtype=dtype, device=DEVICE)
    return buf, buf[guard:guard + n]


def guards_intact(buf: torch.Tensor, n: int, guard: int = 67) -> bool:
    g = torch.cat((buf[:guard], buf[guard + n:]))
    return bool(torch.isnan(g).all())


# explicit (atol, rtol) per dtype: one rounding of the result, plus the spec's 1e-6 on z scaled by |beta|
TOL = {torch.float32: (1e-6, 2.4e-7), torch.float16: (1e-3, 9.8e-4), torch.bfloat16: (8e-3, 7.9e-3)}


_WORDS = ["good", "bad", "great", "terrible", "fun", "boring", "movie", "film", "plot", "acting"]


def write_sst2(d, sizes: dict, seed: int, words: int) -> str:
    """Synthetic SST-2 TSVs (GLUE format) in ``d/sst2``: ``sizes`` {split: rows}, labels alternating, ``words``
    random words per sentence. Returns ``str(d)``."""
    r = random.Random(seed)
    (d / "sst2").mkdir()
    for split, n in sizes.items():
        rows = ["label\tsentence"] + [f"{i % 2}\t" + " ".join(r.choice(_WORDS) for _ in range(words)) for i in range(n)]
        (d / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(d)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A small synthetic SST-2 folder (80 train, 24 dev rows, GLUE TSV format) for end-to-end CLI tests."""
    return write_sst2(tmp_path_factory.mktemp("data"), {"train": 80, "dev": 24}, seed=0, words=6)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Name resolution and connects raise OSError inside the test; the returned list records every attempt."""
    import socket
    calls: list = []

    def refuse(*a, **k):
        calls.append(a)
        raise OSError("network access in a test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls
