"""SmolLM2-135M on SST-2: ``mezo-kernels train`` against ``MeZOTrainer`` with the same settings.

Per seed: (a) the CLI in a subprocess, (b) ``transformers.Trainer`` with ``mezo_kernels.hf.MeZOTrainer``, the
prompt objective through ``ObjectiveModel`` and the CLI's batches through ``StepBatches`` (sequential sampling).
Both are evaluated on the reported split (kshot "test" = the GLUE dev set, 872 examples) with
``trainer.evaluate``; the final adapters are compared tensor by tensor. The two parts run one after the other.

    .venv/bin/python bench/bench_hf_trainer.py --seeds 0 1 --steps 100 --out /tmp/hfb

Each finished part appends one JSON line to ``OUT/results.jsonl``; ``--parts cli`` / ``--parts hf`` run one part
(a CLI run already in ``OUT/cli_s<seed>`` is reused with ``--reuse-cli``), and ``--table`` prints the markdown
table of ``results.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(task="sst2", model="smollm2-135m", protocol="kshot", k=16, lora_r=8, batch_size=16, lr=1e-3,
                eps=1e-2, schedule="constant")


def cli_argv(seed: int, steps: int, out: Path, data_dir: str | None) -> list[str]:
    s = SETTINGS
    argv = [str(ROOT / ".venv/bin/mezo-kernels"), "train", "--task", s["task"], "--model", s["model"],
            "--protocol", s["protocol"], "--k", str(s["k"]), "--seed", str(seed), "--lora-r", str(s["lora_r"]),
            "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]), "--eps", str(s["eps"]),
            "--schedule", s["schedule"], "--steps", str(steps), "--max-minutes", "0", "--eval-every", "0",
            "--no-progress", "--output-dir", str(out)]
    return argv + (["--data-dir", data_dir] if data_dir else [])


def run_cli(seed: int, steps: int, out: Path, data_dir: str | None, reuse: bool) -> dict:
    run_dir = out / f"cli_s{seed}"
    wall = None
    if not (reuse and (run_dir / "summary.json").exists()):
        t0 = time.perf_counter()
        subprocess.run(cli_argv(seed, steps, run_dir, data_dir), check=True, stdout=subprocess.DEVNULL)
        wall = round(time.perf_counter() - t0, 1)
    summ = json.loads((run_dir / "summary.json").read_text())
    if summ["steps"] != steps:
        raise ValueError(f"{run_dir} ran {summ['steps']} steps, not {steps}")
    return {"part": "cli", "seed": seed, "steps": steps, "before": summ["before"], "after": summ["after"],
            "train_seconds": summ["train_seconds"], "wall_seconds": wall}


def step_log(path: Path):
    """A TrainerCallback writing ``{"step", "g", "seconds"}`` per logged step to ``path`` as it goes, so a run
    cut short still shows its trajectory (``g`` compares with the CLI's ``metrics.jsonl``)."""
    from transformers import TrainerCallback

    class _StepLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
            self.prev = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "projected_grad" in logs:          # logging_steps=1: once per step
                now = time.perf_counter()
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step - 1, "g": logs["projected_grad"],
                                        "seconds": round(now - self.prev, 3)}) + "\n")
                self.prev = now

    return _StepLog()


def run_hf(seed: int, steps: int, out: Path, data_dir: str | None, before: bool) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from mezo_kernels.tasks import data
    from mezo_kernels.train import loop as trainer
    from mezo_kernels.train.config import TrainConfig
    from mezo_kernels.hf import MeZOTrainer, ObjectiveModel, StepBatches, collate_examples

    t_all = time.perf_counter()
    cfg = TrainConfig(**SETTINGS, seed=seed, steps=steps, data_dir=data_dir, eval_every=0, max_minutes=None)
    splits = data.load_task_splits(cfg.task, cfg.data_dir, cfg.protocol, cfg.k, cfg.seed)
    model, _, _, obj, _ = trainer.build(cfg)
    rec: dict = {"part": "hf", "seed": seed, "steps": steps}
    if before:
        rec["before"] = trainer.evaluate(model, obj, splits.test, cfg.eval_batch_size)
    args = TrainingArguments(output_dir=str(out / f"hf_s{seed}"), per_device_train_batch_size=cfg.batch_size,
                             max_steps=steps, learning_rate=cfg.lr, lr_scheduler_type="constant", seed=seed,
                             train_sampling_strategy="sequential", report_to="none", save_strategy="no",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, logging_steps=1)
    tr = MeZOTrainer(model=ObjectiveModel(model, obj), args=args, data_collator=collate_examples,
                     train_dataset=StepBatches(splits.train, seed, cfg.batch_size, steps), eps=cfg.eps,
                     callbacks=[step_log(out / f"hf_s{seed}" / "steps.jsonl")])
    t0 = time.perf_counter()
    tr.train()
    rec["train_seconds"] = round(time.perf_counter() - t0, 1)
    adapter = out / f"hf_s{seed}" / "adapter"
    model.save_pretrained(str(adapter))
    cli_file = out / f"cli_s{seed}" / "adapter" / "adapter_model.safetensors"
    if cli_file.exists():
        a, b = load_file(str(cli_file)), load_file(str(adapter / "adapter_model.safetensors"))
        same_keys = a.keys() == b.keys()
        rec["bit_identical"] = same_keys and all(torch.equal(a[k], b[k]) for k in a)
        rec["max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a) if same_keys else None
    print(json.dumps({**rec, "after": "evaluating"}), flush=True)   # the comparison, before the slow evaluation
    rec["after"] = trainer.evaluate(model, obj, splits.test, cfg.eval_batch_size)
    rec["wall_seconds"] = round(time.perf_counter() - t_all, 1)    # in-process: no interpreter start-up
    return rec


def table(rows: list[dict]) -> str:
    lines = ["| seed | run | steps | acc before | acc after | CE after | train s | wall s | adapters bit-identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["part"])):
        b = f"{100 * r['before']['accuracy']:.2f} %" if "before" in r else "(same init)"
        same = {True: "yes", False: f"no (max diff {r.get('max_abs_diff')})"}.get(r.get("bit_identical"), "")
        lines.append(f"| {r['seed']} | {'CLI' if r['part'] == 'cli' else 'MeZOTrainer'} | {r['steps']} | {b} | "
                     f"{100 * r['after']['accuracy']:.2f} % | {r['after']['loss']:.4f} | {r['train_seconds']} | "
                     f"{r['wall_seconds'] if r['wall_seconds'] is not None else '-'} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="/tmp/bench_hf_trainer")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=SETTINGS["model"], help="e.g. tiny-llama for a smoke run")
    p.add_argument("--parts", default="cli,hf", help="comma-separated: cli, hf")
    p.add_argument("--reuse-cli", action="store_true", help="reuse a finished CLI run in OUT/cli_s<seed>")
    p.add_argument("--no-hf-before", action="store_true",
                   help="skip the MeZOTrainer run's before-evaluation (same initial weights as the CLI's)")
    p.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and exit")
    a = p.parse_args(argv)
    SETTINGS["model"] = a.model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if a.table:
        print(table([json.loads(x) for x in results.read_text().splitlines() if x.strip()]))
        return 0
    parts = [x for x in a.parts.split(",") if x]
    if not parts or set(parts) - {"cli", "hf"}:
        raise SystemExit(f"--parts must name cli and/or hf, got {a.parts!r}")
    for seed in a.seeds:
        for part in parts:
            rec = (run_cli(seed, a.steps, out, a.data_dir, a.reuse_cli) if part == "cli"
                   else run_hf(seed, a.steps, out, a.data_dir, not a.no_hf_before))
            with results.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
