"""What the Lightning and Hugging Face callbacks share: one optimizer step's `steps` row (its loss and
counts summed over the data-parallel ranks), the run's fields inferred from the optimizer and the loader,
the noise measurement under DDP, evaluations picked out of a metrics dict, and ending the run right.

Framework-free (torch and the collector only), so it is tested with either framework.
"""

from __future__ import annotations

import atexit
import math
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

import collector
from collector import signals
from trainer.gns import BSimpleEMA, TrackingBSimple
from trainer.noise import NoiseStats
from trainer.steplog import GNS_TARGET_RSE

UNITS = ("examples", "tokens")
EvalKeys = Mapping[str, tuple[str | tuple[str, ...] | None, str | tuple[str, ...] | None]]


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor of a batch (depth first): the model input for (x, y) tuples and HF-style dicts."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def batch_examples(batch: Any) -> int | None:
    """Examples in a batch: dim 0 of its first tensor (a tensor, a tuple/list such as (x, y), or a dict)."""
    t = first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None


def batch_tokens(batch: Any) -> int | None:
    """Tokens in a batch: `attention_mask.sum()` when it has one (padding not counted, as the HF Trainer's
    "non_padding"), else the element count of `input_ids` or of the first tensor (N x T token ids)."""
    if isinstance(batch, Mapping):
        for key in ("attention_mask", "input_ids"):
            t = batch.get(key)
            if isinstance(t, torch.Tensor):
                return int(t.sum()) if key == "attention_mask" else t.numel()
    t = first_tensor(batch)
    return None if t is None else t.numel()


def optimizer_fields(opt: torch.optim.Optimizer | None) -> dict:
    """lr, optimizer, momentum (beta1 for Adam-style) and weight_decay of the first parameter group."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        opt = opt.optimizer
    if opt is None or not getattr(opt, "param_groups", None):
        return {}
    g = opt.param_groups[0]
    momentum = g.get("momentum", g["betas"][0] if "betas" in g else None)
    out = {"optimizer": type(opt).__name__.lower(), "lr": g.get("lr"), "momentum": momentum,
           "weight_decay": g.get("weight_decay")}
    return {k: float(v) if isinstance(v, (int, float, torch.Tensor)) and k != "optimizer" else v
            for k, v in out.items() if v is not None}


def run_fields(optimizer: torch.optim.Optimizer | None, model: torch.nn.Module, *, micro: int | None, accum: int,
               world: int, loader: Any, seed: int | None) -> dict:
    """The `runs` columns a framework's state tells: the optimizer's, the global batch (micro-batch x
    accumulation x ranks), the training set's size (None for an iterable dataset) and the device."""
    dataset = getattr(loader, "dataset", None)
    try:
        train_size = len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        train_size = None
    return optimizer_fields(optimizer) | {
        "model": type(model).__name__, "micro_batch_size": micro, "accum_steps": accum, "world_size": world,
        "batch_size": micro * accum * world if micro else None, "train_size": train_size, "seed": seed,
        "device": device_of(model)}


def data_parallel() -> int:
    """Ranks of the default process group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def pick_evals(metrics: Mapping[str, Any], evals: EvalKeys) -> dict[str, tuple[float | None, float | None]]:
    """{split: (loss, accuracy)} from a metrics dict by the configured keys (the first key present wins)."""
    def first(keys) -> float | None:
        for k in (keys,) if isinstance(keys, str) else keys or ():
            v = metrics.get(k)
            if v is not None:
                return float(v)
        return None

    out = {}
    for split, (loss_keys, acc_keys) in evals.items():
        loss, acc = first(loss_keys), first(acc_keys)
        if loss is not None or acc is not None:
            out[split] = (loss, acc)
    return out


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    return unit


class StepRecorder:
    """Collects one optimizer step's micro-batches (examples, tokens, losses) and logs its `steps` row.

    unit "tokens" makes tokens the x-axis: `examples` and `batch_size` count tokens, and b_small / b_big
    are scaled by this step's tokens per example, so B_simple is in tokens as well (exact for sequences
    of equal length; with padding, the mean length). world: data-parallel ranks (each counts its own,
    `step` sums them); run None: count and compute, log nothing (the ranks that do not write).
    """

    def __init__(self, run, unit: str = "examples", world: int = 1, gns_window: float | None = None):
        self.run, self.unit, self.world, self.window = run, check_unit(unit), world, gns_window
        self.seen = 0  # cumulative examples (or tokens) over all ranks
        # the trainer's online B_simple (trainer/steplog.py): a tracking window, or a fixed EMA if asked
        self.ema: TrackingBSimple | BSimpleEMA | None = None
        self._since = 0.0  # examples since the last measured step
        self._losses: list = []
        self._examples = self._tokens = 0
        self.skipped = 0  # steps whose noise ingredients were not logged (incomplete or unmeasured)
        self._pending: tuple | None = None  # under DDP: the last step, its all-reduce in flight
        self._block: list = []  # (step, row, examples since the last measured step) not logged yet
        self._block_t0 = time.monotonic()

    def micro_batch(self, examples: int | None, tokens: int | None = None) -> None:
        self._examples += examples or 0
        self._tokens += tokens or 0

    def loss(self, value: torch.Tensor | float | None) -> None:
        if value is not None:
            self._losses.append(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value)))

    def step(self, step: int, lr: float | None, stats: NoiseStats | None, loss_is_sum: bool = False,
             shares_over_ranks: bool = False) -> dict | None:
        """Log the step (losses: mean over micro-batches, or their sum when each was already scaled by its
        share of the step, as the HF Trainer's token-normalised losses are) and start the next one.

        Under DDP (world > 1) every rank must call it: the step's loss, examples and tokens are summed
        over the ranks by one all-reduce of 4 scalars, so the row is the global batch's, not rank 0's.
        The ranks' losses are averaged, or added when each is its share of the whole step over all ranks
        (`shares_over_ranks`: the HF Trainer's `average_tokens_across_devices`). That all-reduce runs in
        the background while the next step computes (no extra sync point per step), so the row is logged
        one step late, by the next `step()` or by `flush()`. Rows are logged in blocks of up to 25 steps or
        0.25 s (one online-B_simple update each); returns the row completed now, if any."""
        with signals.deferred():  # a SIGTERM's flush (RunOwner) must see this step whole or not at all
            return self._step(step, lr, stats, loss_is_sum, shares_over_ranks)

    def _step(self, step: int, lr: float | None, stats: NoiseStats | None, loss_is_sum: bool,
              shares_over_ranks: bool) -> dict | None:
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            total = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in losses]).sum()
            loss = total if loss_is_sum else total / len(losses)
        examples, tokens, self._examples, self._tokens = self._examples, self._tokens, 0, 0
        noise = stats.as_dict() if stats is not None and stats.measured and stats.complete else None
        if self.world <= 1:
            return self._log(step, lr, noise, None if loss is None else float(loss), examples, tokens)
        previous, self._pending = self._pending, (RankSums(loss, examples, tokens, shares_over_ranks), step, lr, noise)
        return self._complete(previous) if previous is not None else None

    def flush(self, failed: bool = False) -> None:
        """Log every step held back: the one whose all-reduce is in flight (DDP) and the block waiting for
        its online B_simple. Call it where the ranks all pass (an evaluation, the end of training) and
        before the run ends; `failed`: after an exception, take the in-flight step only if its all-reduce
        already completed, never wait on ranks that may be gone."""
        with signals.deferred():
            pending, self._pending = self._pending, None
            if pending is not None and not (failed and not pending[0].safe_to_read()):
                self._complete(pending)
            elif pending is not None and self.run is not None:
                print(f"batchscope: step {pending[1]} is not stored: its loss and examples are sums over the "
                      "ranks, whose all-reduce did not complete before training stopped", file=sys.stderr,
                      flush=True)
            self._drain()

    def flush_ready(self) -> None:
        """What a signal may take (Run.add_flusher): the in-flight step if its all-reduce completed (else it
        stays in flight, for the next `step()` if the program goes on), and the held block."""
        with signals.deferred():
            if self._pending is not None and self._pending[0].safe_to_read():
                pending, self._pending = self._pending, None
                self._complete(pending)
            self._drain()

    def _complete(self, pending: tuple) -> dict:
        sums, step, lr, noise = pending
        return self._log(step, lr, noise, *sums.result())

    def _log(self, step: int, lr: float | None, noise: dict | None, loss: float | None, examples: int,
             tokens: int) -> dict:
        if self.unit == "tokens" and not tokens:
            raise ValueError("unit='tokens' but no tokens were counted this step (pass a tokens= counter)")
        size = tokens if self.unit == "tokens" else examples
        self.seen += size
        row: dict = {"examples": self.seen, "batch_size": size or None, "lr": lr}
        if loss is not None:
            row["loss"] = loss
        self._since += size
        if noise is not None:
            per = tokens / examples if self.unit == "tokens" and examples else 1.0
            noise["b_small"] *= per
            noise["b_big"] *= per
            row |= noise
            self._block.append((step, row, self._since))
            self._since = 0.0
        else:
            self.skipped += 1
            self._block.append((step, row, None))
        if len(self._block) >= self.BLOCK or time.monotonic() - self._block_t0 >= self.BLOCK_SECONDS:
            self._drain()
        return row

    BLOCK, BLOCK_SECONDS = 25, 0.25  # rows held for one online-B_simple update (~1.7 ms a call, any length)

    def _drain(self) -> None:
        """The online B_simple of the held rows in one block update (as the built-in trainer does per host
        sync), then log them."""
        block, self._block, self._block_t0 = self._block, [], time.monotonic()
        measured = [(row, since) for _, row, since in block if since is not None]
        if measured:
            if self.ema is None:
                self.ema = BSimpleEMA(self.window) if self.window else TrackingBSimple(GNS_TARGET_RSE)
            cols = [[row[k] for row, _ in measured] for k in ("g_small_sq", "b_small", "g_big_sq", "b_big")]
            values = self.ema.update_block(*cols, [since for _, since in measured])[0]
            for (row, _), b in zip(measured, values, strict=True):
                row["b_simple"] = float(b) if math.isfinite(b) else None
        if self.run is not None:  # None on the ranks that do not write
            for step, row, _ in block:
                self.run.log_step(step, **row)


class RankSums:
    """One step's (loss, examples, tokens) summed over the ranks: an all-reduce of 4 float64s started
    now (async, on this rank's CUDA device under NCCL) and read by `result()`. The loss is the ranks'
    mean, or their sum for `shares`; a rank without a loss makes it the others' mean (shares: None)."""

    def __init__(self, loss: torch.Tensor | None, examples: int, tokens: int, shares: bool):
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.shares, self.world = shares, dist.get_world_size()
        has = loss is not None
        self.packed = torch.tensor([float(loss) if has else 0.0, float(has), float(examples), float(tokens)],
                                   dtype=torch.float64, device=device)
        self.work = dist.all_reduce(self.packed, async_op=True)
        self.nccl = nccl

    def safe_to_read(self) -> bool:
        """Whether result() can be read without waiting on other ranks: the all-reduce completed, and
        (NCCL) never, since reading a CUDA tensor waits for the whole stream, where a gradient all-reduce
        that a dead peer will never join may be queued. For a signal handler or after a failure."""
        return not self.nccl and self.work.is_completed()

    def result(self) -> tuple[float | None, int, int]:
        self.work.wait()
        total, with_loss, examples, tokens = self.packed.tolist()
        if with_loss == 0 or (self.shares and with_loss < self.world):
            return None, int(examples), int(tokens)
        return (total if self.shares else total / with_loss), int(examples), int(tokens)


class RunOwner:
    """Starts and ends one collector run for a callback; the callback is also a context manager
    (`with cb: trainer.fit(...)`) so that an exception the framework does not report still fails the run,
    and a run left open at interpreter exit ends failed with the uncaught exception (or "did not end")."""

    def __init__(self, db, name: str | None, sweep: str | None, config: Mapping | None, fields: Mapping):
        self.db, self.name, self.sweep = db, name, sweep
        self.user_config = dict(config or {})
        self.user_fields = dict(fields)
        self.run = None
        self.recorder: StepRecorder | None = None  # its in-flight step is logged, if complete, at a failed exit

    def start(self, inferred: Mapping, config: Mapping, name: str | None = None) -> collector.Run:
        self.end_failed("a new training run started on the same callback before this one ended")
        fields = {k: v for k, v in inferred.items() if v is not None} | self.user_fields
        self.run = collector.start_run(self.db, name=self.name or name or "run", sweep=self.sweep,
                                       config=dict(config) | self.user_config, **fields)
        atexit.register(self._atexit)  # after the run's own handler, so it runs first
        self.run.add_flusher(self._flush_held)  # a SIGTERM logs the held steps before it ends the run
        return self.run

    def _flush_held(self) -> None:
        if self.recorder is not None:
            self.recorder.flush_ready()

    def end(self, status: str | None = None, reason: str | None = None) -> None:
        run, self.run = self.run, None
        if run is not None:
            atexit.unregister(self._atexit)
            run.finish(status, reason=reason)

    def end_failed(self, reason: str) -> None:
        self.end("failed", reason[:500])

    def _atexit(self) -> None:
        if self.recorder is not None:
            self.recorder.flush(failed=True)
        exc = getattr(sys, "last_value", None)
        self.end_failed(f"{type(exc).__name__}: {exc}" if exc is not None else "the process exited during training")


class EndsRun:
    """The run-ending half of a callback: a context manager (`with callback: fit(...)`) that fails the run
    with an exception the framework does not report, or ends it; `_release()` drops the callback's hooks."""

    owner: RunOwner

    def _release(self) -> None:
        """Remove the callback's hooks (and undo what it changed in the framework)."""

    def end_run(self, exc: BaseException | None = None) -> None:
        """Log the last step, release the hooks, then finish the run, or fail it with `exc` (every logged
        step is kept; after an exception the last step only if its all-reduce had completed)."""
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.flush(failed=exc is not None)
        self._release()
        if exc is not None:
            self.owner.end_failed(f"{type(exc).__name__}: {exc}")
        else:
            self.owner.end()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end_run(exc)


def warn_once(seen: set, key: str, message: str) -> None:
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def device_of(module: torch.nn.Module) -> str:
    from trainer.cli import device_label

    p = next(iter(module.parameters()), None)
    return device_label(p.device) if p is not None else "cpu"
