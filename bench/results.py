"""Keep bench/RESULTS.md as sections that each benchmark rewrites in place (one writer per section).

The file is a header, a hand-written ``## Summary`` and one ``## <key>`` section per benchmark, in the order a
reader asks (``ORDER``: quality, step time, memory, kernels, forward engine, GPU). A script's part of a section
lies between ``<!-- key -->`` and ``<!-- /key -->``; text outside the markers is hand-written and never touched.
``replace_section`` rewrites that part in place, or places a new section where ``ORDER`` puts it (an unknown key
goes last), so the summary stays on top. Each time it also writes the section's tables as CSV next to the file:
``csv/<key>.csv`` (first table) and ``csv/<key>.<n>.csv`` (n-th table), cells as the table shows them.

``python bench/results.py csv [RESULTS.md]`` writes the CSVs of every section (hand-written ones too).
"""
from __future__ import annotations

import csv
import os
import re
import sys

# The reader's order: (topic, section keys). A section key is the text of its "## " heading.
GROUPS = [
    ("Summary", ["Summary"]),
    ("Quality", ["demo-sst2-smollm2", "quality-smollm2", "quality-60min-sst2", "quality-rte",
                 "quality-lowrank-sst2", "hf-trainer-sst2-smollm2"]),
    ("Step time", ["step-cpu", "step-cpu-perturb", "step-cpu-lowrank"]),
    ("Memory", ["step-cpu-perturb-1b", "virtual-transient-cpu", "scale-cpu"]),
    ("Kernels", ["perturb-cpu", "drift", "codegen-sm90", "cpu-under-load"]),
    ("Forward engine", ["forward-cpu"]),
    ("GPU", ["perturb-gpu", "perturb-cuda", "step-gpu", "step-cuda", "forward-gpu", "forward-cuda"]),
]
ORDER = [k for _, keys in GROUPS for k in keys]

_HEADING = re.compile(r"^## (.+?)\s*$")


def rank(key: str) -> int:
    """Position of a section in the reader's order (unknown keys after every known one)."""
    return ORDER.index(key) if key in ORDER else len(ORDER)


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first ``## `` heading, [(key, text from its heading to the next)]); pieces join to text.

    Headings inside a ``<!-- k -->`` … ``<!-- /k -->`` block belong to the block, not to the document."""
    pre, secs, inside = [], [], None
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if inside is None:
            m = _HEADING.match(line)
            if m:
                secs.append([m.group(1), line])
                continue
            om = re.fullmatch(r"<!-- ([^/ ][^ ]*) -->", s)
            if om:
                inside = om.group(1)
        elif s == f"<!-- /{inside} -->":
            inside = None
        if secs:
            secs[-1][1] += line
        else:
            pre.append(line)
    return "".join(pre), [(k, t) for k, t in secs]


def md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in text: rows of cells, header first (separator row dropped, ``**`` removed)."""
    tables, cur = [], None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|") and s.endswith("|") and len(s) > 1:
            cells = [c.strip().replace("**", "") for c in s[1:-1].split("|")]
            if cur is None:
                cur = []
                tables.append(cur)
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                cur.append(cells)
        else:
            cur = None
    return [t for t in tables if len(t) > 1]


def section_text(text: str, key: str) -> str:
    """The ``## key`` section of a document (or, without such a heading, its marker block; "" if neither)."""
    for k, t in split_sections(text)[1]:
        if k == key:
            return t
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0]
    return ""


def csv_name(key: str, i: int) -> str:
    """File name of the i-th (0-based) table of section key."""
    return f"{key}.csv" if i == 0 else f"{key}.{i + 1}.csv"


def write_csv(text: str, key: str, csv_dir: str) -> list[str]:
    """Write the tables of section key of document text as csv_dir/<key>[.<n>].csv (old ones of key removed)."""
    tables = md_tables(section_text(text, key))
    if os.path.isdir(csv_dir):
        for f in os.listdir(csv_dir):
            if re.fullmatch(re.escape(key) + r"(\.\d+)?\.csv", f):
                os.remove(os.path.join(csv_dir, f))
    paths = []
    for i, rows in enumerate(tables):
        os.makedirs(csv_dir, exist_ok=True)
        p = os.path.join(csv_dir, csv_name(key, i))
        width = len(rows[0])
        with open(p, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(r + [""] * (width - len(r)) for r in rows)
        paths.append(p)
    return paths


def _place(text: str, key: str, block: str) -> str:
    """text with a new ``## key`` section holding block, placed by ``ORDER``; or block put under an existing
    ``## key`` heading that has no markers yet (its hand-written text kept after the block)."""
    pre, secs = split_sections(text)
    for i, (k, t) in enumerate(secs):
        if k == key:
            head, rest = t.split("\n", 1) if "\n" in t else (t, "")
            rest = rest.lstrip("\n")
            tail = "\n" + rest if rest.strip() else ("\n" if i < len(secs) - 1 else "")
            secs[i] = (k, f"{head}\n\n{block}\n{tail}")
            break
    else:
        new = (key, f"## {key}\n\n{block}\n")
        at = next((i for i, (k, _) in enumerate(secs) if rank(k) > rank(key)), len(secs))
        if at == len(secs):
            if secs:
                secs[-1] = (secs[-1][0], secs[-1][1].rstrip("\n") + "\n\n")
            else:
                pre = pre.rstrip("\n") + "\n\n"
        else:
            new = (key, new[1] + "\n")
        secs.insert(at, new)
    return pre + "".join(t for _, t in secs)


def replace_section(path: str, key: str, body: str) -> None:
    """Replace the text between ``<!-- key -->`` and ``<!-- /key -->`` (adding the section, in the reader's
    order, if absent), then write the section's tables to ``<dir of path>/csv/``."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = _place(text, key, block)
    with open(path, "w") as f:
        f.write(text)
    if os.path.abspath(path) != os.path.abspath(os.devnull):
        # a marker block inside another "## " section (a sub-table) rewrites that section's CSVs: the files are
        # named after the sections, whatever blocks a script writes into them
        owner = next((k for k, sec in split_sections(text)[1] if start in sec), key)
        write_csv(text, owner, os.path.join(os.path.dirname(os.path.abspath(path)), "csv"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "csv":
        raise SystemExit("usage: python bench/results.py csv [RESULTS.md]  (write every section's tables as CSV)")
    path = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    text = open(path).read()
    out = os.path.join(os.path.dirname(os.path.abspath(path)), "csv")
    for key, _ in split_sections(text)[1]:
        if key == "Summary":                      # hand-written, its figures are copied from the sections
            continue
        for p in write_csv(text, key, out):
            print(p)


if __name__ == "__main__":
    main()
