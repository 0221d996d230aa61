"""Helpers of the benchmark: logging, memory sampling, clocks, number formatting."""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
STAGES = ("slice_localization", "brain_generalization", "flow_generation", "mrngan")


# ------------------------------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> float:
    """Current resident set of this process (MiB); the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory during a block. CPU: sampled RSS (MiB, ``peak`` and ``growth`` over the start);
    CUDA: ``torch.cuda.max_memory_allocated`` (MiB, ``peak``; ``growth`` over what was allocated at the start)."""

    def __init__(self, device: str, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak = self.growth = float("nan")
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_rss = max(self._peak_rss, rss_mib())

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
        else:
            self._start = self._peak_rss = rss_mib()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak_rss, rss_mib())
        self.growth = self.peak - self._start

    def as_dict(self) -> dict:
        kind = "cuda_max_allocated" if self.device.startswith("cuda") else "process_rss_sampled"
        return {"kind": kind, "peak_mib": round(self.peak, 1), "growth_mib": round(self.growth, 1)}


class Clock:
    """Accumulated wall time and number of calls of wrapped callables (synchronising CUDA around each)."""

    def __init__(self, device: str) -> None:
        self.device, self.total, self.calls = device, 0.0, 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.total += time.perf_counter() - t0
                self.calls += 1

        return timed


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"
