"""Per-step records kept on the device and handed to the collector in blocks.

The training loop must not wait for the GPU on every step, so each step's loss and squared gradient
norms stay 0-d device tensors in a list; every `sync_every` steps they are stacked and copied to the
host in one transfer (under DDP, after one all-reduce of the block's losses: each rank's are local
means of its shard; the noise ingredients are global already). The host then folds them into the running B_simple and hands whole columns to
`run.log_steps` (one call per block, not one per step).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from collector import signals
from trainer.ddp import reduce_losses
from trainer.gns import BSimpleEMA, TrackingBSimple
from trainer.step import StepGrads

GNS_TARGET_RSE = 0.4  # steps.b_simple averages enough recent measurements for ~40 % relative standard error
HOST_COLUMNS = ("step", "examples", "batch_size", "lr", "wall_time", "b_small", "b_big")
GNS_COLUMNS = ("g_small_sq", "b_small", "g_big_sq", "b_big", "b_simple", "b_simple_n")
# b_simple_n is not a steps column: the collector stores it in `scalars` (name 'b_simple_n') per measured step


class StepLog:
    """Buffers step rows; `sync()` returns the new rows as numpy columns (with b_simple filled in)."""

    def __init__(self, run, device: torch.device, gns: TrackingBSimple | BSimpleEMA, sync_every: int, emit_rows: int = 500,
                 emit_seconds: float = 0.5, world: int = 1):
        self.run, self.world = run, world
        self.gns = gns
        self.sync_every = max(1, sync_every)
        # hand rows over in big blocks (each log_steps call builds Arrow arrays), but at least twice a
        # second, so a live dashboard stays current however slow the steps are
        self.emit_rows, self.emit_seconds = emit_rows, emit_seconds
        self._last_emit = time.monotonic()
        self._nan = torch.full((), math.nan, device=device)
        # one tuple per step, appended in one call: a signal's exception (SIGINT, SIGTERM) never leaves half a row
        self._rows: list[tuple] = []  # (*HOST_COLUMNS, loss, g_small_sq, g_big_sq); the last 3 on the device
        self._out: list[dict[str, np.ndarray]] = []
        self._out_rows = 0
        self._last_examples = 0
        self.dropped = 0  # rows not logged after a failure (DDP on CUDA: see _sync)

    def add(self, step: int, examples: int, batch_size: int, lr: float, wall_time: float, grads: StepGrads) -> None:
        if grads.g_small_sq is None:
            self._rows.append((step, examples, batch_size, lr, wall_time, math.nan, math.nan, grads.loss,
                               self._nan, self._nan))
        else:
            self._rows.append((step, examples, batch_size, lr, wall_time, grads.b_small, grads.b_big, grads.loss,
                               grads.g_small_sq, grads.g_big_sq))

    def due(self) -> bool:
        return len(self._rows) >= self.sync_every

    def sync(self, collective: bool = True) -> dict[str, np.ndarray]:
        """Copy the pending rows to the host (one transfer), compute b_simple, queue them for the collector.

        collective=False (after a crash): under DDP the pending rows' losses cannot be reduced over the
        ranks any more (a peer may be gone), so they are logged without one (NULL: this rank's shard
        alone is not the step's loss), with their noise ingredients (global already); on CUDA they are
        dropped and counted in `dropped` instead, since reading them would wait for the stream, where a
        collective that a dead peer never joins may be queued. If the block's all-reduce or transfer
        raises (a peer died there), the rows stay pending for that call. A signal arriving
        meanwhile acts after it (collector.signals.deferred), so its exception cannot drop the block.
        """
        with signals.deferred():
            return self._sync(collective)

    def _sync(self, collective: bool) -> dict[str, np.ndarray]:
        if not self._rows:
            return {}
        unreduced = self.world > 1 and not collective
        if unreduced and self._nan.device.type == "cuda":  # reading the stream could wait for ever
            self.dropped, self._rows = len(self._rows), []
            return {}
        rows, self._rows = self._rows, []
        n = len(HOST_COLUMNS)
        try:
            dev = torch.stack([t for row in rows for t in row[n:]]).reshape(-1, 3)
            if self.world > 1 and not unreduced:
                dev = torch.cat([reduce_losses(dev[:, 0], self.world)[:, None], dev[:, 1:]], dim=1)
            vals = dev.cpu().numpy().astype(np.float64)  # MPS has no float64
        except BaseException:  # a peer died in the all-reduce: the except path takes them unreduced
            self._rows = rows + self._rows
            raise
        cols = {name: np.array(col) for name, col in zip(HOST_COLUMNS, list(zip(*rows, strict=True))[:n],
                                                         strict=True)}
        cols["loss"], cols["g_small_sq"], cols["g_big_sq"] = vals[:, 0], vals[:, 1], vals[:, 2]
        b_simple, b_simple_n = np.full(len(vals), math.nan), np.full(len(vals), math.nan)
        idx = np.flatnonzero(~np.isnan(cols["b_small"]))
        if idx.size:
            ex = cols["examples"][idx].astype(float)
            seen = np.diff(ex, prepend=float(self._last_examples))  # unmeasured steps age an example-EMA too
            self._last_examples = ex[-1]
            b_simple[idx], b_simple_n[idx] = self.gns.update_block(
                *(cols[k][idx] for k in ("g_small_sq", "b_small", "g_big_sq", "b_big")), seen)
        cols["b_simple"], cols["b_simple_n"] = b_simple, b_simple_n
        if unreduced:
            del cols["loss"]
        self._out.append(cols)
        self._out_rows += len(vals)
        now = time.monotonic()
        if self._out_rows >= self.emit_rows or now - self._last_emit >= self.emit_seconds:
            self.emit()
        return cols

    def emit(self) -> None:
        """Hand queued rows to the collector; unmeasured steps go without GNS columns, so they are NULL."""
        with signals.deferred():
            self._emit()

    def _emit(self) -> None:
        if not self._out:
            return
        out, self._out, self._out_rows, self._last_emit = self._out, [], 0, time.monotonic()
        same: dict[tuple, list] = {}  # blocks with the same columns (a last unreduced one has no loss)
        for c in out:
            same.setdefault(tuple(c), []).append(c)
        for blocks in same.values():
            self._log({k: np.concatenate([c[k] for c in blocks]) for k in blocks[0]})

    def _log(self, cols: dict[str, np.ndarray]) -> None:
        measured = ~np.isnan(cols["b_small"])
        for mask, keep_gns in ((measured, True), (~measured, False)):
            if mask.any():
                block = {k: v[mask] for k, v in cols.items() if keep_gns or k not in GNS_COLUMNS}
                if keep_gns:  # no estimate yet (|G|^2 <= 0 so far) is NULL too, not NaN
                    block = _split_nan(block, "b_simple", self.run, also=("b_simple_n",))
                    if block is None:
                        continue
                self.run.log_steps(block)


def _split_nan(block: dict[str, np.ndarray], col: str, run, also: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """Log rows whose `col` is NaN without that column (NULL) nor the `also` ones; return the rest."""
    nan = np.isnan(block[col])
    if nan.any():
        run.log_steps({k: v[nan] for k, v in block.items() if k != col and k not in also})
        if nan.all():
            return None
        block = {k: v[~nan] for k, v in block.items()}
    return block
