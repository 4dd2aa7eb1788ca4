"""The spec package (mezo_kernels/rng/) is the one definition of every shared constant and code.

C++/CUDA read them from csrc/spec_codes.h, Triton as tl.constexpr globals, dispatch/perturb by name. These tests
parse the header, ask the built extensions what they compiled in, and scan the other sources for copies, so a
constant edited in one place only fails here instead of as wrong bits on one backend.
"""
import importlib
import re
import struct
from pathlib import Path

import pytest
import torch

from mezo_kernels import kernels as dispatch, rng
from mezo_kernels.rng import header as spec_header

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / spec_header.HEADER_PATH
CSRC = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu"))
PACKAGE = sorted((ROOT / "mezo_kernels").rglob("*.py"))
KERNEL_PY = [ROOT / "mezo_kernels" / n for n in ("kernels.py", "perturb/paramset.py", "perturb/copy.py",
                                                  "perturb/plan.py", "triton/axpby.py", "triton/philox.py",
                                                  "triton/rounding.py")]
HEX_CODES = {"PHILOX_M0": rng.PHILOX_M0, "PHILOX_M1": rng.PHILOX_M1, "PHILOX_W0": rng.PHILOX_W0,
             "PHILOX_W1": rng.PHILOX_W1, "UNIFORM_SCALE_BITS": rng.UNIFORM_SCALE_BITS,
             "SR_SEED_XOR": rng.SR_SEED_XOR, "SPLITMIX_GOLDEN": rng.SPLITMIX_GOLDEN, "SPLITMIX_M1": rng.SPLITMIX_M1,
             "SPLITMIX_M2": rng.SPLITMIX_M2}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _expected_cpp() -> dict[str, object]:
    """Every scalar constant the header must define, by its C++ name, with the spec's value."""
    out = {"kPhiloxM0": rng.PHILOX_M0, "kPhiloxM1": rng.PHILOX_M1, "kPhiloxW0": rng.PHILOX_W0,
           "kPhiloxW1": rng.PHILOX_W1, "kPhiloxRounds": rng.PHILOX_ROUNDS,
           "kUniformScaleBits": rng.UNIFORM_SCALE_BITS, "kUniformScale": rng.UNIFORM_SCALE,
           "kTwoPiF": rng.TWO_PI_F32, "kUMinF": rng.U_MIN_F32,
           "kNumModes": len(rng.KernelMode), "kNumDTypes": len(rng.DTypeCode),
           "kNumDists": len(rng.Distribution), "kSignGroup": rng.SIGN_GROUP, "kSrGroup": rng.SR_GROUP,
           "kSrSeedXor": rng.SR_SEED_XOR, "kSplitmixGolden": rng.SPLITMIX_GOLDEN, "kSplitmixM1": rng.SPLITMIX_M1,
           "kSplitmixM2": rng.SPLITMIX_M2}
    out.update({f"kMode{_camel(m.name)}": int(m) for m in rng.KernelMode})
    out.update({f"kDist{_camel(d.name)}": int(d) for d in rng.Distribution})
    out.update({f"kDType{_camel(c.name)}": int(c) for c in rng.DTypeCode})
    return out


def _parse_literal(ctype: str, text: str):
    text = text.strip()
    if ctype == "float":
        assert text.endswith("f") and text.startswith("0x"), f"float constant {text!r} is not an exact hex literal"
        return float.fromhex(text[:-1])
    return int(text.rstrip("uUlL"), 0)


def _header_constants(text: str) -> dict[str, object]:
    found = re.findall(r"^constexpr\s+(uint32_t|uint64_t|int|float)\s+(k\w+)\s*=\s*([^;]+);", text, flags=re.M)
    return {name: _parse_literal(ctype, value) for ctype, name, value in found}


def _spec_table() -> dict:
    """What the extensions' ``spec_codes()`` must return."""
    return {"PHILOX_M0": rng.PHILOX_M0, "PHILOX_M1": rng.PHILOX_M1, "PHILOX_W0": rng.PHILOX_W0,
            "PHILOX_W1": rng.PHILOX_W1, "PHILOX_ROUNDS": rng.PHILOX_ROUNDS,
            "UNIFORM_SCALE_BITS": rng.UNIFORM_SCALE_BITS, "UNIFORM_SCALE": rng.UNIFORM_SCALE,
            "TWO_PI_F32": rng.TWO_PI_F32, "U_MIN_F32": rng.U_MIN_F32,
            "modes": {m.name: int(m) for m in rng.KernelMode},
            "modes_using_master": [int(m) for m in rng.KernelMode if m.uses_master],
            "modes_using_source": [int(m) for m in rng.KernelMode if m.uses_source],
            "dtypes": {c.name.lower(): int(c) for c in rng.DTypeCode},
            "distributions": {d.label: int(d) for d in rng.Distribution},
            "SIGN_GROUP": rng.SIGN_GROUP, "SR_GROUP": rng.SR_GROUP, "SR_SEED_XOR": rng.SR_SEED_XOR}


# ------------------------------------------------------------------------------------------- the spec itself
def test_spec_values_are_the_documented_ones():
    # independent of rng.py's own arithmetic: the bit patterns docs/rng_spec.md names
    assert struct.pack("<f", rng.UNIFORM_SCALE) == struct.pack("<I", 0x2FFFFFFF)
    assert struct.pack("<f", rng.TWO_PI_F32) == struct.pack("<f", 6.2831855)
    assert struct.pack("<f", rng.U_MIN_F32) == struct.pack("<f", 1e-7)
    assert [int(m) for m in rng.KernelMode] == list(range(len(rng.KernelMode)))
    assert {m.name for m in rng.KernelMode if m.uses_master} == {"MASTER_UPDATE", "MASTER_VIEW"}
    assert {m.name for m in rng.KernelMode if m.uses_source} == {"OUT"}
    assert [int(d) for d in rng.Distribution] == [0, 1]
    assert [d.label for d in rng.Distribution] == ["gaussian", "rademacher"]
    assert rng.SR_SEED_XOR.to_bytes(8, "big") == b"SR_ROUND"
    assert (rng.SIGN_GROUP, rng.SR_GROUP) == (128, 8)
    # splitmix64's published first outputs (Vigna's seed-0 sequence: x advances by the golden increment)
    assert rng.splitmix64(0) == 0xE220A8397B1DCDAF and rng.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert all(isinstance(m.effect, str) and "=" in m.effect for m in rng.KernelMode)
    assert rng.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ------------------------------------------------------------------------------------------- C++ header
def test_header_is_generated_from_the_spec():
    assert HEADER.read_text() == spec_header.emit_header(), \
        f"{HEADER} differs from mezo_kernels.rng: run `python tools/gen_spec_header.py` and rebuild"


def test_header_constants_equal_the_spec():
    text = HEADER.read_text()
    assert _header_constants(text) == _expected_cpp()
    names = re.search(r"kModeNames\[kNumModes\]\s*=\s*\{([^}]*)\}", text).group(1)
    assert re.findall(r'"(\w+)"', names) == [m.name for m in rng.KernelMode]
    names = re.search(r"kDTypeNames\[kNumDTypes\]\s*=\s*\{([^}]*)\}", text).group(1)
    assert re.findall(r'"(\w+)"', names) == [c.name.lower() for c in rng.DTypeCode]
    body = re.search(r"bool mode_uses_master\(int mode\)\s*\{\s*return ([^;]*);", text).group(1)
    assert set(re.findall(r"kMode(\w+)", body)) == {_camel(m.name) for m in rng.KernelMode if m.uses_master}
    body = re.search(r"bool mode_uses_source\(int mode\)\s*\{\s*return ([^;]*);", text).group(1)
    assert set(re.findall(r"kMode(\w+)", body)) == {_camel(m.name) for m in rng.KernelMode if m.uses_source}
    names = re.search(r"kDistNames\[kNumDists\]\s*=\s*\{([^}]*)\}", text).group(1)
    assert re.findall(r'"(\w+)"', names) == [d.label for d in rng.Distribution]


@pytest.mark.parametrize("modname", ["mezo_kernels._C", "mezo_kernels._C_cuda"])
def test_extensions_compiled_the_spec(modname):
    """What the compiler made of the header (hex floats included), and that the build is not stale."""
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        pytest.skip(f"{modname} not built here ({e})")
    assert mod.spec_codes() == _spec_table(), f"{modname} was built from other codes: `pip install -e .` again"


@pytest.mark.parametrize("name,value", sorted(HEX_CODES.items()))
def test_each_constant_is_written_once_in_python_and_once_in_cpp(name, value):
    pattern = re.compile(rf"\b0x{value:08X}(?![0-9a-f])", re.I)   # also with a C++ u suffix
    py = {p.relative_to(ROOT).as_posix(): len(pattern.findall(p.read_text())) for p in PACKAGE}
    cpp = {p.relative_to(ROOT).as_posix(): len(pattern.findall(p.read_text())) for p in CSRC}
    assert {k: v for k, v in py.items() if v} == {"mezo_kernels/rng/philox.py": 1}, name
    assert {k: v for k, v in cpp.items() if v} == {spec_header.HEADER_PATH: 1}, name


def _code_lines(path: Path) -> str:
    """The file without // comments (C++) or # comments (Python), so prose may name a mode."""
    marker = "#" if path.suffix == ".py" else "//"
    return "\n".join(line.split(marker, 1)[0] for line in path.read_text().splitlines())


# numeric mode/dtype codes compared or switched on, spec constants re-typed as decimal literals
CPP_COPIES = [r"\bcase\s+\d+\s*:", r"\b(mode|MODE|dtype|DTYPE)\s*(==|!=|>=?|<=)\s*\d", r"\b(mode|dtype)\s*<\s*[1-9]",
              r"6\.28318", r"\b1(\.0)?e-0?7f", r"0x1\.fffffep-32", r"constexpr\s+\w+\s+k(Philox|Uniform|TwoPi|UMin)"]
PY_COPIES = [r"\b(mode|MODE|dtype|DTYPE)\s*(==|!=|>=?|<=?)\s*\d", r"torch\.(float32|float16|bfloat16)\s*:\s*\d",
             r"=\s*0\s*,\s*1\s*,\s*2\b", r"6\.28318", r"\b1(\.0)?e-0?7\b", r"4\.6566\d*e-10", r"static_range\(\d"]


@pytest.mark.parametrize("path", [p for p in CSRC if p != HEADER], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cpp_sources_use_the_header_not_copies(path):
    code = _code_lines(path)
    hits = [m.group(0) for pat in CPP_COPIES for m in re.finditer(pat, code)]
    assert not hits, f"{path.name} re-types spec codes {hits}; use the names in {spec_header.HEADER_PATH}"


@pytest.mark.parametrize("path", KERNEL_PY, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_kernels_use_the_spec_not_copies(path):
    code = _code_lines(path)
    hits = [m.group(0) for pat in PY_COPIES for m in re.finditer(pat, code)]
    assert not hits, f"{path.name} re-types spec codes {hits}; use mezo_kernels.rng"


def test_dispatch_reexports_are_the_spec_objects():
    assert dispatch.DTYPE_CODES is rng.DTYPE_CODES and dispatch.KernelMode is rng.KernelMode
    assert [dispatch.AXPBY, dispatch.MASTER_UPDATE, dispatch.MASTER_VIEW, dispatch.FILL] == list(rng.KernelMode)[:4]
    assert dispatch.Distribution is rng.Distribution and dispatch.GAUSSIAN is rng.Distribution.GAUSSIAN


def test_triton_globals_are_the_spec():
    triton = pytest.importorskip("triton", reason="triton is not installed")
    del triton
    from mezo_kernels.triton import axpby, philox
    expect = {philox: {"_PHILOX_M0": rng.PHILOX_M0, "_PHILOX_M1": rng.PHILOX_M1, "_PHILOX_W0": rng.PHILOX_W0,
                       "_PHILOX_W1": rng.PHILOX_W1, "_PHILOX_ROUNDS": rng.PHILOX_ROUNDS,
                       "_UNIFORM_SCALE": rng.UNIFORM_SCALE, "_TWO_PI": rng.TWO_PI_F32, "_U_MIN": rng.U_MIN_F32},
              axpby: {**{f"_{m.name}": int(m) for m in rng.KernelMode},
                      **{f"_{c.name}": int(c) for c in rng.DTypeCode},
                      "_GAUSSIAN": int(rng.Distribution.GAUSSIAN), "_SIGN": int(rng.Distribution.SIGN),
                      "_SIGN_GROUP": rng.SIGN_GROUP, "_SR_GROUP": rng.SR_GROUP}}
    for mod, table in expect.items():
        for name, value in table.items():
            got = getattr(mod, name)
            assert type(got).__name__ == "constexpr" and got.value == value, (mod.__name__, name)
