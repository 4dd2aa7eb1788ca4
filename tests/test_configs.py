"""configs/: the paper's run settings load, and each runs end to end on the tiny model of its architecture with the
steps cut to 2 and evaluation capped, so a config cannot rot; flags override a config's values."""
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("yaml")
from conftest import write_sst2  # noqa: E402
from mezo_kernels.train.cli import main  # noqa: E402
from mezo_kernels.train.config_files import load_config_file  # noqa: E402
from mezo_kernels.train.config import TrainConfig  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
FAMILY = {"roberta-large": "tiny-roberta", "facebook/opt-13b": "tiny-opt"}


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> str:
    """SST-2 rows enough for both protocols as configured: k = 512 per class for train and dev (2,048 rows) and
    the OPT protocol's 1,000 train + 500 dev."""
    return write_sst2(tmp_path_factory.mktemp("bigdata"), {"train": 2200, "dev": 40}, seed=1, words=5)


def test_the_paper_configs_are_all_there():
    names = {p.stem for p in CONFIGS}
    want = {f"roberta-large-sst2-k{k}-{m}" for k in (16, 512) for m in ("mezo", "mezo-lora", "mezo-prefix")}
    want |= {f"opt-13b-sst2-{m}" for m in ("mezo", "mezo-lora", "mezo-prefix")}
    assert want <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_its_tiny_architecture(path, big_data, tmp_path):
    fields, meta = load_config_file(path)
    assert meta["smoke_model"] == FAMILY[fields["model"]] and meta["follows"] and meta["notes"]
    assert fields["max_minutes"] is None and fields["select_on"] == "dev"
    TrainConfig(**fields)                            # validated when built
    argv = ["train", "--config", str(path), "--model", meta["smoke_model"], "--data-dir", big_data,
            "--output-dir", str(tmp_path), "--steps", "2", "--eval-max", "8", "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    # the file's settings, but for the flags given
    for k, v in fields.items():
        if k not in ("model", "steps", "eval_max", "output_dir"):
            assert saved[k] == v, k
    assert saved["model"] == meta["smoke_model"] and saved["steps"] == 2 and saved["eval_max"] == 8
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["best_step"] == 2 and summary["after"]["n"] == 8
    if "prefix" in path.stem:      # MeZO-prefix: only the 5 learned key/value vectors per layer trained and saved
        assert fields["prefix_tokens"] == 5 and (tmp_path / "adapter").is_dir()
        assert summary["trainable"] == 5 * 2 * 2 * 64           # tiny models: 2 layers, hidden 64 (keys + values)


def test_flags_override_the_file_and_only_typed_flags_do(tmp_path, data_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-llama\nlr: 0.02\neps: 0.05\nbatch_size: 4\nk: 8\nsteps: 3\nmax_minutes: null\n"
                   "eval_every: 0\n")
    out = tmp_path / "run"
    # --eps given with the demo's default value still counts as given; --lr is not typed, so the file's stays
    assert main(["train", "--config", str(cfg), "--data-dir", data_dir, "--output-dir", str(out), "--eps", "1e-2",
                 "--steps", "2", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr"] == 0.02 and saved["eps"] == 1e-2 and saved["steps"] == 2 and saved["batch_size"] == 4
    assert saved["max_minutes"] is None and saved["model"] == "tiny-llama"


@pytest.mark.parametrize("text, why", [("lr: fast\n", "'lr' must be float"), ("lora: 1\n", "'lora' must be bool"),
                                       ("steps: 2.5\n", "'steps' must be int"), ("learning_rate: 1\n", "unknown field"),
                                       ("- 1\n", "expected a mapping"), ("meta: 3\n", "'meta' must be a mapping")])
def test_bad_config_files_name_the_problem(tmp_path, text, why):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=why):
        load_config_file(p)
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.yaml")
