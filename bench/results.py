"""Keep bench/RESULTS.md as sections that each benchmark rewrites in place (one writer per section)."""
from __future__ import annotations

import os


def replace_section(path: str, key: str, body: str) -> None:
    """Replace the text between ``<!-- key -->`` and ``<!-- /key -->`` (appending the section if absent)."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {key}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)
