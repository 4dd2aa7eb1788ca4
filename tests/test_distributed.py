"""Multi-process MeZO on CPU with gloo and 2 processes: data parallel == single process, sharded == unsharded,
kill + restart from the seed log == uninterrupted, and the seed log of a 2-process run replays on one process."""
import json
import os
import signal
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mezo_kernels import distributed as D
from mezo_kernels.objectives import ObjectiveOutput
from mezo_kernels.optim import MeZO
from mezo_kernels.perturb import ParamSet

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


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
        per = torch.stack([((torch.tanh(m @ x[i]).sum() + (w * x[i]).sum() + b[0]) - y[i]) ** 2 for i in idx])
        return ObjectiveOutput(per.mean(), per, per[:, None], per.long(), per.long())
    return fn


def _batch(step):
    return random.Random(step).sample(range(64), B)


def _dp_worker(rank, out, reduce):
    params, x, y = _problem()
    opt = MeZO(params, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7, n_directions=2)
    loss = D.DataParallelLoss(_objective(params, x, y), reduce=reduce)
    with torch.no_grad():
        for t in range(20):
            batch = _batch(t)
            opt.step(lambda: loss(None, batch))
    logs = [None] * WORLD
    dist.all_gather_object(logs, opt.log)
    if rank == 0:
        torch.save({"params": [p.detach().clone() for _, p in params], "logs": logs, "calls": loss.stats.calls,
                    "bytes_out": loss.stats.bytes_out, "bytes_in": loss.stats.bytes_in}, out)


def _single(n_steps=20):
    params, x, y = _problem()
    opt = MeZO(params, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7, n_directions=2)
    fn = _objective(params, x, y)
    with torch.no_grad():
        for t in range(n_steps):
            batch = _batch(t)
            opt.step(lambda: float(fn(None, batch).loss))
    return [p.detach() for _, p in params], opt.log


def test_data_parallel_20_steps_match_single_process_bit_for_bit(tmp_path):
    """Per-example losses are all-gathered in rank order, so both ranks reduce the same [B] vector as the single
    process does: g, the log and the weights are identical (tolerance 0) when the per-example losses themselves
    do not depend on the batch shape, as here."""
    _spawn(_dp_worker, str(tmp_path / "dp.pt"), "gather")
    got = torch.load(tmp_path / "dp.pt")
    ref, ref_log = _single()
    assert got["logs"][0] == got["logs"][1] == ref_log          # same seeds, same g on every rank
    assert all(torch.equal(a, b) for a, b in zip(got["params"], ref))
    # bytes: 2 directions x 2 forwards x 4 local examples x fp32 out, the same in from the other rank
    assert got["calls"] == 20 * 4 and got["bytes_out"] == got["bytes_in"] == 20 * 4 * (B // WORLD) * 4


def test_data_parallel_scalar_all_reduce_is_within_rounding(tmp_path):
    """reduce='sum' sends one float64 per forward: a float64 mean where the single process takes an fp32 mean, so
    the losses differ by about one fp32 ulp (~1e-6 at L ~ 10), which g = dL / (2 eps) with eps = 1e-3 amplifies
    to ~1e-3 (g ~ 30). Over 20 steps of lr 1e-2 the weights (|w| ~ 2) move apart by ~6e-5: tolerance 2e-4, and
    |dg| <= 5e-3. All ranks still agree exactly with each other."""
    _spawn(_dp_worker, str(tmp_path / "dp.pt"), "sum")
    got = torch.load(tmp_path / "dp.pt")
    ref, ref_log = _single()
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
    lo, hi = D.shard_range(HID, rank, WORLD)
    # Megatron MLP: W1 split by output rows (column-parallel), W2 by input columns (row-parallel), b2 replicated
    local = {"w1": full["w1"][lo:hi].clone().requires_grad_(), "b1": full["b1"][lo:hi].clone().requires_grad_(),
             "w2": full["w2"][:, lo:hi].contiguous().requires_grad_(), "b2": full["b2"].clone().requires_grad_()}
    shards = [D.Shard("w1", local["w1"], (HID, IN), 0, lo), D.Shard("b1", local["b1"], (HID,), 0, lo),
              D.Shard("w2", local["w2"], (OUT, HID), 1, lo), D.Shard("b2", local["b2"], (OUT,))]
    params, bases = D.sharded_params(shards)

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
    assert [D.shard_range(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    w = torch.zeros(3, 4)
    params, bases = D.sharded_params([D.Shard("a", torch.zeros(5), (5,)), D.Shard("w", w, (6, 4), 0, 3)])
    assert bases == [0, 8 + 12] and params[1][1] is w
    params, bases = D.sharded_params([D.Shard("w", torch.zeros(2, 2), (2, 5), 1, 3)])
    assert bases == [3, 8] and all(p.shape == (1, 2) for _, p in params)
    with pytest.raises(ValueError, match="outside"):
        D.sharded_params([D.Shard("w", w, (4, 4), 0, 2)])
    with pytest.raises(ValueError, match="does not match"):
        D.sharded_params([D.Shard("w", w, (6, 5), 0, 0)])
    with pytest.raises(ValueError, match="evenly"):
        D.rank_slice(list(range(5)), 0, 2)
    with pytest.raises(ValueError, match="bases has 1 entries"):
        MeZO([torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)], lr=0.1, bases=[0])


# ----------------------------------------------------------------------------------------------- torchrun + CLI
STEPS = 20
# rank 1 dies in the middle of step 9 on the first attempt; torchrun restarts both ranks, which resume from the log
KILLER = """
import os, sys
from mezo_kernels import optim
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ["RANK"] == "1":
    step = optim.MeZO.step
    def dying(self, *a, **k):
        if self.step_count == 9:
            open(os.environ["KILL_MARK"], "w").close()
            os._exit(17)
        return step(self, *a, **k)
    optim.MeZO.step = dying
from mezo_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(data_dir, out, *extra):
    return ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "8", "--steps", str(STEPS), "--eval-every", "0", "--eval-max", "8", "--no-progress",
            "--lr", "5e-3", "--eps", "1e-2", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "MEZO_DATA_DIR": ""}


def _torchrun(*argv, restarts=0, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", *argv]
    # own process group: on a hang the timeout kills torchrun *and* its workers, leaving no orphans behind
    p = subprocess.Popen(cmd, env={**_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail("torchrun hung for 180 s: " + (out[-2000:] + err[-2000:]))
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _adapter(out, sub="adapter"):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / sub / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dp_run(data_dir, tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("dp")
    r = _torchrun("-m", "mezo_kernels", *_args(data_dir, out))
    return out, r


def test_torchrun_train_matches_single_process_within_rounding(dp_run, data_dir, tmp_path):
    """A real prompt objective pads each rank's slice to its own longest example, so per-example losses differ
    from the full-batch forward by fp32 rounding (~1e-7); g = dL/(2 eps) moves by ~1e-5 and 20 updates of
    lr*g*z move the LoRA weights by < 1e-6. Tolerance: |dg| <= 1e-4 per step, weights atol 1e-5."""
    out, r = dp_run
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["distributed"]["world_size"] == WORLD and last["distributed"]["bytes_out_per_step"] == 2 * 4 * 4
    single = tmp_path / "single"
    r1 = subprocess.run([sys.executable, "-m", "mezo_kernels", *_args(data_dir, single)], env=_env(),
                        capture_output=True, text=True, timeout=120)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = _adapter(out), _adapter(single)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    ga = [json.loads(x)["g"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    gb = [json.loads(x)["g"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(ga) == len(gb) == STEPS and max(abs(p - q) for p, q in zip(ga, gb)) <= 1e-4
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["comm_bytes_out"] == m["comm_bytes_in"] == 32 for m in metrics)   # 2 forwards x 4 x fp32


def test_seed_log_of_a_two_process_run_replays_on_one_process(dp_run):
    from mezo_kernels.cli import main
    out, _ = dp_run
    assert main(["replay", "--run", str(out), "--output", str(out / "replayed")]) == 0
    a, b = _adapter(out), _adapter(out, "replayed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_rank_restarts_from_the_seed_log_and_ends_identical(dp_run, data_dir, tmp_path):
    out, _ = dp_run
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run = tmp_path / "run"
    mark = tmp_path / "killed"
    _torchrun(str(script), *_args(data_dir, run, "--resume"), restarts=1, KILL_MARK=str(mark))
    assert mark.exists()                                # the first attempt did lose rank 1 at step 9
    a, b = _adapter(out), _adapter(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (out / "seeds.jsonl").read_text().splitlines()[1:]
    lb = (run / "seeds.jsonl").read_text().splitlines()[1:]
    assert la == lb
