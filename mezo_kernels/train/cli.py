"""``mezo-kernels train | eval | replay`` (also ``python -m mezo_kernels``).

``train`` with no options runs the README demo: MeZO-LoRA on SmolLM2-135M-Instruct, SST-2, on the CPU.
Under ``torchrun --nproc-per-node N -m mezo_kernels train ...`` training is data parallel (data_parallel.py), with
the model replicated (``--shard none``), sharded by FSDP2 (``fsdp``) or tensor parallel (``tp``; sharding.py).
``eval`` prints a JSON object on its last line (accuracy, f1, loss, n). ``replay`` rebuilds a run's weights from
its initial weights and ``seeds.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..tasks.records import ObjectiveKind
from ..tasks.registry import task_names
from .config import TrainConfig

_DEMO = TrainConfig()   # the defaults are the demo's settings
# the modules each command imports (checked before any work, so a missing extra is one line, not a traceback)
_NEEDS = {"train": ("transformers", "peft", "tqdm", "matplotlib"), "eval": ("transformers", "peft"),
          "replay": ("transformers", "peft")}


def _task_arg(value: str) -> str:
    """``--task``: a registered task name or a task spec file (checked when it is read)."""
    from ..tasks.spec import is_spec_path
    from ..tasks.records import canonical_task_name
    if canonical_task_name(value) in task_names() or is_spec_path(value):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(task_names())}, or a "
                                     "task spec file .json/.yaml/.yml)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=_DEMO.task, type=_task_arg, metavar="{" + ",".join(task_names()) + "}|SPEC",
                   help="a built-in task, or a task spec file (.json/.yaml: columns, template, verbalizer)")
    p.add_argument("--model", default=_DEMO.model,
                   help="smollm2-135m | tiny-llama | tiny-opt | tiny-roberta | tiny-bert | local folder | "
                        "hub id org/name")
    p.add_argument("--data-dir", default=None,
                   help="folder with one subfolder per task (else $MEZO_DATA_DIR, else ../shared/data)")
    p.add_argument("--train-file", default=None,
                   help="data file (.jsonl/.json/.csv/.tsv/.parquet) that train and dev are sampled from by "
                        "--protocol; replaces --data-dir")
    p.add_argument("--eval-file", default=None,
                   help="the reported (test) split's file; with --test-file, the dev split's file instead")
    p.add_argument("--test-file", default=None, help="the reported (test) split's file, when --eval-file is dev")
    p.add_argument("--protocol", default=_DEMO.protocol, choices=["kshot", "opt"])
    p.add_argument("--k", type=int, default=_DEMO.k, help="examples per class (kshot protocol)")
    p.add_argument("--seed", type=int, default=_DEMO.seed)
    p.add_argument("--max-length", type=int, default=_DEMO.max_length)
    p.add_argument("--chat", action="store_true", help="wrap causal prompts in the tokenizer's chat template")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="plain forwards: no shared-prefix KV, frozen-layer or eval-cache reuse (same results)")
    p.add_argument("--eval-max", type=int, default=_DEMO.eval_max, help="cap evaluated examples (0: all)")
    p.add_argument("--dtype", default=_DEMO.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the model; auto: bfloat16 on a GPU, or on a CPU with amx_bf16/avx512_bf16 "
                        "where a timed bf16 forward of the model is >= 20%% faster, else float32; a run records the "
                        "resolved one, which --resume and replay reuse (default: %(default)s)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mezo-kernels", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    t = sub.add_parser("train", help="MeZO fine-tuning (no options: the SmolLM2 SST-2 demo)")
    _add_common(t)
    t.add_argument("--output-dir", default=_DEMO.output_dir)
    t.add_argument("--steps", type=int, default=_DEMO.steps)
    t.add_argument("--lr", type=float, default=_DEMO.lr)
    t.add_argument("--eps", type=float, default=_DEMO.eps)
    t.add_argument("--batch-size", type=int, default=_DEMO.batch_size)
    t.add_argument("--n-directions", type=int, default=_DEMO.n_directions)
    t.add_argument("--weight-decay", type=float, default=_DEMO.weight_decay)
    t.add_argument("--schedule", default=_DEMO.schedule, choices=["constant", "linear"])
    t.add_argument("--objective", default=_DEMO.objective, choices=ObjectiveKind.values(),
                   help="the scalar to minimize (default: the task spec's objective, else %(default)s)")
    t.add_argument("--full-param", action="store_true", help="train every weight instead of LoRA")
    t.add_argument("--lora-r", type=int, default=_DEMO.lora_r)
    t.add_argument("--lora-alpha", type=int, default=_DEMO.lora_alpha)
    t.add_argument("--lora-targets", default=None, help="comma-separated module names (default per model)")
    t.add_argument("--lora-first-layer", type=int, default=_DEMO.lora_first_layer,
                   help="LoRA only on layers >= K (the frozen layers below are computed once per step)")
    t.add_argument("--prefix-tokens", type=int, default=None, metavar="N",
                   help="MeZO-prefix instead of LoRA: N learned key/value vectors per attention layer, initialised "
                        "from real tokens' activations (not with --full-param or a --lora-* option)")
    t.add_argument("--eval-every", type=int, default=_DEMO.eval_every)
    t.add_argument("--select-on", default="none", choices=["none", "dev"],
                   help="dev: report the weights of the best dev-split evaluation (every --eval-every steps and at "
                        "the end); the seed log keeps every step, summary.json says best_step")
    t.add_argument("--max-minutes", type=float, default=_DEMO.max_minutes,
                   help="wall-clock budget of the training loop, checked after each step (0: none; default: the "
                        "demo's %(default)s); --resume continues a stopped run")
    t.add_argument("--config", default=None,
                   help="a run config (configs/*.yaml): its settings, with the flags given here on top")
    t.add_argument("--backend", default=_DEMO.backend, choices=["auto", "triton", "cuda", "cpu", "torch"])
    t.add_argument("--perturb", default=_DEMO.perturb, choices=["virtual", "inplace"],
                   help="virtual: the +/- passes never write the weights (exact in any dtype, no fp32 masters); "
                        "inplace (default): write theta +/- eps*z into them, fp32 masters for fp16/bf16; "
                        "virtual is leaner in memory but slower on the CPU (bench/RESULTS.md)")
    t.add_argument("--distribution", default=_DEMO.distribution, choices=["gaussian", "rademacher", "lowrank"],
                   help="the directions z: Gaussian, random signs (+-1), or lowrank (z = U V^T/sqrt(r) per 2-d "
                        "weight, applied inside the matmul: no weight copy or write during the passes)")
    t.add_argument("--lowrank-r", type=int, default=_DEMO.lowrank_r, metavar="R",
                   help="--distribution lowrank: the rank r of each weight's direction (default 1)")
    t.add_argument("--lowrank-lazy", type=int, default=_DEMO.lowrank_lazy, metavar="N",
                   help="--distribution lowrank: keep V for N steps, redraw U every step (LoZO's lazy V; "
                        "default 1)")
    t.add_argument("--batched-pm", action=argparse.BooleanOptionalAction, default=_DEMO.batched_pm,
                   help="LoRA or --distribution lowrank: the +/- passes of all directions in one batched forward "
                        "(virtual perturbation; "
                        "the same losses within fp32 rounding; off by default: not faster on the 2-core CPU)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its seed log")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--ddp", default="auto", choices=["auto", "off"],
                   help="auto: data parallel when launched by torchrun with WORLD_SIZE > 1; off: ignore torchrun")
    t.add_argument("--shard", default=_DEMO.shard, choices=["none", "fsdp", "tp"],
                   help="under torchrun: none (every rank holds the model; data parallel), fsdp (FSDP2 on every "
                        "layer and the root; data parallel), tp (tensor parallel, Llama; LoRA split to match); free to "
                        "change on --resume")
    e = sub.add_parser("eval", help="evaluate a model (and adapter); JSON on the last line")
    _add_common(e)
    e.add_argument("--adapter", default=None, help="a peft adapter folder (e.g. runs/demo/adapter)")
    e.add_argument("--split", default="test", choices=["train", "dev", "test"])
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--icl", type=int, default=0, metavar="K",
                   help="in-context learning (causal LMs): K train demonstrations, balanced over the classes and "
                        "seeded by --seed, before every prompt (0: none)")
    e.add_argument("--icl-max-length", type=int, default=None,
                   help="token bound of an ICL row (demonstrations + prompt + candidate; default: the model's "
                        "context); a row that does not fit is an error saying how many demonstrations fit")
    r = sub.add_parser("replay", help="rebuild a run's adapter or model from its initial weights and seeds.jsonl "
                                      "(one process, whatever --shard and world size the run had)")
    r.add_argument("--run", required=True, help="the run's output dir (config.json, seeds.jsonl)")
    r.add_argument("--output", default=None,
                   help="folder for the rebuilt adapter (LoRA) or model (default RUN/replayed)")
    r.add_argument("--backend", default="auto")
    r.add_argument("--step", type=int, default=None,
                   help="replay the first N steps (default: the selected best_step of a --select-on dev run, "
                        "else every logged step)")
    return ap


def _train(a) -> int:
    from .loop import train
    from .config_files import config_from_cli
    cfg, task = config_from_cli(vars(a), _explicit_flags(a))     # the one config and the one task of the run
    s = train(cfg, progress=not a.no_progress, ddp=None if a.ddp == "auto" else False, task=task)
    if "distributed" in s and os.environ.get("RANK", "0") != "0":
        return 0                                  # rank 0 speaks for the data-parallel run
    print(json.dumps({"before": s.get("before"), "after": s["after"], "steps": s["steps"], "dtype": s["dtype"],
                      "stopped_by": s["stopped_by"], **({"best_step": s["best_step"]} if "best_step" in s else {}),
                      "train_seconds": s["train_seconds"], "zero_grad_rate": s["zero_grad_rate"],
                      **({"distributed": s["distributed"]} if "distributed" in s else {})}))
    return 0


def _eval(a) -> int:
    from ..tasks import data
    from ..tasks.registry import get_task
    from .dtype import load_model
    from .loop import build, evaluate
    cfg = TrainConfig(task=a.task, model=a.model, seed=a.seed, max_length=a.max_length, chat=a.chat,
                      lora=False, dtype=a.dtype, prefix_reuse=not a.no_prefix_reuse)
    task = get_task(a.task)                                      # resolved once, handed to both readers
    splits = data.load_task_splits(task, a.data_dir, a.protocol, a.k, a.seed, train_file=a.train_file,
                                   eval_file=a.eval_file, test_file=a.test_file)
    if not getattr(splits, a.split):
        raise ValueError(f"split {a.split!r} is empty: train and dev are sampled from --train-file")
    if a.icl < 0 or (a.icl == 0 and a.icl_max_length is not None):
        raise ValueError("--icl K takes K >= 1 demonstrations" if a.icl < 0 else "--icl-max-length needs --icl K")
    *loaded, choice = load_model(cfg.model, cfg.dtype, seed=cfg.seed, seq=cfg.max_length)   # auto: decided here
    model, _, _, obj, _ = build(cfg, adapter=a.adapter, task=task, loaded=loaded)
    ex = data.subsample(getattr(splits, a.split), a.eval_max, a.seed)
    icl = {}
    if a.icl:                               # ICL: the same K train demonstrations before every prompt (tasks/icl.py)
        from ..tasks.icl import icl_objective
        obj = icl_objective(obj, task, splits.train, a.icl, a.seed, a.icl_max_length, model=model)
        icl = {"icl": {**obj.info(), **obj.check_fits(ex)}}
    res = evaluate(model, obj, ex, a.batch_size)
    engine = getattr(obj, "engine", None)
    fwd = {"forward": engine.stats.as_dict()} if engine is not None else {}
    print(json.dumps({"task": a.task, "split": a.split, "model": a.model, "adapter": a.adapter,
                      "dtype": choice.dtype, **res, **icl,
                      **fwd}))
    return 0


def _replay(a) -> int:
    from .. import optim
    from ..optim.seedlog import read_log
    from .dtype import load_model
    from .files import replaced_dir
    from .loop import build
    run = Path(a.run)
    cfg = TrainConfig.from_json(run / "config.json")
    if cfg.dtype == "auto":
        raise ValueError(f"{run / 'config.json'} records dtype 'auto', not the dtype that ran: replay loads the "
                         "recorded one and never decides again (write the dtype the run used into it)")
    head, records = read_log(str(run / "seeds.jsonl"))
    until = a.step
    if until is None and (run / "summary.json").exists():
        until = json.loads((run / "summary.json").read_text()).get("best_step")
    if until is not None:
        records = [r for r in records if int(r["step"]) < until]
    loaded = load_model(cfg.model, cfg.dtype, seed=cfg.seed, recorded=cfg.dtype)[:3]   # the recorded dtype, as is
    model, _, _, _, params = build(cfg, loaded=loaded)   # one process: --shard does not apply
    opt = optim.replay(params, (head, records), backend=a.backend)
    out = Path(a.output) if a.output else run / "replayed"
    with replaced_dir(out) as tmp:
        model.save_pretrained(str(tmp))
    print(json.dumps({"replayed_steps": opt.step_count, "saved": str(out)}))
    return 0


def _explicit_flags(a) -> set[str]:
    """The ``train`` options typed on the command line (they override a --config file)."""
    dests, out = [k for k in vars(a) if k not in ("cmd", "argv")], set()
    for tok in a.argv:
        if tok == "--":
            break
        if tok.startswith("--"):
            name = tok[2:].split("=", 1)[0].replace("-", "_")
            hits = [d for d in dests if d == name] or [d for d in dests if d.startswith(name)]  # argparse prefixes
            out.update(hits[:1] if len(hits) == 1 else [])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = _parser().parse_args(argv or ["train"])
    if a.cmd is None:
        argv = ["train", *argv]
        a = _parser().parse_args(argv)
    a.argv = argv or ["train"]
    from .._extras import import_error_message, require
    what = f"mezo-kernels {a.cmd}"
    try:
        files = any(getattr(a, f, None) for f in ("train_file", "eval_file", "test_file"))
        require(_NEEDS[a.cmd] + (("datasets",) if files else ()), what)
        return {"train": _train, "eval": _eval, "replay": _replay}[a.cmd](a)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"{what}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:         # a missing optional package: say which extra installs it
        print(f"{what}: error: {import_error_message(e, what)}", file=sys.stderr)
        return 2
