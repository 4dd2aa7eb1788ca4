"""Build script: `pip install -e .` (or a wheel build) drives CMake + Ninja to build the native modules.

Metadata lives in pyproject.toml; this file only decides which extensions to build and runs CMake.
torch is deliberately NOT a build or install requirement: the extensions take raw pointers as Python ints and
link no libtorch, so users keep whatever torch build (CPU/CUDA/ROCm) they installed themselves.

Environment:
  MEZO_SKIP_EXT=1        pure-Python install, no extension at all (the torch/triton backends still work)
  MEZO_CUDA=auto|0|1     auto (default): build _C_cuda when nvcc is on PATH or in $CUDA_HOME/bin;
                         1: require it (fail if nvcc is missing); 0: never build it
  MEZO_CUDA_ARCHS        CUDA architectures for _C_cuda, default "90" (e.g. "80;90")
  MEZO_CPU_ARCH          -march for _C, default "native" (e.g. "x86-64-v2" for portable wheels; "none")
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"mezo-kernels: {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str, default: str) -> str:
    raw = os.environ.get(name, default).strip().lower()
    table = {"auto": "auto", "": default, "1": "1", "on": "1", "true": "1", "yes": "1",
             "0": "0", "off": "0", "false": "0", "no": "0"}
    if raw not in table:
        raise SystemExit(f"mezo-kernels: {name}={raw!r} is not one of auto, 0, 1")
    return table[raw]


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def _plan() -> tuple[list[Extension], str | None, str]:
    """(extensions, nvcc path or None, one line saying what gets built and why)."""
    if _env_flag("MEZO_SKIP_EXT", "0") == "1":
        return [], None, "MEZO_SKIP_EXT=1: pure-Python install, no native extension"
    exts = [Extension("mezo_kernels._C", sources=[])]
    want = _env_flag("MEZO_CUDA", "auto")
    nvcc = _find_nvcc() if want != "0" else None
    if want == "0":
        why = "_C_cuda skipped: MEZO_CUDA=0"
    elif nvcc is None and want == "1":
        raise SystemExit("mezo-kernels: MEZO_CUDA=1 but nvcc was found neither on PATH nor in $CUDA_HOME/bin; "
                         "install the CUDA toolkit or set CUDA_HOME, or use MEZO_CUDA=auto/0")
    elif nvcc is None:
        why = "_C_cuda skipped: nvcc not found on PATH or in $CUDA_HOME/bin (MEZO_CUDA=auto)"
    else:
        exts.append(Extension("mezo_kernels._C_cuda", sources=[]))
        why = f"_C_cuda enabled: nvcc at {nvcc} (MEZO_CUDA={want})"
    return exts, nvcc, why


def _tool(module: str, attr: str, exe: str) -> str:
    """cmake / ninja from their PyPI packages (build requirements), else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.is_file():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(exe)
    if not found:
        raise SystemExit(f"mezo-kernels: {exe} not found; `pip install {module}` (it is a build requirement)")
    return found


class CMakeBuild(build_ext):
    """One CMake configure + build produces every extension straight into their final directory."""

    def build_extensions(self) -> None:
        if not self.extensions:
            return
        import pybind11  # build requirement

        names = [e.name for e in self.extensions]
        out_dir = Path(self.get_ext_fullpath(names[0])).resolve().parent
        cuda = "mezo_kernels._C_cuda" in names
        cpu_arch = os.environ.get("MEZO_CPU_ARCH", "native") or "native"
        archs = os.environ.get("MEZO_CUDA_ARCHS", "90") or "90"
        # A persistent build tree under build/ (editable installs otherwise get a fresh temp dir each time, and
        # the CUDA part takes most of a minute), one per configuration so venvs/options never share a cache.
        key = "|".join([sys.executable, pybind11.get_cmake_dir(), cpu_arch, str(NVCC if cuda else ""), archs])
        build_dir = ROOT / "build" / f"cmake-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake, ninja = _tool("cmake", "CMAKE_BIN_DIR", "cmake"), _tool("ninja", "BIN_DIR", "ninja")
        args = [
            f"-S{ROOT}", f"-B{build_dir}", "-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-DMEZO_OUTPUT_DIR={out_dir}",
            f"-DMEZO_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DMEZO_CPU_ARCH={cpu_arch}", f"-DMEZO_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={NVCC}",
                     f"-DMEZO_CUDA_ARCHS={archs}"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        t0 = time.monotonic()
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        for name in names:
            if not Path(self.get_ext_fullpath(name)).is_file():
                raise SystemExit(f"mezo-kernels: CMake did not produce {self.get_ext_fullpath(name)}")
        _log(f"built {', '.join(n.rsplit('.', 1)[1] for n in names)} into {out_dir} "
             f"in {time.monotonic() - t0:.1f} s (-march={cpu_arch}); {WHY}")


EXTENSIONS, NVCC, WHY = _plan()
_log(WHY)
setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": CMakeBuild})
