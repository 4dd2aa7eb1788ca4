"""Best-checkpoint selection on the dev split (``--select-on dev``) and the wall-clock budget (``--max-minutes``)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from mezo_kernels.train.cli import main  # noqa: E402
from mezo_kernels.train.selection import BestWeights, is_better  # noqa: E402
from mezo_kernels.train.config import TrainConfig  # noqa: E402
from mezo_kernels.train.loop import train  # noqa: E402

# lr high enough that the tiny model's dev accuracy moves between evaluations
ARGS = ["--model", "tiny-llama", "--k", "8", "--batch-size", "4", "--eval-every", "2", "--no-progress",
        "--lr", "0.3", "--eps", "1e-2", "--max-minutes", "0"]


def cli_train(data_dir, out, *extra):
    assert main(["train", "--data-dir", str(data_dir), "--output-dir", str(out), *ARGS, *extra]) == 0
    return json.loads((Path(out) / "summary.json").read_text())


def adapter(out, sub="adapter"):
    return load_file(str(Path(out) / sub / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def dev_evals(out):
    lines = (Path(out) / "evals.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["split"] == "dev"]


def test_order_prefers_accuracy_then_loss_then_the_earlier_step():
    t = torch.zeros(3)
    bw = BestWeights([("w", t)])
    assert bw.offer(2, {"accuracy": 0.5, "loss": 0.7})
    t += 1
    assert not bw.offer(4, {"accuracy": 0.5, "loss": 0.7})          # full tie: the earlier step stays
    assert bw.offer(6, {"accuracy": 0.5, "loss": 0.6})              # same accuracy, lower loss
    t += 1
    assert not bw.offer(8, {"accuracy": 0.4, "loss": 0.1})          # accuracy first, whatever the loss
    assert bw.best_step == 6 and bw.candidates == 4
    bw.restore()
    assert torch.equal(t, torch.ones(3))                            # the weights kept at step 6
    assert is_better({"accuracy": 0.6, "loss": 9.0}, {"accuracy": 0.5, "loss": 0.1})


def test_selected_weights_are_the_log_prefix_up_to_best_step(data_dir, tmp_path, capsys):
    s = cli_train(data_dir, tmp_path, "--steps", "8", "--select-on", "dev")
    evals = dev_evals(tmp_path)
    assert [e["step"] for e in evals] == [2, 4, 6, 8]               # every eval_every steps and at the end
    best = max(evals, key=lambda e: (e["accuracy"], -e["loss"], -e["step"]))
    assert s["best_step"] == best["step"] and s["best_dev"]["accuracy"] == best["accuracy"]
    assert s["best_step"] < 8                                       # these settings select an earlier step
    seeds = [json.loads(x) for x in (tmp_path / "seeds.jsonl").read_text().splitlines()[1:]]
    assert len(seeds) == 8                                          # the log still holds every step
    # replay stops at best_step by default and rebuilds the reported adapter bit for bit
    assert main(["replay", "--run", str(tmp_path)]) == 0
    assert same(adapter(tmp_path), adapter(tmp_path, "replayed"))
    assert main(["replay", "--run", str(tmp_path), "--step", "8", "--output", str(tmp_path / "all")]) == 0
    assert not same(adapter(tmp_path), adapter(tmp_path, "all"))     # the last weights are not the reported ones
    # the reported accuracy is that of the selected weights
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--data-dir", str(data_dir), "--k", "8", "--split", "test",
                 "--adapter", str(tmp_path / "replayed")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == s["after"]["accuracy"]


def test_selection_never_reads_the_reported_split(data_dir, tmp_path):
    """Flip every label of the test split (kshot: the dev.tsv file): the selection, the weights and the dev
    metrics stay; only the reported accuracy changes (to 1 - accuracy)."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(data_dir, poisoned)
    rows = (poisoned / "sst2" / "dev.tsv").read_text().splitlines()
    flipped = [rows[0]] + [f"{1 - int(r.split(chr(9))[0])}\t{r.split(chr(9), 1)[1]}" for r in rows[1:]]
    (poisoned / "sst2" / "dev.tsv").write_text("\n".join(flipped) + "\n")
    a = cli_train(data_dir, tmp_path / "a", "--steps", "6", "--select-on", "dev")
    b = cli_train(poisoned, tmp_path / "b", "--steps", "6", "--select-on", "dev")
    assert a["best_step"] == b["best_step"] and a["best_dev"] == b["best_dev"]
    assert dev_evals(tmp_path / "a") == dev_evals(tmp_path / "b")
    assert same(adapter(tmp_path / "a"), adapter(tmp_path / "b"))
    assert b["after"]["accuracy"] == pytest.approx(1 - a["after"]["accuracy"])


def test_selection_settings_are_checked_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError, match="final_split"):
        TrainConfig(select_on="dev", final_split="dev")
    with pytest.raises(ValueError, match="select_on"):
        TrainConfig(select_on="test")
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=-1)


class Clock:
    """Seconds that advance by ``tick`` at every reading: deterministic stand-in for the wall clock."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def cfg(data_dir, out, **kw):
    base = dict(model="tiny-llama", data_dir=str(data_dir), output_dir=str(out), k=8, batch_size=4, steps=5,
                eval_every=0, lr=5e-3, max_minutes=None)
    return TrainConfig(**{**base, **kw})


def test_time_budget_stops_after_the_first_step_and_resume_continues(data_dir, tmp_path):
    full = train(cfg(data_dir, tmp_path / "full"), progress=False)
    assert full["stopped_by"] == "steps" and full["steps"] == 5
    part = tmp_path / "part"
    s = train(cfg(data_dir, part, max_minutes=0.001), progress=False, clock=Clock(1.0))
    assert s["stopped_by"] == "time" and s["steps"] == 1
    assert len((part / "seeds.jsonl").read_text().splitlines()) == 2          # header + the one step
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 1
    # a time-stopped run is replayable: the CLI rebuilds its adapter from the log
    assert main(["replay", "--run", str(part)]) == 0
    assert same(adapter(part), adapter(part, "replayed"))
    # resume (with another budget: it is free to change) and end where the uninterrupted run ends
    s2 = train(cfg(data_dir, part, max_minutes=60.0, resume=True), progress=False, clock=Clock(1.0))
    assert s2["stopped_by"] == "steps" and s2["steps"] == 5
    assert same(adapter(tmp_path / "full"), adapter(part))


def test_budget_counts_only_from_the_training_loop(data_dir, tmp_path):
    """3 s per clock reading against a 10 s budget: the checks after steps 1, 2, 3 read 3, 6, 9 s after the
    start, the one after step 4 reads 12 s, so the run stops after 4 steps."""
    s = train(cfg(data_dir, tmp_path, max_minutes=10 / 60, steps=9), progress=False, clock=Clock(3.0))
    assert s["stopped_by"] == "time" and s["steps"] == 4


def test_select_and_time_stop_then_resume_restores_the_best(data_dir, tmp_path):
    """A time stop mid-run, then --resume: the best of the earlier dev evaluations is carried over (the replay
    stops at its step to copy the weights), and the reported adapter is the log prefix up to best_step."""
    out = tmp_path / "run"
    common = dict(steps=6, eval_every=2, lr=0.3, select_on="dev")
    s = train(cfg(data_dir, out, max_minutes=2.5 / 60, **common), progress=False, clock=Clock(1.0))
    assert s["stopped_by"] == "time" and s["steps"] == 3
    assert [e["step"] for e in dev_evals(out)] == [2, 3]              # periodic, then the end of this invocation
    # make step 2 the best beyond doubt, so the weights must come from the replay stopping there
    lines = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    for e in lines:
        if e["split"] == "dev" and e["step"] == 2:
            e["accuracy"] = 1.0
    (out / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    s2 = train(cfg(data_dir, out, resume=True, **common), progress=False)
    assert s2["steps"] == 6 and [e["step"] for e in dev_evals(out)] == [2, 3, 4, 6]
    assert s2["best_step"] == 2 and s2["best_dev"]["accuracy"] == 1.0 and s2["selection_candidates"] == 4
    assert main(["replay", "--run", str(out)]) == 0
    assert same(adapter(out), adapter(out, "replayed"))
    assert main(["replay", "--run", str(out), "--step", "6", "--output", str(out / "all")]) == 0
    assert not same(adapter(out), adapter(out, "all"))
