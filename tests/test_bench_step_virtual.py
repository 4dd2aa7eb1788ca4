"""The step benchmark's virtual-perturbation and batched ± methods (bench/step_worker.py, step_batched.py,
step_report.py, bench_step.py): they run on tiny-llama, leave the weights bit-identical at lr = 0, the batched
losses equal the sequential ones, old method names still map, the grid holds each method where it applies, the
new ratios and targets come from known numbers, and a --quick run never writes into bench/RESULTS.md. CPU only.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import bench_step  # noqa: E402
import step_report  # noqa: E402
import step_worker as w  # noqa: E402

TINY = dict(model="tiny-llama", batch=2, seq=16, mode="lora", dtype="fp32", reps=2, warmup=1)
NEW = ("mezo-virtual",) + w.LORA_ONLY


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", NEW)
def test_new_methods_run_on_tiny_llama_lora(method, dtype):
    r = w.measure({**TINY, "dtype": dtype, "method": method})
    assert r["status"] == "ok", r
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and 0 < r["fwd_s"] <= r["median_s"]
    assert 0 < r["n_trainable"] < r["n_params"] / 4
    assert torch.isfinite(torch.tensor(r["loss"]))


def _setup(method, mode="lora", dtype="fp32", lr=0.0):
    c = w.check_config({**TINY, "mode": mode, "dtype": dtype, "method": method, "lr": lr})
    return c, w.Setup(c)


@pytest.mark.parametrize("method, mode", [("mezo-virtual", "full"), ("mezo-batched", "lora"),
                                          ("mezo-batched-n4", "lora"), ("mezo-n4", "lora")])
def test_lr0_virtual_steps_leave_bf16_weights_bit_identical(method, mode):
    c, s = _setup(method, mode, "bf16")
    before = [p.detach().clone() for p in s.model.parameters()]
    step = w.make_step(method, s, c)
    for _ in range(3):
        info = step()
    assert s.optimizer.perturb == "virtual" and all(not ps.exact_restore for ps in s.optimizer.param_sets)
    assert info["loss"] != info["loss_minus"]                 # the passes did see perturbed weights
    assert all(torch.equal(p, b) for p, b in zip(s.model.parameters(), before))


def test_virtual_update_writes_in_bf16_without_masters():
    c, s = _setup("mezo-virtual", "full", "bf16", lr=1e-2)
    before = [p.detach().clone() for p in s.params]
    info = w.make_step("mezo-virtual", s, c)()
    assert info["g"] != 0.0 and s.optimizer.rounding == "stochastic"
    assert any(not torch.equal(p, b) for p, b in zip(s.params, before))


@pytest.mark.parametrize("batched, sequential", [("mezo-batched", "mezo-virtual"), ("mezo-batched-n4", "mezo-n4")])
def test_batched_losses_equal_the_sequential_ones(batched, sequential):
    out = {}
    c, s = _setup(batched)
    for method in (batched, sequential):                        # same model, batch and seed: same directions
        info = w.make_step(method, s, c)()                      # lr = 0: the first step leaves the weights as is
        out[method] = (info["loss"], info["loss_minus"], info["seed"])
    (bp, bm, bs), (sp, sm_, ss) = out[batched], out[sequential]
    assert bs == ss and bp != bm
    assert bp == pytest.approx(sp, rel=1e-5) and bm == pytest.approx(sm_, rel=1e-5)


def test_old_method_names_map_to_the_explicit_ones():
    assert w.check_config({**TINY, "method": "mezo"})["method"] == "mezo-inplace-master"
    assert w.check_config({**TINY, "method": "mezo-inplace"})["method"] == "mezo-inplace-nomaster"
    assert bench_step.parse(["--methods", "mezo,mezo-inplace,mezo-virtual"]).methods == [
        "mezo-inplace-master", "mezo-inplace-nomaster", "mezo-virtual"]


@pytest.mark.parametrize("method", w.LORA_ONLY)
def test_lora_only_methods_refuse_full_mode(method):
    with pytest.raises(ValueError, match="mode must be lora"):
        w.check_config({**TINY, "mode": "full", "method": method})


def test_grid_holds_each_method_where_it_applies():
    by = {(c["mode"], c["dtype"]): c["methods"] for c in bench_step.GRIDS["cpu"]}
    assert set(NEW) <= set(by[("lora", "fp32")]) and set(NEW) <= set(by[("lora", "bf16")])
    assert "mezo-virtual" in by[("full", "bf16")] and not set(w.LORA_ONLY) & set(by[("full", "bf16")])
    assert "mezo-inplace-nomaster" in by[("full", "bf16")] and "mezo-inplace-nomaster" not in by[("full", "fp32")]
    old = {"inference", "reference", "backprop", "backprop-ckpt", "mezo-inplace-master"}    # existing rows stay
    assert all(old <= set(m) for m in by.values())
    assert list(dict.fromkeys((c["model"], c["batch"], c["seq"]) for c in bench_step.GRIDS["cpu"])) == [
        ("smollm2-135m", 4, 128), ("llama-1b-rand", 2, 64), ("opt-1.3b-rand", 2, 64)]


def test_quick_results_go_under_out_not_into_results_md():
    a = bench_step.parse(["--quick"])
    assert a.results == os.path.join(BENCH, "out", "quick", "RESULTS.md") and a.out.endswith(os.path.join("out", "quick"))
    assert bench_step.parse([]).results == os.path.join(BENCH, "RESULTS.md")
    assert bench_step.parse(["--quick", "--out", "/x"]).results == os.path.join("/x", "RESULTS.md")


def _rows(mode="full", dtype="bf16", **t):
    return [dict(model="m", mode=mode, dtype=dtype, batch=2, seq=8, method=method, status="ok", median_ms=ms,
                 fwd_ms=fwd, other_ms=ms - fwd, footprint_mib=mib) for method, (ms, fwd, mib) in t.items()]


def test_new_ratios_and_targets_from_known_numbers():
    (full,) = step_report.ratios(_rows(**{"inference": (10.0, 10.0, 100.0), "mezo": (30.0, 20.0, 250.0),
                                          "mezo-virtual": (27.0, 20.0, 104.0)}))     # old name "mezo" maps
    assert full["t_virtual_vs_master"] == pytest.approx(0.9) and full["virtual_vs_2fwd"] == pytest.approx(1.35)
    assert full["mem_virtual_vs_inf"] == pytest.approx(1.04) and full["virtual_extra_mib"] == pytest.approx(4.0)
    assert full["mem_virtual_vs_master"] == pytest.approx(104 / 250) and full["virtual_other_ms"] == 7.0
    assert step_report.check(full, "t_virtual_vs_master", "cpu") is True
    assert step_report.check({**full, "t_virtual_vs_master": 1.01}, "t_virtual_vs_master", "cpu") is False
    assert step_report.check({**full, "dtype": "fp32"}, "t_virtual_vs_master", "cpu") is None    # bf16/fp16 only
    assert step_report.check({**full, "mem_virtual_vs_inf": 1.2}, "mem_virtual_vs_inf", "cpu") is False
    (lora,) = step_report.ratios(_rows("lora", "fp32", **{
        "inference": (10.0, 10.0, 100.0), "mezo-inplace-master": (20.0, 20.0, 100.0),
        "mezo-virtual": (21.0, 20.0, 100.0), "mezo-batched": (18.9, 18.0, 130.0), "mezo-n4": (84.0, 80.0, 100.0),
        "mezo-batched-n4": (63.0, 60.0, 220.0)}))
    assert lora["t_batched_vs_seq"] == pytest.approx(0.9) and lora["t_batched_vs_master"] == pytest.approx(0.945)
    assert lora["batched_vs_2fwd"] == pytest.approx(0.945) and lora["t_batched_n4_vs_n4"] == pytest.approx(0.75)
    assert lora["t_n4_vs_n1_batched"] == pytest.approx(63 / 18.9)
    assert lora["mem_batched_vs_inf"] == pytest.approx(1.3) and lora["mem_batched_n4_vs_inf"] == pytest.approx(2.2)
    assert step_report.check(lora, "t_batched_vs_seq", "cpu") is True
    assert step_report.check(lora, "batched_vs_2fwd", "cpu") is None               # a GPU target
    assert step_report.check(lora, "batched_vs_2fwd", "cuda") is False             # 0.945 > 0.6
    assert step_report.check(lora, "t_n4_vs_n1_batched", "cuda") is False          # 3.33 > 2.6
    tables = step_report.ratio_tables([full, lora], "cpu")
    assert "batched / seq (n=1)" in tables and "| 0.90 ✓ |" in tables
    summary = step_report.target_summary([full, lora], "cpu")
    assert "batched ± LoRA step no slower than the sequential one: met in 1 of 1" in summary
    assert "two inference forwards: met" in summary and "0.6 x two" not in summary   # cuda-only targets left out


def test_quick_run_of_the_new_methods(tmp_path):
    res, out = tmp_path / "R.md", tmp_path / "out"
    methods = ",".join(("inference", "mezo") + NEW)
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_step.py"), "--quick", "--modes", "lora",
                        "--methods", methods, "--reps", "1", "--warmup", "0", "--results", str(res), "--out",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "step_cpu.csv")))
    assert [r["method"] for r in rows] == ["inference", "mezo-inplace-master", *NEW]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    sec = res.read_text()
    assert "| tiny-llama | lora | fp32 | 2x32 | mezo-batched-n4 |" in sec and "batched-n4 / n4" in sec
