"""Helpers for the trainer tests: a stand-in for collector.Run that records what the trainer logs."""

from __future__ import annotations

import contextlib

import numpy as np

from trainer.config import TrainConfig
from trainer.tasks import TaskOptions, make_task
from trainer.train import TrainResult, train


class RecordingRun:
    """Records log_steps/log_eval/log calls in memory (same signatures as collector.Run)."""

    def __init__(self, name: str = "test"):
        self.name, self.run_id = name, "0" * 12
        self.blocks: list[dict[str, np.ndarray]] = []
        self.evals: list[dict] = []
        self.scalars: list[tuple[int, str, float]] = []

    def log_steps(self, columns) -> None:
        cols = {k: np.asarray(v) for k, v in columns.items()}
        n = {len(v) for v in cols.values()}
        assert len(n) == 1, "log_steps columns must have equal length"
        self.blocks.append(cols)

    def log_eval(self, step, split="test", loss=None, accuracy=None, examples=None) -> None:
        self.evals.append({"step": step, "split": split, "loss": loss, "accuracy": accuracy, "examples": examples})

    def log(self, step, **values) -> None:
        for k, v in values.items():
            assert isinstance(v, (int, float)), f"{k} is {type(v)}"
            self.scalars.append((step, k, v))

    def steps(self) -> dict[str, np.ndarray]:
        """All logged step rows sorted by step; columns a block left out (NULL in the store) are NaN."""
        names = sorted({k for b in self.blocks for k in b})
        cols = {k: np.concatenate([b[k].astype(float) if k in b else np.full(len(b["step"]), np.nan)
                                   for b in self.blocks]) for k in names}
        order = np.argsort(cols["step"])
        return {k: v[order] for k, v in cols.items()}

    def scalar(self, name: str) -> list[float]:
        return [v for _, k, v in self.scalars if k == name]


def train_in_process(device: str = "cpu", **options) -> tuple[RecordingRun, TrainResult]:
    """Run `train` on a RecordingRun with TrainConfig(**options)."""
    import torch

    cfg = TrainConfig(device=device, **options)
    task = make_task(cfg.task, TaskOptions(dim=cfg.dim, noise=cfg.noise, data_dir=cfg.data_dir),
                     torch.device(device), cfg.seed)
    run = RecordingRun()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does for the small tasks: much faster on a busy 2-core machine
    try:
        return run, train(cfg, task, run, progress=False)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def one_torch_thread():
    """Small models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
