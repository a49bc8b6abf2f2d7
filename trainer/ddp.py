"""Data-parallel training under torchrun: `torchrun --nproc-per-node N -m trainer ...`.

Every rank builds the same task with the same seed, so all ranks draw the same global batch and keep
their own contiguous shard of it (rank r: examples [r*B/N, (r+1)*B/N)): the union of the shards is the
batch one process would train on, and a run is reproducible across world sizes. Only rank 0 writes
the run; the other ranks log into a `NullRun`. The per-step losses (local means) are all-reduced once
per host sync block, so every rank takes the same stop decisions (divergence, target loss) and
there is no per-step barrier. A rank that dies breaks the next collective on the others (gloo/NCCL
raise) or torchrun stops them with SIGTERM; either way rank 0's run ends failed with the reason.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (world 1: no torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 records the run."""
        return self.rank == 0


def from_env(environ: dict | None = None) -> DistEnv:
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK); absent: a single process."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistEnv()
    return DistEnv(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")))


def device_for(env: DistEnv, spec: str) -> str:
    """The device spec of this rank: cuda:LOCAL_RANK when CUDA is asked for (or auto and present)."""
    if not env.active:
        return spec
    if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()):
        return f"cuda:{env.local_rank}"
    return "cpu" if spec == "auto" else spec


class TerminatedError(RuntimeError):
    """SIGTERM stopped training: SLURM or Kubernetes preempting the job, `timeout`, or torchrun stopping
    this rank because another one failed."""


def raise_on_sigterm(message: str) -> None:
    """SIGTERM raises TerminatedError(message) in the training loop, which then logs every step it trained
    (its block held for the host sync included) before the run ends failed ("SIGTERM")."""
    def on_term(signum, frame):
        raise TerminatedError(message)

    signal.signal(signal.SIGTERM, on_term)


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo otherwise); SIGTERM raises, so the run ends failed."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    raise_on_sigterm(f"rank {env.rank} stopped by SIGTERM (torchrun: another rank of {env.world} failed?)")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(env: DistEnv, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch (the batch is divisible by the world size)."""
    if not env.active:
        return x, y
    m = x.shape[0] // env.world
    return x[env.rank * m:(env.rank + 1) * m], y[env.rank * m:(env.rank + 1) * m]


def reduce_losses(losses: torch.Tensor, world: int) -> torch.Tensor:
    """Mean over ranks of each step's local mean loss (equal shards: the global batch's mean), one
    all-reduce per block of steps; every rank gets the same values, so they stop at the same step."""
    if world <= 1:
        return losses
    total = losses.clone()
    dist.all_reduce(total)
    return total / world


class NullRun:
    """Stands in for the collector run on the ranks that do not write: every call does nothing."""

    name = None

    def __getattr__(self, attr: str):
        return lambda *args, **kwargs: None
