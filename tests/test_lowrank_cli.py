"""Low-rank directions through the front ends (issue 21): `mezo-kernels train --distribution lowrank --lowrank-r R
--lowrank-lazy N` (header, replay, resume, errors) and ``MeZOTrainer(distribution="lowrank", lowrank_r=...)``."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from mezo_kernels.hf import MeZOTrainer  # noqa: E402
from mezo_kernels.optim import MeZO  # noqa: E402
from mezo_kernels.train.cli import main  # noqa: E402
from test_hf import dataset, plain_loop, rows, targs, tiny, weights  # noqa: E402

LOW = ["--full-param", "--distribution", "lowrank", "--lowrank-r", "2", "--lowrank-lazy", "2"]


def train(data_dir, out, *extra):
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "4", "--eval-every", "3", "--eval-max", "8", "--no-progress", "--lr", "5e-3", "--eps",
            "1e-2", "--dtype", "float32", *LOW, *extra]
    assert main(argv) == 0


def model_weights(out, sub="model"):
    return load_file(str(next((out / sub).glob("*.safetensors"))))


def test_train_logs_the_mode_and_resumes_and_replays_bit_for_bit(data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(data_dir, full, "--steps", "5")
    header = json.loads((full / "seeds.jsonl").read_text().splitlines()[0])
    assert (header["distribution"], header["lowrank_r"], header["lowrank_lazy"]) == ("lowrank", 2, 2)
    assert header["config"]["perturb"] == "virtual"                # the forward-side term by default
    train(data_dir, part, "--steps", "3")
    train(data_dir, part, "--steps", "5", "--resume")              # resumes inside a lazy window (step 3 of 2-3)
    a, b = model_weights(full), model_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["replay", "--run", str(full)]) == 0
    c = model_weights(full, "replayed")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_bad_flags_exit_2_naming_them(data_dir, tmp_path, capsys):
    base = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--no-progress"]
    assert main(base + ["--lowrank-r", "2"]) == 2
    assert "lowrank_r and lowrank_lazy are options of distribution 'lowrank'" in capsys.readouterr().err
    assert main(base + ["--distribution", "lowrank", "--lowrank-r", "0", "--full-param"]) == 2
    assert "lowrank_r must be >= 1" in capsys.readouterr().err
    assert main(base + ["--distribution", "lowrank", "--batched-pm", "--perturb", "inplace"]) == 2
    assert "batched_pm runs the +/- passes" in capsys.readouterr().err


def test_batched_pm_trains_full_parameter_lowrank_and_replays(data_dir, tmp_path):
    train(data_dir, tmp_path, "--steps", "2", "--batched-pm", "--n-directions", "2", "--lowrank-lazy", "1")
    assert main(["replay", "--run", str(tmp_path)]) == 0
    a, c = model_weights(tmp_path), model_weights(tmp_path, "replayed")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_trainer_takes_lowrank_and_lands_on_a_plain_loops_bits(tmp_path):
    ids = rows(1)
    model = tiny()
    tr = MeZOTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=1), train_dataset=dataset(ids),
                     eps=1e-2, distribution="lowrank", lowrank_r=2)
    tr.train()
    assert (tr.mezo.distribution, tr.mezo.lowrank_r, tr.mezo.perturb) == ("lowrank", 2, "virtual")
    ref = tiny()
    opt = MeZO(ref.named_parameters(), lr=1e-2, eps=1e-2, seed=3, model=ref, distribution="lowrank", lowrank_r=2)
    plain_loop(ref, opt, ids, steps=4)
    got = weights(model)
    assert all(torch.equal(got[k], v) for k, v in weights(ref).items())
    assert any(not torch.equal(got[k], v) for k, v in weights(tiny()).items())


def test_the_forward_engine_serves_lowrank_passes_as_the_plain_forward_does(data_dir, tmp_path):
    # the engine keys its caches on the active perturbation: a stale frozen-layer or prefix result would give the
    # losses of the unperturbed (or another) model, far outside rounding
    on, off = tmp_path / "on", tmp_path / "off"
    train(data_dir, on, "--steps", "3")
    train(data_dir, off, "--steps", "3", "--no-prefix-reuse")
    la, lb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (on, off))
    for a, b in zip(la, lb):
        assert a["loss_plus"] != a["loss_minus"]
        assert a["loss_plus"] == pytest.approx(b["loss_plus"], rel=1e-5)
        assert a["loss_minus"] == pytest.approx(b["loss_minus"], rel=1e-5)
