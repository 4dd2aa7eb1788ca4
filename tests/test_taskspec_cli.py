"""`mezo-kernels train | eval` with a task spec file and data files on tiny-llama, and the CLI's one-line errors:
a bad spec, a missing optional extra, an unknown model."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")
pytest.importorskip("yaml")
from mezo_kernels.train.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_WORDS = ["good", "bad", "great", "terrible", "fun", "boring", "movie", "film", "plot", "acting"]
SPEC_JSON = {"columns": {"text_a": "review", "label": "sentiment"}, "template": "{text_a} It was {mask} .",
             "verbalizer": {"neg": "terrible", "pos": "great"}, "objective": "neg_accuracy"}
SPEC_YAML = """\
name: pairs
columns: {text_a: premise, text_b: hypothesis, label: gold}
template: "{text_a} ? {mask} , {text_b}"
causal_template: "{text_a} Question: {text_b} Yes or No? {mask}"
verbalizer: {0: "Yes", 1: "No"}
objective: neg_f1
"""


def sentences(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(_WORDS) for _ in range(5)) for _ in range(n)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def run_cli(*argv: str) -> int:
    return main([*argv, "--model", "tiny-llama", "--k", "4", "--seed", "1"])


def train_args(out: Path, *files: str) -> list[str]:
    return ["train", *files, "--output-dir", str(out), "--steps", "3", "--batch-size", "4", "--eval-every", "2",
            "--no-progress", "--lr", "5e-3"]


def test_a_json_spec_with_jsonl_data_trains_and_evaluates(tmp_path, capsys):
    spec = tmp_path / "reviews.json"
    spec.write_text(json.dumps(SPEC_JSON))
    for split, n in (("train", 20), ("dev", 10)):
        rows = [{"review": s, "sentiment": ["neg", "pos"][i % 2]} for i, s in enumerate(sentences(n, len(split)))]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ["--task", str(spec), "--train-file", str(tmp_path / "train.jsonl"), "--eval-file",
             str(tmp_path / "dev.jsonl")]
    out = tmp_path / "run"
    assert run_cli(*train_args(out, *files)) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == str(spec) and cfg["train_file"].endswith("train.jsonl")
    assert cfg["objective"] == "neg_accuracy"                                 # the spec's objective
    evals = read_jsonl(out / "evals.jsonl")
    assert [(e["step"], e["split"], e["n"]) for e in evals] == [(0, "test", 10), (2, "dev", 8), (3, "test", 10)]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(m["loss_plus"] <= 0 for m in metrics)     # -accuracy
    capsys.readouterr()
    assert main(["eval", *files, "--model", "tiny-llama", "--k", "4", "--seed", "1",
                 "--adapter", str(out / "adapter")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = json.loads((out / "summary.json").read_text())["after"]
    assert (res["accuracy"], res["n"]) == (after["accuracy"], after["n"])


def test_a_yaml_spec_with_csv_data_and_a_test_file(tmp_path):
    spec = tmp_path / "pairs.yaml"
    spec.write_text(SPEC_YAML)
    for split, n in (("train", 16), ("dev", 6), ("test", 9)):
        a, b = sentences(n, n), sentences(n, n + 1)
        lines = ["gold,hypothesis,premise"] + [f'{i % 2},"{b[i]}, right","{a[i]}"' for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    files = ["--task", str(spec)] + [x for s, f in (("train", "train"), ("eval", "dev"), ("test", "test"))
                                     for x in (f"--{s}-file", str(tmp_path / f"{f}.csv"))]
    out = tmp_path / "run"
    assert run_cli(*train_args(out, *files), "--objective", "ce") == 0
    assert json.loads((out / "config.json").read_text())["objective"] == "ce"       # the flag wins over the spec
    evals = read_jsonl(out / "evals.jsonl")
    assert [(e["split"], e["n"]) for e in evals] == [("test", 9), ("dev", 6), ("test", 9)]


def test_builtin_task_from_files_runs_bit_identical_to_its_folder(data_dir, tmp_path):
    d = Path(data_dir) / "sst2"
    assert run_cli(*train_args(tmp_path / "folder", "--data-dir", data_dir)) == 0
    assert run_cli(*train_args(tmp_path / "files", "--train-file", str(d / "train.tsv"), "--eval-file",
                               str(d / "dev.tsv"))) == 0
    for f in ("seeds.jsonl", "evals.jsonl"):
        assert (tmp_path / "folder" / f).read_text() == (tmp_path / "files" / f).read_text(), f


def test_cli_errors_name_the_spec_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC_YAML.replace("{mask}", "<mask>"))
    assert run_cli(*train_args(tmp_path / "o", "--task", str(bad), "--train-file", "x.csv")) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: field 'template': must contain exactly one {{mask}} slot" in err and "Traceback" not in err
    bad.write_text(SPEC_YAML)
    assert run_cli(*train_args(tmp_path / "o", "--task", str(bad), "--train-file", str(tmp_path / "no.csv"),
                               "--eval-file", str(tmp_path / "no.csv"))) == 2
    assert "no.csv does not exist" in capsys.readouterr().err
    assert run_cli(*train_args(tmp_path / "o", "--task", str(bad))) == 2
    assert f"task spec {bad}: give its data with --train-file and --eval-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--task", "cola"])
    assert "invalid choice: 'cola' (choose from rte, sst2, or a task spec file" in capsys.readouterr().err


def test_no_such_model_lists_the_builtins_without_the_network(data_dir, tmp_path, capsys, no_network):
    calls = no_network
    argv = train_args(tmp_path / "o", "--data-dir", data_dir) + ["--model", "no-such-model"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("model 'no-such-model' is neither a built-in model (smollm2-135m, tiny-llama, tiny-opt, tiny-roberta, "
            "tiny-bert) nor a local folder") in err
    assert "Traceback" not in err and calls == []


_WITHOUT_HF = """
import sys
for m in ("transformers", "peft", "accelerate", "trl"):
    sys.modules[m] = None          # as if the hf extra were not installed
if sys.argv[1] == "import":
    try:
        import mezo_kernels.hf
    except ImportError as e:
        print(e)
        sys.exit(3)
else:
    from mezo_kernels.train.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_without_the_hf_extra_the_cli_and_hf_say_which_extra(data_dir, tmp_path):
    hint = 'pip install -e ".[hf]"'
    cli = subprocess.run([sys.executable, "-c", _WITHOUT_HF, "train", "--model", "tiny-llama", "--data-dir",
                          data_dir, "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert cli.returncode == 2, cli.stderr
    assert "mezo-kernels train needs transformers, peft, from the 'hf' extra" in cli.stderr and hint in cli.stderr
    assert "Traceback" not in cli.stderr and not (tmp_path / "config.json").exists()
    imp = subprocess.run([sys.executable, "-c", _WITHOUT_HF, "import"], capture_output=True, text=True, cwd=REPO)
    assert imp.returncode == 3 and "mezo_kernels.hf needs transformers, from the 'hf' extra" in imp.stdout
    assert hint in imp.stdout
