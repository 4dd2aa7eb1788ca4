"""The seed log is the checkpoint: a run resumes from a copy of its folder, on another world size and under another
``--shard`` (2 -> 1 and 1 -> 2 ranks, gloo on the CPU, tiny-llama LoRA). The logged steps replay bit for bit; the
steps after them match an uninterrupted run within rounding."""
import json
import shutil

import pytest

pytest.importorskip("peft")
import torch  # noqa: E402

from mezo_kernels.train.cli import main  # noqa: E402
from test_shard_cli import STEPS, WEIGHT_ATOL, max_diff, records, torchrun, train_args, weights  # noqa: E402

HALF = STEPS // 2


def replayed(run, out, *step):
    """The adapter ``mezo-kernels replay`` rebuilds from ``run``'s log on this one process, in ``out``."""
    from safetensors.torch import load_file
    assert main(["replay", "--run", str(run), "--output", str(out), *step]) == 0
    return load_file(str(out / "adapter_model.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """One process, uninterrupted: the reference."""
    out = tmp_path_factory.mktemp("single")
    assert main(train_args(data_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def single_half(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_half")
    assert main(train_args(data_dir, out, steps=HALF)) == 0
    return out


def test_a_copied_folder_resumes_to_the_uninterrupted_bits(data_dir, tmp_path, single, single_half):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(single_half, moved)
    with open(moved / "seeds.jsonl", "a") as f:
        f.write('{"step": 3, "seed": 12')                 # a kill in the middle of writing a record
    for log, torn in (("metrics.jsonl", '{"step": 3, "loss_pl'), ("evals.jsonl", '{"step": 3, "spl')):
        with open(moved / log, "a") as f:
            f.write(torn)
    assert main(train_args(data_dir, moved, "--resume")) == 0
    assert same(weights(moved, "adapter"), weights(single, "adapter"))
    assert records(moved) == records(single)
    assert [json.loads(x)["g"] for x in (moved / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["g"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (moved / "evals.jsonl").read_text().splitlines()]   # every line whole
    assert [e["step"] for e in evals] == [0, HALF, STEPS]    # before; after the first part; after
    assert json.loads((moved / "config.json").read_text())["output_dir"] == str(moved)
    assert not list(moved.glob(".*"))                       # no temporary file or folder left behind


def test_two_ranks_resume_on_one(data_dir, tmp_path, single):
    """2 ranks (FSDP2) for HALF steps, the folder copied, resumed on one process (no --shard)."""
    two = tmp_path / "two"
    torchrun("-m", "mezo_kernels", *train_args(data_dir, two, "--shard", "fsdp", steps=HALF))
    moved = tmp_path / "one"
    shutil.copytree(two, moved)
    assert main(train_args(data_dir, moved, "--resume")) == 0
    # the logged steps replay on one process to the two ranks' gathered adapter, bit for bit
    assert same(replayed(moved, tmp_path / "at_half", "--step", str(HALF)), weights(two, "adapter"))
    assert records(moved)[:HALF] == records(two)
    assert same(replayed(moved, tmp_path / "at_end"), weights(moved, "adapter"))
    assert max_diff(weights(moved, "adapter"), weights(single, "adapter")) <= WEIGHT_ATOL
    cfg = json.loads((moved / "config.json").read_text())
    assert cfg["world_size"] == 1 and cfg["shard"] == "none"


@pytest.mark.parametrize("world", [2, 4])
def test_one_process_resumes_on_more_ranks(data_dir, tmp_path, single, single_half, world):
    """One process for HALF steps, the folder copied, resumed by 2 or 4 ranks under FSDP2: the ranks replay the log
    onto their shards, and their adapter is what one process replays from the whole log."""
    moved = tmp_path / "more"
    shutil.copytree(single_half, moved)
    torchrun("-m", "mezo_kernels", *train_args(data_dir, moved, "--shard", "fsdp", "--resume"), world=world)
    assert records(moved)[:HALF] == records(single_half)
    assert same(replayed(moved, tmp_path / "replayed"), weights(moved, "adapter"))
    assert max_diff(weights(moved, "adapter"), weights(single, "adapter")) <= WEIGHT_ATOL
    gm = [json.loads(x)["g"] for x in (moved / "metrics.jsonl").read_text().splitlines()]
    gs = [json.loads(x)["g"] for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(gm) == STEPS and gm[:HALF] == gs[:HALF] and max(abs(p - q) for p, q in zip(gm, gs)) <= 1e-4


def test_a_copied_folder_resumes_with_its_data_at_another_path(data_dir, tmp_path, single, single_half):
    """Another machine: the data lives elsewhere. The same examples (checked by their digest) resume; other
    examples are refused, naming the digest."""
    moved = tmp_path / "run"
    shutil.copytree(single_half, moved)
    data2 = tmp_path / "data2"
    shutil.copytree(f"{data_dir}/sst2", data2 / "sst2")
    assert main(train_args(str(data2), moved, "--resume")) == 0
    assert same(weights(moved, "adapter"), weights(single, "adapter"))
    assert json.loads((moved / "config.json").read_text())["data_dir"] == str(data2)

    other = tmp_path / "other"
    shutil.copytree(single_half, other)
    rows = (data2 / "sst2" / "train.tsv").read_text().splitlines(keepends=True)
    (data2 / "sst2" / "train.tsv").write_text("".join(rows[:1] + rows[2:]))      # one example fewer
    assert main(train_args(str(data2), other, "--resume")) == 2
    assert json.loads((other / "config.json").read_text()) == json.loads((single_half / "config.json").read_text())
