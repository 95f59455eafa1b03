"""Wall time and peak memory of a block of work, on CUDA or on the CPU."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil
import torch

__all__ = ["Measurement", "best_of", "measure"]


@dataclass
class Measurement:
    """Filled in when the ``with measure(...)`` block ends.

    Attributes:
        seconds: wall time of the block.
        peak_bytes: on CUDA, the allocator's peak during the block; on the CPU, the largest
            resident set size (RSS) of this process seen during the block, sampled every
            ``interval`` seconds.
        kind: ``"cuda_allocated"`` or ``"cpu_rss"``, so that a reader knows which one it is.
        start_bytes: the same quantity when the block started; ``added_bytes`` is the growth.
    """

    seconds: float = 0.0
    peak_bytes: int = 0
    kind: str = "cpu_rss"
    start_bytes: int = 0

    @property
    def added_bytes(self) -> int:
        """How far the peak rose above the level at the start of the block."""
        return max(0, self.peak_bytes - self.start_bytes)

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_memory_gb": round(self.peak_bytes / 1e9, 4), "memory_kind": self.kind}


@contextmanager
def measure(device: str | torch.device = "cpu", interval: float = 0.01) -> Iterator[Measurement]:
    """``with measure("cuda:0") as m: ...`` then read ``m.seconds`` and ``m.peak_bytes``.

    PyTorch keeps no allocation statistics for the CPU, so there the process's RSS is sampled by a
    background thread; a peak shorter than ``interval`` can be missed.
    """
    device = torch.device(device)
    m = Measurement(kind="cuda_allocated" if device.type == "cuda" else "cpu_rss")
    stop = threading.Event()
    sampler = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.start_bytes = int(torch.cuda.memory_allocated(device))
    else:
        process = psutil.Process()
        m.peak_bytes = m.start_bytes = process.memory_info().rss

        def sample() -> None:
            while not stop.wait(interval):
                m.peak_bytes = max(m.peak_bytes, process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    try:
        yield m
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            m.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        m.seconds = time.perf_counter() - start
        if sampler is not None:
            stop.set()
            sampler.join()
            m.peak_bytes = max(m.peak_bytes, psutil.Process().memory_info().rss)


def best_of(fn, device: str | torch.device = "cpu", repeats: int = 3) -> tuple[float, int]:
    """Benchmark helper: the fastest of ``repeats`` calls of ``fn`` after one warm-up call
    (allocator, kernels, cached weights, compilation), in seconds, and the peak memory that the
    calls, warm-up included, added in bytes (see :func:`measure`). The warm-up counts for memory:
    a CPU process keeps what it freed, so the timed calls alone would show almost no rise."""
    device = torch.device(device)
    times = []
    with measure(device, interval=0.002) as m:
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times), m.added_bytes
