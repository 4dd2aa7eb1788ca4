"""The quality study's pieces (bench/bench_quality.py, bench/quality_report.py) on a tiny random Llama and
synthetic SST-2: budgets turn into the right step counts, the reported weights are the best dev weights (and the
reported split cannot move them), patience stops a run and later budgets repeat its selection, the lr choice
reads only the dev split, bad arguments are refused. CPU only; nothing here is a timing."""
import json
import os
import sys

import pytest

from conftest import write_sst2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_quality as bq  # noqa: E402
import quality_report as qr  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sst2(tmp_path_factory.mktemp("q"), {"train": 64, "dev": 24}, seed=1, words=5)


def args(data, *extra):
    return bq.parse(["--model", "tiny-llama", "--data-dir", data, "--k", "4", "--batch-size", "4",
                     "--step-seconds", "2", "--sec-per-fe", "1", "--eval-every", "4", *extra])


@pytest.mark.parametrize("method", ["mezo-lora", "bp-lora", "mezo-full"])
def test_budgets_give_steps_and_report_the_best_dev_weights(data, method):
    # 0.1 min = 6 quiet seconds = 3 steps of 2 s; 0.2 min = 6 steps
    rows = bq.run(args(data, "--method", method, "--budgets-min", "0.1", "0.2", "--lr", "1e-2"))
    assert [r["budget_min"] for r in rows] == [0.1, 0.2]
    assert [r["steps"] for r in rows] == [3, 6] and [r["fe"] for r in rows] == [6.0, 12.0]
    for r in rows:
        assert r["stopped"] == "budget" and 1 <= r["best_step"] <= r["steps"]
        assert r["dev"]["n"] == 8 and r["test"]["n"] == 24          # k=4 per class on dev; the whole test split
    assert rows[1]["dev"]["accuracy"] >= rows[0]["dev"]["accuracy"]  # the best so far can only improve


def test_patience_stops_and_later_budgets_repeat_the_selection(data):
    rows = bq.run(args(data, "--method", "bp-lora", "--budgets-min", "0.1", "1", "5", "--lr", "0",
                       "--patience", "8"))
    # AdamW with lr 0 never changes the weights: the first evaluation stays best, and 8 s (4 steps) later the run stops
    assert rows[0]["stopped"] == "budget" and rows[1]["stopped"] == "patience"
    assert rows[1]["steps"] == rows[2]["steps"] < 30 and rows[2]["budget_min"] == 5
    assert rows[1]["test"] == rows[2]["test"] and rows[1]["best_step"] == rows[0]["best_step"]


def test_zeroshot_is_the_untrained_model(data):
    (row,) = bq.run(args(data, "--method", "zeroshot"))
    trained = bq.run(args(data, "--method", "bp-lora", "--budgets-min", "0.1", "--lr", "0"))
    assert row["steps"] == 0 and row["test"] == trained[0]["test"]   # lr 0: the same weights, the same metrics


def test_the_lr_choice_reads_only_the_dev_split(tmp_path):
    def row(lr, dev_acc, dev_loss, test_acc, budget=10, seed=0):
        return {"method": "mezo-lora", "task": "sst2", "k": 16, "seed": seed, "lr": lr, "eps": 1e-2,
                "objective": "ce", "distribution": "gaussian", "n_directions": 1, "budget_min": budget,
                "steps": 5, "fe": 10.0, "dev": {"accuracy": dev_acc, "loss": dev_loss},
                "test": {"accuracy": test_acc}}
    rows = [row(1e-3, 0.75, 0.5, 0.60), row(2e-3, 0.75, 0.4, 0.50), row(5e-4, 0.70, 0.3, 0.90),
            row(5e-4, 0.90, 0.3, 0.90, budget=5), row(1e-2, 0.99, 0.1, 0.99, seed=1)]
    assert qr.choose(rows, "mezo-lora", "sst2", 16) == 2e-3     # the largest budget, seed 0, accuracy then loss
    for r in rows:
        r["test"]["accuracy"] = 1 - r["test"]["accuracy"]
    assert qr.choose(rows, "mezo-lora", "sst2", 16) == 2e-3
    rows.append(row(1e-2, 0.5, 0.5, 0.5, seed=2))
    assert qr.seeded_lr(rows, "mezo-lora", "sst2", 16) == 1e-2      # the lr taken to the most seeds
    assert qr.seeded_lr(rows, "bp-lora", "sst2", 16) is None
    with pytest.raises(ValueError, match="no seed-0 runs of bp-lora"):
        qr.choose(rows, "bp-lora", "sst2", 16)
    p = tmp_path / "runs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = qr.main_table(qr.load(p))
    assert "| sst2 | 16 | mezo-lora | 0.002 |" in table
    long_rows = rows + [dict(row(1e-3, 0.5, 0.5, 0.5), max_length=128)]   # other prompt cuts: another experiment
    assert "| sst2 (len 128) | 16 | mezo-lora | 0.001 |" in qr.main_table(long_rows)
    assert qr.choose(long_rows, "mezo-lora", "sst2 (len 128)", 16) == 1e-3
    assert qr.choose(long_rows, "mezo-lora", "sst2", 16) == 2e-3


def test_ablations_compare_equal_steps_and_the_plot_has_a_panel_per_task(tmp_path):
    def row(steps, test_acc, task="sst2", seed=0, **kw):
        r = {"method": "mezo-lora", "task": task, "k": 16, "seed": seed, "lr": 2e-3, "eps": 1e-2, "objective": "ce",
             "distribution": "gaussian", "n_directions": 1, "budget_min": steps / 30, "steps": steps, "fe": 1.0,
             "dev": {"accuracy": 0.5, "loss": 1.0}, "test": {"accuracy": test_acc}, "zero_grad_rate": 0.0}
        return dict(r, **kw)
    rows = [row(67, 0.61), row(67, 0.62, n_directions=4, budget_min=8), row(166, 0.65),
            row(67, 0.99, seed=1), row(67, 0.98, task="rte"), row(67, 0.97, lr=1e-3), row(67, 0.96, k=512)]
    table = qr.ablation_table(rows, 67, 2e-3)
    lines = table.splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == ["| ce, gaussian, n=1", "| ce, gaussian, n=4"]
    assert "61.0" in lines[0] and "62.0" in lines[1]             # not the other seed, task, lr, k or step count
    with pytest.raises(ValueError, match="no seed-0 mezo-lora rows of sst2 with 5 steps"):
        qr.ablation_table(rows, 5)
    rows.append(dict(row(0, 0.5), method="zeroshot", budget_min=0))
    assert qr.plot(rows, str(tmp_path / "q.png")) == ["rte", "sst2"]
    assert (tmp_path / "q.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no trained runs with k=64"):
        qr.plot(rows, str(tmp_path / "q2.png"), k=64)


def test_bad_arguments_are_refused(data, capsys):
    with pytest.raises(SystemExit):
        bq.parse(["--method", "mezo-lora"])                       # no --step-seconds
    assert "--step-seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bq.parse(["--method", "mezo-lora", "bp-lora", "--step-seconds", "1"])
    assert "one --method per call" in capsys.readouterr().err


def test_eval_best_scores_the_kept_weights_and_puts_the_current_ones_back():
    import torch
    from mezo_kernels.train.selection import BestWeights
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    best = BestWeights([("w", w)])
    best.offer(1, {"accuracy": 0.5, "loss": 1.0})
    with torch.no_grad():
        w.add_(10.0)
    seen = []
    out = bq.eval_best(best, [w], None, None, [], 0, evaluate=lambda *a: seen.append(w.detach().clone()) or {"x": 1})
    assert out == {"x": 1} and torch.equal(seen[0], torch.tensor([1.0, 2.0]))
    assert torch.equal(w.detach(), torch.tensor([11.0, 12.0]))


def test_icl_rows_are_untrained_and_kept_apart_by_k():
    """ICL rows (budget 0, no lr) are quoted at every budget like zero-shot, one table row per K."""
    def row(method, acc, budget=0, lr=None, seed=0, **kw):
        return {"task": "sst2", "k": 16, "method": method, "lr": lr, "budget_min": budget, "seed": seed,
                "objective": "ce", "distribution": "gaussian", "n_directions": 1, "eps": 1e-2, "steps": 5, "fe": 10,
                "test": {"accuracy": acc}, "dev": {"accuracy": acc}, **kw}
    rows = [row("zeroshot", 0.5), row("icl", 0.6, icl={"k": 4}), row("icl", 0.7, icl={"k": 16}),
            row("mezo-lora", 0.8, budget=5, lr=1e-3)]
    table = qr.main_table(rows)
    icl4 = next(line for line in table.splitlines() if "icl K=4" in line)
    icl16 = next(line for line in table.splitlines() if "icl K=16" in line)
    assert "60.0" in icl4 and "70.0" in icl16 and "–" not in icl4 + icl16


def test_prefix_and_lowrank_rows_run_and_the_tables_keep_them_apart(data):
    rows = bq.run(args(data, "--method", "mezo-prefix", "--budgets-min", "0.1", "--lr", "1e-2",
                       "--prefix-tokens", "3"))
    assert rows[0]["prefix_tokens"] == 3 and rows[0]["steps"] == 3
    low = [bq.run(args(data, "--method", "mezo-full", "--budgets-min", "0.1", "--distribution", "lowrank",
                       "--lowrank-r", str(r), "--eps", "1e-3"))[0] for r in (1, 4)]
    assert [r["lowrank_r"] for r in low] == [1, 4]
    names = {qr.method_of(r) for r in rows + low}
    assert names == {"mezo-prefix", "mezo-full lowrank r=1", "mezo-full lowrank r=4"}
    assert all(qr.is_main(r) for r in rows + low)


@pytest.mark.parametrize("method", ["mezo-lora", "bp-lora"])
def test_a_linear_schedule_decays_to_zero_at_the_largest_budget(data, method, monkeypatch):
    """--schedule linear: the lr factor is 1 - t / T with T the steps of the largest budget (0.2 min = 6 steps of
    2 s), so the last step runs at lr / 6 and a run without selection would end where the factor reaches 0."""
    seen = []
    real = bq.Learner.step

    def spy(self, batch):
        lr = (self.opt.lr_at(self.opt.step_count, 0) if method.startswith("mezo")
              else self.opt.param_groups[0]["lr"])
        seen.append(lr)
        return real(self, batch)
    monkeypatch.setattr(bq.Learner, "step", spy)
    rows = bq.run(args(data, "--method", method, "--budgets-min", "0.1", "0.2", "--lr", "6e-3",
                       "--schedule", "linear"))
    assert [r["schedule"] for r in rows] == ["linear", "linear"]
    assert seen == pytest.approx([6e-3 * (1 - t / 6) for t in range(6)])
    seen.clear()
    bq.run(args(data, "--method", method, "--budgets-min", "0.1", "--lr", "6e-3"))
    assert seen == pytest.approx([6e-3] * 3)                       # constant: the default


def test_rows_are_written_as_each_budget_is_scored(data, tmp_path, monkeypatch):
    """A long run that is stopped keeps the rows of the budgets it reached: each row is appended when scored."""
    out = tmp_path / "runs.jsonl"
    written = []
    real = bq.eval_best

    def eval_and_look(*a, **kw):                       # what the file holds when the next budget is being scored
        written.append(len(out.read_text().splitlines()) if out.exists() else 0)
        return real(*a, **kw)
    monkeypatch.setattr(bq, "eval_best", eval_and_look)
    bq.main(["--model", "tiny-llama", "--data-dir", data, "--k", "4", "--batch-size", "4", "--step-seconds", "2",
             "--eval-every", "4", "--method", "mezo-lora", "--budgets-min", "0.1", "0.2", "--out", str(out)])
    assert written == [0, 1]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["budget_min"] for r in rows] == [0.1, 0.2] and all(r["wall_s"] >= 0 for r in rows)
    bq.main(["--model", "tiny-llama", "--data-dir", data, "--k", "4", "--method", "zeroshot", "--out", str(out)])
    assert json.loads(out.read_text().splitlines()[-1])["method"] == "zeroshot"


def test_the_choice_covers_the_schedule_and_the_tables_keep_schedules_apart(capsys, tmp_path):
    def row(lr, schedule, dev_acc, budget=60, seed=0):
        r = {"method": "mezo-lora", "task": "sst2", "k": 16, "seed": seed, "lr": lr, "eps": 1e-2, "objective": "ce",
             "distribution": "gaussian", "n_directions": 1, "budget_min": budget, "steps": 5, "fe": 10.0,
             "dev": {"accuracy": dev_acc, "loss": 0.5}, "test": {"accuracy": 0.7}}
        return r if schedule is None else dict(r, schedule=schedule)
    rows = [row(1e-3, None, 0.70), row(2e-3, "linear", 0.80), row(1e-3, "linear", 0.75), row(2e-3, None, 0.9, 30)]
    assert qr.choose_setting(rows, "mezo-lora", "sst2", 16) == (2e-3, "linear")
    assert qr.choose(rows, "mezo-lora", "sst2", 16) == 2e-3
    assert qr.method_of(rows[1]) == "mezo-lora (linear)" and qr.method_of(rows[0]) == "mezo-lora"
    table = qr.main_table(rows)
    assert "| mezo-lora (linear) | 0.002 |" in table and "| mezo-lora | 0.002 |" in table
    rows += [row(2e-3, "linear", 0.5, seed=1), row(1e-3, None, 0.5, seed=1), row(1e-3, None, 0.5, seed=2)]
    assert qr.seeded_setting(rows, "mezo-lora", "sst2", 16) == (1e-3, "constant")
    p = tmp_path / "runs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    qr.main([str(p), "--choose", "mezo-lora"])
    assert capsys.readouterr().out.strip() == "0.002 linear"


def test_a_run_recorded_twice_counts_once(tmp_path):
    """A phase started again after an interruption records the budgets its first try reached once more: the
    tables count that run once (else it would pose as a second seed)."""
    def row(seed, budget, acc):
        return {"method": "mezo-lora", "task": "rte", "k": 16, "seed": seed, "lr": 1e-3, "eps": 1e-2,
                "objective": "ce", "distribution": "gaussian", "n_directions": 1, "budget_min": budget, "steps": 5,
                "fe": 10.0, "max_length": 128, "dev": {"accuracy": 0.5, "loss": 1.0}, "test": {"accuracy": acc}}
    p = tmp_path / "runs.jsonl"
    rows = [row(0, 5, 0.40), row(0, 5, 0.40), row(0, 10, 0.50), row(1, 5, 0.60), row(1, 10, 0.70)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = qr.load(p)
    assert len(loaded) == 4
    line = next(x for x in qr.main_table(loaded).splitlines() if "mezo-lora" in x)
    assert "| 50.0 ± 14.1 (5, 10) | 60.0 ± 14.1 (5, 10) | 2 |" in line     # with the duplicate: 46.7 ± 11.5


def test_a_low_rank_family_is_chosen_within_itself():
    def row(lr, dev_acc, **kw):
        return {"method": "mezo-full", "task": "sst2", "k": 16, "seed": 0, "lr": lr, "eps": 1e-3, "objective": "ce",
                "distribution": "gaussian", "n_directions": 1, "budget_min": 30, "steps": 5, "fe": 10.0,
                "dev": {"accuracy": dev_acc, "loss": 0.5}, "test": {"accuracy": 0.7}, **kw}
    rows = [row(1e-4, 0.9), row(3e-4, 0.6, distribution="lowrank", lowrank_r=1),
            row(1e-4, 0.5, distribution="lowrank", lowrank_r=1), row(1e-5, 0.99, distribution="lowrank", lowrank_r=4)]
    assert qr.choose(rows, "mezo-full lowrank r=1", "sst2", 16) == 3e-4      # not Gaussian's 0.9, nor r = 4's
    assert qr.choose(rows, "mezo-full", "sst2", 16) == 1e-4
    assert qr.choose(rows, "mezo-full lowrank r=4", "sst2", 16) == 1e-5


def test_a_study_section_shows_the_dev_choices_and_the_gap(tmp_path):
    import quality_section as qs

    def row(method, lr, seed, budget, dev_acc, acc, schedule="constant"):
        return {"method": method, "task": "sst2", "k": 16, "seed": seed, "lr": lr, "eps": 1e-2, "objective": "ce",
                "distribution": "gaussian", "n_directions": 1, "budget_min": budget, "steps": 10, "fe": 20.0,
                "schedule": schedule, "best_step": 7, "dev": {"accuracy": dev_acc, "loss": 0.5, "n": 32},
                "test": {"accuracy": acc}}
    rows = [row("mezo-lora", 1e-3, 0, 60, 0.70, 0.60), row("mezo-lora", 2e-3, 0, 60, 0.80, 0.70, "linear"),
            row("mezo-lora", 2e-3, 0, 15, 0.60, 0.65, "linear"), row("mezo-lora", 2e-3, 1, 60, 0.5, 0.74, "linear"),
            row("bp-lora", 1e-4, 0, 60, 0.90, 0.80), row("bp-lora", 1e-4, 0, 15, 0.90, 0.78)]
    choice = qs.choice_table(rows, "sst2", 16).splitlines()
    assert len(choice) == 2 + 3                               # 60-minute rows only: two MeZO settings, one backprop
    chosen = [line for line in choice if "**yes**" in line]
    assert [line.split(" | ")[:3] for line in chosen] == [["| bp-lora", "0.0001", "constant"],
                                                         ["| mezo-lora", "0.002", "linear"]]
    gap = qs.gap_table(rows, "mezo-lora", "bp-lora", "sst2", 16).splitlines()
    assert gap[2] == "| 15 | 65.0 (1) | 78.0 (1) | +13.0 |"
    assert gap[3] == "| 60 | 72.0 ± 2.8 (2) | 80.0 (1) | +8.0 |"   # MeZO at the setting taken to two seeds
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Summary\n\ntext\n")
    qs.main([str(runs), "--section", "quality-test", "--compare", "mezo-lora", "bp-lora", "--results", str(results)])
    text = results.read_text()
    assert "<!-- quality-test -->" in text and "| 60 | 72.0 ± 2.8 (2) | 80.0 (1) | +8.0 |" in text
    assert (tmp_path / "csv" / "quality-test.csv").exists()
