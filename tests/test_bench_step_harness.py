"""Correctness of the step benchmark's pieces (bench/bench_step.py, step_worker.py, step_models.py, step_report.py):
sane fields per method, the MeZO / reference / backprop steps change the weights by what they should, the peak-RSS
reading sees a known allocation, a --quick run writes the CSV and only its own RESULTS.md section, ratios from known
numbers, clear errors for bad input. CPU only, tiny models; the CUDA paths (events, max_memory_allocated) are not
exercised here.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import bench_step  # noqa: E402
import step_measure as meas  # noqa: E402
import step_models as sm  # noqa: E402
import step_report  # noqa: E402
import step_worker as w  # noqa: E402

from mezo_kernels import ParamSet  # noqa: E402

TINY = dict(model="tiny-llama", batch=2, seq=16, mode="full", dtype="fp32", reps=2, warmup=1)


@pytest.mark.parametrize("method", [m for m in w.METHODS if m not in w.LORA_ONLY])   # LoRA-only: next file
def test_worker_fields_are_sane(method):
    r = w.measure({**TINY, "method": method})
    assert r["status"] == "ok", r
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    assert r["q1_s"] <= r["q3_s"] and r["iqr_s"] >= 0 and len(r["times_s"]) == 2
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_s"])
    assert r["peak_over_base_mib"] >= 0 and r["peak_abs_mib"] >= r["baseline_mib"]
    assert r["footprint_mib"] == pytest.approx(r["weights_mib"] + r["peak_over_base_mib"])
    assert r["n_trainable"] == r["n_params"] > 0
    assert torch.isfinite(torch.tensor(r["loss"]))


@pytest.mark.parametrize("method", ["mezo-inplace-master", "mezo-virtual", "backprop-ckpt"])
def test_worker_tiny_opt_lora(method):
    r = w.measure({**TINY, "model": "tiny-opt", "mode": "lora", "method": method})
    assert r["status"] == "ok", r
    assert 0 < r["n_trainable"] < r["n_params"] / 4        # LoRA q/v r=8 on hidden 64: a small share


def _setup(mode="full", lr=0.0, dtype="fp32"):
    c = w.check_config({**TINY, "mode": mode, "dtype": dtype, "method": "mezo-inplace-master", "lr": lr})
    return c, w.Setup(c)


def _snapshot(s):
    return [p.detach().clone() for _, p in s.model.named_parameters()]


def _max_change(s, before):
    return max(float((p.detach() - b).abs().max()) for (_, p), b in zip(s.model.named_parameters(), before))


@pytest.mark.parametrize("method", ["mezo-inplace-master", "mezo-inplace-nomaster", "mezo-virtual", "reference"])
def test_zeroth_order_steps_restore_with_lr0(method):
    c, s = _setup(lr=0.0)
    before = _snapshot(s)
    step = w.make_step(method, s, c)
    for _ in range(3):
        info = step()
    assert info["g"] != 0.0                                 # the perturbation did move the loss
    assert _max_change(s, before) <= 1e-6                   # +eps, -2eps, +eps: back within fp32 rounding


def test_mezo_step_applies_exactly_the_update():
    c, s = _setup(lr=1e-3)
    before = [p.detach().clone() for p in s.params]
    info = w.make_step("mezo-inplace-master", s, c)()
    z = [torch.zeros_like(p) for p in s.params]
    ParamSet(z).axpby_(info["seed"], 0.0, 1.0)              # z(seed), same layout as the optimizer's single set
    for p, b, zz in zip(s.params, before, z):
        torch.testing.assert_close(p.detach(), b - c["lr"] * info["g"] * zz, atol=1e-6, rtol=0)
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(s.params, before)) > 1e-6


def test_reference_step_applies_exactly_the_update():
    c, s = _setup(lr=1e-3)
    before = [p.detach().clone() for p in s.params]
    info = w.make_step("reference", s, c)()
    z = [torch.zeros_like(p) for p in s.params]
    w.reference_pass(z, info["seed"], 1.0)                  # the same manual_seed + per-tensor normal stream
    for p, b, zz in zip(s.params, before, z):
        torch.testing.assert_close(p.detach(), b - c["lr"] * info["g"] * zz, atol=1e-6, rtol=0)
    assert info["g"] != 0.0


@pytest.mark.parametrize("method", ["backprop", "backprop-ckpt"])
def test_backprop_changes_only_the_trainable_set(method):
    c, s = _setup(mode="lora", lr=1e-2)
    names = [n for n, p in s.model.named_parameters()]
    trainable = {n for n, _ in s.trainable}
    before = _snapshot(s)
    step = w.make_step(method, s, c)
    step(); step()                                          # LoRA B starts at 0: A moves from the second step on
    changed = {n for n, (_, p), b in zip(names, s.model.named_parameters(), before) if not torch.equal(p, b)}
    assert changed and changed <= trainable and all("lora_" in n for n in changed)


def test_gradient_checkpointing_is_active():
    c, s = _setup(mode="full", lr=1e-3)
    w.make_step("backprop-ckpt", s, c)
    on = getattr(s.model, "is_activation_checkpointing", None)
    assert (s.model.is_gradient_checkpointing if on is None else on) and s.model.training


def test_peak_rss_sees_a_known_allocation():
    base = meas.reset_peak(torch.device("cpu"))
    x = torch.ones(50 * 2**20)                              # 200 MiB, written (so resident), then freed
    del x
    over = (meas.read_peak(torch.device("cpu")) - base) / 2**20
    assert 195 <= over <= 260, over
    base = meas.reset_peak(torch.device("cpu"))             # the reset really resets: nothing big since
    assert (meas.peak_rss() - base) / 2**20 < 50


def test_memory_guard_skips(monkeypatch):
    monkeypatch.setattr(sm, "mem_available", lambda: 2**30)  # pretend 1 GiB is left
    r = w.measure({**TINY, "model": "llama-1b-rand", "dtype": "bf16", "method": "backprop"})
    assert r["status"] == "skipped" and r["error"].startswith("skipped: needs ~") and "MemAvailable" in r["error"]
    n = sum(p.numel() for p in sm.meta_model("llama-1b-rand").parameters())
    assert 1.2e9 < n < 1.3e9                                # Llama-3.2-1B: 1.24 B with tied embeddings
    need = sm.estimate_bytes("backprop", n, n, 0, 2, sm.shape_of(sm.meta_model("llama-1b-rand").config), 2, 64, True)
    assert need >= 4 * 2 * n                                # weights + grads + 2 moments at least


def _rows(**t):
    return [dict(model="m", mode="full", dtype="fp32", batch=2, seq=8, method=method, status="ok", median_ms=ms,
                 fwd_ms=fwd, other_ms=ms - fwd, footprint_mib=mib) for method, (ms, fwd, mib) in t.items()]


def test_ratios_from_known_numbers():
    rows = _rows(inference=(10.0, 10.0, 100.0), mezo=(21.0, 20.0, 104.0), reference=(42.0, 24.0, 110.0),
                 backprop=(63.0, 10.0, 520.0), **{"backprop-ckpt": (84.0, 8.0, 300.0)})
    rows.append({**rows[0], "method": "mezo-inplace", "status": "skipped", "median_ms": "", "footprint_mib": ""})
    (r,) = step_report.ratios(rows)
    assert r["mezo_vs_2fwd"] == pytest.approx(1.05) and r["mezo_vs_own_fwd"] == pytest.approx(1.05)
    assert r["mezo_other_ms"] == pytest.approx(1.0) and r["ref_other_ms"] == pytest.approx(18.0)
    assert r["ref_vs_ours"] == pytest.approx(2.0) and r["ref_vs_ours_other"] == pytest.approx(18.0)
    assert r["ref_vs_ours_eqfwd"] == pytest.approx((22 + 18) / (22 + 1))    # F = (20 + 24) / 2
    assert r["mem_mezo_vs_inf"] == pytest.approx(1.04) and r["mezo_extra_mib"] == pytest.approx(4.0)
    assert r["mem_bp_vs_mezo"] == pytest.approx(5.0) and r["mem_bpckpt_vs_mezo"] == pytest.approx(300 / 104)
    assert r["mem_ckpt_vs_bp"] == pytest.approx(300 / 520)
    assert r["t_bp_vs_mezo"] == pytest.approx(3.0) and r["t_bpckpt_vs_mezo"] == pytest.approx(4.0)
    assert r["mem_inplace_vs_inf"] is None and r["mem_bp_vs_inplace"] is None    # the skipped row is ignored
    assert step_report.check(r, "mem_mezo_vs_inf", "cpu") is True
    assert step_report.check(r, "mem_bp_vs_mezo", "cpu") is True
    assert step_report.check(r, "mezo_vs_2fwd", "cpu") is None            # the time target is for LoRA
    lora = {**r, "mode": "lora"}
    assert step_report.check(lora, "mezo_vs_2fwd", "cpu") is True          # 1.05 <= 1.10
    assert step_report.check({**lora, "mezo_vs_2fwd": 1.06}, "mezo_vs_2fwd", "cuda") is False
    assert step_report.check(lora, "mem_bp_vs_mezo", "cpu") is None       # the 4x target is full-parameter only
    assert step_report.check({**r, "ref_vs_ours_eqfwd": 0.99}, "ref_vs_ours_eqfwd", "cpu") is False
    s = step_report.target_summary([r, {**r, "mem_mezo_vs_inf": 1.2, "batch": 4}], "cpu")
    assert "met in 1 of 2" in s and "m/full/fp32/4x8 (1.20; MeZO - inference 4 MiB)" in s
    assert "non-forward part 18.0x to 18.0x" in s
    bf16 = {**r, "dtype": "bf16", "mem_mezo_vs_inf": 1.2, "mezo_n_trainable": 2**20}   # where the memory went
    assert step_report.why(bf16, "mem_mezo_vs_inf") == "MeZO - inference 4 MiB, fp32 masters 4 B x 1048576 = 4 MiB"
    table = step_report.ratio_tables([r], "cpu")
    assert "| m | full | fp32 | 2x8 | 1.05 | 1.050 | 1.0 | 3.00 |" in table and "| 1.04 ✓ | 4 |" in table


def test_quick_run_writes_csv_section_and_plots(tmp_path):
    res = tmp_path / "RESULTS.md"
    res.write_text("# Benchmark results\n\n<!-- perturb-cpu -->\nkeep me\n<!-- /perturb-cpu -->\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_step.py"), "--quick", "--modes", "lora",
                        "--methods", "inference,mezo", "--reps", "2", "--results", str(res), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "step_cpu.csv")))
    assert [r["method"] for r in rows] == ["inference", "mezo-inplace-master"]    # the old name maps
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["footprint_mib"]) > 0 for r in rows)
    text = res.read_text()
    assert "<!-- perturb-cpu -->\nkeep me\n<!-- /perturb-cpu -->" in text
    sec = text.split("<!-- step-cpu -->", 1)[1].split("<!-- /step-cpu -->", 1)[0]
    assert "| tiny-llama | lora | fp32 | 2x32 | mezo-inplace-master |" in sec and "MeZO / 2 fwd" in sec
    assert "named `mezo` in earlier runs" in sec                           # old RESULTS rows still map
    assert "Command: `python bench/bench_step.py --quick" in sec and "torch " in sec
    assert (tmp_path / "step_time_cpu.png").stat().st_size > 1000 and (tmp_path / "step_memory_cpu.png").exists()
    assert "MeZO / 2 fwd" in p.stdout                                      # the tables are printed too


@pytest.mark.parametrize("argv, msg", [
    (["--models", "gpt-5"], "unknown model 'gpt-5'"),
    (["--methods", "sgd"], "unknown method 'sgd'"),
    (["--modes", "qlora"], "unknown mode 'qlora'"),
    (["--quick", "--models", "smollm2-135m"], "not in the quick grid"),
])
def test_bad_cli_input_is_a_clear_error(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        bench_step.parse(argv)


def test_bad_device_is_rejected(capsys):
    with pytest.raises(SystemExit):
        bench_step.parse(["--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("cfg, msg", [
    ({"model": "nope", "method": "mezo"}, "unknown model 'nope'"),
    ({"model": "tiny-llama", "method": "adam"}, "unknown method 'adam'"),
    ({"model": "tiny-llama", "method": "mezo", "device": "tpu"}, "unknown device 'tpu'"),
    ({"model": "tiny-llama", "method": "mezo", "batch": 0}, "batch must be an int >= 1"),
])
def test_worker_rejects_bad_config(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        w.check_config(cfg)


def test_failed_worker_is_a_row_not_a_crash():
    r = bench_step.run_worker({"model": "tiny-llama", "method": "adam", "batch": 2, "seq": 8}, timeout=60)
    assert r["status"] == "error" and "unknown method 'adam'" in r["error"] and r["method"] == "adam"
    row = bench_step.to_row(r)
    assert row["median_ms"] == "" and row["status"] == "error"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "step_worker.py"), "{not json"],
                       capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout.strip().splitlines()[-1])["status"] == "error"
