"""Shared helpers of the DTensor tests (test_dtensor*.py): gloo workers, a small Linear stack and its FSDP2 / TP /
2-d layouts, fixed losses (the same g on every rank and in one process), full weights gathered from the shards."""
import itertools
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mezo_kernels import _compat
from mezo_kernels.optim import MeZO

IN, HID, OUT = 6, 10, 5           # OUT 5 splits unevenly over 2 ranks (FSDP2), HID over 2 x 2 (2-d: 5 over dp)
X = torch.randn(8, IN, generator=torch.Generator().manual_seed(3))
Y = torch.randn(8, OUT, generator=torch.Generator().manual_seed(4))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes, one thread each, on a port of its own."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def spawn_results(tmp_path_factory, name: str, fn, world: int):
    """Run ``fn(rank, world, out)`` on ``world`` processes (rank 0 saves its results to ``out``) and load them."""
    out = tmp_path_factory.mktemp(name) / "res.pt"
    spawn(fn, world, str(out))
    return torch.load(out, weights_only=False)


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def stack(dtype=torch.float32) -> nn.Sequential:
    """Linear(6, 10), ReLU, Linear(10, 5), LayerNorm(5), the same weights every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT), nn.LayerNorm(OUT))
        with torch.no_grad():                      # LayerNorm starts at 1 and 0: give it values of its own
            m[3].weight.add_(torch.randn(OUT) * 0.1)
            m[3].bias.add_(torch.randn(OUT) * 0.1)
    return m.to(dtype)


def shard(m: nn.Module, kind: str, world: int) -> nn.Module:
    """``m`` sharded in place: ``fsdp`` (the two Linears and the root, which keeps the LayerNorm; ``fsdp-root``:
    the root alone), ``hsdp`` (FSDP2 on a 2-d mesh), ``tp`` (column then row parallel; the LayerNorm stays
    plain), or ``2d`` (tp on the inner mesh dim, FSDP2 over the outer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    if kind in ("fsdp", "fsdp-root"):
        mesh = init_device_mesh("cpu", (world,))
        for sub in (m[0], m[2], m) if kind == "fsdp" else (m,):
            fully_shard(sub, mesh=mesh)
    elif kind == "tp":
        parallelize_module(m, init_device_mesh("cpu", (world,)), plan)
    elif kind == "hsdp":              # FSDP2 over a 2-d mesh: replicated over the outer dim, sharded over the inner
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
        for sub in (m[0], m[2], m):
            fully_shard(sub, mesh=mesh)
    elif kind == "2d":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(m, mesh["tp"], plan)
        for sub in (m[0], m[2], m):
            fully_shard(sub, mesh=mesh["dp"])
    else:
        raise ValueError(kind)
    return m


def full_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the full tensor (a collective for DTensors)."""
    for f in _compat.fsdp_modules(m):
        f.reshard()
    return {n: (p.full_tensor() if _compat.is_dtensor(p) else p).detach().clone() for n, p in m.named_parameters()}


def fixed_losses():
    """A closure whose k-th call returns the same float everywhere: every run sees the same g."""
    counter = itertools.count()
    return lambda: 1.0 + ((next(counter) * 7919) % 101) / 997


def loss_of(m: nn.Module, rows=slice(None)) -> float:
    with torch.no_grad():
        return float(((m(X[rows].to(next(m.parameters()).dtype)).float() - Y[rows]) ** 2).mean())


# the modes every layout must serve: (name, dtype, MeZO keyword arguments)
MODES = [
    ("fp32", torch.float32, dict(weight_decay=0.1, n_directions=2)),
    ("bf16-masters", torch.bfloat16, dict()),
    ("sign", torch.float32, dict(distribution="rademacher")),
    ("bf16-sr", torch.bfloat16, dict(rounding="stochastic", exact_restore=False)),
]
HYPER = dict(lr=0.05, eps=1e-2, seed=11)


def train_fixed(m: nn.Module, steps: int = 4, **kw) -> MeZO:
    opt = MeZO(m.named_parameters(), model=m, **HYPER, **kw)
    closure = fixed_losses()
    with torch.no_grad():
        for _ in range(steps):
            opt.step(closure)
    return opt


def perturbed_full(m: nn.Module, opt: MeZO, seed: int) -> dict[str, torch.Tensor]:
    """The full weights while every set of ``opt`` is perturbed by ``seed`` (offset 0.5); restored after."""
    for ps in opt.param_sets:
        ps.perturb_(seed, 0.5)
    got = full_state(m)
    for ps in opt.param_sets:
        ps.restore_()
    return got


def equal_states(a: dict, b: dict) -> list[str]:
    """The names whose tensors differ in any bit (dtype, shape or value)."""
    return [k for k in b if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                 torch.equal(a[k].view(-1).view(torch.int16 if a[k].element_size() == 2 else
                                                                torch.int32),
                                             b[k].view(-1).view(torch.int16 if b[k].element_size() == 2 else
                                                                torch.int32)))]
