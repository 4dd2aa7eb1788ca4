"""End to end on tiny random models: `mezo-kernels train | eval | replay`, resume, artifacts, objectives."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from mezo_kernels.train.cli import main  # noqa: E402


def train(data_dir, out, *extra):
    argv = ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "4", "--eval-every", "3", "--no-progress", "--lr", "5e-3", "--eps", "1e-2", *extra]
    assert main(argv) == 0


def adapter(out, sub="adapter"):
    return load_file(str(out / sub / "adapter_model.safetensors"))


def test_train_writes_every_artifact(data_dir, tmp_path, capsys):
    train(data_dir, tmp_path, "--steps", "6")
    for f in ("adapter/adapter_config.json", "seeds.jsonl", "metrics.jsonl", "curves.png", "summary.json",
              "config.json", "evals.jsonl"):
        assert (tmp_path / f).exists(), f
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))
    assert all({"loss_plus", "loss_minus", "g", "seconds"} <= set(m) for m in metrics)
    assert all(m["g"] == pytest.approx((m["loss_plus"] - m["loss_minus"]) / 2e-2, rel=1e-5) for m in metrics)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"before", "after", "zero_grad_rate"} <= set(last)
    # weights moved: lora_B starts at zero, so any nonzero entry is MeZO's doing
    assert any(v.abs().max() > 0 for k, v in adapter(tmp_path).items() if "lora_B" in k)


def test_replay_rebuilds_the_adapter_bit_for_bit(data_dir, tmp_path):
    train(data_dir, tmp_path, "--steps", "5")
    assert main(["replay", "--run", str(tmp_path)]) == 0
    a, b = adapter(tmp_path), adapter(tmp_path, "replayed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_matches_an_uninterrupted_run(data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(data_dir, full, "--steps", "6")
    train(data_dir, part, "--steps", "3")
    with open(part / "seeds.jsonl", "a") as f:
        f.write('{"step": 3, "seed": 12')           # a kill in the middle of writing a record
    train(data_dir, part, "--steps", "6", "--resume")
    a, b = adapter(full), adapter(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss_plus"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss_plus"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert la == lb
    # resuming with different settings is refused, naming them
    assert main(["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(part), "--k", "8",
                 "--batch-size", "4", "--lr", "1.0", "--eps", "1e-2", "--steps", "6", "--resume",
                 "--no-progress"]) == 2


def test_eval_prints_json_with_adapter(data_dir, tmp_path, capsys):
    train(data_dir, tmp_path, "--steps", "2")
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--adapter", str(tmp_path / "adapter"),
                 "--split", "test", "--k", "8"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 24 and 0 <= res["accuracy"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert res["accuracy"] == summary["after"]["accuracy"]


def test_accuracy_objective_shows_zero_gradients(data_dir, tmp_path):
    """-accuracy is piecewise constant: on a batch of 4 most +-eps pairs give identical accuracy, so g = 0."""
    train(data_dir, tmp_path / "acc", "--steps", "8", "--objective", "neg_accuracy", "--eps", "1e-4")
    train(data_dir, tmp_path / "ce", "--steps", "8", "--objective", "ce")
    za = json.loads((tmp_path / "acc" / "summary.json").read_text())["zero_grad_rate"]
    zc = json.loads((tmp_path / "ce" / "summary.json").read_text())["zero_grad_rate"]
    assert za >= 0.5 and zc == 0.0


def test_masked_lm_trains_too(data_dir, tmp_path):
    argv = ["train", "--model", "tiny-roberta", "--data-dir", data_dir, "--output-dir", str(tmp_path), "--k", "8",
            "--batch-size", "4", "--steps", "3", "--no-progress", "--eval-every", "0"]
    assert main(argv) == 0 and (tmp_path / "adapter").exists()


def test_bad_invocations_exit_2_with_a_message(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEZO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)                       # no ../shared/data fallback from here
    assert main(["train", "--model", "tiny-llama", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "data" in capsys.readouterr().err
    assert main(["train", "--model", "tiny-llama", "--data-dir", str(tmp_path / "nope"),
                 "--output-dir", str(tmp_path), "--no-progress"]) == 2
    bad = tmp_path / "bad"
    (bad / "sst2").mkdir(parents=True)
    (bad / "sst2" / "train.tsv").write_text("label\tsentence\n0\tfine\nx\tbroken\n")
    (bad / "sst2" / "dev.tsv").write_text("label\tsentence\n0\tfine\n")
    assert main(["train", "--model", "tiny-llama", "--data-dir", str(bad), "--output-dir", str(tmp_path),
                 "--no-progress"]) == 2
    assert "train.tsv:3" in capsys.readouterr().err


def test_only_rank_zero_writes_or_prints(data_dir, tmp_path, capsys):
    """The run context decides what a rank does: rank 1 of 2 trains and evaluates but writes and prints nothing.
    Without a process group its loss exchange reduces locally, so it ends where a single process does."""
    from mezo_kernels.train.data_parallel import DistInfo
    from mezo_kernels.train.run import Run
    from mezo_kernels.tasks.registry import get_task
    from mezo_kernels.train.config import TrainConfig
    from mezo_kernels.train.loop import _train

    def cfg(out):
        return TrainConfig(model="tiny-llama", data_dir=data_dir, output_dir=str(out), k=8, batch_size=4, steps=3,
                           eval_every=2, lr=5e-3)
    sst2 = get_task("sst2")
    single = _train(cfg(tmp_path / "r0"), Run(cfg(tmp_path / "r0"), DistInfo(0, 1, 0, None), progress=False), sst2)
    capsys.readouterr()
    other = _train(cfg(tmp_path / "r1"), Run(cfg(tmp_path / "r1"), DistInfo(1, 2, 1, None), progress=False), sst2)
    assert not (tmp_path / "r1").exists() and capsys.readouterr().out == ""
    assert (tmp_path / "r0" / "summary.json").exists() and "distributed" not in single
    assert other["after"] == single["after"] and other["before"] == single["before"]
    assert other["distributed"]["world_size"] == 2 and other["distributed"]["steps_timed"] == 3
    assert other["distributed"]["bytes_out_per_step"] == 0            # nothing left this process
    with pytest.raises(ValueError, match="evenly"):
        Run(TrainConfig(batch_size=5, output_dir=str(tmp_path / "r2")), DistInfo(1, 2, 1, None))
