"""bench/bench_drift.py on small tensors: virtual perturbation with stochastically rounded lr = 0 updates leaves
every bit in place (where plain in-place arithmetic drifts), stochastic rounding keeps the mean of many tiny
updates (round-to-nearest loses most of them in bf16), and the script rewrites only its own section."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_drift  # noqa: E402

N = 20_000


@pytest.mark.parametrize("dtype", bench_drift.DTYPES)
def test_virtual_cycles_leave_weights_bit_identical(dtype):
    r = bench_drift.virtual_drift(dtype, 200, 1e-3, N, "auto")
    assert (r["changed"], r["max_abs"], r["rel"]) == ("0.00%", "0.000e+00", "0.000e+00")
    plain = bench_drift.drift(dtype, False, 200, 1e-3, N, "auto")
    assert float(plain["changed"].rstrip("%")) > 50                 # the same cycles in place do drift


def test_stochastic_rounding_keeps_tiny_updates_in_the_mean():
    rows = {r["rounding"]: r for r in bench_drift.update_drift(torch.bfloat16, 200, 1e-5, N, "auto")}
    kept_sr, kept_rtn = float(rows["stochastic"]["kept"]), float(rows["nearest"]["kept"])
    assert abs(kept_sr - 1.0) < 0.15, kept_sr                      # unbiased: the intended total update arrives
    assert kept_rtn < 0.6, kept_rtn                                 # steps under half a spacing are lost


def test_main_writes_only_its_section(tmp_path):
    res = tmp_path / "R.md"
    res.write_text("# r\n\n<!-- step-cpu -->\nkeep\n<!-- /step-cpu -->\n")
    bench_drift.main(["--numel", "4096", "--cycles", "20", "--sr-steps", "20", "--results", str(res)])
    text = res.read_text()
    assert "<!-- step-cpu -->\nkeep\n<!-- /step-cpu -->" in text
    sec = text.split("<!-- drift -->", 1)[1]
    assert "| bfloat16 | virtual (no masters), SR update lr=0 | 0.00% |" in sec
    assert "| bfloat16 | stochastic |" in sec and "| float16 | nearest |" in sec


def test_bad_numel_is_a_clear_error():
    with pytest.raises(SystemExit, match="--numel must be >= 1"):
        bench_drift.main(["--numel", "0", "--results", os.devnull])
