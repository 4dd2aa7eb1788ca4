"""The C++ view of the spec: ``emit_header()`` is the text of ``csrc/spec_codes.h``.

``python tools/gen_spec_header.py`` writes it; tests/test_spec_codes.py keeps file, spec module and the built
extensions equal. Every value comes from ``mezo_kernels.rng``.
"""
from __future__ import annotations

import enum

from .philox import (PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, SIGN_GROUP, SPLITMIX_GOLDEN,
                     SPLITMIX_M1, SPLITMIX_M2, SR_GROUP, SR_SEED_XOR, TWO_PI_F32, U_MIN_F32, UNIFORM_SCALE,
                     UNIFORM_SCALE_BITS, Distribution, DTypeCode, KernelMode)

__all__ = ["HEADER_PATH", "emit_header"]

HEADER_PATH = "csrc/spec_codes.h"          # relative to the repository root


def _cpp_f32(x: float) -> str:
    """An exact C++ float literal (hex) for a float32 value held in a Python float."""
    mant, exp = float(x).hex().split("p")
    return f"{mant.rstrip('0').rstrip('.')}p{exp}f"


def _cpp_name(prefix: str, member: enum.Enum) -> str:
    return prefix + "".join(part.capitalize() for part in member.name.split("_"))


def _cpp_codes(title: str, table: type[enum.IntEnum], prefix: str, describe, label) -> list[str]:
    codes = [int(m) for m in table]
    if codes != list(range(len(codes))):
        raise ValueError(f"{table.__name__} codes must be 0, 1, ... in order, got {codes}")
    lines = [f"// {title}"]
    lines += [f"constexpr int {_cpp_name(prefix, m)} = {int(m)};  // {describe(m)}" for m in table]
    lines.append(f"constexpr int kNum{prefix[1:]}s = {len(codes)};")
    names = ", ".join(f'"{label(m)}"' for m in table)
    lines.append(f"constexpr const char* k{prefix[1:]}Names[kNum{prefix[1:]}s] = {{{names}}};  // indexed by code")
    return lines


def emit_header() -> str:
    """The text of ``csrc/spec_codes.h``: this module's shared codes as C++ constants, for g++ and nvcc alike."""
    masters = " || ".join(f"mode == {_cpp_name('kMode', m)}" for m in KernelMode if m.uses_master) or "false"
    sources = " || ".join(f"mode == {_cpp_name('kMode', m)}" for m in KernelMode if m.uses_source) or "false"
    lines = [
        "// Generated from mezo_kernels/rng/ by `python tools/gen_spec_header.py`; do not edit.",
        "// The spec's shared codes for the C++ and CUDA backends; tests/test_spec_codes.py checks this file",
        "// against mezo_kernels/rng.py and against the values compiled into the extensions.",
        "#pragma once", "", "#include <cstdint>", "",
        "#if defined(__CUDACC__)", "#define MEZO_SPEC_HD __host__ __device__", "#else", "#define MEZO_SPEC_HD",
        "#endif", "", "namespace mezo {", "",
        "// Philox4x32-10 (docs/rng_spec.md)",
        f"constexpr uint32_t kPhiloxM0 = 0x{PHILOX_M0:08X}u;  // round multiplier of counter word 0",
        f"constexpr uint32_t kPhiloxM1 = 0x{PHILOX_M1:08X}u;  // round multiplier of counter word 2",
        f"constexpr uint32_t kPhiloxW0 = 0x{PHILOX_W0:08X}u;  // key schedule: golden ratio",
        f"constexpr uint32_t kPhiloxW1 = 0x{PHILOX_W1:08X}u;  // key schedule: sqrt(3) - 1",
        f"constexpr int kPhiloxRounds = {PHILOX_ROUNDS};", "",
        "// Uniform and Box-Muller; fp32 values as exact hex literals",
        f"constexpr uint32_t kUniformScaleBits = 0x{UNIFORM_SCALE_BITS:08X}u;",
        f"constexpr float kUniformScale = {_cpp_f32(UNIFORM_SCALE)};  // {UNIFORM_SCALE:.8g}",
        f"constexpr float kTwoPiF = {_cpp_f32(TWO_PI_F32)};  // {TWO_PI_F32:.8g}",
        f"constexpr float kUMinF = {_cpp_f32(U_MIN_F32)};  // {U_MIN_F32:.8g}", "",
        *_cpp_codes("Kernel modes (docs/kernel_abi.md)", KernelMode, "kMode", lambda m: m.effect, lambda m: m.name),
        "// The mode reads the fp32 master copy (meta[3] must be non-null).",
        "MEZO_SPEC_HD constexpr bool mode_uses_master(int mode) {", f"  return {masters};", "}",
        "// The mode reads a source tensor of the group's dtype at meta[3] (non-null); it never writes it.",
        "MEZO_SPEC_HD constexpr bool mode_uses_source(int mode) {", f"  return {sources};", "}", "",
        *_cpp_codes("Direction distributions (the dist code of a launch)", Distribution, "kDist",
                    lambda d: d.label, lambda d: d.label),
        f"constexpr int kSignGroup = {SIGN_GROUP};  // sign stream: elements per Philox call, counter k = g / 128",
        "", "// Stochastic rounding (mode AXPBY_SR): Philox at key(sr_seed(seed)), counter k = g / 8, 16 bits each",
        f"constexpr int kSrGroup = {SR_GROUP};",
        f"constexpr uint64_t kSrSeedXor = 0x{SR_SEED_XOR:016X}ull;  // \"SR_ROUND\"",
        f"constexpr uint64_t kSplitmixGolden = 0x{SPLITMIX_GOLDEN:016X}ull;",
        f"constexpr uint64_t kSplitmixM1 = 0x{SPLITMIX_M1:016X}ull;",
        f"constexpr uint64_t kSplitmixM2 = 0x{SPLITMIX_M2:016X}ull;",
        "MEZO_SPEC_HD constexpr uint64_t splitmix64(uint64_t x) {",
        "  x += kSplitmixGolden;", "  x = (x ^ (x >> 30)) * kSplitmixM1;", "  x = (x ^ (x >> 27)) * kSplitmixM2;",
        "  return x ^ (x >> 31);", "}",
        "MEZO_SPEC_HD constexpr uint64_t sr_seed(uint64_t seed) { return splitmix64(seed ^ kSrSeedXor); }", "",
        *_cpp_codes("Element type codes", DTypeCode, "kDType", lambda m: m.name.lower(), lambda m: m.name.lower()),
        "",
        "}  // namespace mezo", "",
    ]
    return "\n".join(lines)
