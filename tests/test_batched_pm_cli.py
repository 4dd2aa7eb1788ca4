"""`mezo-kernels train --batched-pm`: the +/- passes of every direction in one forward, through the CLI."""
import json

import pytest
import torch

pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from mezo_kernels.train.cli import main  # noqa: E402


def _train(data_dir, out, *extra):
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "4", "--eval-every", "0", "--no-progress", "--lr", "5e-3", "--eps", "1e-2",
            "--steps", "4", "--n-directions", "2", "--max-minutes", "0", *extra]
    assert main(argv) == 0


def _log(out):
    return [json.loads(x) for x in (out / "seeds.jsonl").read_text().splitlines()[1:]]


def test_batched_pm_matches_the_sequential_virtual_run_and_replays(data_dir, tmp_path):
    seq, bat = tmp_path / "seq", tmp_path / "bat"
    _train(data_dir, seq, "--perturb", "virtual")
    _train(data_dir, bat, "--batched-pm")
    a, b = _log(seq), _log(bat)
    assert [r["seed"] for r in a] == [r["seed"] for r in b] and len(a) == 8
    # the same losses within fp32 rounding, so the same projected gradients to that tolerance
    assert all(abs(x["g"] - y["g"]) <= 1e-3 * max(1.0, abs(x["g"])) for x, y in zip(a, b))
    assert json.loads((bat / "config.json").read_text())["batched_pm"] is True
    assert main(["replay", "--run", str(bat)]) == 0          # the log alone rebuilds the adapter bit for bit
    w, r = load_file(str(bat / "adapter" / "adapter_model.safetensors")), load_file(
        str(bat / "replayed" / "adapter_model.safetensors"))
    assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w)


def test_batched_pm_refuses_settings_it_cannot_run(data_dir, tmp_path, capsys):
    base = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--steps", "1",
            "--no-progress", "--batched-pm"]
    assert main(base + ["--full-param"]) == 2
    assert "needs lora=True" in capsys.readouterr().err
    assert main(base + ["--perturb", "inplace"]) == 2
    assert "perturb 'virtual'" in capsys.readouterr().err


def test_batched_pm_with_several_processes_is_refused_before_anything_loads(data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """WORLD_SIZE > 1 (torchrun) with --batched-pm: one error line before the process group is joined and before
    the data or the model is loaded, and no output folder."""
    from mezo_kernels import models
    from mezo_kernels.tasks import data
    from mezo_kernels.train import data_parallel

    touched: list[str] = []

    def refuse(what):
        def f(*a, **k):
            touched.append(what)
            raise AssertionError(f"{what} called")
        return f
    monkeypatch.setattr(models, "load_model", refuse("load_model"))
    monkeypatch.setattr(data, "load_task_splits", refuse("load_task_splits"))
    monkeypatch.setattr(data_parallel, "init_from_env", refuse("init_from_env"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--steps", "1",
            "--no-progress", "--batched-pm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "batched_pm is single-process" in err and "2 processes" in err and "Traceback" not in err
    assert touched == [] and not out.exists()
