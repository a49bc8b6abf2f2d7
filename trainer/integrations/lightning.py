"""A PyTorch Lightning callback that logs a batchscope run: every optimizer step with its noise-scale
ingredients, the validation metrics, and how the run ended.

    from trainer.integrations.lightning import BatchscopeCallback
    trainer = L.Trainer(callbacks=[BatchscopeCallback(db="runs.duckdb", name="b32-lr0.1")], ...)

When, in Lightning's hook order (2.x, automatic optimization):
- on_train_start: the run starts (global rank 0 only) with lr/optimizer from the optimizer, batch size =
  dataloader batch x accumulate_grad_batches x world size, seed (seed_everything), device; every rank
  attaches `GradientNoise` (to the DDP wrapper under DDP, so each rank's local gradient is the small
  batch);
- on_train_batch_start: one micro-batch begins (counted here, not by a forward hook: a training_step
  may call `self.net(x)` instead of `self(x)`, and under DDP Lightning routes it through `forward` too);
- on_before_optimizer_step: after the last micro-batch's backward, after AMP's unscale and *before*
  Lightning clips (`gradient_clip_val`), so the norms are of the unclipped gradient: `gns.step()`;
- on_train_batch_end after the optimizer step: the step's row (the mean of its micro-batches' losses,
  which Lightning hands over divided by accumulate_grad_batches); under DDP every rank takes part in one
  background all-reduce of the step's loss and counts, so the row is the global batch's (logged when the
  next step ends, at a validation, or at the end);
- on_validation_end: evals from `trainer.callback_metrics` (sanity checks skipped);
- on_train_end: finished; on_exception: failed, with the exception; steps logged so far are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package name
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("trainer.integrations.lightning needs Lightning: pip install 'batchscope[lightning]'") from exc

from trainer.integrations._common import (
    EndsRun,
    EvalKeys,
    RunOwner,
    StepRecorder,
    batch_examples,
    batch_tokens,
    check_unit,
    first_tensor,
    pick_evals,
    run_fields,
    warn_once,
)
from trainer.noise import GradientNoise, NoiseStats

__all__ = ["BatchscopeCallback"]

DEFAULT_EVALS: EvalKeys = {"test": (("val_loss", "val/loss"), ("val_acc", "val_accuracy", "val/acc"))}


class _CountedNoise(GradientNoise):
    """GradientNoise whose micro-batches are counted by the callback, not by the root module's forward."""

    _counting = False

    def _root_hook(self, module, args, kwargs):  # noqa: D401 - the base class's forward pre-hook
        if self._counting:
            super()._root_hook(module, args, kwargs)

    def begin_micro_batch(self, batch: Any) -> None:
        """Count one micro-batch; its first tensor stands for the model input (its shape tells the batch
        dimension, e.g. token ids (N, T) for embeddings)."""
        x = first_tensor(batch)
        self._counting = True
        try:
            with torch.enable_grad():
                super()._root_hook(self.module, () if x is None else (x,), {})
        finally:
            self._counting = False


class BatchscopeCallback(EndsRun, pl.Callback):
    """Log a Lightning fit to a batchscope store.

    db, name, sweep, config: as `collector.start_run` (name defaults to the module's class name);
    unit: "examples" or "tokens" for the x-axis (tokens counted by `tokens(batch)`, default: the
    attention mask's sum or the token-id tensor's size); evals: {split: (loss key(s), accuracy key(s))}
    in `trainer.callback_metrics` (default: val_loss / val_acc logged as split "test", which the
    dashboard's generalization page reads); per_example / noise: GradientNoise options (noise=False
    logs steps only); any other keyword is a `runs` column (task, model, train_size, ...).
    """

    def __init__(self, db=None, *, name: str | None = None, sweep: str | None = None, config: Mapping | None = None,
                 unit: str = "examples", tokens: Callable[[Any], int] | None = None, evals: EvalKeys | None = None,
                 per_example: bool = True, noise: bool = True, gns_window: float | None = None, **run_fields):
        self.owner = RunOwner(db, name, sweep, config, run_fields)
        self.unit, self.count_tokens = check_unit(unit), tokens or batch_tokens
        self.evals = DEFAULT_EVALS if evals is None else evals
        self.per_example, self.noise, self.gns_window = per_example, noise, gns_window
        self.gns: _CountedNoise | None = None
        self.recorder: StepRecorder | None = None
        self._stats: NoiseStats | None = None
        self._lr: float | None = None
        self._logged = 0
        self._warned: set[str] = set()

    @property
    def run(self):
        return self.owner.run

    # --- start ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accum, world = int(trainer.accumulate_grad_batches), int(trainer.world_size)
        wrapped = trainer.strategy.model
        if self.noise and str(trainer.precision).startswith("16"):
            warn_once(self._warned, "fp16", "BatchscopeCallback: no noise scale under fp16 loss scaling (the "
                      "hooks see scaled gradients, .grad is unscaled); use bf16 or 32 (steps are logged)")
        elif self.noise:
            target = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else pl_module
            try:
                self.gns = _CountedNoise(target, per_example=self.per_example, accumulation=accum > 1)
            except ValueError as e:  # a sharding GradientNoise cannot measure (FSDPStrategy's FSDP1, ...)
                warn_once(self._warned, "sharded", f"BatchscopeCallback: no noise scale ({e}); steps are logged")
        self._logged = trainer.global_step
        self.recorder = StepRecorder(None, self.unit, world, self.gns_window)
        self.owner.recorder = self.recorder
        if not trainer.is_global_zero:
            return
        loader = trainer.train_dataloader
        seed = os.environ.get("PL_GLOBAL_SEED")
        inferred = run_fields(trainer.optimizers[0] if trainer.optimizers else None, pl_module,
                              micro=getattr(loader, "batch_size", None), accum=accum, world=world, loader=loader,
                              seed=int(seed) if seed is not None else None)
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        config = {"framework": "lightning", "lightning_version": pl.__version__, "unit": self.unit,
                  "precision": str(trainer.precision), "gradient_clip_val": trainer.gradient_clip_val,
                  "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                  "hparams": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                              for k, v in hparams.items()}}
        self.recorder.run = self.owner.start(inferred, config, name=type(pl_module).__name__)

    # --- every micro-batch and step ------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        n = batch_examples(batch)
        if self.gns is not None:
            self.gns.begin_micro_batch(batch)
        if self.recorder is not None:
            self.recorder.micro_batch(n, self.count_tokens(batch) if self.unit == "tokens" else None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        if self.gns is not None:  # Lightning divides each micro-batch's loss by accumulate_grad_batches
            self._stats = self.gns.step(loss_scale=1.0 / trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, (torch.Tensor, float, int)):  # Lightning hands the loss divided by accumulation
            self.recorder.loss(loss * trainer.accumulate_grad_batches)
        if trainer.global_step > self._logged:  # this micro-batch ended an optimizer step
            self._logged = trainer.global_step
            stats, self._stats = self._stats, None
            self.recorder.step(trainer.global_step, self._lr, stats)  # logs on global rank 0 only

    # --- evaluations and the end ---------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # under DDP the last step's row waits for its all-reduce: log it first
        run = self.owner.run
        if run is None or trainer.sanity_checking:
            return
        seen = self.recorder.seen if self.recorder else 0
        for split, (loss, acc) in pick_evals(trainer.callback_metrics, self.evals).items():
            run.log_eval(trainer.global_step, split=split, loss=loss, accuracy=acc, examples=seen)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end_run()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.end_run(exception)

    def _release(self) -> None:
        if self.gns is not None:
            self.gns.close()
            self.gns = None
