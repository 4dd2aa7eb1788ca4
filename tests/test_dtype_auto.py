"""``--dtype auto`` (mezo_kernels/train/dtype.py): the one choice on both CPU branches and on a GPU, with a faked
flag set and a faked timing; the warning for bf16 on a CPU without bf16 support; the resolved dtype recorded in
config.json, the seed log and summary.json; resume and replay reuse it on another (faked) CPU; bad values.
MeZOTrainer's ``dtype=``: tests/test_dtype_auto_trainer.py."""
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from mezo_kernels.train import dtype as dtypes  # noqa: E402
from mezo_kernels.train.cli import main  # noqa: E402
import dataclasses  # noqa: E402

from mezo_kernels.train.config import TrainConfig  # noqa: E402
from dtype_cases import AMX, AVX512_BF16, NO_BF16, cpu  # noqa: E402,F401  (cpu: a fixture)

def _timer(t32, t16, calls):
    def f():
        calls.append(1)
        return t32, t16
    return f


@pytest.mark.parametrize("flags", [AMX, AVX512_BF16])
@pytest.mark.parametrize("t16,want", [(0.40, "bfloat16"), (0.80, "bfloat16"), (0.81, "float32"), (1.5, "float32")])
def test_auto_on_a_bf16_cpu_follows_the_timing(cpu, flags, t16, want):
    cpu(flags)
    calls: list = []
    c = dtypes.choose("auto", "cpu", _timer(1.0, t16, calls))
    assert c.dtype == want and c.asked == "auto" and calls == [1]
    assert c.fp32_ms == 1000.0 and c.bf16_ms == pytest.approx(1e3 * t16)
    assert set(c.flags) == set(flags) & set(dtypes.BF16_FLAGS) and c.warning is None
    assert f"{t16:.2f}x" in c.reason


def test_auto_without_bf16_flags_is_fp32_and_times_nothing(cpu):
    cpu(NO_BF16)
    calls: list = []
    c = dtypes.choose("auto", "cpu", _timer(1.0, 0.1, calls))    # even a (faked) fast bf16 does not count
    assert c.dtype == "float32" and calls == [] and c.flags == ()
    assert "amx_bf16" in c.reason and "avx512_bf16" in c.reason
    assert dtypes.choose("auto", "cpu", None).dtype == "float32"
    cpu(AMX)                                                     # flags, but nothing to time: float32
    assert dtypes.choose("auto", "cpu", None).dtype == "float32"
    assert dtypes.choose("auto", "cpu", lambda: None).dtype == "float32"


def test_gpu_auto_is_bf16_without_flags_or_timing(cpu):
    cpu(NO_BF16)
    calls: list = []
    c = dtypes.choose("auto", torch.device("cuda", 0), _timer(1.0, 2.0, calls))
    assert c.dtype == "bfloat16" and calls == []
    assert dtypes.choose("float32", "cuda", _timer(1.0, 2.0, calls)).dtype == "float32" and calls == []


def test_explicit_dtypes_are_kept(cpu):
    cpu(AMX)
    calls: list = []
    for d in ("float32", "bfloat16", "float16"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")                      # no warning where bf16 is supported
            c = dtypes.choose(d, "cpu", _timer(1.0, 9.0, calls))
        assert (c.dtype, c.asked, c.warning) == (d, d, None)
    assert calls == []


def test_bf16_without_support_warns_with_the_flags_and_the_slowdown_then_runs(cpu):
    cpu(NO_BF16)
    calls: list = []
    with pytest.warns(UserWarning) as rec:
        c = dtypes.choose("bfloat16", "cpu", _timer(0.252, 1.020, calls))
    assert c.dtype == "bfloat16" and calls == [1]
    text = str(rec[0].message)
    assert c.warning == text
    for part in ("amx_bf16", "avx512_bf16", "1020.0 ms", "252.0 ms", "4.05x", "running in bfloat16 as asked"):
        assert part in text, part
    # float16 is not what the flags are about: no warning, no timing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dtypes.choose("float16", "cpu", _timer(1.0, 1.0, calls)).dtype == "float16" and calls == [1]


def test_the_environment_pins_auto(cpu, monkeypatch):
    cpu(AMX)
    calls: list = []
    monkeypatch.setenv(dtypes.ENV_VAR, "float32")
    assert dtypes.choose("auto", "cpu", _timer(1.0, 0.1, calls)).dtype == "float32" and calls == []
    monkeypatch.setenv(dtypes.ENV_VAR, "bfloat16")
    assert dtypes.choose("auto", "cpu", _timer(1.0, 9.0, calls)).dtype == "bfloat16" and calls == []
    monkeypatch.setenv(dtypes.ENV_VAR, "auto")
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        dtypes.choose("auto", "cpu")


@pytest.mark.parametrize("bad,exc", [("fp32", ValueError), ("bf16", ValueError), ("", ValueError),
                                     (None, TypeError), (torch.bfloat16, TypeError), (32, TypeError)])
def test_bad_values_are_clear_errors(bad, exc, tmp_path, data_dir, capsys):
    with pytest.raises(exc, match="dtype must be"):
        dtypes.choose(bad, "cpu")
    with pytest.raises(exc, match="dtype must be"):
        TrainConfig(dtype=bad)
    if isinstance(bad, str):
        with pytest.raises(SystemExit):
            main(["train", "--model", "tiny-llama", "--data-dir", data_dir, "--dtype", bad])
        assert "--dtype: invalid choice" in capsys.readouterr().err


def test_cpu_flags_reads_proc_cpuinfo():
    flags = dtypes.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == frozenset()
        return
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    assert flags == (frozenset(line.split(":", 1)[1].split()) if line else frozenset())


def test_forward_times_measures_both_dtypes_and_leaves_the_model_alone():
    from mezo_kernels import models
    model, _, _ = models.load_model("tiny-llama", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    t32, t16 = dtypes.forward_times(model, batch=2, seq=8, reps=2)
    assert t32 > 0 and t16 > 0
    assert torch.equal(state, torch.random.get_rng_state())       # the global generator was not drawn from
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def _train(data_dir, out, *extra):
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "4", "--eval-every", "0", "--no-progress", "--lr", "5e-3", "--eps", "1e-2", *extra]
    assert main(argv) == 0


def _recorded(out):
    cfg = json.loads((out / "config.json").read_text())
    head = json.loads((out / "seeds.jsonl").read_text().splitlines()[0])
    summary = json.loads((out / "summary.json").read_text())
    return cfg["dtype"], head["dtype"], summary["dtype"], summary["dtype_choice"]


@pytest.mark.parametrize("t16,want", [(0.5, "bfloat16"), (0.9, "float32")])
def test_train_records_the_resolved_dtype(cpu, data_dir, tmp_path, capsys, t16, want):
    calls = cpu(AMX, (1.0, t16))
    _train(data_dir, tmp_path, "--steps", "2", "--dtype", "auto", "--max-length", "48")
    assert calls == [48]                                          # timed once, on the run's max_length
    c, h, s, choice = _recorded(tmp_path)
    assert c == h == s == want and choice["asked"] == "auto" and choice["bf16_ms"] == 1e3 * t16
    out = capsys.readouterr().out
    assert f"dtype {want} (auto: " in out and json.loads(out.strip().splitlines()[-1])["dtype"] == want
    # the run computed in it: frozen weights in the chosen dtype, the LoRA adapters in fp32 (exact updates)
    from safetensors.torch import load_file
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert ad and all(v.dtype == torch.float32 for v in ad.values())
    assert TrainConfig.from_json(tmp_path / "config.json").dtype == want


def test_auto_without_bf16_records_fp32(cpu, data_dir, tmp_path):
    calls = cpu(NO_BF16, (1.0, 0.1))
    _train(data_dir, tmp_path, "--steps", "1", "--dtype", "auto")
    assert calls == [] and _recorded(tmp_path)[:3] == ("float32",) * 3


def test_resume_and_replay_use_the_recorded_dtype_on_another_cpu(cpu, data_dir, tmp_path):
    from safetensors.torch import load_file
    full, part = tmp_path / "full", tmp_path / "part"
    cpu(AMX, (1.0, 0.5))                                          # the first box: auto -> bf16
    _train(data_dir, full, "--steps", "4", "--dtype", "auto")
    _train(data_dir, part, "--steps", "2", "--dtype", "auto")
    assert _recorded(part)[0] == "bfloat16"
    calls = cpu(NO_BF16, (1.0, 4.0))                              # another box, where auto would pick fp32
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # the recorded dtype is not re-judged either
        _train(data_dir, part, "--steps", "4", "--dtype", "auto", "--resume")
    assert calls == []
    c, h, s, choice = _recorded(part)
    assert c == h == s == "bfloat16" and "recorded" in choice["reason"]
    a, b = load_file(str(full / "adapter" / "adapter_model.safetensors")), \
        load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an explicit other dtype on resume is a changed setting
    assert main(["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(part), "--k", "8",
                 "--batch-size", "4", "--eval-every", "0", "--no-progress", "--lr", "5e-3", "--eps", "1e-2",
                 "--steps", "4", "--resume", "--dtype", "float32"]) == 2
    # replay on this box loads bf16 too and rebuilds the adapter bit for bit
    assert main(["replay", "--run", str(full)]) == 0 and calls == []
    r = load_file(str(full / "replayed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], r[k]) for k in a)


def test_auto_bf16_run_equals_an_explicit_bf16_run(cpu, data_dir, tmp_path):
    """auto times an fp32 load, then loads the chosen dtype as an explicit run (and a resume or a replay) does."""
    from safetensors.torch import load_file
    cpu(AMX, (1.0, 0.5))
    _train(data_dir, tmp_path / "auto", "--steps", "3", "--dtype", "auto")
    _train(data_dir, tmp_path / "bf16", "--steps", "3", "--dtype", "bfloat16")
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("auto", "bf16"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ([json.loads(x)["loss_plus"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("auto", "bf16"))
    assert la == lb


def test_bf16_run_on_a_cpu_without_support_warns_and_runs(cpu, data_dir, tmp_path):
    calls = cpu(NO_BF16, (0.25, 1.0))
    with pytest.warns(UserWarning, match=r"without bf16 support.*1000\.0 ms against 250\.0 ms"):
        _train(data_dir, tmp_path, "--steps", "1", "--dtype", "bfloat16")
    assert calls == [64] and _recorded(tmp_path)[:3] == ("bfloat16",) * 3


def test_old_run_without_a_recorded_dtype_was_fp32(tmp_path):
    cfg = TrainConfig(model="tiny-llama", output_dir=str(tmp_path))
    saved = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if k != "dtype"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert TrainConfig.from_json(tmp_path / "config.json").dtype == "float32"


def test_eval_prints_the_dtype(cpu, data_dir, capsys):
    cpu(AMX, (1.0, 0.5))
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--split", "dev", "--dtype", "auto"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "bfloat16"


def test_bench_quality_rows_record_the_dtype_that_ran(cpu, data_dir):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_quality as bq
    calls = cpu(AMX, (1.0, 0.5))
    (row,) = bq.run(bq.parse(["--model", "tiny-llama", "--data-dir", data_dir, "--k", "4", "--method", "zeroshot",
                              "--dtype", "auto", "--max-length", "40"]))
    assert row["dtype"] == "bfloat16" and calls == [40]
    (row,) = bq.run(bq.parse(["--model", "tiny-llama", "--data-dir", data_dir, "--k", "4", "--method", "zeroshot",
                              "--dtype", "float32"]))
    assert row["dtype"] == "float32" and calls == [40]


def test_bench_step_reports_what_auto_picks_from_its_own_inference_rows(cpu):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_step as bs

    def row(model, dtype, ms, mode="full", method="inference", status="ok"):
        return dict(model=model, mode=mode, dtype=dtype, batch=4, seq=128, method=method, status=status, median_ms=ms)
    rows = [row("a", "fp32", 100.0), row("a", "bf16", 45.0), row("a", "bf16", 10.0, mode="lora"),
            row("b", "fp32", 100.0), row("b", "bf16", 90.0), row("c", "bf16", 5.0),
            row("a", "fp32", 1.0, method="mezo-virtual")]
    cpu(AMX)
    line = bs.auto_line(rows, "cpu")
    assert "a 4x128: auto: bfloat16" in line and "0.45x" in line               # the full-mode row, not lora's
    assert "b 4x128: auto: float32" in line and "0.90x" in line and "c 4x128" not in line
    cpu(NO_BF16)
    assert "a 4x128: auto: float32, the CPU has neither" in bs.auto_line(rows, "cpu")
    assert bs.auto_line([row("c", "bf16", 5.0)], "cpu") == ""


def test_the_progress_bar_names_the_dtype_that_ran(cpu, data_dir, tmp_path, capsys):
    cpu(AMX, (1.0, 0.5))
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--k", "8",
            "--batch-size", "4", "--eval-every", "0", "--steps", "2", "--dtype", "auto"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "bfloat16: 100%" in err and "float32:" not in err


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-roberta"])
def test_a_bf16_build_keeps_lora_fp32_and_scores_and_losses_in_fp32(cpu, data_dir, model_name):
    """The exactness a bf16 run keeps: the trainable LoRA tensors are fp32 (MeZO updates them exactly), the frozen
    weights bf16, and the objective's scores and CE losses are fp32, the CE equal to a float64 one of the same
    scores to fp32 rounding."""
    from mezo_kernels.tasks import data
    from mezo_kernels.train.loop import build
    cpu(AMX, (1.0, 0.5))
    cfg = TrainConfig(model=model_name, data_dir=data_dir, k=4, dtype="auto")
    model, _, task, obj, params = build(cfg)
    assert params and all(p.dtype == torch.float32 for _, p in params)
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    batch = data.load_task_splits(task, data_dir, "kshot", 4, 0).train[:5]
    with torch.no_grad():
        out = obj(model, batch)
    assert out.logits.dtype == out.per_example.dtype == out.loss.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(out.logits.double(), out.labels, reduction="none")
    torch.testing.assert_close(out.per_example.double(), ref, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), ref.mean(), rtol=2e-7, atol=1e-7)


def test_with_dtype_resolves_auto_without_validating_again():
    cfg = TrainConfig(dtype="auto")
    new = cfg.with_dtype("bfloat16")
    assert (new.dtype, cfg.dtype) == ("bfloat16", "auto") and dataclasses.replace(new, dtype="auto") == cfg
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        cfg.with_dtype("auto")
