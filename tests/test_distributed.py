"""Multi-process MeZO on CPU with gloo and 2 processes: data parallel == single process (the loss exchange and its
reductions), sharded == unsharded. The torchrun + CLI runs are in test_distributed_torchrun.py."""
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mezo_kernels.optim.shard import Shard, shard_range, sharded_params
from mezo_kernels.train import data_parallel as D
from mezo_kernels.tasks.metrics import ObjectiveOutput, Reduction, objective_value
from mezo_kernels.optim import MeZO
from mezo_kernels.perturb import ParamSet

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on WORLD gloo processes (one thread each: the machine is small)."""
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, args), nprocs=WORLD, join=True)


def _entry(rank, fn, port, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    D.init_from_env()
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- data parallel
B, DIM = 8, 13


def _problem():
    g = torch.Generator().manual_seed(0)
    params = [(n, torch.randn(*shape, generator=g).requires_grad_()) for n, shape in
              (("w", (DIM,)), ("b", (1,)), ("m", (3, DIM)))]
    x, y = torch.randn(64, DIM, generator=g), torch.randn(64, generator=g)
    return params, x, y


def _objective(params, x, y):
    """Per-example squared error of a tiny 2-layer model; every example is computed alone, so its loss does not
    depend on how many examples share the call (that is what makes the DP run bit-exact)."""
    w, b, m = (p for _, p in params)

    def fn(_model, idx):
        pred = torch.stack([torch.tanh(m @ x[i]).sum() + (w * x[i]).sum() + b[0] for i in idx])
        per = (pred - y[idx]) ** 2
        # a sign classifier's predictions and labels, for the accuracy/F1 reductions
        return ObjectiveOutput(per.mean(), per, pred[:, None], (pred > 0).long(), (y[idx] > 0).long())
    return fn


def _batch(step):
    return random.Random(step).sample(range(64), B)


def _dp_worker(rank, out, reduce):
    params, x, y = _problem()
    opt = MeZO(params, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7, n_directions=2)
    loss = D.DataParallelLoss(_objective(params, x, y), Reduction("ce"), exchange=reduce)
    with torch.no_grad():
        for t in range(20):
            batch = _batch(t)
            opt.step(lambda: loss(None, batch))
        # the metric reductions gather predictions and labels too; weights are those after training
        metrics = {k: [D.DataParallelLoss(_objective(params, x, y), Reduction(k))(None, _batch(100 + t))
                       for t in range(6)] for k in ("neg_accuracy", "neg_f1")}
    logs = [None] * WORLD
    dist.all_gather_object(logs, opt.log)
    if rank == 0:
        torch.save({"params": [p.detach().clone() for _, p in params], "logs": logs, "calls": loss.stats.calls,
                    "bytes_out": loss.stats.bytes_out, "bytes_in": loss.stats.bytes_in, "metrics": metrics}, out)


def _single(n_steps=20):
    params, x, y = _problem()
    opt = MeZO(params, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7, n_directions=2)
    fn = _objective(params, x, y)
    with torch.no_grad():
        for t in range(n_steps):
            batch = _batch(t)
            opt.step(lambda: float(fn(None, batch).loss))
        metrics = {k: [objective_value(fn(None, _batch(100 + t)), k) for t in range(6)]
                   for k in ("neg_accuracy", "neg_f1")}
    return [p.detach() for _, p in params], opt.log, metrics


def test_data_parallel_20_steps_match_single_process_bit_for_bit(tmp_path):
    """Per-example losses are all-gathered in rank order, so both ranks reduce the same [B] vector as the single
    process does: g, the log and the weights are identical (tolerance 0) when the per-example losses themselves
    do not depend on the batch shape, as here."""
    _spawn(_dp_worker, str(tmp_path / "dp.pt"), "gather")
    got = torch.load(tmp_path / "dp.pt")
    ref, ref_log, ref_metrics = _single()
    assert got["logs"][0] == got["logs"][1] == ref_log          # same seeds, same g on every rank
    assert all(torch.equal(a, b) for a, b in zip(got["params"], ref))
    assert got["metrics"] == ref_metrics                        # -accuracy / -F1 of the gathered predictions
    assert len({v for vs in ref_metrics.values() for v in vs}) > 2   # the batches do not all score alike
    # bytes: 2 directions x 2 forwards x 4 local examples x fp32 out, the same in from the other rank
    assert got["calls"] == 20 * 4 and got["bytes_out"] == got["bytes_in"] == 20 * 4 * (B // WORLD) * 4


def test_data_parallel_scalar_all_reduce_is_within_rounding(tmp_path):
    """reduce='sum' sends one float64 per forward: a float64 mean where the single process takes an fp32 mean, so
    the losses differ by about one fp32 ulp (~1e-6 at L ~ 10), which g = dL / (2 eps) with eps = 1e-3 amplifies
    to ~1e-3 (g ~ 30). Over 20 steps of lr 1e-2 the weights (|w| ~ 2) move apart by ~6e-5: tolerance 2e-4, and
    |dg| <= 5e-3. All ranks still agree exactly with each other."""
    _spawn(_dp_worker, str(tmp_path / "dp.pt"), "sum")
    got = torch.load(tmp_path / "dp.pt")
    ref, ref_log, _ = _single()
    assert got["logs"][0] == got["logs"][1]
    assert all(abs(a["g"] - b["g"]) <= 5e-3 for a, b in zip(got["logs"][0], ref_log))   # a few loss ulps / 2 eps
    assert all(torch.allclose(a, b, rtol=0, atol=2e-4) for a, b in zip(got["params"], ref))
    assert got["bytes_out"] == 20 * 4 * 8


# ----------------------------------------------------------------------------------------------- tensor parallel
HID, IN, OUT = 6, 10, 5      # per-rank bases 30 (W1 rows) and r*6+3 (W2 columns): not multiples of 4
X_TP = torch.randn(16, IN, generator=torch.Generator().manual_seed(2))


def _full_mlp():
    g = torch.Generator().manual_seed(1)
    return {"w1": torch.randn(HID, IN, generator=g), "b1": torch.randn(HID, generator=g),
            "w2": torch.randn(OUT, HID, generator=g), "b2": torch.randn(OUT, generator=g)}


def _unsharded_params(full):
    return [(k, v.clone().requires_grad_()) for k, v in full.items()]


def _tp_worker(rank, out):
    full = _full_mlp()
    lo, hi = shard_range(HID, rank, WORLD)
    # Megatron MLP: W1 split by output rows (column-parallel), W2 by input columns (row-parallel), b2 replicated
    local = {"w1": full["w1"][lo:hi].clone().requires_grad_(), "b1": full["b1"][lo:hi].clone().requires_grad_(),
             "w2": full["w2"][:, lo:hi].contiguous().requires_grad_(), "b2": full["b2"].clone().requires_grad_()}
    shards = [Shard("w1", local["w1"], (HID, IN), 0, lo), Shard("b1", local["b1"], (HID,), 0, lo),
              Shard("w2", local["w2"], (OUT, HID), 1, lo), Shard("b2", local["b2"], (OUT,))]
    params, bases = sharded_params(shards)

    def gather_full():
        parts = {}
        for k, d in (("w1", 0), ("b1", 0), ("w2", 1)):
            bufs = [torch.empty_like(local[k]) for _ in range(WORLD)]
            dist.all_gather(bufs, local[k].detach().contiguous())
            parts[k] = torch.cat(bufs, dim=d)
        parts["b2"] = local["b2"].detach().clone()
        return parts

    x = X_TP
    res = {}
    ps = ParamSet(params, bases=bases)
    for off in (1e-2, -1e-2):
        ps.perturb_(123, off)
        res[f"perturbed{off}"] = gather_full()
    ps.restore_()
    res["restored"] = gather_full()
    ps.restore_update_(123, 0.1, 0.7, 0.01)
    res["updated"] = gather_full()

    def tp_loss():                  # the real tensor-parallel forward: one all-reduce of [16, OUT] partials
        h = torch.relu(x @ local["w1"].T + local["b1"])
        y = h @ local["w2"].T
        dist.all_reduce(y)
        return float(((y + local["b2"]) ** 2).mean())

    def gathered_loss():            # the single-process forward on the gathered weights: identical losses
        f = gather_full()
        return float(((torch.relu(x @ f["w1"].T + f["b1"]) @ f["w2"].T + f["b2"]) ** 2).mean())

    with torch.no_grad():
        res["tp_vs_full_loss"] = (tp_loss(), gathered_loss())
        for k, d in (("w1", 0), ("b1", 0), ("w2", 1), ("b2", None)):   # back to the initial weights, same storage
            local[k].copy_(full[k] if d is None else full[k].narrow(d, lo, hi - lo))
    opt = MeZO(params, lr=1e-3, eps=1e-2, weight_decay=0.1, seed=5, bases=bases)
    with torch.no_grad():
        for _ in range(5):
            opt.step(gathered_loss)
    res["trained"], res["log"] = gather_full(), opt.log
    if rank == 0:
        torch.save(res, out)


def test_sharded_perturbation_and_update_equal_unsharded_bit_for_bit(tmp_path):
    _spawn(_tp_worker, str(tmp_path / "tp.pt"))
    got = torch.load(tmp_path / "tp.pt")
    full = _full_mlp()

    def state(ps_params):
        return {k: v.detach().clone() for k, v in ps_params}

    params = _unsharded_params(full)
    ps = ParamSet(params)
    for off in (1e-2, -1e-2):
        ps.perturb_(123, off)
        assert all(torch.equal(got[f"perturbed{off}"][k], v) for k, v in state(params).items()), off
    ps.restore_()
    assert all(torch.equal(got["restored"][k], v) for k, v in state(params).items())
    ps.restore_update_(123, 0.1, 0.7, 0.01)
    assert all(torch.equal(got["updated"][k], v) for k, v in state(params).items())
    tp, fl = got["tp_vs_full_loss"]
    assert tp == pytest.approx(fl, rel=1e-5)                # tensor-parallel forward: summation order only
    params = _unsharded_params(full)
    opt = MeZO(params, lr=1e-3, eps=1e-2, weight_decay=0.1, seed=5)
    with torch.no_grad():
        for _ in range(5):
            opt.step(lambda: float(((torch.relu(X_TP @ params[0][1].T + params[1][1]) @ params[2][1].T
                                     + params[3][1]) ** 2).mean()))
    assert got["log"] == opt.log
    assert all(torch.equal(got["trained"][k], v) for k, v in state(params).items())


def test_shard_helpers_validate():
    assert [shard_range(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    w = torch.zeros(3, 4)
    params, bases = sharded_params([Shard("a", torch.zeros(5), (5,)), Shard("w", w, (6, 4), 0, 3)])
    assert bases == [0, 8 + 12] and params[1][1] is w
    params, bases = sharded_params([Shard("w", torch.zeros(2, 2), (2, 5), 1, 3)])
    assert bases == [3, 8] and all(p.shape == (1, 2) for _, p in params)
    with pytest.raises(ValueError, match="outside"):
        sharded_params([Shard("w", w, (4, 4), 0, 2)])
    with pytest.raises(ValueError, match="does not match"):
        sharded_params([Shard("w", w, (6, 5), 0, 0)])
    with pytest.raises(ValueError, match="evenly"):
        D.rank_slice(list(range(5)), 0, 2)
    with pytest.raises(ValueError, match="not additive"):
        D.DataParallelLoss(lambda m, b: None, Reduction("neg_f1"), exchange="sum")
    with pytest.raises(ValueError, match="exchange must be"):
        D.DataParallelLoss(lambda m, b: None, Reduction("ce"), exchange="mean")
    with pytest.raises(TypeError, match="reducer must have"):
        D.DataParallelLoss(lambda m, b: None, "ce")
    with pytest.raises(ValueError, match="bases has 1 entries"):
        MeZO([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)], lr=0.1, bases=[0])
