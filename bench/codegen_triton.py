"""The Triton half of ``bench/codegen.py``, run as a worker subprocess without ``TRITON_INTERPRET``.

``python bench/codegen_triton.py ARCH OUT_DIR STRIPE STRIPES WHICH`` compiles stripe STRIPE of STRIPES of the
variants that ``mezo_kernels.triton.axpby.launch`` can request (WHICH: "all", or only the "aligned" ones) for
``GPUTarget("cuda", ARCH, 32)`` and writes ``<variant>.cubin``, ``.ptx`` and ``.json`` (the compile error instead,
when there is one) into OUT_DIR. The variants are found by calling ``launch`` itself with the module's kernels
replaced by recorders (the modes and dtypes it rejects are not variants), and compiled with the argument types and
specializations that Triton's JIT derives from the recorded arguments.
"""
from __future__ import annotations

import json
import os
import sys

SEEDS = (0, 1, 16, 2**32, 2**64 - 1, 0x1234_5678_9ABC_DEF1)   # int32 halves 0, 1, 16, ... must not specialize
_TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int32")
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _specialize(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) for ``fn(*args, **kwargs)`` as Triton's JIT specializes a call.

    The per-argument rule is Triton's own, behind ``_compat.triton_specialize``."""
    from triton.backends.compiler import BaseBackend
    from mezo_kernels._compat import triton_specialize
    sig, consts, attrs = {}, {}, {}
    bound = dict(zip(fn.arg_names, args))
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name], consts[(i,)] = "constexpr", kwargs[p.name]
            continue
        ty, key = triton_specialize(bound[p.name], not p.do_not_specialize, not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[(i,)] = key
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return sig, consts, attrs, options


def triton_variants():
    """[(variant name, seed, jit_fn, args, kwargs)]: one launch per seed of SEEDS for every (dtype, mode, aligned)
    that ``axpby.launch`` accepts; the name is e.g. "mode0/bf16/aligned" ("any" when not aligned).

    The kernels of the module are swapped for recorders during the probe, and ``available`` for a yes."""
    import torch
    import triton
    from mezo_kernels.triton import axpby
    calls, saved = [], {}
    for name, obj in vars(axpby).items():
        if isinstance(obj, triton.runtime.jit.JITFunction):
            saved[name] = obj
            setattr(axpby, name, _Recorder(obj, calls))
    saved["available"] = axpby.available
    axpby.available = lambda device: None
    meta, chunks = torch.zeros(4, 1, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)
    out = []
    try:
        for dt in _TORCH_DTYPES:
            for mode in range(8):
                for aligned in (True, False):
                    for seed in SEEDS:
                        del calls[:]
                        try:
                            axpby.launch(meta, chunks, 1, 1, getattr(torch, dt), mode, seed, 0.5, 0.25, 2.0, aligned)
                        except (TypeError, ValueError):
                            break
                        for fn, a, kw in calls:
                            out.append((f"mode{mode}/{_SHORT.get(dt, dt)}/{'aligned' if aligned else 'any'}",
                                        seed, fn, a, kw))
    finally:
        for name, obj in saved.items():
            setattr(axpby, name, obj)
    return out


class _Recorder:
    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append((self.fn, a, kw))


def _triton_worker(arch: int, out_dir: str, stripe: int, stripes: int, which: str) -> None:
    """Compile this stripe of the variants (all, or only the aligned ones); write <variant>.cubin/.ptx and
    <variant>.json (with the source hash per seed), or <variant>.json with the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    groups: dict[str, list] = {}
    for name, seed, fn, a, kw in triton_variants():
        groups.setdefault(name, []).append((seed, fn, a, kw))
    # aligned ones first, then the (slower to compile) any-base ones: every stripe gets its share of both
    names = sorted(n for n in groups if n.endswith("/aligned")) + sorted(n for n in groups if n.endswith("/any"))
    for idx, name in enumerate(names):
        calls = groups[name]
        if idx % stripes != stripe or (which == "aligned" and not name.endswith("/aligned")):
            continue
        hashes = {}
        for seed, fn, a, kw in calls:
            sig, consts, attrs, opts = _specialize(fn, a, kw)
            src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
            hashes[str(seed)] = src.hash()
        stem = os.path.join(out_dir, name.replace("/", "_"))
        try:
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        except Exception as e:  # noqa: BLE001 -- reported per variant: a variant the launcher accepts must compile
            with open(stem + ".json", "w") as f:
                why = [ln for c in (e, e.__cause__) if c for ln in str(c).splitlines()[-1:]]
                json.dump({"name": name, "error": f"{type(e).__name__}: {' <- '.join(why)}"}, f)
            continue
        with open(stem + ".cubin", "wb") as f:
            f.write(k.asm["cubin"])
        with open(stem + ".ptx", "w") as f:
            f.write(k.asm["ptx"])
        dtype, mode = name.split("/")[1], int(name.split("/")[0][4:])
        with open(stem + ".json", "w") as f:
            json.dump({"name": name, "kernel": fn.__name__, "dtype": dtype, "mode": mode, "hashes": hashes,
                       "signature": sig, "triton": triton.__version__}, f)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("run without TRITON_INTERPRET: under the interpreter @triton.jit builds nothing to compile")
    _triton_worker(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
