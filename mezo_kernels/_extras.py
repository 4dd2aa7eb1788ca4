"""Which optional extra provides a missing module, and the message that says how to install it.

The core package needs only torch and numpy; models, adapters, data files and the Trainer integration come with the
``hf`` extra, and the GPU kernels' JIT with ``triton``. Modules import these lazily; the CLI checks up front (so a
command fails before any work, without a traceback) and :mod:`mezo_kernels.hf` when it is imported.
"""
from __future__ import annotations

import importlib.util
from typing import Iterable

__all__ = ["EXTRA_OF", "install_hint", "missing_modules", "require", "import_error_message"]

# top-level module -> the extra that installs it (the pyproject's optional-dependencies)
EXTRA_OF = {m: "hf" for m in ("transformers", "peft", "accelerate", "datasets", "trl", "gguf", "safetensors",
                              "tqdm", "matplotlib", "yaml", "tokenizers")}
EXTRA_OF["triton"] = "triton"


def install_hint(extra: str) -> str:
    """How to install ``extra``: from a checkout, or from a package index."""
    return f'pip install -e ".[{extra}]" (in a checkout of mezo-kernels), or pip install "mezo-kernels[{extra}]"'


def missing_modules(names: Iterable[str]) -> list[str]:
    """The modules of ``names`` that cannot be imported (found without importing them)."""
    out = []
    for n in names:
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):          # a parent package missing, or a broken module entry
            out.append(n)
    return out


def _message(what: str, missing: list[str]) -> str:
    extras = sorted({EXTRA_OF.get(m, "hf") for m in missing})
    return (f"{what} needs {', '.join(missing)}, from the {' and '.join(repr(e) for e in extras)} extra; install it "
            f"with: {' ; '.join(install_hint(e) for e in extras)}")


def require(names: Iterable[str], what: str) -> None:
    """ImportError saying which extra to install when any of the modules ``names`` is missing."""
    missing = missing_modules(names)
    if missing:
        raise ImportError(_message(what, missing))


def import_error_message(err: ImportError, what: str = "this") -> str:
    """A one-paragraph message for ``err``: which extra to install when the missing module belongs to one, else
    the error's own text."""
    root = (getattr(err, "name", None) or "").split(".")[0]
    if root in EXTRA_OF:
        return _message(what, [root])
    return str(err)
