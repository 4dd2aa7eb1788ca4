"""MeZOTrainer on 2 gloo processes (torch.multiprocessing spawn, one thread each): data parallel through MeZO's loss
all-reduce (no DDP wrapper), a user-wrapped FSDP2 model, and a bit-exact resume of a 2-process checkpoint."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD, STEPS, TIMEOUT = 2, 5, 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """``fn(rank, *args)`` on WORLD gloo processes; a hang past TIMEOUT kills them and fails the test."""
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = __import__("time").monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if __import__("time").monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes hung for {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _entry(rank, fn, port, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _lora_model(seed):
    from mezo_kernels.models import add_lora, load_model
    model, _, _ = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)                    # a different adapter per rank: the trainer must align them
        return add_lora(model, r=4)


def _data():
    ids = torch.randint(0, 100, (32, 12), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(out, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=STEPS,
                lr_scheduler_type="linear", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=3, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _trainable(model):
    from mezo_kernels import _compat
    for f in _compat.fsdp_modules(model):
        f.reshard()
    return {n: (p.full_tensor() if _compat.is_dtensor(p) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, out):
    """Both runs in one pair of processes (starting them and importing transformers is most of the time)."""
    _dp_worker(rank, out)
    _fsdp_worker(rank, out)


def _dp_worker(rank, out):
    """An uninterrupted run that saves at step 3, then a run resumed from that checkpoint."""
    from mezo_kernels.hf import MeZOTrainer
    model = _lora_model(seed=rank)
    tr = MeZOTrainer(model=model, args=_args(out / "a", save_strategy="steps", save_steps=3), train_dataset=_data(),
                     eps=1e-2)
    tr.train()
    assert tr.model_wrapped is tr.model, type(tr.model_wrapped)        # no DDP wrapper
    w0 = _trainable(_lora_model(seed=0))                                 # rank 0's adapter, broadcast at the start
    resumed = MeZOTrainer(model=_lora_model(seed=10 + rank), args=_args(out / "b"), train_dataset=_data(), eps=1e-2)
    resumed.train(resume_from_checkpoint=str(out / "a" / "checkpoint-3"))
    torch.save({"w0": w0, "final": _trainable(model), "resumed": _trainable(resumed.model),
                "logs": [h for h in tr.state.log_history if "loss" in h],
                "resumed_logs": [h for h in resumed.state.log_history if "loss" in h and h["step"] > 3]}, out / f"dp{rank}.pt")


def _fsdp_worker(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from mezo_kernels import _compat
    from mezo_kernels.hf import MeZOTrainer
    model = _lora_model(seed=0)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(_compat.is_dtensor(p) for p in model.parameters() if p.requires_grad)
    w0 = _trainable(model)
    with pytest.raises(ValueError, match="wrapped with `fully_shard` yourself"):   # rank 0 alone cannot save it
        MeZOTrainer(model=model, args=_args(out / "fsdp", save_strategy="steps"), train_dataset=_data())
    tr = MeZOTrainer(model=model, args=_args(out / "fsdp"), train_dataset=_data(), eps=1e-2)
    tr.train()
    torch.save({"w0": w0, "final": _trainable(model), "logs": [h for h in tr.state.log_history if "loss" in h]},
               out / f"fsdp{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_multi")
    _spawn(_worker, out)
    return out


def _load(out, kind):
    return [torch.load(out / f"{kind}{r}.pt", weights_only=False) for r in range(WORLD)]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_run(ranks, w0):
    r0, r1 = ranks
    assert _equal(r0["final"], r1["final"])                             # every rank ends on the same bits
    assert any(not torch.equal(r0["final"][k], w0[k]) for k in w0)     # and they moved
    assert len(r0["logs"]) == STEPS and all("projected_grad" in h and h["projected_grad"] != 0 for h in r0["logs"])
    assert [h["projected_grad"] for h in r0["logs"]] == [h["projected_grad"] for h in r1["logs"]]


def test_two_processes_train_data_parallel_and_resume_bit_for_bit(runs):
    ranks = _load(runs, "dp")
    _check_run(ranks, ranks[0]["w0"])
    for r in ranks:                        # resumed at step 3 of 5: the uninterrupted run's bits
        assert _equal(r["resumed"], r["final"])
        assert [h["projected_grad"] for h in r["resumed_logs"]] == [h["projected_grad"] for h in r["logs"][3:]]
    assert (runs / "a" / "checkpoint-3" / "optimizer.pt").exists()


def test_two_processes_train_a_user_wrapped_fsdp2_model(runs):
    ranks = _load(runs, "fsdp")
    assert _equal(ranks[0]["w0"], ranks[1]["w0"])
    _check_run(ranks, ranks[0]["w0"])


def _swap_trainable(model):
    """Replace every trainable parameter by a new tensor object with the same values, as accelerate's FSDP2
    preparation does (with DTensors) after the Trainer built its optimizer."""
    old = {}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.requires_grad:
                setattr(mod, name, torch.nn.Parameter(p.detach().clone()))
                old[id(mod), name] = p
    return old


def test_parameters_replaced_after_the_optimizer_was_built(tmp_path):
    from mezo_kernels.hf import MeZOTrainer
    model = _lora_model(seed=0)
    tr = MeZOTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_data(), eps=1e-2)
    first = tr.create_optimizer()
    old = _swap_trainable(model)
    before = {k: p.detach().clone() for k, p in old.items()}
    tr.train()                        # before its first step: rebuilt on the model's new parameters
    assert tr.mezo is not first and tr.mezo.step_count == 2
    live = [p for p in model.parameters() if p.requires_grad]
    assert all(any(q is p for q in live) for g in tr.mezo.param_groups for p in g["params"])
    mods = dict((id(m), m) for m in model.modules())
    assert all(torch.equal(p, before[k]) for k, p in old.items())                  # the discarded ones: untouched
    assert any(not torch.equal(getattr(mods[k[0]], k[1]), before[k]) for k in old)  # the live ones trained
    _swap_trainable(model)
    with pytest.raises(RuntimeError, match="no longer parameters of the model"):
        tr.train()                    # the optimizer has stepped: an error, not a silent no-op training
