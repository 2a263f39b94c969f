"""Cost of generation: seconds per call / per image, peak memory, and storage a method adds.

CPU peak memory is the process's resident set size sampled every few ms while the function runs
(/proc/self/statm), because torch's CPU tensors are invisible to tracemalloc and ru_maxrss is a
lifetime high-water mark that cannot be reset between measurements. On CUDA it is
torch.cuda.max_memory_allocated after a reset (allocator-visible memory only).
"""
from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Timing:
    seconds: list[float]
    mean_s: float
    std_s: float
    min_s: float
    per_image_s: float
    images_per_call: int
    peak_memory_bytes: int          # CPU: peak RSS from the warm-up on; CUDA: max allocated in the timed calls
    memory_increase_bytes: int      # peak minus the value before the warm-up (CPU) / the first timed call (CUDA)
    device: str
    memory_method: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak (KiB on Linux/BSD, bytes on macOS)
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if os.uname().sysname == "Darwin" else r * 1024


class _RssSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_evt = interval, current_rss(), threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop_evt.wait(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        self.peak = max(self.peak, current_rss())
        return self.peak


def time_generation(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, images_per_call: int = 1,
                    device: str | None = None) -> Timing:
    """Time `fn()` `repeats` times after `warmup` untimed calls (first-call compilation/allocation excluded).

    device: 'cuda' synchronises around each call and reads CUDA peak memory; default: cuda if available.
    """
    import torch

    if repeats < 1 or images_per_call < 1:
        raise ValueError(f"repeats ({repeats}) and images_per_call ({images_per_call}) must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:
        # The RSS baseline is taken before the warm-up and sampled through it: an allocator that keeps
        # the warm-up's freed memory (glibc does, below its mmap threshold) would otherwise hide the
        # call's footprint from a baseline read after it.
        sampler = _RssSampler()
        base = sampler.peak
        sampler.start()
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    secs = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            secs.append(time.perf_counter() - t0)
    finally:
        peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    mean = statistics.fmean(secs)
    return Timing(secs, mean, statistics.stdev(secs) if len(secs) > 1 else 0.0, min(secs), mean / images_per_call,
                  images_per_call, int(peak), int(peak - base), device,
                  "torch.cuda.max_memory_allocated" if cuda else "peak RSS sampled from /proc/self/statm",
                  {"repeats": repeats, "warmup": warmup, "torch_threads": torch.get_num_threads()})


def storage_bytes(obj) -> int:
    """Bytes a method adds: a file, a folder (all files), a torch module's parameters+buffers, or a tensor dict."""
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        raise FileNotFoundError(f"{p} does not exist")
    if hasattr(obj, "parameters"):
        return sum(t.numel() * t.element_size() for t in list(obj.parameters()) + list(obj.buffers()))
    if isinstance(obj, dict):
        return sum(t.numel() * t.element_size() for t in obj.values())
    raise TypeError(f"cannot size a {type(obj).__name__}")
