"""Compile the GPU kernels ahead of time for an sm_XX target, without a GPU, and summarize their SASS.

Triton: every variant that ``mezo_kernels.triton.axpby.launch`` can request, compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` by ``bench/codegen_triton.py`` in worker
subprocesses without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` builds nothing to compile).
CUDA: each ``csrc/cuda/*.cu`` through ``nvcc -cubin`` with the flags of CMakeLists.txt (-O3, C++17).
Both are read with ``nvdisasm``/``cuobjdump`` (from the CUDA toolkit or the copies Triton ships).

Instructions per element of the hot path (``per_elem``): the SASS instructions one thread executes on the hot path
chosen by ``bench/sass.py`` (setup included, each loop body once) divided by the elements that path updates. The
elements are counted from the path's own stores: bytes stored to global memory / bytes stored per element
(element size, plus 4 for the fp32 master in mode 1). E.g. a Triton fp32 program stores 16 elements per thread
with four STG.E.128, so a 1100-instruction path is 68.75 per element.

CLI: ``python bench/codegen.py report`` prints a table; ``python bench/codegen.py record [--kind cuda]`` rewrites the bounds that
``tests/test_codegen.py`` enforces (today's figures plus a margin) for the installed Triton and nvcc.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass  # noqa: E402
from codegen_triton import SEEDS  # noqa: E402,F401  (the tests read the seeds from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDS = os.path.join(ROOT, "tests", "codegen_bounds.json")
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codegen_triton.py")
ARCHS = (90, 80)
# Which Triton variants are compiled per arch: sm_80 only the aligned ones, to keep a cold test run near a minute
TRITON_VARIANTS = {90: "all", 80: "aligned"}
NVCC_FLAGS = ("-O3", "-std=c++17")
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# ------------------------------------------------------------------------------------------------ tools
def find_tool(name: str) -> str | None:
    """``name`` on PATH, under $CUDA_HOME or /usr/local/cuda*, or shipped inside the triton package."""
    dirs = [os.environ.get("CUDA_HOME", ""), *sorted(glob.glob("/usr/local/cuda*"), reverse=True)]
    for d in [None] + [os.path.join(d, "bin") for d in dirs if d]:
        p = shutil.which(name, path=d)
        if p:
            return p
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            p = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
            return p if os.access(p, os.X_OK) else None
    except (ImportError, ValueError):
        pass
    return None


def missing_tools(*names: str) -> str | None:
    """None when every tool is found, else a sentence naming the missing ones."""
    gone = [n for n in names if find_tool(n) is None]
    return f"not found on PATH, /usr/local/cuda*/bin or in triton: {', '.join(gone)}" if gone else None


def _run(cmd: list[str], **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def disassemble(cubin: str) -> tuple[dict[str, sass.Function], dict[str, dict[str, int]]]:
    """SASS functions of a cubin and ``cuobjdump -res-usage`` per function ({"REG": .., "STACK": .., ...})."""
    funcs = sass.parse(_run([find_tool("nvdisasm"), "-c", cubin]))
    usage, cur = {}, None
    for line in _run([find_tool("cuobjdump"), "-res-usage", cubin]).splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            cur = m.group(1)
        elif cur and "REG:" in line:
            usage[cur] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
    return funcs, usage


# ------------------------------------------------------------------------------------------------ analysis
def summarize(fn: sass.Function, usage: dict[str, int], dtype: str, mode: int) -> dict:
    """Figures of one kernel's hot path (module docstring); loads/stores in bytes per thread on that path."""
    path = sass.hot_path(fn)
    stored = sum(sass.access_bytes(i) for i in path if i.base in ("STG", "ST"))
    per_elem_store = _DTYPE_BYTES[dtype] + (4 if mode == 1 else 0)
    elements = stored / per_elem_store
    data_loads = [i for i in path if i.base in ("LDG", "LD") and "CONSTANT" not in i.op]
    return {
        "path_insts": len(path), "elements": elements,
        "per_elem": round(len(path) / elements, 3) if elements else None,
        "regs": usage.get("REG"), "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0),
        "hot_local_insts": sum(1 for i in path if i.base in sass.LOCAL),
        "all_local_insts": sum(1 for i in fn.instrs if i.base in sass.LOCAL),
        "hot_generic": sum(1 for i in path if i.base in sass.GENERIC),
        "stored_bytes": stored,
        "stored_128": sum(16 for i in path if i.base in ("STG", "ST") and sass.access_bytes(i) == 16),
        "loaded_128": sum(16 for i in data_loads if sass.access_bytes(i) == 16),
        "load_bytes_per_elem": {0: _DTYPE_BYTES[dtype], 1: 4, 2: 4, 4: _DTYPE_BYTES[dtype],
                                5: _DTYPE_BYTES[dtype]}.get(mode, 0),
    }


# ------------------------------------------------------------------------------------------------ Triton
def _digest(paths: list[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _cache(kind: str, key: str) -> str:
    base = os.environ.get("MEZO_CODEGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mezo-codegen")
    return os.path.join(base, f"{kind}-{key}")


def compile_triton(arch: int, which: str = "all", jobs: int = 2) -> str:
    """Compile the Triton variants (``which``: "all" or "aligned") for sm_<arch>, cached by a digest of the
    sources; returns the output folder."""
    import triton
    if which not in ("all", "aligned"):
        raise ValueError(f"which must be 'all' or 'aligned', got {which!r}")
    srcs = glob.glob(os.path.join(ROOT, "mezo_kernels", "**", "*.py"), recursive=True)
    srcs += [__file__, _WORKER, sass.__file__]
    out = _cache(f"triton{triton.__version__}-sm{arch}-{which}", _digest(srcs, triton.__version__))
    if os.path.exists(os.path.join(out, "done")):
        return out
    os.makedirs(out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, _WORKER, str(arch), out]
    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(lambda s: _run(cmd + [str(s), str(jobs), which], env=env, cwd=ROOT), range(jobs)))
    open(os.path.join(out, "done"), "w").close()
    return out


def triton_report(arch: int, which: str = "all", jobs: int = 2) -> dict[str, dict]:
    """{variant name: summary + hashes/signature} for sm_<arch>."""
    out = compile_triton(arch, which, jobs)
    done = os.path.join(out, "summary.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)

    def one(js):
        with open(js) as f:
            info = json.load(f)
        if "error" in info:
            return info["name"], info
        funcs, usage = disassemble(js[:-5] + ".cubin")
        with open(js[:-5] + ".ptx") as f:
            info["ptx"] = f.read()
        return info["name"], {**info, **summarize(funcs[info["kernel"]], usage[info["kernel"]], info["dtype"],
                                                  info["mode"])}
    with ThreadPoolExecutor(jobs) as ex:
        res = dict(ex.map(one, sorted(glob.glob(os.path.join(out, "*.json")))))
    _write_json(done, res, sort_keys=False)   # a signature's key order is the kernel's parameter order
    return res


def _write_json(path: str, obj, sort_keys: bool = True) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=sort_keys)
        f.write("\n")
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------ CUDA
def nvcc_version() -> str:
    m = re.search(r"release (\d+\.\d+)", _run([find_tool("nvcc"), "--version"]))
    return m.group(1) if m else "unknown"


CUDA_DISTS = {0: "gaussian", 1: "rademacher"}   # rng.Distribution codes -> labels, as in the bound keys


def cuda_kernel_variant(mangled: str) -> tuple[str, int, str] | None:
    """(dtype, mode, distribution label) of an ``axpby_kernel<D, DIST, MODE>`` instantiation from its mangled
    name; None for other kernels."""
    if "axpby_kernel" not in mangled:
        return None
    dt = re.search(r"(BF16|F16|F32)", mangled)
    ints = re.findall(r"Li(\d+)E", mangled)
    if not dt or len(ints) != 2 or int(ints[0]) not in CUDA_DISTS:
        raise ValueError(f"cannot tell the dtype/mode/dist of CUDA kernel {mangled}: update cuda_kernel_variant()")
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[dt.group(1)], int(ints[1]), CUDA_DISTS[int(ints[0])]


def cuda_lowrank_variant(mangled: str) -> tuple[str, str, int] | None:
    """(dtype, rounding, R) of a ``lowrank_kernel<D, SR, R>`` instantiation (csrc/cuda/lowrank.cu; R = 0: the rank
    at run time) from its mangled name; None for other kernels."""
    if "lowrank_kernel" not in mangled:
        return None
    dt, sr, rank = re.search(r"(BF16|F16|F32)", mangled), re.search(r"Lb([01])E", mangled), re.search(r"Li(\d+)E",
                                                                                                      mangled)
    if not (dt and sr and rank):
        raise ValueError(f"cannot tell the dtype/rounding/rank of CUDA kernel {mangled}: update cuda_lowrank_variant()")
    return ({"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[dt.group(1)], ("nearest", "stochastic")[int(sr.group(1))],
            int(rank.group(1)))


FP64_OPS = ("DFMA", "DMUL", "DADD")   # the float64 pipe (64 lanes per SM on sm_80/sm_90: half the fp32 rate)


def _is_cvt64(i: sass.Instr) -> bool:
    """A conversion from or to a 64-bit type (16 per clock per SM on sm_80/sm_90: 1/8 of the fp32 rate)."""
    return i.base in ("F2F", "I2F", "F2I") and "64" in i.op


# A mangled anonymous namespace carries a hash of its file ("41_GLOBAL__N__babb01cd_9_stream_cu_6ae2e126"): drop it,
# so that bound keys survive edits of the file.
_ANON = re.compile(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_[0-9a-f]{8}(?=\d)")


def cuda_report(arch: int) -> dict[str, dict]:
    """{kernel name: resource usage (+ hot-path summary for axpby kernels)} for every kernel of csrc/cuda/*.cu."""
    cus = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    # the summary is cached too: this file and sass.py (how it is computed) are part of the key
    deps = cus + glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True) + [__file__, sass.__file__]
    ver = nvcc_version()
    out = _cache(f"nvcc{ver}-sm{arch}", _digest(deps, " ".join(NVCC_FLAGS)))
    os.makedirs(out, exist_ok=True)

    def build(cu):
        cubin = os.path.join(out, os.path.basename(cu)[:-3] + ".cubin")
        if not os.path.exists(cubin):
            _run([find_tool("nvcc"), "-cubin", f"-arch=sm_{arch}", *NVCC_FLAGS, "-I", os.path.join(ROOT, "csrc"),
                  "-o", cubin + ".tmp", cu])
            os.replace(cubin + ".tmp", cubin)
        return cu, cubin
    done = os.path.join(out, "summary.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    res = {}
    with ThreadPoolExecutor(2) as ex:
        for cu, cubin in ex.map(build, cus):
            funcs, usage = disassemble(cubin)
            for name, fn in funcs.items():
                u = usage.get(name, {})
                v, lr = cuda_kernel_variant(name), cuda_lowrank_variant(name)
                if lr:   # the low-rank update: AXPBY / AXPBY_SR traffic, plus its float64 work on the hot path
                    s = summarize(fn, u, lr[0], 5 if lr[1] == "stochastic" else 0)
                    path = sass.hot_path(fn)
                    s.update(fp64_insts=sum(1 for i in path if i.base in FP64_OPS),
                             cvt64_insts=sum(1 for i in path if _is_cvt64(i)))
                elif v:
                    s = summarize(fn, u, v[0], v[1])
                else:
                    s = {"regs": u.get("REG"), "stack": u.get("STACK", 0), "local": u.get("LOCAL", 0)}
                    if "factors_kernel" in name:   # the low-rank pre-pass: priced by its hot path per counter
                        s["path_insts"] = len(sass.hot_path(fn))
                key = (f"lowrank/{lr[0]}/{lr[1]}/r{lr[2]}" if lr else f"mode{v[1]}/{v[0]}/{v[2]}" if v
                       else f"{os.path.basename(cu)}:{_ANON.sub('', name)}")
                res[key] = {**s, "file": os.path.basename(cu), "mangled": name}
    _write_json(done, res)
    return res


# ------------------------------------------------------------------------------------------------ CLI
def _margin(x: float) -> float:
    return round(x * 1.03 + 0.5, 1)   # 3% plus half an instruction: room for scheduling noise, not for a regression


def _regs(n: int) -> int:
    return -(-n // 8) * 8         # registers are allocated 8 per thread at a time: only a step changes occupancy


def record(path: str = BOUNDS, kinds: tuple[str, ...] = ("triton", "cuda")) -> dict:
    """Rewrite the bounds of the installed Triton and/or nvcc in ``path`` (other entries are kept)."""
    data = json.load(open(path)) if os.path.exists(path) else {}
    tkey = ckey = None
    if "triton" in kinds:
        import triton
        tkey = f"triton {'.'.join(triton.__version__.split('.')[:2])}"
        data[tkey] = {}
    if "cuda" in kinds:
        ckey = f"nvcc {nvcc_version()}"
        data[ckey] = {}
    for arch in ARCHS:
        for name, s in (triton_report(arch, TRITON_VARIANTS[arch]) if tkey else {}).items():
            if "error" in s:
                print(f"not recorded: triton sm{arch} {name} does not compile: {s['error'][:300]}")
                continue
            data[tkey][f"sm{arch}/{name}"] = {"today": s["per_elem"], "per_elem_max": _margin(s["per_elem"]),
                                             "regs_max": _regs(s["regs"]), "hot_local_insts": s["hot_local_insts"],
                                             "stack_max": s["stack"]}
        for name, s in (cuda_report(arch) if ckey else {}).items():
            e = {"regs_max": _regs(s["regs"]), "stack_max": s["stack"]}
            if "per_elem" in s:
                e.update(today=s["per_elem"], per_elem_max=_margin(s["per_elem"]), hot_generic=s["hot_generic"])
            data[ckey][f"sm{arch}/{name}"] = e
    _write_json(path, data)
    return data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["report", "record"])
    ap.add_argument("--arch", type=int, action="append", help="sm_XX targets (default 90 and 80)")
    ap.add_argument("--kind", choices=["triton", "cuda"], action="append",
                    help="record only these kernels' bounds (default both)")
    a = ap.parse_args(argv)
    if a.what == "record":
        record(kinds=tuple(a.kind or ("triton", "cuda")))
        print(f"wrote {BOUNDS}")
        return
    print("| kernel | regs | local | hot path insts | elements | insts/elem | generic LD/ST | 128-bit st/ld bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in a.arch or ARCHS:
        for kind, rep in (("triton", triton_report(arch, TRITON_VARIANTS[arch])), ("cuda", cuda_report(arch))):
            for name, s in rep.items():
                if "error" in s:
                    print(f"| {kind} sm{arch} {name} | does not compile: {s['error'][:120]!r} |")
                elif "per_elem" in s:
                    print(f"| {kind} sm{arch} {name} | {s['regs']} | {s['local']} | {s['path_insts']} | "
                          f"{s['elements']:g} | {s['per_elem']} | {s['hot_generic']} | "
                          f"{s['stored_128']}/{s['loaded_128']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
