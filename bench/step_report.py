"""Ratios, target checks and markdown tables for the step benchmark (rows as bench_step.py writes them to CSV).

A row is one (configuration, method): model, mode, dtype, batch, seq, method, status, median_ms, min_ms, max_ms,
iqr_ms, fwd_ms, other_ms, tokens_per_s, peak_over_base_mib, footprint_mib, ... Ratios compare the methods of one
configuration (medians for time, footprints = weights + peak over the baseline for memory).

Time:
* ``mezo_vs_2fwd``: MeZO step / (2 x inference forward), the two from different processes (the target's figure);
* ``mezo_vs_own_fwd``: MeZO step / the two forwards inside it (same process: the overhead without process-to-process
  noise), and ``mezo_other_ms``: the step minus those forwards (perturbation passes, bookkeeping);
* ``t_bp_vs_mezo`` / ``t_bpckpt_vs_mezo``: backprop (with checkpointing) step / MeZO step;
* ``ref_vs_ours``: reference-loop MeZO step / ours, as measured; ``ref_vs_ours_eqfwd``: the same at equal forwards,
  (F + reference non-forward) / (F + ours non-forward) with F the mean of the two steps' in-step forward times.
  Both steps run the same two forwards, which differ between processes only by machine noise; with LoRA the
  perturbation is well under 1 % of a step and that noise decides the raw ratio, so the target is marked on this
  one; ``ref_other_ms`` and ``ref_vs_ours_other`` show the non-forward parts themselves.

Memory:
* ``mem_mezo_vs_inf``, ``mezo_extra_mib``: MeZO / inference, and MeZO minus inference (where the memory goes);
* ``mem_inplace_vs_inf``: the same for MeZO without fp32 masters (``exact_restore=False``; bf16/fp16 only);
* ``mem_bp_vs_mezo``, ``mem_bp_vs_inplace``, ``mem_bpckpt_vs_mezo``: backprop (with checkpointing) / MeZO;
* ``mem_ckpt_vs_bp``: backprop with checkpointing / without (< 1 when checkpointing saves memory).

"MeZO" above is the in-place path with fp32 masters in bf16/fp16 (``mezo-inplace-master``, the method named
``mezo`` in runs before the explicit names; ``mezo-inplace`` was ``mezo-inplace-nomaster``). The new paths, against
inference and against it:
* ``virtual_vs_2fwd``, ``t_virtual_vs_master``, ``virtual_other_ms``: virtual-perturbation step / 2 inference
  forwards, / the master step, and its non-forward part;
* ``mem_virtual_vs_inf``, ``virtual_extra_mib``, ``mem_virtual_vs_master``: its footprint / inference, minus
  inference, / the master path's;
* ``t_batched_vs_seq``: batched ± step (one forward of 2B rows) / the sequential virtual step (n = 1, the same
  optimizer and update); ``t_batched_vs_master``: / the master step; ``batched_vs_2fwd``: / 2 inference forwards;
* ``t_batched_n4_vs_n4``: 4 directions in one forward of 8B rows / 4 directions one after the other;
  ``t_n4_vs_n1_batched``: batched n = 4 / batched n = 1; ``mem_batched_vs_inf``, ``mem_batched_n4_vs_inf``.
"""
from __future__ import annotations

from typing import NamedTuple

CONFIG_KEYS = ("model", "mode", "dtype", "batch", "seq")
METHOD_ALIASES = {"mezo": "mezo-inplace-master", "mezo-inplace": "mezo-inplace-nomaster"}   # old -> explicit
MASTER, NOMASTER, VIRTUAL = "mezo-inplace-master", "mezo-inplace-nomaster", "mezo-virtual"


def canonical(method: str) -> str:
    """The explicit method name of ``method`` (old CSVs and command lines use ``mezo`` / ``mezo-inplace``)."""
    return METHOD_ALIASES.get(method, method)


class Target(NamedTuple):
    key: str
    op: str                           # "<=", ">=" or ">"
    bound: float | dict | None        # a number, {device: number} (no target on other devices), None: time_bound
    modes: tuple
    label: str
    dtypes: tuple | None = None       # None: every dtype


TARGETS = (
    Target("mem_mezo_vs_inf", "<=", 1.05, ("lora", "full"), "MeZO peak <= 1.05 x inference peak"),
    Target("mem_bp_vs_mezo", ">=", 4.0, ("full",), "full-parameter backprop+AdamW peak >= 4 x MeZO peak"),
    Target("mezo_vs_2fwd", "<=", None, ("lora",), "MeZO-LoRA step <= {b} x two inference forwards"),
    Target("ref_vs_ours_eqfwd", ">", 1.0, ("lora", "full"),
           "our MeZO step faster than the reference loop (equal forwards)"),
    Target("mem_virtual_vs_inf", "<=", 1.05, ("lora", "full"),
           "virtual MeZO (no fp32 masters) peak <= 1.05 x inference peak"),
    Target("t_virtual_vs_master", "<=", 1.0, ("full",),
           "full-parameter virtual step no slower than the fp32-master step (bf16/fp16)", ("bf16", "fp16")),
    Target("t_batched_vs_seq", "<=", 1.0, ("lora",), "batched ± LoRA step no slower than the sequential one"),
    Target("batched_vs_2fwd", "<=", {"cuda": 0.6}, ("lora",), "batched LoRA step <= {b} x two inference forwards"),
    Target("t_n4_vs_n1_batched", "<=", {"cuda": 2.6}, ("lora",), "batched n = 4 step <= {b} x batched n = 1 step"),
)

INPLACE_ALTERNATIVE = {"mem_mezo_vs_inf": "mem_inplace_vs_inf", "mem_bp_vs_mezo": "mem_bp_vs_inplace"}


def _f(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None      # NaN -> None


def _div(a, b) -> float | None:
    a, b = _f(a), _f(b)
    return None if a is None or not b else a / b


def ratios(rows: list[dict]) -> list[dict]:
    """One record per configuration (in first-seen order) with the ratios above; None where a method is missing."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault(tuple(str(r[k]) for k in CONFIG_KEYS), {})[canonical(r["method"])] = r
    out = []
    for key, m in groups.items():
        if MASTER in m:                   # the ratio keys below call the master path "mezo"
            m["mezo"] = m[MASTER]
        if NOMASTER in m:
            m["mezo-inplace"] = m[NOMASTER]
        t = {k: _f(v["median_ms"]) for k, v in m.items()}
        mem = {k: _f(v["footprint_mib"]) for k, v in m.items()}
        fwd = {k: _f(v.get("fwd_ms")) for k, v in m.items()}
        other = {k: _f(v.get("other_ms")) for k, v in m.items()}
        two = 2 * t["inference"] if t.get("inference") is not None else None
        eq = None
        if None not in (fwd.get("mezo"), fwd.get("reference"), other.get("mezo"), other.get("reference")):
            f = (fwd["mezo"] + fwd["reference"]) / 2
            eq = _div(f + other["reference"], f + other["mezo"])
        out.append({**dict(zip(CONFIG_KEYS, key)),
                    "mezo_vs_2fwd": _div(t.get("mezo"), two),
                    "mezo_vs_own_fwd": _div(t.get("mezo"), fwd.get("mezo")),
                    "mezo_other_ms": other.get("mezo"),
                    "t_bp_vs_mezo": _div(t.get("backprop"), t.get("mezo")),
                    "t_bpckpt_vs_mezo": _div(t.get("backprop-ckpt"), t.get("mezo")),
                    "ref_vs_ours": _div(t.get("reference"), t.get("mezo")),
                    "ref_vs_ours_eqfwd": eq,
                    "ref_other_ms": other.get("reference"),
                    "ref_vs_ours_other": _div(other.get("reference"), other.get("mezo")),
                    "mem_mezo_vs_inf": _div(mem.get("mezo"), mem.get("inference")),
                    "mezo_extra_mib": (mem["mezo"] - mem["inference"])
                    if mem.get("mezo") is not None and mem.get("inference") is not None else None,
                    "mem_inplace_vs_inf": _div(mem.get("mezo-inplace"), mem.get("inference")),
                    "mem_bp_vs_mezo": _div(mem.get("backprop"), mem.get("mezo")),
                    "mem_bp_vs_inplace": _div(mem.get("backprop"), mem.get("mezo-inplace")),
                    "mem_bpckpt_vs_mezo": _div(mem.get("backprop-ckpt"), mem.get("mezo")),
                    "mem_ckpt_vs_bp": _div(mem.get("backprop-ckpt"), mem.get("backprop")),
                    # for explaining misses: what is in the MeZO and backprop peaks, and the forwards' times
                    "mezo_n_trainable": _f(m.get("mezo", {}).get("n_trainable")),
                    "mezo_over_base_mib": _f(m.get("mezo", {}).get("peak_over_base_mib")),
                    "bp_over_base_mib": _f(m.get("backprop", {}).get("peak_over_base_mib")),
                    "mezo_fwd_ms": fwd.get("mezo"), "inf_ms": t.get("inference"),
                    **_new_paths(t, mem, other, two)})
    return out


def _new_paths(t: dict, mem: dict, other: dict, two: float | None) -> dict:
    """The virtual and batched methods against inference, the master path and each other (module docstring)."""
    return {"virtual_vs_2fwd": _div(t.get(VIRTUAL), two),
            "t_virtual_vs_master": _div(t.get(VIRTUAL), t.get("mezo")),
            "virtual_other_ms": other.get(VIRTUAL),
            "mem_virtual_vs_inf": _div(mem.get(VIRTUAL), mem.get("inference")),
            "virtual_extra_mib": (mem[VIRTUAL] - mem["inference"])
            if mem.get(VIRTUAL) is not None and mem.get("inference") is not None else None,
            "mem_virtual_vs_master": _div(mem.get(VIRTUAL), mem.get("mezo")),
            "t_batched_vs_seq": _div(t.get("mezo-batched"), t.get(VIRTUAL)),
            "t_batched_vs_master": _div(t.get("mezo-batched"), t.get("mezo")),
            "batched_vs_2fwd": _div(t.get("mezo-batched"), two),
            "t_batched_n4_vs_n4": _div(t.get("mezo-batched-n4"), t.get("mezo-n4")),
            "t_n4_vs_n1_batched": _div(t.get("mezo-batched-n4"), t.get("mezo-batched")),
            "mem_batched_vs_inf": _div(mem.get("mezo-batched"), mem.get("inference")),
            "mem_batched_n4_vs_inf": _div(mem.get("mezo-batched-n4"), mem.get("inference"))}


def time_bound(device: str) -> float:
    return 1.05 if device == "cuda" else 1.10


def bound_of(t: Target, device: str) -> float | None:
    if t.bound is None:
        return time_bound(device)
    return t.bound.get(device) if isinstance(t.bound, dict) else t.bound


def applies(t: Target, ratio: dict, device: str) -> bool:
    return (ratio["mode"] in t.modes and (t.dtypes is None or ratio["dtype"] in t.dtypes)
            and bound_of(t, device) is not None)


def check(ratio: dict, key: str, device: str) -> bool | None:
    """True/False when ``key`` has a target for this configuration's mode, dtype and device and a value; None
    otherwise."""
    for t in TARGETS:
        if t.key == key and applies(t, ratio, device) and ratio.get(key) is not None:
            b, v = bound_of(t, device), ratio[key]
            return v <= b if t.op == "<=" else v >= b if t.op == ">=" else v > b
    return None


def _cell(ratio: dict, key: str, device: str, fmt: str) -> str:
    v = ratio.get(key)
    if v is None:
        return ""
    ok = check(ratio, key, device)
    return fmt.format(v) + ("" if ok is None else " ✓" if ok else " ✗")


TIME_COLUMNS = (  # (header, key, format)
    ("MeZO / 2 fwd", "mezo_vs_2fwd", "{:.2f}"), ("MeZO / its own 2 fwd", "mezo_vs_own_fwd", "{:.3f}"),
    ("MeZO non-fwd ms", "mezo_other_ms", "{:.1f}"), ("BP / MeZO", "t_bp_vs_mezo", "{:.2f}"),
    ("BP-ckpt / MeZO", "t_bpckpt_vs_mezo", "{:.2f}"), ("reference / ours", "ref_vs_ours", "{:.2f}"),
    ("reference / ours, equal fwd", "ref_vs_ours_eqfwd", "{:.3f}"), ("reference non-fwd ms", "ref_other_ms", "{:.1f}"),
    ("reference / ours, non-fwd", "ref_vs_ours_other", "{:.1f}"),
)
MEMORY_COLUMNS = (
    ("MeZO / inf", "mem_mezo_vs_inf", "{:.2f}"), ("MeZO − inf MiB", "mezo_extra_mib", "{:.0f}"),
    ("in-place MeZO / inf", "mem_inplace_vs_inf", "{:.2f}"), ("BP / MeZO", "mem_bp_vs_mezo", "{:.2f}"),
    ("BP / in-place MeZO", "mem_bp_vs_inplace", "{:.2f}"), ("BP-ckpt / MeZO", "mem_bpckpt_vs_mezo", "{:.2f}"),
    ("BP-ckpt / BP", "mem_ckpt_vs_bp", "{:.2f}"),
)
NEW_PATH_COLUMNS = (
    ("virtual / 2 fwd", "virtual_vs_2fwd", "{:.2f}"), ("virtual / master time", "t_virtual_vs_master", "{:.2f}"),
    ("virtual non-fwd ms", "virtual_other_ms", "{:.1f}"), ("virtual / inf mem", "mem_virtual_vs_inf", "{:.2f}"),
    ("virtual − inf MiB", "virtual_extra_mib", "{:.0f}"), ("virtual / master mem", "mem_virtual_vs_master", "{:.2f}"),
    ("batched / seq (n=1)", "t_batched_vs_seq", "{:.2f}"), ("batched / master", "t_batched_vs_master", "{:.2f}"),
    ("batched / 2 fwd", "batched_vs_2fwd", "{:.2f}"), ("batched-n4 / n4", "t_batched_n4_vs_n4", "{:.2f}"),
    ("batched-n4 / batched", "t_n4_vs_n1_batched", "{:.2f}"), ("batched / inf mem", "mem_batched_vs_inf", "{:.2f}"),
    ("batched-n4 / inf mem", "mem_batched_n4_vs_inf", "{:.2f}"),
)


def ratio_table(rs: list[dict], device: str, columns=TIME_COLUMNS) -> str:
    """One row per configuration; ✓/✗ after a value that has a target (met/missed)."""
    head = ("| model | mode | dtype | batch x seq | " + " | ".join(h for h, _, _ in columns) + " |\n"
            + "|---" * (4 + len(columns)) + "|\n")
    return head + "".join(
        f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']}x{r['seq']} | "
        + " | ".join(_cell(r, k, device, fmt) for _, k, fmt in columns) + " |\n" for r in rs)


def ratio_tables(rs: list[dict], device: str) -> str:
    out = ("Time ratios:\n\n" + ratio_table(rs, device, TIME_COLUMNS)
           + "\nMemory ratios (footprints):\n\n" + ratio_table(rs, device, MEMORY_COLUMNS))
    if any(r.get(k) is not None for r in rs for _, k, _ in NEW_PATH_COLUMNS):
        out += ("\nVirtual perturbation and batched ± (against inference and the fp32-master path "
                "`mezo-inplace-master`; time ratios of medians, memory of footprints):\n\n"
                + ratio_table(rs, device, NEW_PATH_COLUMNS))
    return out


def why(r: dict, key: str) -> str:
    """Where a missed target's memory or time goes, from the measured figures of the configuration."""
    n, el = r.get("mezo_n_trainable"), {"fp32": 4, "bf16": 2, "fp16": 2}.get(r["dtype"], 4)
    if key == "mem_mezo_vs_inf" and r.get("mezo_extra_mib") is not None:
        masters = f", fp32 masters 4 B x {n:.0f} = {4 * n / 2**20:.0f} MiB" if n and el < 4 else ""
        return f"MeZO - inference {r['mezo_extra_mib']:.0f} MiB{masters}"
    if key == "mem_bp_vs_mezo" and None not in (r.get("mezo_over_base_mib"), r.get("bp_over_base_mib")):
        state = f", of which grads + 2 AdamW moments {3 * el * n / 2**20:.0f} MiB" if n else ""
        return (f"over the weights: MeZO {r['mezo_over_base_mib']:.0f} MiB (activations, logits"
                + (", fp32 masters" if el < 4 else "") + f"), backprop {r['bp_over_base_mib']:.0f} MiB{state}")
    if key == "mem_virtual_vs_inf" and r.get("virtual_extra_mib") is not None:
        return f"virtual MeZO - inference {r['virtual_extra_mib']:.0f} MiB"
    if key == "t_virtual_vs_master" and r.get("virtual_other_ms") is not None and r.get("mezo_other_ms") is not None:
        return (f"non-forward part: virtual {r['virtual_other_ms']:.0f} ms, master {r['mezo_other_ms']:.0f} ms "
                "(the virtual part includes materialising each tensor in both passes)")
    if key == "mezo_vs_2fwd" and None not in (r.get("mezo_fwd_ms"), r.get("inf_ms"), r.get("mezo_other_ms")):
        return (f"forwards inside the step {r['mezo_fwd_ms']:.0f} ms vs 2 x {r['inf_ms']:.0f} ms measured alone, "
                f"non-forward part {r['mezo_other_ms']:.1f} ms")
    return ""


def target_summary(rs: list[dict], device: str) -> str:
    """One line per target: how many configurations met it, which missed and where the memory or time went; the
    reference speedup per mode."""
    lines = []
    for t in TARGETS:
        key = t.key
        if bound_of(t, device) is None:
            continue
        label = t.label.format(b=bound_of(t, device))
        done = [(r, check(r, key, device)) for r in rs if check(r, key, device) is not None]
        if not done and key not in ("mem_mezo_vs_inf", "mem_bp_vs_mezo", "mezo_vs_2fwd", "ref_vs_ours_eqfwd"):
            continue                # a new method's target, where the run left that method out
        missed = [f"{r['model']}/{r['mode']}/{r['dtype']}/{r['batch']}x{r['seq']} ({r[key]:.2f}"
                  + (f"; {why(r, key)})" if why(r, key) else ")") for r, ok in done if not ok]
        line = f"- {label}: met in {len(done) - len(missed)} of {len(done)} configurations"
        line += f"; missed: {', '.join(missed)}" if missed else ""
        alt = INPLACE_ALTERNATIVE.get(key)
        if alt:                             # the same target for MeZO without fp32 masters, where measured
            v = [(r[alt], check({**r, key: r[alt]}, key, device)) for r in rs
                 if r.get(alt) is not None and check(r, key, device) is not None]
            if v:
                line += (f" (in-place MeZO, no fp32 masters: met in {sum(ok for _, ok in v)} of {len(v)}, "
                         f"{min(x for x, _ in v):.2f}..{max(x for x, _ in v):.2f})")
        lines.append(line)
    for mode in ("lora", "full"):
        def span(key, fmt):
            v = [r[key] for r in rs if r["mode"] == mode and r.get(key) is not None]
            return f"{fmt.format(min(v))}x to {fmt.format(max(v))}x" if v else "n/a"
        if any(r["mode"] == mode and r.get("ref_vs_ours") is not None for r in rs):
            lines.append(f"- {mode}: the reference loop's step takes {span('ref_vs_ours_eqfwd', '{:.3f}')} ours at "
                         f"equal forwards ({span('ref_vs_ours', '{:.2f}')} as measured); its non-forward part "
                         f"{span('ref_vs_ours_other', '{:.1f}')} ours")
    return "\n".join(lines) + "\n"


def _num(v, fmt: str) -> str:
    x = _f(v)
    return "" if x is None else fmt.format(x)


def failure(r: dict) -> str:
    """'status: error' of a row that did not run ('skipped: needs ...' as the worker wrote it)."""
    st, err = str(r.get("status", "")), str(r.get("error", ""))
    return err if err.startswith(st) else f"{st}: {err}"


def result_table(rows: list[dict]) -> str:
    head = ("| model | mode | dtype | batch x seq | method | median ms | spread ms [min..max] | IQR ms | fwd ms | "
            "other ms | tokens/s | peak over base MiB | footprint MiB | status |\n" + "|---" * 14 + "|\n")
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        body.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']}x{r['seq']} | {r['method']} | "
                    + (f"{_num(r['median_ms'], '{:.1f}')} | "
                       f"{_num(r['min_ms'], '{:.1f}')}..{_num(r['max_ms'], '{:.1f}')} | "
                       f"{_num(r['iqr_ms'], '{:.1f}')} | {_num(r.get('fwd_ms'), '{:.1f}')} | "
                       f"{_num(r.get('other_ms'), '{:.1f}')} | {_num(r['tokens_per_s'], '{:.0f}')} | "
                       f"{_num(r['peak_over_base_mib'], '{:.0f}')} | {_num(r['footprint_mib'], '{:.0f}')} | ok |"
                       if ok else f" | | | | | | | | {failure(r).replace('|', '/')} |")
                    + "\n")
    return head + "".join(body)
