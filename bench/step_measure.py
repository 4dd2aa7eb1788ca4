"""Instruments of the step benchmark: peak memory over a baseline (CPU: RSS high-water mark; GPU: the caching
allocator's peak) and step timing (perf_counter on the CPU, CUDA events on a GPU) with its spread.

CPU peak memory: ``reset_peak`` returns free heap to the OS (``malloc_trim``: free but resident heap would otherwise
absorb a step's allocations unseen), resets the kernel's high-water mark (``/proc/self/clear_refs`` <- 5, proc(5),
Linux >= 4.0) and returns VmRSS as the baseline; ``read_peak`` returns VmHWM. GPU: ``reset_peak_memory_stats`` and
``memory_allocated`` as the baseline, then ``max_memory_allocated``.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable

import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    return _status_kb("VmHWM")


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter and return the baseline (bytes) that the peak will be measured over."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:                                   # free heap still counts in RSS and would hide a step's allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # proc(5): resets VmHWM to the current RSS
    return rss()


def read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss()


def time_steps(step: Callable[[], dict], warmup: int, reps: int, device: torch.device):
    """(seconds per timed step, each timed step's info). bench_perturb.timer fixes 2 warm-ups; here it is a knob,
    because one full-parameter reference step of a 1B model takes tens of seconds on a 2-core CPU."""
    for _ in range(warmup):
        step()
    times, infos = [], []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); infos.append(step()); b.record(); b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter(); infos.append(step()); times.append(time.perf_counter() - t0)
    return times, infos


def spread(times: list[float]) -> dict:
    """median, min, max, quartiles and IQR of ``times`` (seconds)."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), q1_s=q[0], q3_s=q[2],
                iqr_s=q[2] - q[0])
