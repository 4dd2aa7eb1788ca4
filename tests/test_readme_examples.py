"""The usage examples of README.md and docs/*.md, run as written on the tiny random model.

A fenced block is an example when the line ``<!-- example: NAME -->`` precedes it. Python examples are executed
in a scratch working directory; the CLI example's spec file is written from its YAML block and its commands run
through ``mezo_kernels.train.cli.main`` with the model, steps and k turned down (flags given last win)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKED = re.compile(r"^<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)^```", re.M | re.S)


def _examples() -> dict[str, tuple[Path, str, str]]:
    out: dict[str, tuple[Path, str, str]] = {}
    for path in FILES:
        for name, lang, code in MARKED.findall(path.read_text(encoding="utf-8")):
            assert name not in out, f"example {name!r} is marked twice"
            out[name] = (path, lang, code)
    return out


EXAMPLES = _examples()
TESTED = {"pytorch", "trainer", "spec", "cli", "paramset", "forward", "prompt-trainer", "trl", "prefix"}


def run_example(name: str, where: Path, monkeypatch) -> dict:
    """Execute Python example ``name`` with ``where`` as the working directory; its namespace."""
    path, lang, code = EXAMPLES[name]
    assert lang == "python", (name, lang)
    monkeypatch.chdir(where)
    ns: dict = {"__name__": f"example_{name}"}
    exec(compile(code, f"{path.name}:{name}", "exec"), ns)
    return ns


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _moved(model, before):
    return any(not torch.equal(p.detach().cpu(), before[n].cpu()) for n, p in model.named_parameters())


def test_every_marked_example_is_run_here():
    assert set(EXAMPLES) == TESTED
    readme = REPO / "README.md"
    assert {n for n, (p, _, _) in EXAMPLES.items() if p == readme} == {"pytorch", "trainer", "spec", "cli"}


def test_plain_pytorch_loop(tmp_path, monkeypatch):
    from mezo_kernels.models import load_model
    ns = run_example("pytorch", tmp_path, monkeypatch)
    model, opt, res, fresh = ns["model"], ns["opt"], ns["res"], ns["fresh"]
    assert opt.step_count == 20 and not res.skipped
    assert _moved(model, _snapshot(load_model("tiny-llama")[0]))
    assert [r["lr"] for r in opt.log][-1] < 1e-4            # the scheduler drove the kernels' lr
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())    # replay: bit for bit


def test_transformers_trainer(tmp_path, monkeypatch):
    from mezo_kernels.models import load_model
    ns = run_example("trainer", tmp_path, monkeypatch)
    trainer = ns["trainer"]
    assert trainer.state.global_step == 10 and _moved(ns["model"], _snapshot(load_model("tiny-llama")[0]))
    assert all("projected_grad" in h for h in trainer.state.log_history if "loss" in h)
    assert (tmp_path / "runs" / "trainer" / "checkpoint-10").is_dir()


def test_cli_on_your_own_data(tmp_path, monkeypatch, capsys):
    """The task spec as written, data files in the README's record format, the two commands on tiny-llama."""
    from mezo_kernels.train.cli import main
    readme = EXAMPLES["spec"][0].read_text(encoding="utf-8")
    spec = EXAMPLES["spec"][2]
    spec_name = re.match(r"#\s*(\S+\.ya?ml)", spec).group(1)
    (tmp_path / spec_name).write_text(spec, encoding="utf-8")
    record = json.loads(re.search(r"e\.g\. `(\{.*?\})`", readme).group(1))     # the README's sample line
    (text_col, text), (label_col, _) = record.items()
    labels = ["negative", "positive"]
    for file, n in (("train.jsonl", 24), ("dev.jsonl", 6)):
        rows = [{text_col: f"{text} number {i}", label_col: labels[i % 2]} for i in range(n)]
        (tmp_path / file).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    commands = EXAMPLES["cli"][2].replace("\\\n", " ").strip().splitlines()
    assert [c.split()[:2] for c in commands] == [["mezo-kernels", "train"], ["mezo-kernels", "eval"]]
    small = {"train": ["--model", "tiny-llama", "--steps", "2", "--k", "4", "--eval-every", "0", "--no-progress"],
             "eval": ["--model", "tiny-llama"]}
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        assert main(argv + small[argv[0]]) == 0, cmd
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["n"] == 6 and json.loads(out[-1])["adapter"] == "runs/reviews/adapter"
    assert (tmp_path / "runs" / "reviews" / "seeds.jsonl").is_file()


def test_paramset_api(tmp_path, monkeypatch):
    ns = run_example("paramset", tmp_path, monkeypatch)
    assert ns["t"].abs().eq(1).all() and ns["buf"].shape == next(ns["model"].parameters()).shape


def test_forward_engine(tmp_path, monkeypatch):
    ns = run_example("forward", tmp_path, monkeypatch)
    assert ns["logits"].shape[0] == 2 and torch.isfinite(ns["logits"]).all()


def test_prefix_tuning(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    ns = run_example("prefix", tmp_path, monkeypatch)
    assert [n for n, _ in ns["params"]] == ["prefix.weight"] and ns["params"][0][1].shape == (5, 256)
    assert ns["res"].loss_plus != ns["res"].loss_minus and (tmp_path / "prefix-adapter" / "mezo_prefix.json").is_file()


def test_prompt_task_through_the_trainer(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    ns = run_example("prompt-trainer", tmp_path, monkeypatch)
    assert ns["trainer"].state.global_step == 5
    assert (tmp_path / "runs" / "prompt" / "adapter" / "adapter_config.json").is_file()


def test_trl_sft(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from mezo_kernels.models import load_model
    ns = run_example("trl", tmp_path, monkeypatch)
    assert _moved(ns["model"], _snapshot(load_model("tiny-llama")[0])) and len(ns["trainer"].mezo.log) == 10
