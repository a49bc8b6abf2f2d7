"""A Hugging Face `transformers.TrainerCallback` that logs a batchscope run: every optimizer step with its
noise-scale ingredients, the evaluations, and how the run ended.

    from trainer.integrations.hf import BatchscopeCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[BatchscopeCallback(db="runs.duckdb")])

What the Trainer's events give (transformers 5.x `_inner_training_loop`, read for 5.24):
- per optimizer step: micro-batch forward/backward passes, then, after the last one, *clipping*
  (`max_grad_norm`, 1.0 by default), then `on_pre_optimizer_step`, `optimizer.step()`,
  `on_optimizer_step`, the LR scheduler, `zero_grad`, `on_step_end`. No event lies between the last
  backward and the clipping, so at `on_pre_optimizer_step` the gradient is already clipped;
- the noise scale is defined on the unclipped gradient, so the callback takes the clipping over: at
  on_train_begin it sets `args.max_grad_norm = 0` (the Trainer then only computes the norm it logs,
  unclipped, as before), and at on_pre_optimizer_step it measures, then clips with the same max norm
  (`torch.nn.utils.clip_grad_norm_`, as accelerate does on one process); the user's value is restored at
  the end. The parameter updates are the same as without the callback (tests/test_integration_hf.py);
- micro-batches are counted by a forward hook on the model (the Trainer calls it once per micro-batch),
  which also reads each micro-batch's loss from the model output: the Trainer gives callbacks no
  per-step loss. When the model is passed `num_items_in_batch` (token-normalised losses over the whole
  step), the micro-batch losses are already weighted and the step's loss is their sum, else their mean;
- on_evaluate: the metrics (eval_loss, eval_accuracy; eval_<name>_loss for several eval sets);
- on_train_end: finished. No event reports an exception: use the callback as a context manager
  (`with cb: trainer.train()`) to fail the run in-process; an uncaught exception that ends the process
  fails it at exit with the exception.

Under DDP (torchrun, accelerate launch) every rank measures: callbacks are handed the bare model, not
the DDP wrapper, but the hooks sit on its layers and parameters, so they see each rank's local gradient
(the small batch; per example where a layer has a rule) while `.grad` is the all-reduced one, and
`step()` all-reduces a few scalars. Each step's loss and counts are all-reduced too, in the background
while the next step runs (4 scalars; the row is logged a step late), and rank 0 writes. Not covered: FSDP and DeepSpeed (sharded gradients) and fp16 loss
scaling (the hooks see scaled gradients): steps and evals are logged without the noise scale there;
bf16 and fp32 are measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

try:
    import transformers
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError("trainer.integrations.hf needs transformers: pip install 'batchscope[hf]'") from exc

from trainer.integrations._common import (
    EndsRun,
    EvalKeys,
    RunOwner,
    StepRecorder,
    batch_examples,
    batch_tokens,
    check_unit,
    data_parallel,
    pick_evals,
    run_fields,
    warn_once,
)
from trainer.noise import GradientNoise, NoiseStats

__all__ = ["BatchscopeCallback"]


def default_evals(metrics: Mapping[str, Any]) -> EvalKeys:
    """eval_loss -> split "test" (the split the dashboard's generalization page reads), eval_<name>_loss ->
    split <name>; accuracy from eval[_<name>]_accuracy or _acc."""
    out = {}
    for key in metrics:
        if key.startswith("eval_") and key.endswith("loss"):
            prefix = key[: -len("loss")]
            split = prefix[len("eval_"):].rstrip("_") or "test"
            out[split] = (key, (prefix + "accuracy", prefix + "acc"))
    return out


class BatchscopeCallback(EndsRun, TrainerCallback):
    """Log a `transformers.Trainer` run to a batchscope store.

    db, name, sweep, config: as `collector.start_run` (name defaults to args.run_name); unit: "examples"
    or "tokens" for the x-axis (tokens: attention_mask.sum() of each micro-batch, else input_ids.numel(),
    or `tokens(inputs)`); evals: {split: (loss key(s), accuracy key(s))} in the eval metrics (default:
    `default_evals`); per_example / noise: GradientNoise options; any other keyword is a `runs` column.
    """

    def __init__(self, db=None, *, name: str | None = None, sweep: str | None = None, config: Mapping | None = None,
                 unit: str = "examples", tokens: Callable[[Mapping], int] | None = None,
                 evals: EvalKeys | None = None, per_example: bool = True, noise: bool = True,
                 gns_window: float | None = None, **run_fields):
        self.owner = RunOwner(db, name, sweep, config, run_fields)
        self.unit, self.count_tokens = check_unit(unit), tokens or batch_tokens
        self.evals, self.per_example, self.noise, self.gns_window = evals, per_example, noise, gns_window
        self.gns: GradientNoise | None = None
        self.recorder: StepRecorder | None = None
        self._stats: NoiseStats | None = None
        self._lr: float | None = None
        self._clip: float | None = None  # the user's max_grad_norm while the callback clips
        self._args = None
        self._hook = None
        self._loss_is_sum = False
        self._warned: set[str] = set()

    @property
    def run(self):
        return self.owner.run

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        self._release()  # a previous train() that raised outside `with callback:` left its hooks and clip
        world = int(args.world_size)
        measure = self.noise
        if measure and world > 1 and (args.fsdp or args.deepspeed or data_parallel() != world):
            warn_once(self._warned, "ddp", "BatchscopeCallback (HF): no noise scale under FSDP or DeepSpeed "
                      "(sharded gradients); steps and evals are logged from rank 0")
            measure = False
        if measure and args.fp16:
            warn_once(self._warned, "fp16", "BatchscopeCallback (HF): no noise scale under fp16 loss scaling; "
                      "use bf16 or fp32 (steps and evals are logged)")
            measure = False
        if measure:  # under DDP the Trainer hands over the bare model: name the group its .grad is reduced over
            group = dist.group.WORLD if world > 1 else None
            self.gns = GradientNoise(model, per_example=self.per_example, process_group=group)
            if args.max_grad_norm and args.max_grad_norm > 0:
                self._clip, self._args, args.max_grad_norm = args.max_grad_norm, args, 0.0
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self.recorder = StepRecorder(None, self.unit, world, self.gns_window)
        self.owner.recorder = self.recorder
        if not state.is_world_process_zero:
            return
        inferred = run_fields(optimizer, model, micro=int(args.per_device_train_batch_size),
                              accum=int(args.gradient_accumulation_steps), world=world, loader=train_dataloader,
                              seed=int(args.seed)) | {"lr": float(args.learning_rate)}
        config = {"framework": "transformers", "transformers_version": transformers.__version__, "unit": self.unit,
                  "training_args": json.loads(args.to_json_string()),
                  "model_config": getattr(getattr(model, "config", None), "to_diff_dict", dict)()}
        self.recorder.run = self.owner.start(inferred, config, name=args.run_name)

    def _on_forward(self, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or self.recorder is None:
            return
        inputs = kwargs if kwargs else {"input": args[0]} if args else {}
        self.recorder.micro_batch(batch_examples(inputs),
                                  self.count_tokens(inputs) if self.unit == "tokens" else None)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        self.recorder.loss(loss)
        self._loss_is_sum = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self._lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        if self.gns is not None:
            self._stats = self.gns.step()
        if self._clip:  # after measuring: what the Trainer would have done before this event
            torch.nn.utils.clip_grad_norm_(model.parameters(), self._clip)

    def on_step_end(self, args, state, control, **kw):
        if self.recorder is not None:
            stats, self._stats = self._stats, None
            self.recorder.step(state.global_step, self._lr, stats, loss_is_sum=self._loss_is_sum,
                               shares_over_ranks=self._loss_is_sum and args.average_tokens_across_devices)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.recorder is not None:
            self.recorder.flush()  # under DDP the last step's row waits for its all-reduce: log it first
        run = self.owner.run
        if run is None or not metrics:
            return
        seen = self.recorder.seen if self.recorder else 0
        for split, (loss, acc) in pick_evals(metrics, self.evals or default_evals(metrics)).items():
            run.log_eval(state.global_step, split=split, loss=loss, accuracy=acc, examples=seen)

    def on_train_end(self, args, state, control, **kw):
        self.end_run()

    def _release(self) -> None:
        """Remove the hooks and give the user's max_grad_norm back."""
        for h in (self.gns, self._hook):
            if h is not None:
                h.close() if isinstance(h, GradientNoise) else h.remove()
        self.gns = self._hook = None
        if self._args is not None:
            self._args.max_grad_norm, self._args, self._clip = self._clip, None, None
