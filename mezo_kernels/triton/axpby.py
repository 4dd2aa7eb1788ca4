"""The multi-tensor Triton kernel for one group plan (``docs/kernel_abi.md``), its launcher and availability.

One launch serves every tensor of a dtype group: program c reads ``(t, start) = chunks[c]`` and tensor t's
pointer / numel / base / master pointer from ``meta`` (int64, device-resident, built once per plan), casts the
int64 addresses to typed pointers, and updates elements ``[start, min(start + CHUNK, numel))``:

| MODE | effect (z = z(seed, base + i), fp32 math, one rounding to DTYPE) |
|------|-------------------------------------------------------------------|
| 0    | ``d = round(fma(z, beta, alpha * d))``                            |
| 1    | ``m' = fma(z, beta, alpha * m); m = m'; d = round(fma(z, gamma, m'))`` |
| 2    | ``d = round(fma(z, gamma, m))``                                   |
| 3    | ``d = round(z)`` (d is never read)                                |

Interpreter note (TRITON_INTERPRET=1, how CI runs this on CPU): the interpreter represents pointers as uint64
host addresses and ``int -> pointer`` casts as a bit reinterpretation, so ``meta`` entries holding
``tensor.data_ptr()`` of *CPU* tensors are directly loadable; masked loads/stores touch only unmasked lanes.
With CUDA tensors the same addresses are device pointers, which the interpreter cannot dereference, hence
``available()`` refuses that combination.

Compiled mode was checked without a GPU only by compiling every (MODE, DTYPE, ALIGNED) variant for sm_90 with
triton 3.9 (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``): no spills, 56-114 registers,
fma.rn.f32, sqrt.approx.ftz.f32, libdevice log/cos/sin, v4 loads/stores on the 16-byte-aligned path. Still to
verify on a GPU: the tests on CUDA tensors (triton 3.6 there), bit-identity with the CUDA kernel (which must use
logf/cosf/sinf, sqrt.approx.ftz.f32 and a non-ftz fmaf), and CHUNK / num_warps tuning against memory bandwidth.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .philox import interleave4, randn4x_counters, randn_at, seed_words

__all__ = ["CHUNK", "NUM_WARPS", "launch", "available"]

# Elements per program. 4096 with 8 warps = 256 threads x 16 elements = 4 Philox counters per thread: enough
# independent work per thread to hide memory latency and amortize the meta/chunks lookups, few enough registers
# (4 x 10 Philox rounds unrolled + Box-Muller) to keep occupancy high, and a small tail waste (< 4096 elements
# per tensor). A multiple of 4 as the ABI requires; a power of two because tl.arange needs one. Not tuned on a
# GPU yet (none was available when this was written): benchmark 2048/4096/8192 x 4/8 warps on an H100.
# Under the interpreter the chunk size only changes speed (numpy vectors per program), never results.
CHUNK = 4096
NUM_WARPS = 8
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MODES = (0, 1, 2, 3)
_MIN_VERSION = (3, 4)


@triton.jit
def _typed(addr, DTYPE: tl.constexpr):
    # int64 address -> typed pointer. Compiled: inttoptr; interpreter: reinterpretation as a uint64 host address.
    # (The dtype is chosen by constexpr branches on the ABI's dtype code rather than by passing a tl.dtype as a
    # constexpr argument, which older Triton versions do not accept.)
    if DTYPE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    return p


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even, with integer ops.

    Why not ``x.to(tl.bfloat16)``: compiled, that is cvt.rn (RTNE), but the interpreter (checked on 3.9) converts
    fp32 -> bf16 by *truncating* the mantissa, so CPU CI would disagree with the GPU and with torch. The integer
    version is exact on both; it costs a few ALU ops in a memory-bound kernel."""
    b = x.to(tl.uint32, bitcast=True)
    r = tl.add(b, 0x7FFF + ((b >> 16) & 1), sanitize_overflow=False)  # may wrap only for NaN, fixed below
    r = tl.where(x != x, b | 0x400000, r)  # NaN stays a (quiet) NaN instead of carrying into Inf
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _update(d, mp, z, mask, alpha, beta, gamma, MODE: tl.constexpr, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Apply MODE at pointers d (DTYPE) and mp (fp32 master) with fp32 normals z; mask only if MASKED.

    Every update is an explicit tl.fma: the default for fp contraction changes in Triton 3.10, and the CUDA/CPU
    backends use a true fma too. alpha * x is its own (rounded) fp32 product, as the ABI specifies."""
    if MODE == 3:
        out = z
    elif MODE == 0:
        if MASKED:
            x = tl.load(d, mask=mask).to(tl.float32)
        else:
            x = tl.load(d).to(tl.float32)
        out = tl.fma(z, beta, alpha * x)
    else:
        if MASKED:
            m = tl.load(mp, mask=mask)
        else:
            m = tl.load(mp)
        if MODE == 1:
            m = tl.fma(z, beta, alpha * m)
            if MASKED:
                tl.store(mp, m, mask=mask)
            else:
                tl.store(mp, m)
        out = tl.fma(z, gamma, m)
    # One rounding fp32 -> DTYPE, to nearest even (fp16: Triton's cast is RTNE compiled and interpreted).
    if DTYPE == 2:
        out = _round_bf16(out)
    else:
        out = out.to(d.dtype.element_ty)
    if MASKED:
        tl.store(d, out, mask=mask)
    else:
        tl.store(d, out)


@triton.jit(do_not_specialize=["num_tensors", "seed_lo", "seed_hi"])
def _axpby_kernel(meta_ptr, chunks_ptr, num_tensors, seed_lo, seed_hi, alpha, beta, gamma,
                  MODE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """meta: int64 [4, T] (ptr, numel, base, master ptr); chunks: int64 [C, 2] (t, start); grid = (C,).

    seed_lo/seed_hi: the uint64 seed's 32-bit halves as signed int32; alpha/beta/gamma: fp32 scalars.
    ALIGNED: every base of the group is a multiple of 4 (then so is base + start, starts being multiples of CHUNK)."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    nt = num_tensors.to(tl.int64)
    numel = tl.load(meta_ptr + nt + t)
    base = tl.load(meta_ptr + 2 * nt + t)
    addr = tl.load(meta_ptr + t)
    d = _typed(addr, DTYPE) + start                            # int64 scalar offset: no 32-bit overflow
    if MODE == 1 or MODE == 2:
        maddr = tl.load(meta_ptr + 3 * nt + t)
        mp = maddr.to(tl.pointer_type(tl.float32)) + start
    else:
        maddr = addr
        mp = d  # unused; keeps one code path (never dereferenced for modes 0 and 3)
    j = tl.arange(0, CHUNK)                                    # int32 offsets within the chunk
    if ALIGNED:
        # One Philox call per 4 elements; interleave the 4 normals into element order.
        k = ((base + start) >> 2) + tl.arange(0, CHUNK // 4)
        n0, n1, n2, n3 = randn4x_counters(k, seed_lo, seed_hi)
        z = interleave4(n0, n1, n2, n3, CHUNK)
    else:
        # Any base (sharded explicit bases): one Philox call per element, lane picked per element.
        z = randn_at(base + start + j, seed_lo, seed_hi)
    if start + CHUNK <= numel:
        # Addresses come from a table, so the compiler cannot know their alignment and would emit scalar accesses.
        # When both buffers are 16-byte aligned (the usual case: the caching allocator aligns storages; only views
        # with odd storage offsets are not) say so: each thread's 4 consecutive elements become one vector access
        # (checked in sm_90 PTX: ld/st.global.v4.b32). Starts are multiples of CHUNK, so d + j keeps that alignment.
        if ALIGNED and ((addr | maddr) & 15) == 0:
            _update(tl.multiple_of(d + j, 16), tl.multiple_of(mp + j, 16), z, None, alpha, beta, gamma, MODE, DTYPE,
                    False)
        else:
            _update(d + j, mp + j, z, None, alpha, beta, gamma, MODE, DTYPE, False)
    else:
        _update(d + j, mp + j, z, j < numel - start, alpha, beta, gamma, MODE, DTYPE, True)


def _interpreted() -> bool:
    """Were our kernels decorated in interpreter mode? (TRITON_INTERPRET is read at @triton.jit time.)"""
    return type(_axpby_kernel).__name__ == "InterpretedFunction"


def _version() -> tuple[int, int]:
    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())  # type: ignore[return-value]


def available(device: torch.device | str) -> str | None:
    """None when this backend can run on tensors of ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if _version() < _MIN_VERSION:
        return (f"triton {triton.__version__} is too old: >= 3.4 is required (older versions use a different "
                "generator for int64 offsets)")
    if _interpreted():
        if device.type != "cpu":
            return (f"TRITON_INTERPRET=1 runs kernels on the host and cannot dereference {device.type} pointers "
                    "from the plan tables; use CPU tensors or unset TRITON_INTERPRET")
        return None
    if device.type == "cpu":
        return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before mezo_kernels.triton "
                f"is first imported (now {os.environ.get('TRITON_INTERPRET')!r})")
    if device.type != "cuda":
        return f"serves CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    return None


def launch(meta: torch.Tensor, chunks: torch.Tensor, num_tensors: int, num_chunks: int, dtype: torch.dtype,
           mode: int, seed: int, alpha: float, beta: float, gamma: float, aligned: bool) -> None:
    """Run ``mode`` on every chunk of a group plan in one launch (in place; asynchronous on CUDA).

    meta: int64 [4, num_tensors], chunks: int64 [num_chunks, 2] built for chunk size ``CHUNK``, both C-contiguous on
    the tensors' device. dtype: float32/float16/bfloat16 (the tensors' dtype). seed: uint64 or negative int64.
    aligned: True only if every base is a multiple of 4 (selects the fast path; False is correct for any base)."""
    if dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode}")
    if meta.dtype != torch.int64 or tuple(meta.shape) != (4, num_tensors) or not meta.is_contiguous():
        raise ValueError(f"meta must be a contiguous int64 [4, {num_tensors}] tensor, got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    if chunks.dtype != torch.int64 or tuple(chunks.shape) != (num_chunks, 2) or not chunks.is_contiguous():
        raise ValueError(f"chunks must be a contiguous int64 [{num_chunks}, 2] tensor, got {chunks.dtype} "
                         f"{tuple(chunks.shape)}")
    if meta.device != chunks.device:
        raise ValueError(f"meta is on {meta.device} but chunks on {chunks.device}")
    why = available(meta.device)
    if why is not None:
        raise RuntimeError(f"triton backend unavailable for {meta.device}: {why}")
    if num_chunks == 0:
        return
    lo, hi = seed_words(seed)
    kernel = _axpby_kernel[(num_chunks,)]
    args = (meta, chunks, num_tensors, lo, hi, float(alpha), float(beta), float(gamma))
    consts = dict(MODE=mode, DTYPE=_DTYPES[dtype], ALIGNED=bool(aligned), CHUNK=CHUNK, num_warps=NUM_WARPS)
    if meta.device.type == "cuda":
        with torch.cuda.device(meta.device):  # Triton launches on the current device's current stream
            kernel(*args, **consts)
    else:
        kernel(*args, **consts)
