"""GLUE TSV reading, data-dir resolution and the k-shot / OPT split protocols (small TSV files in tmp_path;
the real-data test skips when the shared data folder is absent)."""
import os
from collections import Counter
from pathlib import Path

import pytest

from mezo_kernels.tasks.spec import task_from_dict
from mezo_kernels.tasks.records import Example
from mezo_kernels.tasks.data import load_splits, read_glue_tsv, resolve_data_dir, subsample
from mezo_kernels.tasks.registry import TASKS, get_task, task_names
from mezo_kernels.tasks.records import Columns, Task

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("MEZO_DATA_DIR", REPO.parent / "shared" / "data"))


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_dir(root: Path, n_pos: int, n_neg: int, n_dev: int) -> Path:
    """A data dir with sst2/ and rte/ train/dev files: n_pos + n_neg train rows, n_dev dev rows."""
    rows = [f"1\tgood movie number {i}" for i in range(n_pos)] + [f"0\tbad movie number {i}" for i in range(n_neg)]
    write(root / "sst2" / "train.tsv", ["label\tsentence"] + rows)
    write(root / "sst2" / "dev.tsv", ["label\tsentence"] + [f"{i % 2}\tdev sentence {i}" for i in range(n_dev)])
    rte = [f"premise {i}\thypothesis {i}\t{i % 2}\t{i}" for i in range(n_pos + n_neg)]
    write(root / "rte" / "train.tsv", ["sentence1\tsentence2\tlabel\tidx"] + rte)
    write(root / "rte" / "dev.tsv", ["sentence1\tsentence2\tlabel\tidx"] + rte[:n_dev])
    return root


def test_read_sst2_and_rte(tmp_path):
    p = write(tmp_path / "a.tsv", ["label\tsentence", '1\tit\'s "quoted" , fine ', "0\tbad", ""])
    assert read_glue_tsv(p, "sst2") == [Example('it\'s "quoted" , fine', None, 1), Example("bad", None, 0)]
    # GLUE's own column order and string labels for RTE
    p = write(tmp_path / "b.tsv", ["sentence\tlabel", "nice\t1"])
    assert read_glue_tsv(p, "SST-2") == [Example("nice", None, 1)]
    p = write(tmp_path / "c.tsv", ["idx\tsentence1\tsentence2\tlabel", "0\tP.\tH.\tnot_entailment", "1\tP2\tH2\t0"])
    assert read_glue_tsv(p, "rte") == [Example("P.", "H.", 1), Example("P2", "H2", 0)]


@pytest.mark.parametrize("lines,task,match", [
    (["1\tno header"], "sst2", r"b\.tsv:1: missing header"),
    ([], "sst2", r"b\.tsv:1: missing header"),
    (["label\tsentence", "1\tok", "1\ttoo\tmany"], "sst2", r"b\.tsv:3: expected 2 tab-separated columns"),
    (["label\tsentence", "1\tok", "0\tok", "2\tbad label"], "sst2", r"b\.tsv:4: bad label '2'"),
    (["label\tsentence", "x\tbad label"], "sst2", r"b\.tsv:2: bad label 'x'"),
    (["label\tsentence", "1\t  "], "sst2", r"b\.tsv:2: empty text in column 'sentence'"),
    (["sentence1\tsentence2\tlabel\tidx", "p\t\t0\t0"], "rte", r"b\.tsv:2: empty text in column 'sentence2'"),
    (["sentence1\tsentence2\tlabel\tidx", "p\th\t0"], "rte", r"b\.tsv:2: expected 4"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, task, match):
    p = write(tmp_path / "b.tsv", lines)
    with pytest.raises(ValueError, match=match):
        read_glue_tsv(p, task)


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        read_glue_tsv(write(tmp_path / "x.tsv", ["a"]), "mnli")


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MEZO_DATA_DIR", raising=False)
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")                 # no ../shared/data beside the working directory
    with pytest.raises(ValueError, match="MEZO_DATA_DIR"):
        resolve_data_dir(None)
    (tmp_path / "shared" / "data" / "sst2").mkdir(parents=True)
    assert resolve_data_dir(None) == tmp_path / "shared" / "data"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("MEZO_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "o"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the flag wins over the environment


@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_kshot_counts_disjoint_deterministic(tmp_path, task):
    root = make_dir(tmp_path, 40, 30, 9)
    s = load_splits(task, root, "kshot", k=8, seed=3)
    assert Counter(e.label for e in s.train) == {0: 8, 1: 8}
    assert Counter(e.label for e in s.dev) == {0: 8, 1: 8}
    assert not set(s.train) & set(s.dev)  # rows are unique in the file, so equal examples = same row
    assert s.test == read_glue_tsv(root / task / "dev.tsv", task)
    assert load_splits(task, root, "kshot", k=8, seed=3) == s
    assert load_splits(task, root, "kshot", k=8, seed=4).train != s.train


def test_kshot_too_few(tmp_path):
    root = make_dir(tmp_path, 40, 5, 3)
    with pytest.raises(ValueError, match="class 0 has 5 examples"):
        load_splits("sst2", root, "kshot", k=3)


def test_opt_protocol_caps(tmp_path):
    root = make_dir(tmp_path, 700, 600, 872)
    s = load_splits("sst2", root, "opt", seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (1000, 300, 872)  # dev capped by the 1300-row train file
    assert not set(s.train) & set(s.dev)
    assert s.test == read_glue_tsv(root / "sst2" / "dev.tsv", "sst2")  # all of it, in file order
    assert load_splits("sst2", root, "opt", seed=0) == s
    small = load_splits("sst2", root, "opt", seed=1, opt_sizes=(10, 5, 20))
    assert (len(small.train), len(small.dev), len(small.test)) == (10, 5, 20)
    tiny = make_dir(tmp_path / "t", 400, 300, 50)
    s2 = load_splits("rte", tiny, "opt")
    assert (len(s2.train), len(s2.dev), len(s2.test)) == (700, 0, 50)
    with pytest.raises(ValueError, match="unknown protocol"):
        load_splits("sst2", root, "lmbff")


@pytest.mark.skipif(not (REAL_DATA / "sst2" / "train.tsv").is_file(), reason=f"no shared data at {REAL_DATA}")
def test_real_data():
    s = load_splits("sst2", REAL_DATA, "kshot", k=16, seed=42)
    assert len(s.train) == 32 and len(s.dev) == 32 and len(s.test) == 872
    r = load_splits("rte", REAL_DATA, "opt", seed=0)
    assert (len(r.train), len(r.dev), len(r.test)) == (1000, 500, 277)
    assert all(e.text_b for e in r.train)


def test_a_task_record_from_a_plain_dict_drives_reading(tmp_path, monkeypatch):
    """A task spec as parsed JSON: string label keys, one column set for every split file, label names; the
    reader uses exactly its columns and labels."""
    spec = {"name": "toy", "label_words": {"0": "bad", "1": "good"}, "template": "{text_a} It was {mask} .",
            "columns": {"text_a": "review", "label": "stars"}, "label_names": {"neg": 0, "pos": 1},
            "description": "a test task"}
    toy = task_from_dict(spec)
    assert toy.num_classes == 2 and toy.words == ["bad", "good"] and toy.num_text_fields == 1
    assert toy.columns_for("dev") == Columns("review", None, "stars")
    monkeypatch.setitem(TASKS, "toy", toy)
    p = write(tmp_path / "toy.tsv", ["stars\tid\treview", "pos\t7\tfine", "0\t8\tawful"])
    assert read_glue_tsv(p, "toy") == [Example("fine", None, 1), Example("awful", None, 0)]
    with pytest.raises(ValueError, match=r"bad\.tsv:2: bad label 'entailment'"):
        read_glue_tsv(write(tmp_path / "bad.tsv", ["stars\treview", "entailment\tx"]), "toy")
    pair = task_from_dict({**spec, "name": "pair", "template": "{text_a} ? {mask} , {text_b}",
                           "causal_template": "{text_a} {text_b} {mask}",
                           "columns": {"train": {"text_a": "p", "text_b": "h"}, "dev": {"text_a": "a", "text_b": "b"}}})
    assert pair.num_text_fields == 2 and pair.columns_for("dev") == Columns("a", "b", "label")


@pytest.mark.parametrize("change,field", [
    ({"labels": {}}, "labels"),                                       # unknown field
    ({"template": None}, "template"),
    ({"label_words": ["bad", "good"]}, "label_words"),
    ({"label_words": {"x": "bad", "1": "good"}}, "label_words"),
    ({"columns": {"text_a": "review", "stars": "label"}}, "columns"),
    ({"columns": {"train": {"label": "y"}}}, "columns.train"),
    ({"columns": {"text_a": 3}}, "columns.text_a"),
    ({"num_text_fields": "1"}, "num_text_fields"),
    ({"label_names": {"pos": "1"}}, "label_names"),
    ({"label_names": {"pos": 5}}, "label_names"),
])
def test_a_malformed_task_spec_names_its_field(change, field):
    spec = {"name": "toy", "label_words": {"0": "bad", "1": "good"}, "template": "{text_a} It was {mask} .",
            "columns": {"text_a": "review"}}
    with pytest.raises(ValueError, match=rf"task spec 'toy'.*{field}"):
        task_from_dict({**spec, **change})
    for missing, fld in (("name", "name"), ("label_words", "verbalizer"), ("template", "template")):
        with pytest.raises(ValueError, match=f"field '{fld}': missing"):
            task_from_dict({k: v for k, v in spec.items() if k != missing})


def test_one_registry_serves_reading_prompts_and_the_cli(capsys, monkeypatch):
    from mezo_kernels.train.cli import main
    assert task_names() == sorted(TASKS) == ["rte", "sst2"]
    monkeypatch.setitem(TASKS, "toy", Task("toy", {0: "a", 1: "b"}, "{text_a} {mask}"))
    with pytest.raises(SystemExit):
        main(["train", "--task", "cola"])
    assert "choose from rte, sst2, toy" in capsys.readouterr().err.replace("'", "")
    assert get_task("SST-2").columns_for("train") == Columns("sentence", None, "label")
    assert get_task("rte").label_names == {"entailment": 0, "not_entailment": 1}
    with pytest.raises(ValueError, match="no data columns for split 'test'"):
        get_task("rte").columns_for("test")
    assert Task("bare", {0: "a", 1: "b"}, "{text_a} {mask}").columns == {}     # a task without data files


def test_subsample():
    ex = [Example(str(i), None, i % 2) for i in range(10)]
    assert subsample(ex, 0, 1) == ex and subsample(ex, 20, 1) == ex
    got = subsample(ex, 4, 1)
    assert len(got) == 4 and len(set(got)) == 4 and set(got) <= set(ex)
    assert got == subsample(ex, 4, 1) and got != subsample(ex, 4, 2)


# ------------------------------------------------------------------ no data folder: GLUE through `datasets`

def _no_folder(tmp_path, monkeypatch):
    """No --data-dir, no MEZO_DATA_DIR, no ../shared/data beside the working directory."""
    monkeypatch.delenv("MEZO_DATA_DIR", raising=False)
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def _no_network(monkeypatch, calls: list):
    """Fail on any socket connection, and record (then refuse) any datasets.load_dataset call."""
    import socket

    def refuse(*a, **k):
        raise AssertionError(f"network attempted: {a[1:]!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    datasets = pytest.importorskip("datasets")

    def load_dataset(*a, **k):
        calls.append((a, k))
        raise AssertionError("datasets.load_dataset called")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.mark.parametrize("env", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("task", ["sst2", "rte"])
def test_no_folder_offline_is_one_line_naming_both_ways(tmp_path, monkeypatch, env, task):
    _no_folder(tmp_path, monkeypatch)
    calls: list = []
    _no_network(monkeypatch, calls)
    monkeypatch.setenv(env, "1")
    from mezo_kernels.tasks.glue_hub import DataUnavailableError
    with pytest.raises(DataUnavailableError) as info:
        load_splits(task, None, "kshot", k=4)
    msg = str(info.value)
    assert "\n" not in msg and calls == []
    for part in ("--data-dir", "MEZO_DATA_DIR", f"{task}/train.tsv", f"{env}=1", "go online", "glue"):
        assert part in msg, (part, msg)
    assert isinstance(info.value, ValueError)       # the CLI prints ValueErrors as one `error:` line


def test_no_folder_offline_through_the_cli(tmp_path, monkeypatch, capsys):
    _no_folder(tmp_path, monkeypatch)
    calls: list = []
    _no_network(monkeypatch, calls)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mezo_kernels.train.cli import main
    assert main(["eval", "--task", "sst2", "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mezo-kernels eval: error: no data for task 'sst2'"), err
    assert "--data-dir" in err[0] and "go online" in err[0] and calls == []


def test_no_folder_hub_unreachable_is_the_same_line(tmp_path, monkeypatch):
    """Online but the call fails to connect: the same one-line error (the load_dataset call is faked)."""
    _no_folder(tmp_path, monkeypatch)
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(*a, **k):
        calls.append(a)
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match=r"no data for task 'rte'.*ConnectionError.*--data-dir.*go online") as info:
        load_splits("rte", None)
    assert "\n" not in str(info.value) and calls == [("nyu-mll/glue", "rte")]

    def broken(*a, **k):                            # not a network failure: propagates unchanged
        raise KeyError("validation")
    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):
        load_splits("rte", None)


def test_no_folder_online_rows_become_examples(tmp_path, monkeypatch):
    """The one load_dataset call, faked with GLUE's columns: train is the pool, validation the reported split."""
    _no_folder(tmp_path, monkeypatch)
    datasets = pytest.importorskip("datasets")
    rows = {"train": {"sentence1": [f"p{i} " for i in range(20)], "sentence2": [f"h{i}" for i in range(20)],
                      "label": [i % 2 for i in range(20)], "idx": list(range(20))},
            "validation": {"sentence1": ["P"], "sentence2": ["H"], "label": [1], "idx": [0]}}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, name: datasets.DatasetDict({k: datasets.Dataset.from_dict(v)
                                                                 for k, v in rows.items()}))
    s = load_splits("rte", None, "kshot", k=3, seed=1)
    assert s.test == [Example("P", "H", 1)]
    assert Counter(e.label for e in s.train) == {0: 3, 1: 3} and len(s.dev) == 6
    pool = {Example(f"p{i}", f"h{i}", i % 2) for i in range(20)}
    assert set(s.train) <= pool and set(s.dev) <= pool and not set(s.train) & set(s.dev)
    # the same rows in a folder give the same splits
    root = tmp_path / "d"
    write(root / "rte" / "train.tsv", ["sentence1\tsentence2\tlabel\tidx"]
          + [f"p{i}\th{i}\t{i % 2}\t{i}" for i in range(20)])
    write(root / "rte" / "dev.tsv", ["sentence1\tsentence2\tlabel\tidx", "P\tH\t1\t0"])
    assert load_splits("rte", root, "kshot", k=3, seed=1) == s


def test_a_folder_wins_over_the_hub_and_glue_folder_names(tmp_path, monkeypatch):
    _no_folder(tmp_path, monkeypatch)
    calls: list = []
    _no_network(monkeypatch, calls)
    root = make_dir(tmp_path / "d", 20, 20, 4)
    monkeypatch.setenv("MEZO_DATA_DIR", str(root))
    assert len(load_splits("sst2", None, "kshot", k=4).test) == 4 and calls == []
    glue = tmp_path / "glue_data"                   # GLUE's own download: SST-2/, RTE/, sentence<TAB>label
    write(glue / "SST-2" / "train.tsv", ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(20)])
    write(glue / "SST-2" / "dev.tsv", ["sentence\tlabel", "d\t0"])
    assert load_splits("sst2", glue, "kshot", k=4).test == [Example("d", None, 0)]
    with pytest.raises(FileNotFoundError, match=r"has no rte/train\.tsv or RTE/train\.tsv"):
        load_splits("rte", glue)
    monkeypatch.delenv("MEZO_DATA_DIR")
    toy = Task("toy", {0: "a", 1: "b"}, "{text_a} {mask}")
    with pytest.raises(ValueError, match="MEZO_DATA_DIR"):   # not a GLUE task: no hub, the old message
        load_splits(toy, None)
    assert calls == []
