"""What bench_trainer.py and bench_charlm.py share: device sync, the bare training loop, a run that drops
log calls, interleaved repeats, and ratios to the bare loop of the same repeat.

Every variant is a function returning (wall seconds, process CPU seconds) per step. The variants run
interleaved (one of each per repeat, after a warm-up pass), and a ratio is the median over repeats of
(variant / baseline of the same repeat), so a busy machine skews both sides of a ratio alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

Timing = tuple[float, float]  # seconds per step: wall clock, process CPU


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_loop(task, model, opt, batch: int, steps: int, accum: int = 1,
              after_backward: Callable[[], object] | None = None,
              after_loop: Callable[[], object] | None = None) -> Timing:
    """The loop a user would write, timed per step: sample, zero_grad, forward and backward (`accum`
    micro-batches), `after_backward()` (e.g. a noise measurement), step; `after_loop()` (e.g. a final
    evaluation) inside the clock. The device is synced before and after, not in between."""
    sync(task.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y = task.next_batch(batch)
        opt.zero_grad(set_to_none=True)
        if accum == 1:
            task.loss_fn(model(x), y).backward()
        else:
            for xk, yk in zip(x.chunk(accum), y.chunk(accum), strict=True):
                (task.loss_fn(model(xk), yk) / accum).backward()
        if after_backward is not None:
            after_backward()
        opt.step()
    if after_loop is not None:
        after_loop()
    sync(task.device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def noise_step(gns) -> Callable[[], None] | None:
    """step_loop's after_backward for a GradientNoise (None: none): its step(), the ingredients kept on
    the device, as a user's loop would hand them to run.log_step in blocks."""
    if gns is None:
        return None
    kept = []

    def measure() -> None:
        s = gns.step()
        kept.append((s.g_small_sq, s.g_big_sq))

    return measure


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
