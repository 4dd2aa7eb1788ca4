"""The ICL baseline (mezo_kernels/tasks/icl.py, ``mezo-kernels eval --icl K``, bench_quality's ``icl`` method) on
tiny-llama and synthetic SST-2: the prompt builder (balanced, seeded, one order for every row, gold words, blank-line
separator), the engine's prefix reuse on ICL rows (saves work, same scores as the plain forward), the clear errors
(too many demonstrations for a class, a prompt that does not fit, masked LMs), the CLI's JSON and the bench row."""
import json
import os
import sys

import pytest
import torch

from mezo_kernels.forward import ForwardEngine
from mezo_kernels.tasks import data, icl
from mezo_kernels.tasks.records import Example
from mezo_kernels.tasks.registry import get_task
from mezo_kernels.train.cli import main
from mezo_kernels.train.config import TrainConfig
from mezo_kernels.train.loop import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sst2():
    return get_task("sst2")


@pytest.fixture(scope="module")
def splits(data_dir, sst2):
    return data.load_task_splits(sst2, data_dir, "kshot", 16, 0)


@pytest.fixture(scope="module")
def tiny(data_dir):
    model, tok, task, obj, _ = build(TrainConfig(task="sst2", model="tiny-llama", data_dir=data_dir, lora=False))
    return model, task, obj


# ------------------------------------------------------------------------------------------------ prompt builder
def test_per_class_counts_give_the_remainder_to_the_first_classes():
    assert icl.per_class_counts(4, 2) == [2, 2]
    assert icl.per_class_counts(5, 2) == [3, 2]
    assert icl.per_class_counts(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match=">= 1"):
        icl.per_class_counts(0, 2)


def test_demonstrations_are_balanced_seeded_and_from_train(sst2, splits):
    for k in (4, 5, 8):
        demos = icl.select_demonstrations(sst2, splits.train, k, seed=3)
        labels = [d.label for d in demos]
        assert len(demos) == k and [labels.count(c) for c in (0, 1)] == icl.per_class_counts(k, 2)
        assert all(d in splits.train for d in demos) and len(set(map(id, demos))) == k
        assert demos == icl.select_demonstrations(sst2, splits.train, k, seed=3)        # seeded
    draws = {tuple(map(id, icl.select_demonstrations(sst2, splits.train, 8, seed=s))) for s in range(5)}
    assert len(draws) > 1                                                               # the seed matters
    # one fixed shuffled order: not all of class 0 first
    orders = {tuple(d.label for d in icl.select_demonstrations(sst2, splits.train, 8, seed=s)) for s in range(5)}
    assert any(o != tuple(sorted(o)) for o in orders)


def test_prompt_builder_format(sst2):
    demos = [Example("a fine film", None, 1), Example("a dull plot", None, 0)]
    ex = Example("the acting", None, 1)
    cp = icl.icl_prompt(sst2, demos, ex)
    assert cp.prompt == "a fine film It was great\n\na dull plot It was terrible\n\nthe acting It was"
    assert cp.candidates == sst2.format_causal(ex).candidates == (" terrible", " great")
    # the same demonstration block, in the same order, before every example; the gold word ends each demonstration
    other = icl.icl_prompt(sst2, demos, Example("boring", None, 0))
    block = icl.demonstration_block(sst2, demos)
    assert cp.prompt.startswith(block) and other.prompt.startswith(block)
    assert other.prompt[len(block):] == sst2.format_causal(Example("boring", None, 0)).prompt
    assert [icl.demonstration_text(sst2, d) for d in demos] == ["a fine film It was great",
                                                                "a dull plot It was terrible"]
    assert icl.icl_prompt(sst2, demos, ex, separator="\n").prompt.count("\n") == 2


def test_rte_demonstrations_use_the_causal_template_and_its_gold_word():
    rte = get_task("rte")
    d = Example("It rained.", "The street is wet", 0)
    text = icl.demonstration_text(rte, d)
    assert text.startswith("It rained.\nDoes this mean that") and text.endswith("\n" + rte.words[0])


# ------------------------------------------------------------------------------------------------ engine
def test_prefix_reuse_saves_work_and_keeps_the_scores(tiny, splits):
    model, task, base = tiny
    reuse = icl.icl_objective(base, task, splits.train, 4, 0, None, model=model)
    engine = ForwardEngine()
    reuse.engine = engine
    plain = icl.ICLObjective(base.tokenizer, task, reuse.demos, reuse.max_length, engine=ForwardEngine.plain())
    rows = splits.test[:12]
    with torch.no_grad():
        for batch in (rows[:6], rows[6:]):
            a, b = reuse(model, batch), plain(model, batch)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    st = engine.stats
    assert st.saved_fraction > 0.3 and st.fallback is None
    assert st.prefix_cache_hits >= 1                       # the second batch finds the demonstrations cached
    assert reuse.info()["per_class"] == [2, 2] and reuse.max_length == model.config.max_position_embeddings


def test_rows_start_with_the_demonstration_ids(tiny, splits):
    model, task, base = tiny
    obj = icl.icl_objective(base, task, splits.train, 4, 0, None, model=model)
    enc = obj.encode(splits.test[:4])
    n = len(obj.prefix_ids)
    assert all(enc["input_ids"][r, :n].tolist() == obj.prefix_ids for r in range(enc["input_ids"].shape[0]))


# ------------------------------------------------------------------------------------------------ errors
def test_too_many_demonstrations_for_a_class(sst2, splits):
    with pytest.raises(icl.NotEnoughDemonstrations, match=r"needs 17 demonstrations of class 0 .* has 16"):
        icl.select_demonstrations(sst2, splits.train, 34, 0)


def test_a_prompt_that_does_not_fit_says_how_many_demonstrations_fit(tiny, splits):
    model, task, base = tiny
    obj = icl.icl_objective(base, task, splits.train, 8, 0, 50, model=model)
    fits = r"--icl-max-length 50: 8 demonstrations .* (\d+) demonstrations? fit"
    with pytest.raises(icl.ICLPromptTooLong, match=fits) as e:
        obj.check_fits(splits.test)
    j = int(str(e.value).split("; ")[1].split(" ")[0])
    assert 1 <= j < 8
    icl.icl_objective(base, task, splits.train, j, 0, 50, model=model).check_fits(splits.test)     # j fits
    with pytest.raises(icl.ICLPromptTooLong):
        icl.icl_objective(base, task, splits.train, j + 1, 0, 50, model=model).check_fits(splits.test)
    with pytest.raises(icl.ICLPromptTooLong):              # encode refuses too: never a truncated demonstration
        obj.encode(splits.test[:2])


def test_masked_lm_is_refused(data_dir, capsys):
    assert main(["eval", "--model", "tiny-roberta", "--data-dir", data_dir, "--icl", "4"]) == 2
    assert "--icl needs a causal LM" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CLI and bench
def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_eval_icl_prints_accuracy_and_engine_stats(data_dir, capsys):
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--icl", "4", "--batch-size", "8"]) == 0
    r = _last_json(capsys.readouterr().out)
    assert r["n"] == 24 and 0 <= r["accuracy"] <= 1
    assert r["icl"]["k"] == 4 and r["icl"]["per_class"] == [2, 2] and r["icl"]["separator"] == "\n\n"
    assert r["forward"]["saved_fraction"] > 0 and r["forward"]["prefix_cache_hits"] >= 1
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--icl", "4", "--batch-size", "8",
                 "--no-prefix-reuse"]) == 0
    p = _last_json(capsys.readouterr().out)
    assert p["forward"]["saved_fraction"] == 0 and p["accuracy"] == r["accuracy"]
    assert abs(p["loss"] - r["loss"]) < 1e-5


def test_cli_eval_icl_errors(data_dir, capsys):
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--icl", "40"]) == 2
    assert "class 0" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--icl", "8",
                 "--icl-max-length", "40"]) == 2
    assert "fit" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--data-dir", data_dir, "--icl-max-length", "40"]) == 2
    assert "needs --icl" in capsys.readouterr().err


def test_bench_quality_icl_method(data_dir):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_quality as bq
    a = bq.parse(["--model", "tiny-llama", "--data-dir", data_dir, "--k", "4", "--method", "icl", "--icl-k", "4"])
    rows = bq.run(a)
    assert len(rows) == 1
    r = rows[0]
    assert r["method"] == "icl" and r["steps"] == 0 and r["budget_min"] == 0
    assert r["test"]["n"] == 24 and r["dev"]["n"] == 8 and r["icl"]["per_class"] == [2, 2]
    assert r["forward"]["saved_fraction"] > 0
