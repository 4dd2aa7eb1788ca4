"""README.md and docs/*.md stay true to the repository: no paths outside it, every relative link and every repository
path they name exists (anchors included), every ``mezo_kernels.x.y`` name imports, every CLI flag is documented,
and the RNG spec's known answers are what ``mezo_kernels.rng`` computes."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_DIRS = ("mezo_kernels", "bench", "tests", "docs", "csrc", "configs", "tools")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")                 # [text](target)
CODE = re.compile(r"`([^`\n]+)`")


def _id(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def _prose(text: str) -> str:
    """The text without fenced code blocks (paths in examples are the reader's, not the repository's)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "cli.md", "modes.md", "benchmarks.md", "gpu.md", "rng_spec.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_no_paths_outside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    for bad in ("../shared", "shared/docs", "/work/", "../../"):
        assert bad not in text, f"{_id(doc)} names {bad!r}, a path outside the repository"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        dest = (doc.parent / target.split("#")[0]).resolve()
        assert dest == REPO or REPO in dest.parents, f"{_id(doc)}: link {target!r} leaves the repository"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_point_to_existing_files_and_anchors(doc):
    text = doc.read_text(encoding="utf-8")
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                      # http(s), mailto
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {_id(dest)})")
    assert not bad, f"{_id(doc)}: broken links: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_repository_paths_in_code_spans_exist(doc):
    """`bench/bench_step.py --device cpu`, `mezo_kernels/forward/`, `csrc/cuda/*.cu`: the path must be there
    (bench/out/, where the benchmarks write, is not committed)."""
    missing = []
    for span in CODE.findall(_prose(doc.read_text(encoding="utf-8"))):
        word = span.split()[0].rstrip(",;:)")
        if not word.startswith(tuple(d + "/" for d in TOP_DIRS)) or word.startswith("bench/out"):
            continue
        if any(c in word for c in "<>{}|"):
            continue
        hits = list(REPO.glob(word)) if "*" in word else [REPO / word] if (REPO / word).exists() else []
        if not hits:
            missing.append(word)
    assert not missing, f"{_id(doc)} names repository paths that do not exist: {missing}"


def _dotted_names() -> list[str]:
    names = set()
    for doc in DOCS:
        names.update(re.findall(r"\bmezo_kernels(?:\.[A-Za-z_]\w*)+", doc.read_text(encoding="utf-8")))
    return sorted(names)


def _native_extensions() -> set[str]:
    return set(re.findall(r'Extension\("([\w.]+)"', (REPO / "setup.py").read_text()))


@pytest.mark.parametrize("name", _dotted_names())
def test_dotted_names_import(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):                       # the longest importable module prefix
        mod_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and not (e.name == mod_name or mod_name.startswith(e.name + ".")):
                if e.name.split(".")[0] == "mezo_kernels":
                    raise
                pytest.skip(f"{name} needs {e.name}, not installed here")
            if mod_name in _native_extensions():
                pytest.skip(f"{mod_name} is a native extension not built here")
            continue
        except ImportError as e:                                # the hf extra missing: the package says so
            if "pip install" in str(e):
                pytest.skip(str(e))
            raise
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{name}: {'.'.join(parts[:parts.index(attr)])} has no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{name}: nothing of it imports")


def test_every_cli_flag_is_in_docs_cli():
    from mezo_kernels.train.cli import _parser
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for cmd, parser in sub.choices.items():
        assert f"`mezo-kernels {cmd}`" in text, f"docs/cli.md has no section for {cmd}"
        for action in parser._actions:
            missing += [f"{cmd} {o}" for o in action.option_strings if o.startswith("--") and o != "--help"
                        and not re.search(rf"`{re.escape(o)}[` ]", text)]
    assert not missing, f"flags missing from docs/cli.md: {missing}"


# ---------------------------------------------------------------------------------------------- docs/rng_spec.md
SPEC = REPO / "docs" / "rng_spec.md"


def _table(heading_words: str) -> list[list[str]]:
    """Rows of the first markdown table after the first line containing ``heading_words``."""
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if heading_words in ln)
    rows, seen = [], False
    for ln in lines[start:]:
        if ln.startswith("|"):
            seen = True
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif seen:
            break
    return rows[1:]                                            # without the header row


def test_rng_spec_philox_known_answers():
    torch = pytest.importorskip("torch")
    from mezo_kernels import rng
    rows = _table("Known answers (`rng.philox4x32_10")
    assert len(rows) == 3
    for key, counter, words in rows:
        k0, k1 = (int(x, 16) for x in key.split())
        c = [torch.tensor([int(x, 16)], dtype=torch.int64) for x in counter.split()]
        got = [f"{int(w):08x}" for w in rng.philox4x32_10(k0, k1, *c)]
        assert got == words.split(), (key, counter)


def test_rng_spec_gaussian_known_answers():
    from mezo_kernels import rng
    rows = _table("Known answers (`rng.words_table")
    assert len(rows) >= 6
    for seed, k, words, zs in rows:
        seed, k = int(seed), int(k)
        assert [f"{w:08x}" for w in rng.words_table(seed, [k])[0]] == words.split()
        want = [float(z) for z in zs.split(",")]
        got = rng.normal_f64(seed, 4 * k, 4).tolist()
        assert [round(g, 7) for g in got] == pytest.approx(want, abs=1e-7), (seed, k)


def test_rng_spec_other_known_answers():
    from mezo_kernels import rng
    text = SPEC.read_text(encoding="utf-8")
    assert "seed 0 gives z[0..7] = −1, +1, −1, +1, −1, +1, −1, −1" in text
    assert rng.signs(0, 0, 8).tolist() == [-1, 1, -1, 1, -1, 1, -1, -1] and rng.signs(0, 32, 1).tolist() == [-1]
    assert "z[0..7] = −1, −1, +1, +1, −1, +1, −1, +1" in text
    assert rng.signs(42, 0, 8).tolist() == [-1, -1, 1, 1, -1, 1, -1, 1]
    assert f"sr_seed(0) = 0x{rng.sr_seed(0):016X}" in text
    bits = " ".join(f"{b:04x}" for b in rng.sr_bits(0, 0, 8).tolist())
    assert f"seed 0:\n{bits}" in text or f"seed 0: {bits}" in text
    assert f"splitmix64(0) = 0x{rng.splitmix64(0):016X}" in text
    assert f"seed_for(0, 0) = 0x{rng.seed_for(0, 0):016X}" in text
    assert f"seed_for(0, 1) = 0x{rng.seed_for(0, 1):016X}" in text and rng.seed_for(0, 1) == rng.seed_for(0, 0, 1, 2)
    assert "Sizes 5, 3, 8, 1 give bases 0, 8, 12, 20" in text and rng.default_bases([5, 3, 8, 1]) == [0, 8, 12, 20]
    for name, value in (("PHILOX_M0", "0xD2511F53"), ("PHILOX_M1", "0xCD9E8D57"), ("PHILOX_W0", "0x9E3779B9"),
                        ("PHILOX_W1", "0xBB67AE85"), ("UNIFORM_SCALE_BITS", "0x2FFFFFFF"),
                        ("SR_SEED_XOR", "0x53525F524F554E44"), ("SPLITMIX_GOLDEN", "0x9E3779B97F4A7C15"),
                        ("SPLITMIX_M1", "0xBF58476D1CE4E5B9"), ("SPLITMIX_M2", "0x94D049BB133111EB")):
        assert getattr(rng, name) == int(value, 16) and value in text, name
    assert rng.SIGN_GROUP == 128 and rng.SR_GROUP == 8 and rng.PHILOX_ROUNDS == 10
