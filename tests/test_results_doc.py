"""bench/RESULTS.md and the helper that writes it (bench/results.py): a section written by a benchmark lands in the
reader's order below an untouched summary, its tables go to csv/ beside the file, and the real file's summary links
all resolve, its sections are in that order and its committed CSVs match its tables. CPU only, no benchmark runs."""
import csv
import importlib
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
DOC = os.path.join(BENCH, "RESULTS.md")
sys.path.insert(0, BENCH)
import results  # noqa: E402  (as the bench scripts import it)

TABLE = "Some text.\n\n| a | b |\n|---|---|\n| 1 | **2** |\n| 3 |  |\n"


def headings(text):
    return [k for k, _ in results.split_sections(text)[1]]


def summary(text):
    return dict(results.split_sections(text)[1])["Summary"]


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)} | set(
        re.findall(r'<a (?:id|name)="([^"]+)"', text))


def test_import_paths_the_scripts_use():
    assert importlib.import_module("bench.results").replace_section.__name__ == "replace_section"
    p = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); "
                        "from results import replace_section, ORDER; print(ORDER[0])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "Summary", p.stderr


def test_order_covers_the_benchmarks_sections():
    order = results.ORDER
    assert len(order) == len(set(order)) and order[0] == "Summary"
    topics = [t for t, _ in results.GROUPS]
    assert topics == ["Summary", "Quality", "Step time", "Memory", "Kernels", "Forward engine", "GPU"]
    for key in ("perturb-cpu", "perturb-cuda", "step-cpu", "step-cuda", "drift", "forward-cpu", "forward-cuda"):
        assert key in order                           # what bench_perturb/step/drift/forward write
    assert results.rank("something-new") == len(order)


def test_new_section_lands_in_order_below_the_summary(tmp_path):
    doc = tmp_path / "RESULTS.md"
    shutil.copy(DOC, doc)
    before = doc.read_text()
    results.replace_section(str(doc), "perturb-cuda", "GPU figures\n\n" + TABLE)
    after = doc.read_text()
    keys = headings(after)
    assert keys.index("perturb-cuda") == keys.index("perturb-gpu") + 1
    assert [results.rank(k) for k in keys] == sorted(results.rank(k) for k in keys)
    assert summary(after) == summary(before) and after.startswith(before.split("## Summary")[0] + "## Summary")
    for k, t in results.split_sections(before)[1]:    # every other section unchanged
        assert t.rstrip("\n") in after, k
    rows = list(csv.reader(open(tmp_path / "csv" / "perturb-cuda.csv")))
    assert rows == [["a", "b"], ["1", "2"], ["3", ""]]


def test_rewrite_in_place_keeps_everything_else(tmp_path):
    doc = tmp_path / "RESULTS.md"
    shutil.copy(DOC, doc)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "drift.2.csv").write_text("stale\n")
    (tmp_path / "csv" / "drift-other.csv").write_text("not drift's\n")
    before = doc.read_text()
    results.replace_section(str(doc), "drift", TABLE)
    after = doc.read_text()
    assert headings(after) == headings(before)
    new_drift = dict(results.split_sections(after)[1])["drift"]
    assert "<!-- drift -->\n" + TABLE.rstrip() + "\n<!-- /drift -->" in new_drift
    assert after.replace(new_drift, "") == before.replace(dict(results.split_sections(before)[1])["drift"], "")
    assert sorted(os.listdir(tmp_path / "csv")) == ["drift-other.csv", "drift.csv"]   # its stale 2nd table gone


def test_sections_written_in_any_order_come_out_in_the_readers_order(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Benchmark results\n\nHeader.\n\n## Summary\n\n| claim | figure |\n|---|---|\n| x | 1 |\n")
    for key in ("forward-cpu", "zz-unknown", "step-gpu", "step-cpu", "perturb-cpu", "quality-smollm2",
                "demo-sst2-smollm2"):
        results.replace_section(str(doc), key, f"{key} body\n\n" + TABLE)
    text = doc.read_text()
    assert headings(text) == ["Summary", "demo-sst2-smollm2", "quality-smollm2", "step-cpu", "perturb-cpu",
                              "forward-cpu", "step-gpu", "zz-unknown"]
    assert text.startswith("# Benchmark results\n\nHeader.\n\n## Summary\n\n| claim | figure |\n|---|---|\n| x | 1 |\n\n")
    assert "\n\n\n" not in text and text.endswith("<!-- /zz-unknown -->\n")
    for k in headings(text)[1:]:
        assert f"## {k}\n\n<!-- {k} -->\n{k} body\n" in text


def test_heading_without_markers_gets_the_block_and_keeps_its_notes(tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\n## step-gpu\n\nNo GPU yet.\n\n## forward-cpu\n\n<!-- forward-cpu -->\nf\n<!-- /forward-cpu -->\n")
    results.replace_section(str(doc), "step-gpu", "ran")
    assert doc.read_text() == ("# R\n\n## step-gpu\n\n<!-- step-gpu -->\nran\n<!-- /step-gpu -->\n\nNo GPU yet.\n\n"
                               "## forward-cpu\n\n<!-- forward-cpu -->\nf\n<!-- /forward-cpu -->\n")


def test_missing_file_is_created(tmp_path):
    doc = tmp_path / "sub" / "RESULTS.md"
    doc.parent.mkdir()
    results.replace_section(str(doc), "drift", "x")
    assert doc.read_text() == "# Benchmark results\n\n## drift\n\n<!-- drift -->\nx\n<!-- /drift -->\n"
    assert not (doc.parent / "csv").exists()                      # no table, no CSV


def test_real_file_summary_on_top_and_its_links_resolve():
    text = open(DOC).read()
    keys = headings(text)
    assert keys[0] == "Summary" and len(keys) == len(set(keys))
    assert [results.rank(k) for k in keys] == sorted(results.rank(k) for k in keys)
    summ = summary(text)
    table = results.md_tables(summ)[0]
    assert table[0] == ["claim", "figure", "date", "machine", "section"] and len(table) > 15
    links = re.findall(r"\]\(#([^)]+)\)", summ)
    assert links and set(links) <= anchors(text), set(links) - anchors(text)
    assert all(re.search(r"\]\(#[^)]+\)", row[4]) for row in table[1:])     # every claim links its section
    assert {slug(k) for k in keys} <= anchors(text)
    assert "bench/csv/" in text.split("## Summary")[0]                     # the header says where the CSVs are
    assert "perturb-gpu" in links and "step-gpu" in links


def test_real_file_summary_numbers_come_from_the_sections():
    text = open(DOC).read()
    summ = summary(text)
    rest = text.replace(summ, "")
    for row in results.md_tables(summ)[0][1:]:
        for n in re.findall(r"\d[\d.]*(?:e[-+]\d+)?", row[1]):
            assert n.rstrip(".") in rest, (row[0], n)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d|not stated", row[2]), row[2]


def test_committed_csvs_match_the_tables():
    text = open(DOC).read()
    csv_dir = os.path.join(BENCH, "csv")
    expected = {}
    for key, sec in results.split_sections(text)[1]:
        if key == "Summary":
            continue
        for i, rows in enumerate(results.md_tables(sec)):
            expected[results.csv_name(key, i)] = rows
    assert sorted(os.listdir(csv_dir)) == sorted(expected)
    for name, rows in expected.items():
        assert list(csv.reader(open(os.path.join(csv_dir, name)))) == rows, name


def test_a_block_inside_another_section_rewrites_that_sections_csvs(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.replace_section(str(path), "perturb-cpu", "| a | b |\n|---|---|\n| 1 | 2 |\n\n<!-- sub -->\n<!-- /sub -->")
    results.replace_section(str(path), "sub", "| c |\n|---|\n| 3 |")
    assert sorted(os.listdir(tmp_path / "csv")) == ["perturb-cpu.2.csv", "perturb-cpu.csv"]
    with open(tmp_path / "csv" / "perturb-cpu.2.csv") as f:
        assert list(csv.reader(f)) == [["c"], ["3"]]
