"""Task specs (JSON / YAML files, dicts) and data files read through `datasets` (JSONL, CSV, TSV, parquet): what
they hold, and the errors that name the file, the field, the row and the column."""
import json
from pathlib import Path

import pytest

from mezo_kernels.tasks.spec import task_from_dict
from mezo_kernels.tasks import registry as tasks
from mezo_kernels.tasks.records import Example
from mezo_kernels.tasks.data import load_splits, load_task_splits
from mezo_kernels.tasks.spec import load_task_spec
from mezo_kernels.tasks.registry import register_task
from mezo_kernels.tasks.records import Columns, Task
from mezo_kernels.tasks.registry import get_task

pytest.importorskip("datasets")
pytest.importorskip("yaml")
from mezo_kernels.tasks.files import read_data_file  # noqa: E402

SPEC_YAML = """\
columns: {text_a: review, label: stars}
template: "{text_a} It was {mask} ."
causal_template: "{text_a} It was {mask}"
verbalizer: {negative: terrible, positive: great}
objective: neg_f1
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_a_yaml_spec_describes_a_task(tmp_path):
    t = load_task_spec(write(tmp_path / "reviews.yaml", SPEC_YAML))
    assert t.name == "reviews" and t.words == ["terrible", "great"] and t.objective == "neg_f1"
    assert t.columns_for("train") == Columns("review", None, "stars") == t.columns_for("dev")
    # classes follow the verbalizer's order; integer classes are accepted too, other values are not
    assert [t.label_of(v) for v in ("negative", " positive", 0, "1", "neutral", 2, True, None)] == \
        [0, 1, 0, 1, None, None, None, None]
    # the same spec as JSON is the same task; get_task reads spec files
    j = write(tmp_path / "reviews.json", json.dumps({"name": "reviews", "columns": {"text_a": "review", "label":
              "stars"}, "template": "{text_a} It was {mask} .", "causal_template": "{text_a} It was {mask}",
              "verbalizer": {"negative": "terrible", "positive": "great"}}))
    assert get_task(str(j)) == t


def test_integer_verbalizers():
    base = {"name": "x", "template": "{text_a} {mask}"}
    t = task_from_dict({**base, "verbalizer": {1: "good", 0: "bad"}})          # the classes themselves
    assert t.words == ["bad", "good"] and t.label_names == {} and t.label_of(1.0) == 1
    stars = task_from_dict({**base, "verbalizer": {1: "bad", 2: "okay", 3: "good"}})   # values, not classes
    assert [stars.label_of(v) for v in (1, "2", 3, 0)] == [0, 1, 2, None]      # a bare 0 would be ambiguous


def test_builtin_tasks_are_specs_of_the_same_kind():
    assert get_task("rte").label_names == {"entailment": 0, "not_entailment": 1}
    assert get_task("rte").label_of("1") == 1 and get_task("sst2").label_of("entailment") is None
    t = register_task({"name": "My-Task", "template": "{text_a} {mask}", "verbalizer": {"a": "x", "b": "y"}})
    try:
        assert get_task("my_task") is t
    finally:
        tasks.TASKS.pop("mytask")


@pytest.mark.parametrize("text,where,field,why", [
    (SPEC_YAML.replace("{mask} .", "."), "s.yaml", "template", "must contain exactly one {mask} slot"),
    (SPEC_YAML.replace("{mask} .", "{mask} {mask}"), "s.yaml", "template", "exactly one {mask}"),
    (SPEC_YAML.replace("It was {mask}\"", "{mask} {text_a}\""), "s.yaml", "causal_template", "after {mask}"),
    (SPEC_YAML + "labels: [a, b]\n", "s.yaml", "labels", "unknown field"),
    (SPEC_YAML.replace("{negative: terrible, positive: great}", "[terrible, great]"), "s.yaml", "verbalizer",
     "mapping"),
    (SPEC_YAML.replace("negative: terrible", "no: terrible"), "s.yaml", "verbalizer", "is a boolean"),
    (SPEC_YAML.replace("great}", "' great'}"), "s.yaml", "verbalizer", "surrounding whitespace"),
    (SPEC_YAML.replace("verbalizer", "label_words"), "s.yaml", "label_words", "integers"),
    (SPEC_YAML.replace("neg_f1", "f1"), "s.yaml", "objective", "not one of ce, neg_accuracy, neg_f1"),
    (SPEC_YAML.replace("review,", "3,"), "s.yaml", "columns.text_a", "expected a column name"),
    (SPEC_YAML.replace("text_a: review", "text: review"), "s.yaml", "columns", "unknown keys ['text']"),
    (SPEC_YAML.split("\n", 1)[1], "s.yaml", "columns", "missing"),
    (SPEC_YAML.replace("verbalizer: {negative: terrible, positive: great}\n", ""), "s.yaml", "verbalizer",
     "missing"),
    ('{"template": 3, "verbalizer": {"0": "a", "1": "b"}, "columns": {"text_a": "t"}}', "s.json", "template",
     "expected a string"),
])
def test_a_malformed_spec_names_its_file_and_field(tmp_path, text, where, field, why):
    path = write(tmp_path / where, text)
    with pytest.raises(ValueError) as e:
        load_task_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field '{field}': ") and why in msg, msg
    assert e.value.field == field


@pytest.mark.parametrize("name,text,match", [
    ("s.yaml", "template: [unclosed\n", r"s\.yaml:2: not valid YAML"),
    ("s.json", '{"template": "x",\n}', r"s\.json:2: not valid JSON"),
    ("s.yaml", "- a\n- b\n", r"s\.yaml: a task spec must be a mapping"),
    ("s.yaml", "  \n", r"s\.yaml: the task spec file is empty"),
    ("s.txt", SPEC_YAML, r"s\.txt: a task spec file must end in \.json"),
])
def test_a_spec_file_that_does_not_parse(tmp_path, name, text, match):
    with pytest.raises(ValueError, match=match):
        load_task_spec(write(tmp_path / name, text))
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        get_task(str(tmp_path / "nope.yaml"))


def rows(n: int) -> list[dict]:
    return [{"id": i, "review": f"review number {i}", "stars": ["negative", "positive"][i % 2]} for i in range(n)]


def test_every_format_reads_the_same_examples(tmp_path):
    import datasets
    t = load_task_spec(write(tmp_path / "s.yaml", SPEC_YAML))
    want = [Example(r["review"], None, i % 2) for i, r in enumerate(rows(6))]
    csv_text = "stars,id,review\n" + "".join(f"{r['stars']},{r['id']},\"{r['review']}\"\n" for r in rows(6))
    files = [jsonl(tmp_path / "d.jsonl", rows(6)), write(tmp_path / "d.json", json.dumps(rows(6))),
             write(tmp_path / "d.csv", csv_text),
             write(tmp_path / "d.tsv", csv_text.replace(",", "\t").replace('"', ""))]     # TSV: no quoting
    datasets.Dataset.from_list(rows(6)).to_parquet(str(tmp_path / "d.parquet"))
    for f in files + [tmp_path / "d.parquet"]:
        assert read_data_file(f, t) == want, f
    # CSV text stays text: no number parsing, "NA" is a review; TSV has no quoting (GLUE's convention)
    write(tmp_path / "n.tsv", 'stars\treview\npositive\t007\nnegative\tNA\npositive\t"1.50\n')
    assert [e.text_a for e in read_data_file(tmp_path / "n.tsv", t)] == ["007", "NA", '"1.50']


def test_glue_files_through_datasets_give_the_glue_splits(data_dir):
    d = Path(data_dir) / "sst2"
    for protocol in ("kshot", "opt"):
        got = load_task_splits("sst2", None, protocol, 8, 5, train_file=d / "train.tsv", eval_file=d / "dev.tsv")
        assert got == load_splits("sst2", data_dir, protocol, 8, 5)
    # a test file makes the eval file the dev split; without a train file only the test split exists
    s = load_task_splits("sst2", None, "kshot", 8, 5, train_file=d / "train.tsv", eval_file=d / "train.tsv",
                         test_file=d / "dev.tsv")
    assert len(s.train) == 16 and len(s.dev) == 80 and len(s.test) == 24
    assert load_task_splits("sst2", None, "kshot", 8, 5, eval_file=d / "dev.tsv").train == []
    with pytest.raises(ValueError, match="no evaluation data: give --eval-file"):
        load_task_splits("sst2", None, train_file=d / "train.tsv")


@pytest.mark.parametrize("name,text,match", [
    ("d.jsonl", "", r"d\.jsonl: the data file is empty"),
    ("d.csv", "\n\n", r"d\.csv: the data file is empty"),
    ("d.jsonl", '{"review": "a", "label": 1}\n', r"d\.jsonl: missing column 'stars' \(the task's columns\.label\); "
                                                r"the file has columns \['review', 'label'\]"),
    ("d.jsonl", '{"review": "a", "stars": "positive"}\n{"review": "b", "stars": "meh"}\n',
     r"d\.jsonl: row 2, column 'stars': unknown label value 'meh'; the task's label values are \['negative', "
     r"'positive'\]"),
    ("d.csv", "review,stars\ngood,positive\n,negative\n", r"d\.csv: row 2, column 'review': empty text"),
    ("d.csv", "review,stars\ngood,\n", r"d\.csv: row 1, column 'stars': missing label"),
    ("d.jsonl", '{"review": "a", "stars": "positive"}\n{"review": ', r"d\.jsonl: could not be read as json"),
    ("d.xlsx", "x", r"d\.xlsx: unknown data file type '\.xlsx'; use one of \.jsonl, \.json, \.csv"),
])
def test_bad_data_files_name_file_row_and_column(tmp_path, name, text, match):
    t = load_task_spec(write(tmp_path / "s.yaml", SPEC_YAML))
    with pytest.raises(ValueError, match=match):
        read_data_file(write(tmp_path / name, text), t)


def test_reading_data_files_never_touches_the_network(tmp_path, no_network):
    calls = no_network
    t = load_task_spec(write(tmp_path / "s.yaml", SPEC_YAML))
    assert len(read_data_file(jsonl(tmp_path / "d.jsonl", rows(4)), t)) == 4
    assert calls == []
