"""What bench_trainer.py and bench_charlm.py share: device sync, a run that drops log calls, interleaved
repeats, and ratios to the bare loop of the same repeat.

Every variant is a function returning (wall seconds, process CPU seconds) per step. The variants run
interleaved (one of each per repeat, after a warm-up pass), and a ratio is the median over repeats of
(variant / baseline of the same repeat), so a busy machine skews both sides of a ratio alike.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable

import torch

Timing = tuple[float, float]  # seconds per step: wall clock, process CPU


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


class NullRun:
    """Takes the trainer's log calls and drops them: isolates the loop's own cost from the collector's."""

    name = "bench"

    def log_steps(self, columns) -> None:
        pass

    def log_eval(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        pass


def interleave(variants: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, list[Timing]]:
    """Warm every variant up once (allocator, lazy imports, dynamo's first-call import), then time them
    round-robin `repeats` times."""
    for fn in variants.values():
        fn()
    times: dict[str, list[Timing]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    return times


def ratio(times: dict[str, list[Timing]], num: str, den: str, clock: int) -> float:
    """Median over repeats of num / den from the same repeat; clock 0 = wall, 1 = CPU."""
    return statistics.median(a[clock] / b[clock] for a, b in zip(times[num], times[den], strict=True))
