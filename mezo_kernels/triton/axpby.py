"""The multi-tensor Triton kernel for one group plan (``docs/kernel_abi.md``), its launcher and availability.

One launch serves every tensor of a dtype group: program c reads ``(t, start) = chunks[c]`` and tensor t's
pointer / numel / base / master pointer from ``meta`` (int64, device-resident, built once per plan), casts the
int64 addresses to typed pointers, and updates elements ``[start, min(start + CHUNK, numel))`` as the kernel mode
says (``rng.KernelMode``: codes and effects). Mode and dtype codes are the spec's, read as ``tl.constexpr`` globals.

Interpreter note (TRITON_INTERPRET=1, how CI runs this on CPU): the interpreter represents pointers as uint64
host addresses and ``int -> pointer`` casts as a bit reinterpretation, so ``meta`` entries holding
``tensor.data_ptr()`` of *CPU* tensors are directly loadable; masked loads/stores touch only unmasked lanes.
With CUDA tensors the same addresses are device pointers, which the interpreter cannot dereference, hence
``available()`` refuses that combination.

Compiled for sm_90 (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` needs no GPU), every
(MODE, DTYPE, ALIGNED) variant uses fma.rn.f32, sqrt.approx.ftz.f32, libdevice log/cos/sin and, on the 16-byte
aligned path, v4 loads/stores. The CUDA kernel uses the same operations (logf/cosf/sinf, sqrt.approx.ftz.f32, a
non-ftz fmaf), which is what lets the two backends agree bit for bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _compat
from .. import rng
from .philox import interleave4, randn4x_counters, randn8_counters, randn_at, signed_words, stream_bits
from .rounding import round_nearest, sround

__all__ = ["CHUNK", "NUM_WARPS", "launch", "available"]

# Elements per program. 4096 with 8 warps = 256 threads x 16 elements = 4 Philox counters per thread: enough
# independent work per thread to hide memory latency and amortize the meta/chunks lookups, few enough registers
# (4 x 10 Philox rounds unrolled + Box-Muller) to keep occupancy high, and a small tail waste (< 4096 elements
# per tensor). A multiple of 4 as the ABI requires; a power of two because tl.arange needs one. A reasoned
# default, not a measured optimum: 2048/4096/8192 x 4/8 warps are the candidates to time against copy bandwidth.
# Under the interpreter the chunk size only changes speed (numpy vectors per program), never results.
CHUNK = 4096
NUM_WARPS = 8
_MIN_VERSION = (3, 4)
_MASK32 = 0xFFFFFFFF
_MODES = frozenset(map(int, rng.KernelMode))
_DISTS = frozenset(map(int, rng.Distribution))

_AXPBY = tl.constexpr(int(rng.KernelMode.AXPBY))
_MASTER_UPDATE = tl.constexpr(int(rng.KernelMode.MASTER_UPDATE))
_MASTER_VIEW = tl.constexpr(int(rng.KernelMode.MASTER_VIEW))
_FILL = tl.constexpr(int(rng.KernelMode.FILL))
_OUT = tl.constexpr(int(rng.KernelMode.OUT))
_AXPBY_SR = tl.constexpr(int(rng.KernelMode.AXPBY_SR))
_GAUSSIAN = tl.constexpr(int(rng.Distribution.GAUSSIAN))
_SIGN = tl.constexpr(int(rng.Distribution.SIGN))
_SIGN_GROUP = tl.constexpr(rng.SIGN_GROUP)
_SR_GROUP = tl.constexpr(rng.SR_GROUP)
_FLOAT32 = tl.constexpr(int(rng.DTypeCode.FLOAT32))
_FLOAT16 = tl.constexpr(int(rng.DTypeCode.FLOAT16))
_BFLOAT16 = tl.constexpr(int(rng.DTypeCode.BFLOAT16))


@triton.jit
def _typed(addr, DTYPE: tl.constexpr):
    # int64 address -> typed pointer. Compiled: inttoptr; interpreter: reinterpretation as a uint64 host address.
    # (The dtype is chosen by constexpr branches on the ABI's dtype code rather than by passing a tl.dtype as a
    # constexpr argument, which older Triton versions do not accept.)
    if DTYPE == _FLOAT32:
        p = addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == _FLOAT16:
        p = addr.to(tl.pointer_type(tl.float16))
    else:
        tl.static_assert(DTYPE == _BFLOAT16, "dtype code without a pointer type")
        p = addr.to(tl.pointer_type(tl.bfloat16))
    return p


@triton.jit
def _update(d, mp, z, r, mask, alpha, beta, gamma, MODE: tl.constexpr, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """Apply MODE at pointers d (DTYPE) and mp (fp32 master, or the DTYPE source of mode OUT) with fp32
    directions z; r: the uint32 rounding bits of mode AXPBY_SR (unused otherwise); mask only if MASKED.

    Every update is an explicit tl.fma: the default for fp contraction changes in Triton 3.10, and the CUDA/CPU
    backends use a true fma too. alpha * x is its own (rounded) fp32 product, as the ABI specifies."""
    if MODE == _FILL:
        out = z
    elif MODE == _AXPBY or MODE == _AXPBY_SR or MODE == _OUT:
        if MODE == _OUT:
            src = mp
        else:
            src = d
        if MASKED:
            x = tl.load(src, mask=mask).to(tl.float32)
        else:
            x = tl.load(src).to(tl.float32)
        out = tl.fma(z, beta, alpha * x)
    else:
        tl.static_assert(MODE == _MASTER_UPDATE or MODE == _MASTER_VIEW, "kernel mode without an implementation")
        if MASKED:
            m = tl.load(mp, mask=mask)
        else:
            m = tl.load(mp)
        if MODE == _MASTER_UPDATE:
            m = tl.fma(z, beta, alpha * m)
            if MASKED:
                tl.store(mp, m, mask=mask)
            else:
                tl.store(mp, m)
        out = tl.fma(z, gamma, m)
    # One rounding fp32 -> DTYPE: stochastic in AXPBY_SR (fp16/bf16), else to nearest even.
    if MODE == _AXPBY_SR and DTYPE != _FLOAT32:
        out = sround(out, r, DTYPE)
    else:
        out = round_nearest(out, DTYPE)
    if MASKED:
        tl.store(d, out, mask=mask)
    else:
        tl.store(d, out)


@triton.jit(do_not_specialize=["num_tensors", "seed_lo", "seed_hi", "sr_lo", "sr_hi"])
def _axpby_kernel(meta_ptr, chunks_ptr, num_tensors, seed_lo, seed_hi, sr_lo, sr_hi, alpha, beta, gamma,
                  MODE: tl.constexpr, DTYPE: tl.constexpr, DIST: tl.constexpr, ALIGNED: tl.constexpr,
                  CHUNK: tl.constexpr):
    """meta: int64 [4, T] (ptr, numel, base, master/source ptr); chunks: int64 [C, 2] (t, start); grid = (C,).

    seed_lo/seed_hi: the uint64 seed's 32-bit halves as signed int32 (sr_lo/sr_hi: those of rng.sr_seed(seed),
    read by AXPBY_SR only); alpha/beta/gamma: fp32 scalars. DIST: distribution code.
    ALIGNED: every base of the group is a multiple of 4 (then so is base + start, starts being multiples of CHUNK);
    when False, each chunk looks at its own tensor's base."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    nt = num_tensors.to(tl.int64)
    numel = tl.load(meta_ptr + nt + t)
    base = tl.load(meta_ptr + 2 * nt + t)
    addr = tl.load(meta_ptr + t)
    d = _typed(addr, DTYPE) + start                            # int64 scalar offset: no 32-bit overflow
    if MODE == _MASTER_UPDATE or MODE == _MASTER_VIEW:
        maddr = tl.load(meta_ptr + 3 * nt + t)
        mp = maddr.to(tl.pointer_type(tl.float32)) + start
    elif MODE == _OUT:
        maddr = tl.load(meta_ptr + 3 * nt + t)
        mp = _typed(maddr, DTYPE) + start                      # the source: read, never written
    else:
        maddr = addr
        mp = d  # unused; keeps one code path (never dereferenced by the modes without a master)
    j = tl.arange(0, CHUNK)                                    # int32 offsets within the chunk
    if DIST == _SIGN:
        # 128 elements per Philox call, any base: the row layout of stream_bits handles the offset (so the vector
        # accesses need only 16-byte aligned buffers, whatever the base)
        z = 1.0 - 2.0 * stream_bits(base + start, seed_lo, seed_hi, CHUNK // _SIGN_GROUP, _SIGN_GROUP, 1
                                    ).to(tl.float32)
        r = _sr_bits(base + start, sr_lo, sr_hi, j, MODE, DTYPE, CHUNK)
        _window(d, mp, z, r, start, numel, addr, maddr, alpha, beta, gamma, MODE, DTYPE, CHUNK)
    else:
        tl.static_assert(DIST == _GAUSSIAN, "distribution without an implementation")
        # One Philox call per 4 elements, on a window of CHUNK elements whose global indices start at the multiple
        # of 4 at or below base + start: window element e is tensor element start - o + e. With o = 0 (every
        # tensor of an ALIGNED group; per tensor otherwise) the window is the chunk. With o > 0 the windows of a
        # tensor's chunks still tile it, shifted by -o; its last chunk has up to 3 elements past its window, done
        # by the per-element path.
        # Hot path: o = 0, a full chunk, both buffers 16-byte aligned (the usual case: the caching allocator aligns
        # storages; only views with odd storage offsets are not). Addresses come from a table, so the compiler
        # cannot know their alignment: saying so (multiple_of, on values made here: a hint on a callee's argument
        # is lost) turns each thread's consecutive elements into vector accesses. Starts are multiples of CHUNK,
        # so d + j keeps that alignment.
        # z is computed inside each branch: the scalar accesses of the cold branch want another register layout,
        # and a z shared by both branches would be converted to it (through shared memory) on the hot path too.
        hot = (start + CHUNK <= numel) & (((addr | maddr) & 15) == 0)
        if ALIGNED:
            o = 0
        else:
            o = base & 3
            hot = hot & (o == 0)
        if hot:
            z = _z_window(base + start, seed_lo, seed_hi, DTYPE, CHUNK)
            r = _sr_bits(base + start, sr_lo, sr_hi, j, MODE, DTYPE, CHUNK)
            _update(tl.multiple_of(d + j, 16), tl.multiple_of(mp + j, 16), z, r, None, alpha, beta, gamma, MODE,
                    DTYPE, False)
        else:
            first = start - o
            z = _z_window(base + first, seed_lo, seed_hi, DTYPE, CHUNK)
            r = _sr_bits(base + first, sr_lo, sr_hi, j, MODE, DTYPE, CHUNK)
            # int32 bounds (in [0, CHUNK]): per-element compares in 32 bits
            lim = tl.minimum(numel - first, CHUNK).to(tl.int32)
            if ALIGNED:
                mask = j < lim
            else:
                mask = (j >= tl.maximum(-first, 0).to(tl.int32)) & (j < lim)
            _update(d - o + j, mp - o + j, z, r, mask, alpha, beta, gamma, MODE, DTYPE, True)
            if not ALIGNED:
                if (numel - start > CHUNK - o) & (numel - start <= CHUNK):
                    # the last chunk, 1..3 elements past its window: global indices base + first + CHUNK + e
                    e = tl.arange(0, _SR_GROUP)
                    tail = first + CHUNK
                    zt = randn_at(base + tail + e, seed_lo, seed_hi)
                    rt = _sr_bits(base + tail, sr_lo, sr_hi, e, MODE, DTYPE, _SR_GROUP)
                    _update(d - o + CHUNK + e, mp - o + CHUNK + e, zt, rt, tail + e < numel, alpha, beta, gamma,
                            MODE, DTYPE, True)


@triton.jit
def _z_window(g0, seed_lo, seed_hi, DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    """fp32 z[g0 : g0 + CHUNK] for int64 g0 a multiple of 4, in the register layout of DTYPE's 16-byte accesses:
    4 consecutive elements (one counter) per thread for fp32, 8 (two counters) for 16-bit dtypes."""
    if DTYPE == _FLOAT32:
        k = (g0 >> 2) + tl.arange(0, CHUNK // 4)
        n0, n1, n2, n3 = randn4x_counters(k, seed_lo, seed_hi)
        z = interleave4(n0, n1, n2, n3, CHUNK)
    else:
        z = randn8_counters((g0 >> 2) + 2 * tl.arange(0, CHUNK // 8), seed_lo, seed_hi)
    return z


@triton.jit
def _sr_bits(g0, sr_lo, sr_hi, j, MODE: tl.constexpr, DTYPE: tl.constexpr, N: tl.constexpr):
    """The N rounding bits of global indices g0.. for mode AXPBY_SR on fp16/bf16; j (unused) otherwise."""
    if MODE == _AXPBY_SR and DTYPE != _FLOAT32:
        r = stream_bits(g0, sr_lo, sr_hi, N // _SR_GROUP, _SR_GROUP, 16)
    else:
        r = j
    return r


@triton.jit
def _window(d, mp, z, r, start, numel, addr, maddr, alpha, beta, gamma, MODE: tl.constexpr, DTYPE: tl.constexpr,
            CHUNK: tl.constexpr):
    """_update on the chunk at d / mp (tensor elements start .. start + CHUNK - 1, masked past numel) with the
    directions z; vector accesses when both buffers are 16-byte aligned (addr / maddr: their addresses)."""
    j = tl.arange(0, CHUNK)
    if start + CHUNK <= numel:
        if ((addr | maddr) & 15) == 0:
            _update(tl.multiple_of(d + j, 16), tl.multiple_of(mp + j, 16), z, r, None, alpha, beta, gamma, MODE,
                    DTYPE, False)
        else:
            _update(d + j, mp + j, z, r, None, alpha, beta, gamma, MODE, DTYPE, False)
    else:
        _update(d + j, mp + j, z, r, j < numel - start, alpha, beta, gamma, MODE, DTYPE, True)


def _interpreted() -> bool:
    """Were our kernels decorated in interpreter mode? (TRITON_INTERPRET is read at @triton.jit time.)"""
    return _compat.triton_interpreting(_axpby_kernel)


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
           mode: int, seed: int, alpha: float, beta: float, gamma: float, aligned: bool, dist: int = 0) -> None:
    """Run ``mode`` on every chunk of a group plan in one launch (in place; asynchronous on CUDA).

    meta: int64 [4, num_tensors], chunks: int64 [num_chunks, 2] built for chunk size ``CHUNK``, both C-contiguous on
    the tensors' device. dtype: float32/float16/bfloat16 (the tensors' dtype). seed: an int in [0, 2**64), as the
    public API checked it (``rng.check_seed``), not validated again. aligned: True only if every base is a multiple
    of 4 (compiles the counter path alone); False is correct for any base, and still takes the counter path for
    each tensor whose base is a multiple of 4. dist: a ``rng.Distribution`` code (0 gaussian, 1 rademacher signs)."""
    assert isinstance(seed, int) and 0 <= seed < 1 << 64, f"seed {seed!r} was not checked by the caller"
    if dtype not in rng.DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of {', '.join(map(str, rng.DTYPE_CODES))}")
    if isinstance(mode, bool) or mode not in _MODES:
        codes = ", ".join(f"{m.name}={int(m)}" for m in rng.KernelMode)
        raise ValueError(f"mode must be a kernel mode code ({codes}), got {mode!r}")
    if isinstance(dist, bool) or dist not in _DISTS:
        codes = ", ".join(f"{d.name}={int(d)}" for d in rng.Distribution)
        raise ValueError(f"dist must be a distribution code ({codes}), got {dist!r}")
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
    lo, hi = signed_words(seed & _MASK32, seed >> 32)
    sr = rng.sr_seed(seed) if mode == rng.KernelMode.AXPBY_SR else 0     # the SR stream's key: AXPBY_SR only
    sr_lo, sr_hi = signed_words(sr & _MASK32, sr >> 32)
    kernel = _axpby_kernel[(num_chunks,)]
    args = (meta, chunks, num_tensors, lo, hi, sr_lo, sr_hi, float(alpha), float(beta), float(gamma))
    consts = dict(MODE=int(mode), DTYPE=int(rng.DTYPE_CODES[dtype]), DIST=int(dist), ALIGNED=bool(aligned),
                  CHUNK=CHUNK, num_warps=NUM_WARPS)
    if meta.device.type == "cuda":
        with torch.cuda.device(meta.device):  # Triton launches on the current device's current stream
            kernel(*args, **consts)
    else:
        kernel(*args, **consts)
