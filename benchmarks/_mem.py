"""Peak memory of one benchmark row, measured in the benchmark's own process.

``ru_maxrss`` only grows over a process's life, so a later row would inherit an earlier row's
peak. On Linux the peak-RSS counter (VmHWM, which ``getrusage(RUSAGE_SELF).ru_maxrss`` also reads)
can be reset by writing ``5`` to ``/proc/self/clear_refs``; :class:`PeakMemory` resets it before
the row and reads it afterwards, so ``peak_rss_mib`` is the largest resident set reached *during*
the row (including what was resident before it: the data, the model, the interpreter), and
``rss_increase_mib`` = peak − resident set at the start of the row. Where the reset is not
permitted, the increase is measured against the monotone ``ru_maxrss`` instead and
``peak_reset`` is False (the peak is then an upper bound). On CUDA, the peak of
``torch.cuda.max_memory_allocated`` during the row is recorded as ``cuda_peak_mib``.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

MiB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.record()`` → dict of MiB values."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def __enter__(self) -> PeakMemory:
        self.start_kib = _status_kib("VmRSS") or _maxrss_kib()
        self.reset = _reset_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.reset else None
        self.peak_kib = peak if peak is not None else _maxrss_kib()
        self.cuda_peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def record(self) -> dict:
        out = {"peak_rss_mib": round(self.peak_kib / 1024, 1),
               "rss_increase_mib": round(max(0, self.peak_kib - self.start_kib) / 1024, 1),
               "peak_reset": self.reset}
        if self.cuda_peak is not None:
            out["cuda_peak_mib"] = round(self.cuda_peak / MiB, 1)
            out["cuda_increase_mib"] = round((self.cuda_peak - self.cuda_start) / MiB, 1)
        return out


def best_of_runs(fn, repeat: int, device: str) -> tuple[float, object, dict]:
    """(best wall seconds of ``repeat`` calls of ``fn``, its last result, the peak-memory record
    of the call with the largest peak RSS)."""
    best, out, mem = float("inf"), None, {}
    for _ in range(repeat):
        out = None
        with PeakMemory(device) as m:
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        rec = m.record()
        if not mem or rec["peak_rss_mib"] > mem["peak_rss_mib"]:
            mem = rec
    return best, out, mem
