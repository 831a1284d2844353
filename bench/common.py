"""What every benchmark shares: timing (warm-up excluded, best and median of repeats) and the rows of
``BENCHMARKS.md``. Each benchmark module under ``bench/`` has ``run(quick: bool) -> list[Row]``; ``bench/run.py``
runs them in one process, with the same threads, and writes the table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls (after the warm-up calls): the best and the median."""

    min_s: float
    median_s: float
    repeats: int

    def __str__(self) -> str:
        return f"{seconds(self.min_s)} (median {seconds(self.median_s)}, {self.repeats} runs)"


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` calls first, not counted, then ``repeats`` timed calls. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock reading, so queued GPU work is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), repeats)


def seconds(value: float) -> str:
    """A duration for the table: µs, ms or s with three significant digits."""
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


@dataclass(frozen=True)
class Row:
    """One line of ``BENCHMARKS.md``."""

    what: str  # what is measured, with its size ("LogSoftmaxLoss forward + backward, batch 128")
    figure: str  # the measurement ("1.2 ms (median 1.3 ms, 5 runs)")
    against: str = ""  # the plain way of doing the same work, and its figure
    ratio: str = ""  # e.g. "183x faster", "0.93 of the pure loop's speed"
    target: str = ""  # the target, e.g. ">= 150x at batch 128"; empty: reported only
    met: bool | None = None  # None when there is no target
    note: str = ""  # how it was measured (sampled and extrapolated, ...) and, for a missed target, by how much and why
