"""MeZO on N processes (CPU, gloo): per-rank parameter bytes, step time and communication bytes per step, under FSDP2
and tensor parallelism, for a Llama shape with random weights in bf16, full-parameter.

Layouts:

* ``fsdp``: ``fully_shard`` on every decoder layer, then on the root (embedding, final norm; the LM head is tied to
  the embedding), one mesh of N ranks. Data parallel: every rank has its own batch, and MeZO averages the (L+, L-)
  pair over the N ranks (one all-reduce of 2 float64 per direction).
* ``tp``: the Llama TP plan (q/k/v/gate/up column-parallel, o/down row-parallel) on a mesh of N ranks, only where
  the attention and key-value heads divide N. The embedding, norms and LM head stay replicated. Every rank sees the
  same batch; a pure TP mesh has no data-parallel ranks, so there is no loss exchange.

The model is built on the meta device, sharded, then materialized (``to_empty``) and filled with random values
shard by shard: no rank ever holds the whole model. Weights N(0, 0.02), norms 1.

Measured per rank:

* parameter bytes after ``reshard()``: the sum of the local shards' bytes (``to_local()``), and the fp32 masters
  MeZO keeps for bf16 (in place, exact restore; as sharded as the weights); the prediction 1/N of the weights
  (FSDP2) or of the sharded layers plus the replicated rest (TP), and the largest unsharded FSDP2 unit in flight
  (the largest all-gather output seen in a step);
* step time: median, [min..max] over the timed steps after ``--warmup`` untimed ones, with the counting shim off;
  peak RSS (VmHWM);
* communication bytes per step, counted in one more step after the timed ones, inside each benchmark process, by
  a shim: ``torch.distributed``'s
  ``all_gather_into_tensor``, ``all_gather``, ``all_reduce``, ``reduce_scatter_tensor``, ``reduce_scatter``,
  ``broadcast`` are wrapped (FSDP2's all-gathers and MeZO's loss all-reduce go through them), and a
  ``TorchDispatchMode`` counts the functional collectives (``torch.ops._c10d_functional.*``) that DTensor's
  tensor-parallel redistributions call. Bytes are each call's tensor payload on this rank: the all-gather's output
  (the unsharded tensor), the all-reduce's input. A ring moves (N-1)/N of an all-gather's output and 2(N-1)/N of an
  all-reduce's input per rank.

The N processes share the 2 cores of this machine (``torch.set_num_threads(max(1, cores // N))``): step times at
N > 1 are the cost of N ranks' work on the same cores, not a scaling figure.

    .venv/bin/python bench/bench_scale.py                      # llama-1b-rand, fsdp and tp, N = 1 2 4; RESULTS.md
    .venv/bin/python bench/bench_scale.py --model llama-tiny-rand --n 1 2 --steps 2 --no-results   # seconds
    .venv/bin/python bench/bench_scale.py --paper              # docs/scale.md's table, on paper (no measurement)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

from comm_count import CommCounter, classify
from scale_paper import paper_table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Llama shapes (transformers.LlamaConfig keyword arguments). llama-1b-rand is bench/step_models.py's shape.
SHAPES = {
    "llama-1b-rand": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu"),
    "llama-tiny-rand": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0,
        max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu"),
}
LAYOUTS = ("fsdp", "tp")


def config(name: str):
    from transformers import LlamaConfig
    return LlamaConfig(**SHAPES[name])


def tp_fits(name: str, n: int) -> bool:
    """Whether the attention and key-value heads divide n (the TP plan shards heads)."""
    kw = SHAPES[name]
    return kw["num_attention_heads"] % n == 0 and kw["num_key_value_heads"] % n == 0


def shape_bytes(name: str, bytes_per: int = 2) -> dict:
    """Parameter counts and bytes of a shape, from its meta model: total, one decoder layer, the root's own
    (embedding + final norm; the LM head is tied)."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        m = LlamaForCausalLM(config(name))
    total = sum(p.numel() for p in m.parameters())
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    root = total - layer * len(m.model.layers)
    return dict(params=total, layer_params=layer, root_params=root, layers=len(m.model.layers),
                bytes=total * bytes_per, layer_bytes=layer * bytes_per, root_bytes=root * bytes_per)


def predicted_bytes(name: str, layout: str, n: int, bytes_per: int = 2) -> int:
    """Parameter bytes a rank should hold after reshard(): FSDP2 1/N of everything (shards rounded up per
    tensor, ignored here); TP 1/N of the decoder layers' Linear weights, the rest (norms, embedding) whole."""
    s = shape_bytes(name, bytes_per)
    if layout == "fsdp":
        return s["bytes"] // n
    kw = SHAPES[name]
    h, i = kw["hidden_size"], kw["intermediate_size"]
    kv = kw["num_key_value_heads"] * kw["head_dim"]
    q = kw["num_attention_heads"] * kw["head_dim"]
    linear = (h * q + 2 * h * kv + q * h + 3 * h * i) * kw["num_hidden_layers"] * bytes_per
    return linear // n + (s["bytes"] - linear)


# ------------------------------------------------------------------------------------------------------ worker
def build(name: str, layout: str, n: int, rank: int):
    """The shape on meta, sharded by ``layout`` over n ranks, materialized on the CPU in bf16, random values."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = config(name)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (n,))
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        plan = {}
        for i in range(cfg.num_hidden_layers):
            plan.update({f"model.layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
            plan.update({f"model.layers.{i}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
            plan.update({f"model.layers.{i}.self_attn.o_proj": RowwiseParallel(),
                         f"model.layers.{i}.mlp.down_proj": RowwiseParallel()})
        parallelize_module(m, mesh, plan)
    m.to_empty(device="cpu")
    if cfg.tie_word_embeddings and m.lm_head.weight is not m.model.embed_tokens.weight:
        m.lm_head.weight = m.model.embed_tokens.weight      # to_empty gives each plain module a new Parameter
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            if "norm" in pname:
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(0.02))
        rot = LlamaRotaryEmbedding(cfg)                     # the buffers to_empty left uninitialized
        for bname, b in rot.named_buffers():
            getattr(m.model.rotary_emb, bname).copy_(b)
    m.eval()
    return m


def local_bytes(params) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params)


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(rank: int, n: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist
    threads = max(1, (os.cpu_count() or 1) // n)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        sys.path.insert(0, ROOT)
        from mezo_kernels import _compat
        from mezo_kernels.optim import MeZO
        name, layout = args["model"], args["layout"]
        t0 = time.perf_counter()
        m = build(name, layout, n, rank)
        build_s = time.perf_counter() - t0
        for f in _compat.fsdp_modules(m):
            f.reshard()
        param_bytes = local_bytes(m.parameters())
        opt = MeZO(m.named_parameters(), model=m, lr=1e-6, eps=1e-3, seed=0)
        master_bytes = 2 * param_bytes               # fp32 masters of the bf16 shards (in place, exact restore)
        vocab = SHAPES[name]["vocab_size"]
        # data parallel (fsdp): a batch per rank; tp: the same batch on every rank
        g = torch.Generator().manual_seed(7 + (rank if layout == "fsdp" else 0))
        ids = torch.randint(0, vocab, (args["batch"], args["seq"]), generator=g)

        def closure():
            return float(m(input_ids=ids, labels=ids).loss)

        # timed steps without the shim (its TorchDispatchMode sends every op through Python: it tripled the FSDP2
        # step), then one more step with the shim on, for the communication bytes
        times, comm = [], []
        with torch.no_grad():
            for i in range(args["warmup"] + args["steps"]):
                dist.barrier()
                t = time.perf_counter()
                res = opt.step(closure)
                if i >= args["warmup"]:
                    times.append(time.perf_counter() - t)
            counter = CommCounter()
            with counter:
                counter.records, counter.active = [], True
                res = opt.step(closure)
                counter.active = False
            comm.append(classify(counter.records, layout))
        for f in _compat.fsdp_modules(m):
            f.reshard()
        after = local_bytes(m.parameters())
        row = dict(rank=rank, param_bytes=param_bytes, param_bytes_after=after, master_bytes=master_bytes,
                   times=times, comm=comm, hwm=vm_hwm(), threads=threads, build_s=build_s,
                   loss_group=opt.loss_group is not None, g=float(getattr(res, "projected_grad", 0.0) or 0.0))
        rows = [None] * n
        dist.all_gather_object(rows, row)
        if os.environ.get("BENCH_SCALE_DEBUG") and rank == 0:
            print(sorted(set(k for k, _ in counter.records)), flush=True)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, layout: str, n: int, steps: int = 3, warmup: int = 1, batch: int = 1, seq: int = 64) -> dict:
    """One (model, layout, N) in N fresh spawned processes; the per-rank rows and a summary."""
    import torch.multiprocessing as mp
    args = dict(model=model, layout=layout, steps=steps, warmup=warmup, batch=batch, seq=seq)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        mp.spawn(worker, args=(n, free_port(), args, out), nprocs=n, join=True)
        rows = json.load(open(out))
    return summarize(model, layout, n, rows, args)


def summarize(model, layout, n, rows, args) -> dict:
    times = [max(r["times"][i] for r in rows) for i in range(len(rows[0]["times"]))]   # a step ends on the slowest
    c = rows[0]["comm"]
    per = {k: statistics.median(x[k] for x in c) for k in c[0]}
    s = shape_bytes(model)
    return dict(model=model, layout=layout, n=n, batch=args["batch"], seq=args["seq"], steps=len(times),
                threads=rows[0]["threads"], time_med=statistics.median(times), time_min=min(times),
                time_max=max(times), param_bytes=max(r["param_bytes"] for r in rows),
                param_bytes_after=max(r["param_bytes_after"] for r in rows),
                master_bytes=max(r["master_bytes"] for r in rows), predicted=predicted_bytes(model, layout, n),
                weights=s["bytes"], layer_bytes=s["layer_bytes"], root_bytes=s["root_bytes"],
                hwm=max(r["hwm"] for r in rows), loss_group=rows[0]["loss_group"], **per)


# ------------------------------------------------------------------------------------------------------ report
def _mb(b) -> str:
    return f"{b / 1e6:,.1f}"


def table(rows) -> str:
    head = ("| model | layout | N | threads/rank | step s median [min..max] | params MB/rank after reshard | "
            "predicted MB (1/N share) | + largest unit in flight MB | fp32 masters MB/rank | peak RSS GB/rank | "
            "FSDP2 all-gather MB/step (calls) | TP all-reduce MB/step (calls) | loss exchange B/step (calls) | "
            "other B/step (calls) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['n']} | {r['threads']} | {r['time_med']:.2f} "
            f"[{r['time_min']:.2f}..{r['time_max']:.2f}] | {_mb(r['param_bytes_after'])} | {_mb(r['predicted'])} | "
            f"{_mb(r['ag_max']) if r['layout'] == 'fsdp' else '-'} | {_mb(r['master_bytes'])} | "
            f"{r['hwm'] / 2**30:.2f} | {_mb(r['ag_bytes'])} ({int(r['ag_calls'])}) | {_mb(r['tp_bytes'])} "
            f"({int(r['tp_calls'])}) | {int(r['scalar_bytes'])} ({int(r['scalar_calls'])}) | "
            f"{int(r['other_bytes'])} ({int(r['other_calls'])}) |")
    return "\n".join(lines)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")),
                 platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in lscpu.splitlines() if l.startswith("Flags")), [])
    keep = [f for f in ("amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512bw", "avx512f") if f in flags]
    return f"{os.cpu_count()}-core {model} (flags {' '.join(keep)}), torch {torch.__version__}, gloo"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b-rand", choices=sorted(SHAPES))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--n", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank (fsdp) / per TP group (tp)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "out", "scale-cpu.csv"))
    ap.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    ap.add_argument("--paper", action="store_true", help="print docs/scale.md's table (no measurement) and exit")
    a = ap.parse_args(argv)
    if a.paper:
        print(paper_table())
        return
    rows = []
    for layout in a.layouts:
        for n in a.n:
            if layout == "tp" and not tp_fits(a.model, n):
                print(f"skip tp N={n}: heads do not divide", flush=True)
                continue
            t = time.time()
            r = run(a.model, layout, n, a.steps, a.warmup, a.batch, a.seq)
            print(f"{layout} N={n}: {r['time_med']:.2f} s/step, params {_mb(r['param_bytes_after'])} MB/rank, "
                  f"all-gather {_mb(r['ag_bytes'])} MB, TP {_mb(r['tp_bytes'])} MB, scalar {r['scalar_bytes']} B "
                  f"({time.time() - t:.0f} s wall)", flush=True)
            rows.append(r)
            os.makedirs(os.path.dirname(a.csv), exist_ok=True)
            with open(a.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    print(table(rows))
    if not a.no_results:
        sys.path.insert(0, HERE)
        from results import replace_section
        cmd = "PYTHONPATH=. .venv/bin/python bench/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
        s = shape_bytes(a.model)
        body = (f"Command: `{cmd.strip()}`. Machine: {machine()}. Date: "
                f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}.\n\n"
                f"{a.model}: {s['params']:,} parameters ({_mb(s['bytes'])} MB in bf16), {s['layers']} decoder layers "
                f"of {s['layer_params']:,} ({_mb(s['layer_bytes'])} MB), root (embedding, tied LM head, final norm) "
                f"{s['root_params']:,} ({_mb(s['root_bytes'])} MB). Full-parameter MeZO in bf16, in place with fp32 "
                f"masters (the default), batch {a.batch} x {a.seq} tokens per rank (fsdp) / per TP group (tp), "
                f"{a.warmup} warm-up + {a.steps} timed steps; a step's time is the slowest rank's. Communication: counted "
                f"in one more step by a shim in each process (wrappers of `torch.distributed`'s collectives: FSDP2's "
                f"`all_gather_single`, MeZO's loss `all_reduce`; a TorchDispatchMode for DTensor's functional "
                f"all-reduces), off during the timed steps; bytes = each call's payload on the rank (all-gather: "
                f"its output; all-reduce: its input). Predicted MB: 1/N of the weights (fsdp), 1/N of the layers' "
                f"Linear weights + the replicated embedding and norms (tp). The N ranks share the 2 cores "
                f"(threads/rank = 2 // N): times at N > 1 are N ranks' work on the same cores, not a scaling "
                f"figure.\n\n"
                + table(rows) + "\n")
        replace_section(os.path.join(HERE, "RESULTS.md"), "scale-cpu", body)


if __name__ == "__main__":
    main()
