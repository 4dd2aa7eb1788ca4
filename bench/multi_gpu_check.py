"""Two-process check of sharded MeZO on one machine: NCCL on 2 GPUs (bench/gpu_check.sh's nccl stage), or gloo on
the CPU (``--device cpu``, how it is tested without a GPU).

Launch: ``torchrun --standalone --nproc-per-node 2 bench/multi_gpu_check.py [--device cpu] [--steps N]``.
Every rank builds the same tiny Llama (seeded), shards it with FSDP2 (``fully_shard`` on each decoder layer, then the
root), and takes MeZO steps on the same batch; rank 0 then takes the same steps on an unsharded copy and compares:
with the same batch on every rank the losses, g and the gathered weights must equal the single-device run bit for
bit (z is a function of the global element indices). Prints one JSON line per rank; exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mezo_kernels.models import load_model  # noqa: E402
from mezo_kernels.optim import MeZO  # noqa: E402


def build(device: torch.device):
    torch.manual_seed(0)
    model, _, _ = load_model("tiny-llama")
    return model.to(device)


def train(model, device: torch.device, steps: int, sharded: bool) -> list[float]:
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    opt = MeZO(model.named_parameters() if not sharded else list(model.named_parameters()), lr=1e-3, eps=1e-3,
               seed=7, model=model, loss_group=None if sharded else False)
    gs = []
    for _ in range(steps):
        with torch.no_grad():
            res = opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        gs.append(res.grad)
    return gs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args(argv)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if a.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    from torch.distributed.fsdp import fully_shard
    model = build(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    g_sharded = train(model, device, a.steps, sharded=True)
    full = {n: p.full_tensor().cpu() for n, p in model.named_parameters()}
    # the reference: every rank trains an unsharded copy (MeZO's start-up check is a collective, so all ranks take
    # part), with the loss left unreduced (the same batch everywhere)
    ref = build(device)
    g_ref = train(ref, device, a.steps, sharded=False)
    same_w = all(torch.equal(full[n], p.detach().cpu()) for n, p in ref.named_parameters())
    ok = g_ref == g_sharded and same_w
    print(json.dumps({"rank": rank, "device": str(device), "backend": dist.get_backend(), "steps": a.steps,
                      "g_sharded": g_sharded, "g_single": g_ref, "weights_bit_identical": same_w, "ok": ok}))
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
