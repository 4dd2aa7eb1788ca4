"""Each decision once, at the boundary where its input enters: the config is validated when built (then frozen),
the task is resolved (a spec file read) once per run, a --config file read once, and the objective kinds are
spelled in one enum that every other spelling derives from."""
import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
from mezo_kernels.tasks import data, metrics, registry, spec  # noqa: E402
from mezo_kernels.tasks.records import ObjectiveKind, Task  # noqa: E402
from mezo_kernels.train import config_files, loop  # noqa: E402
from mezo_kernels.train.cli import _parser, main  # noqa: E402
from mezo_kernels.train.config import TrainConfig  # noqa: E402
from mezo_kernels.train.run import Run  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "mezo_kernels"
FAST = ["--model", "tiny-llama", "--k", "4", "--batch-size", "4", "--steps", "1", "--eval-every", "0",
        "--eval-max", "4", "--no-progress"]


@pytest.fixture
def counts(monkeypatch) -> dict:
    """Counts of config validations, task resolutions, spec file reads and config file reads (every name the
    package binds them under is wrapped)."""
    n = {"validate": 0, "get_task": 0, "load_task_spec": 0, "load_config_file": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            n[key] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(TrainConfig, "_validate", counting("validate", TrainConfig._validate))
    get_task = counting("get_task", registry.get_task)
    for mod in (registry, data, config_files):
        monkeypatch.setattr(mod, "get_task", get_task)
    monkeypatch.setattr(registry, "load_task_spec", counting("load_task_spec", spec.load_task_spec))
    monkeypatch.setattr(config_files, "load_config_file", counting("load_config_file", config_files.load_config_file))
    return n


@pytest.fixture
def spec_task(tmp_path) -> list[str]:
    """A task spec file and its data files: the ``--task ... --train-file ... --eval-file ...`` flags."""
    words = ["good", "bad", "great", "terrible", "fun", "boring"]
    (tmp_path / "rev.json").write_text(json.dumps({
        "columns": {"text_a": "review", "label": "stars"}, "template": "{text_a} It was {mask} .",
        "verbalizer": {"neg": "terrible", "pos": "great"}, "objective": "neg_accuracy"}))
    for split, n in (("train", 16), ("test", 6)):
        rows = [{"review": f"{words[i % 6]} {words[(i * 5) % 6]}", "stars": ["neg", "pos"][i % 2]} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--task", str(tmp_path / "rev.json"), "--train-file", str(tmp_path / "train.jsonl"), "--eval-file",
            str(tmp_path / "test.jsonl")]


# ------------------------------------------------------------------------------------------------ the config
def test_the_config_is_frozen_and_validated_when_built():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    assert dataclasses.replace(cfg, steps=3).steps == 3 and cfg.steps == 450
    with pytest.raises(ValueError, match="select_on='dev' with final_split='dev'"):
        dataclasses.replace(cfg, select_on="dev", final_split="dev")            # a replacement is validated too
    with pytest.raises(ValueError, match="objective must be one of ce, neg_accuracy, neg_f1, got 'f1'"):
        TrainConfig(objective="f1")
    assert not hasattr(TrainConfig, "check")                                  # nothing to call again later


def test_the_run_takes_the_typed_config():
    assert typing.get_type_hints(Run.__init__)["cfg"] is TrainConfig
    assert typing.get_type_hints(Run.start)["cfg"] is TrainConfig


def test_train_cli_validates_once_and_reads_the_spec_once(tmp_path, spec_task, counts, data_dir):
    assert main(["train", *spec_task, *FAST, "--output-dir", str(tmp_path / "run")]) == 0
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 1, "load_config_file": 0}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["objective"] == "neg_accuracy"                               # the spec's, chosen at the boundary


def test_eval_and_replay_resolve_the_task_once(tmp_path, spec_task, counts):
    assert main(["train", *spec_task, *FAST, "--output-dir", str(tmp_path / "run")]) == 0
    for k in counts:
        counts[k] = 0
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["eval", *spec_task, "--model", "tiny-llama", "--k", "4", "--adapter", adapter]) == 0
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 1, "load_config_file": 0}
    for k in counts:
        counts[k] = 0
    assert main(["replay", "--run", str(tmp_path / "run")]) == 0
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 1, "load_config_file": 0}


def test_a_config_file_is_read_once_and_its_task_is_the_one_resolved(tmp_path, data_dir, counts):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"task": "rte", "model": "tiny-llama", "lr": 5e-3, "max_minutes": None}))
    cfg, task = config_files.config_from_cli(vars(_parser().parse_args(["train", "--config", str(path)])),
                                             explicit={"config"})
    assert task.name == "rte" and cfg.task == "rte" and cfg.lr == 5e-3 and cfg.objective == "ce"
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 0, "load_config_file": 1}
    for k in counts:
        counts[k] = 0
    path.write_text(json.dumps({"model": "tiny-llama", "max_minutes": None}))
    argv = ["train", "--config", str(path), "--data-dir", data_dir, *FAST, "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 0, "load_config_file": 1}


def test_the_api_resolves_the_task_once_and_validates_nothing_again(tmp_path, data_dir, counts):
    cfg = TrainConfig(model="tiny-llama", data_dir=data_dir, output_dir=str(tmp_path), k=4, batch_size=4, steps=1,
                      eval_every=0, eval_max=4, max_minutes=None)
    assert counts["validate"] == 1
    loop.train(cfg, progress=False)
    assert counts == {"validate": 1, "get_task": 1, "load_task_spec": 0, "load_config_file": 0}


def test_a_spec_task_without_data_is_refused_naming_the_file(tmp_path, spec_task):
    task = registry.get_task(spec_task[1])
    assert task.source == spec_task[1]
    with pytest.raises(ValueError, match=f"task spec {spec_task[1]}: give its data with --train-file"):
        data.load_task_splits(task)


def test_batched_pm_with_several_processes_is_a_config_error():
    cfg = TrainConfig(batched_pm=True)
    cfg.check_world_size(1)
    with pytest.raises(ValueError, match="batched_pm is single-process"):
        cfg.check_world_size(2)
    TrainConfig().check_world_size(4)


# ------------------------------------------------------------------------------------------------ the objective
def test_the_objective_kinds_are_one_enum():
    assert ObjectiveKind.values() == ("ce", "neg_accuracy", "neg_f1")
    sub = next(a for a in _parser()._actions if a.dest == "cmd").choices["train"]
    choices = next(a for a in sub._actions if a.dest == "objective").choices
    assert tuple(choices) == ObjectiveKind.values()
    assert metrics.ObjectiveKind is ObjectiveKind and metrics.Reduction("neg_f1").kind is ObjectiveKind.NEG_F1
    with pytest.raises(ValueError, match="unknown objective 'f1'; use 'ce', 'neg_accuracy', 'neg_f1' or a callable"):
        metrics.Reduction("f1")
    with pytest.raises(ValueError, match="not one of ce, neg_accuracy, neg_f1"):
        Task("t", {0: "no", 1: "yes"}, "{text_a} {mask}", objective="f1")


def test_no_other_module_spells_an_objective_kind():
    """The kinds' spellings appear as code (string constants) only in the enum's module."""
    spelled = set(ObjectiveKind.values())
    where = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in spelled:
                where.add(path.relative_to(PKG).as_posix())
    assert where == {"tasks/records.py"}
