"""``mezo-kernels train | eval | replay`` (also ``python -m mezo_kernels``).

``train`` with no options runs the README demo: MeZO-LoRA on SmolLM2-135M-Instruct, SST-2, on the CPU.
Under ``torchrun --nproc-per-node N -m mezo_kernels train ...`` training is data parallel (see distributed.py).
``eval`` prints a JSON object on its last line (accuracy, f1, loss, n). ``replay`` rebuilds a run's weights from
its initial weights and ``seeds.jsonl``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .trainer import TrainConfig

_DEMO = TrainConfig()   # the defaults are the demo's settings


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=_DEMO.task, choices=["sst2", "rte"])
    p.add_argument("--model", default=_DEMO.model,
                   help="smollm2-135m | tiny-llama | tiny-opt | tiny-roberta | tiny-bert | HF id or path")
    p.add_argument("--data-dir", default=None, help="folder with sst2/ and rte/ (else $MEZO_DATA_DIR, else ../shared/data)")
    p.add_argument("--protocol", default=_DEMO.protocol, choices=["kshot", "opt"])
    p.add_argument("--k", type=int, default=_DEMO.k, help="examples per class (kshot protocol)")
    p.add_argument("--seed", type=int, default=_DEMO.seed)
    p.add_argument("--max-length", type=int, default=_DEMO.max_length)
    p.add_argument("--chat", action="store_true", help="wrap causal prompts in the tokenizer's chat template")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="plain forwards: no shared-prefix KV, frozen-layer or eval-cache reuse (same results)")
    p.add_argument("--eval-max", type=int, default=_DEMO.eval_max, help="cap evaluated examples (0: all)")
    p.add_argument("--dtype", default=_DEMO.dtype, choices=["float32", "bfloat16", "float16"])


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
    t.add_argument("--objective", default=_DEMO.objective, choices=["ce", "neg_accuracy", "neg_f1"])
    t.add_argument("--full-param", action="store_true", help="train every weight instead of LoRA")
    t.add_argument("--lora-r", type=int, default=_DEMO.lora_r)
    t.add_argument("--lora-alpha", type=int, default=_DEMO.lora_alpha)
    t.add_argument("--lora-targets", default=None, help="comma-separated module names (default per model)")
    t.add_argument("--lora-first-layer", type=int, default=_DEMO.lora_first_layer,
                   help="LoRA only on layers >= K (the frozen layers below are computed once per step)")
    t.add_argument("--eval-every", type=int, default=_DEMO.eval_every)
    t.add_argument("--backend", default=_DEMO.backend, choices=["auto", "triton", "cuda", "cpu", "torch"])
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its seed log")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--ddp", default="auto", choices=["auto", "off"],
                   help="auto: data parallel when launched by torchrun with WORLD_SIZE > 1; off: ignore torchrun")
    e = sub.add_parser("eval", help="evaluate a model (and adapter); JSON on the last line")
    _add_common(e)
    e.add_argument("--adapter", default=None, help="a peft adapter folder (e.g. runs/demo/adapter)")
    e.add_argument("--split", default="test", choices=["train", "dev", "test"])
    e.add_argument("--batch-size", type=int, default=32)
    r = sub.add_parser("replay", help="rebuild a run's adapter from its initial weights and seeds.jsonl")
    r.add_argument("--run", required=True, help="the run's output dir (config.json, seeds.jsonl)")
    r.add_argument("--output", default=None, help="folder for the rebuilt adapter (LoRA) or model (default RUN/replayed)")
    r.add_argument("--backend", default="auto")
    return ap


def _train(a) -> int:
    from .trainer import train
    cfg = TrainConfig(task=a.task, model=a.model, data_dir=a.data_dir, output_dir=a.output_dir,
                      protocol=a.protocol, k=a.k, steps=a.steps, seed=a.seed, lr=a.lr, eps=a.eps,
                      batch_size=a.batch_size, n_directions=a.n_directions, weight_decay=a.weight_decay,
                      schedule=a.schedule, objective=a.objective, lora=not a.full_param, lora_r=a.lora_r,
                      lora_alpha=a.lora_alpha, max_length=a.max_length, chat=a.chat,
                      prefix_reuse=not a.no_prefix_reuse, lora_first_layer=a.lora_first_layer,
                      lora_targets=a.lora_targets.split(",") if a.lora_targets else None,
                      eval_every=a.eval_every, eval_max=a.eval_max, backend=a.backend, dtype=a.dtype,
                      resume=a.resume)
    s = train(cfg, progress=not a.no_progress, ddp=None if a.ddp == "auto" else False)
    if "distributed" in s and os.environ.get("RANK", "0") != "0":
        return 0                                  # rank 0 speaks for the data-parallel run
    print(json.dumps({"before": s.get("before"), "after": s["after"], "steps": s["steps"],
                      "train_seconds": s["train_seconds"], "zero_grad_rate": s["zero_grad_rate"],
                      **({"distributed": s["distributed"]} if "distributed" in s else {})}))
    return 0


def _eval(a) -> int:
    from . import data
    from .trainer import build, evaluate
    cfg = TrainConfig(task=a.task, model=a.model, seed=a.seed, max_length=a.max_length, chat=a.chat,
                      lora=False, dtype=a.dtype, prefix_reuse=not a.no_prefix_reuse)
    model, _, _, obj, _ = build(cfg)
    if a.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, a.adapter)
        model.eval()
    splits = data.load_splits(a.task, data.resolve_data_dir(a.data_dir), a.protocol, a.k, a.seed)
    from .trainer import _capped
    ex = _capped(getattr(splits, a.split), a.eval_max, a.seed)
    res = evaluate(model, obj, ex, a.batch_size)
    engine = getattr(obj, "engine", None)
    fwd = {"forward": engine.stats.as_dict()} if engine is not None else {}
    print(json.dumps({"task": a.task, "split": a.split, "model": a.model, "adapter": a.adapter, **res, **fwd}))
    return 0


def _replay(a) -> int:
    import torch
    from .optim import MeZO
    from .seedlog import read_log
    from .trainer import build
    run = Path(a.run)
    cfg = TrainConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items()
                         if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    head, records = read_log(str(run / "seeds.jsonl"))
    model, _, _, _, params = build(cfg)
    opt = MeZO(params, backend=a.backend, **head["config"])
    opt.replay_(records)
    out = Path(a.output) if a.output else run / "replayed"
    model.save_pretrained(str(out))
    print(json.dumps({"replayed_steps": opt.step_count, "saved": str(out)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = _parser().parse_args(argv or ["train"])
    if a.cmd is None:
        a = _parser().parse_args(["train", *argv])
    try:
        return {"train": _train, "eval": _eval, "replay": _replay}[a.cmd](a)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"mezo-kernels {a.cmd}: error: {e}", file=sys.stderr)
        return 2
