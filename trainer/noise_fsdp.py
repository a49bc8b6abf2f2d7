"""GradientNoise under FSDP2 (`torch.distributed.fsdp.fully_shard`): what is sharded, and |g_big|^2 from shards.

Under FSDP2 the forward and backward run on each rank's local batch with all-gathered weights, so the
per-example rules' hooks see the rank's local layer inputs and output gradients, exactly as under DDP:
their sums are all-reduced like DDP's. What differs is `.grad`: after backward each parameter's is a
DTensor holding this rank's shard of the all-ranks mean gradient (FSDP's reduce-scatter averages), so
|g_big|^2 is the sum over ranks of the local shards' squared norms; a shard that HSDP replicates over a
mesh dimension is counted once per replica and divided back. Both ride in one all-reduce of a few
scalars per step (trainer/noise.py `_stats`).

Not covered: FSDP1 (`FullyShardedDataParallel`: flat parameters, refused with a clear error) and tensor
parallelism (DTensor parameters outside FSDP2, whose activations are sharded too). Parameters without a
per-example rule have no small batch under FSDP2: the sharded parameter never enters the autograd graph
(its all-gathered copy does), so no public hook sees its per-rank gradient; they are reported missing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from trainer.noise_stats import _sq_norm


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def sharding_mesh(module: nn.Module):
    """The DeviceMesh of the module's FSDP2-sharded parameters, or None when nothing is sharded.
    Refuses, with what to use instead, FSDP1 and DTensor parameters that FSDP2 does not manage."""
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        raise ValueError("GradientNoise: FSDP1 (FullyShardedDataParallel) is not supported: its flat parameters "
                         "hide the layers' gradients; shard with FSDP2 (torch.distributed.fsdp.fully_shard)")
    dtensor = _dtensor_type()
    # DeviceMesh compares by value: two models in one process hold equal meshes that are distinct objects
    meshes = {p.device_mesh for p in module.parameters() if dtensor and isinstance(p, dtensor)}
    if not meshes:
        return None
    if not any(isinstance(m, FSDPModule) for m in module.modules()):
        raise ValueError("GradientNoise: DTensor parameters outside FSDP2 (tensor parallelism?) are not supported: "
                         "their activations are sharded too, so per-example norms need the full layer")
    if len(meshes) > 1:
        raise ValueError("GradientNoise: the parameters are sharded over different device meshes; one mesh only")
    return next(iter(meshes))


def mesh_group(mesh, process_group=None):
    """(world, group) of the data-parallel ranks behind a mesh: every rank of it (FSDP shards and HSDP
    replicas all see their own examples). A 2-d mesh that is not the whole world needs `process_group`."""
    if process_group is not None:
        return dist.get_world_size(process_group), process_group
    if mesh.ndim == 1:
        return mesh.size(), mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return mesh.size(), None
    raise ValueError("GradientNoise: a multi-dimensional mesh that is not the whole world: pass process_group= "
                     "spanning its ranks")


def shard_sq(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """This rank's part of |g|^2 over sharded gradients: the local shards' squared norms, each divided by
    the number of replicas of its shard (HSDP), in float32 at least; summed over the ranks it is |g|^2.
    A plain gradient in a sharded model (a parameter left out of fully_shard, which the loop must then
    average over the ranks itself) is on every one of the `world` ranks."""
    dtensor = _dtensor_type()
    by_reps: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            mesh = g.device_mesh
            reps = math.prod(mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            g = g.to_local()
        else:
            reps = world
        if g.numel():
            by_reps.setdefault(reps, []).append(g)
    total = None
    for reps, local in by_reps.items():
        part = _sq_norm(local, 1.0 / reps)
        total = part if total is None else total + part
    if total is None:  # every shard of these gradients is on other ranks
        device = grads[0].to_local().device if dtensor and isinstance(grads[0], dtensor) else grads[0].device
        return torch.zeros((), device=device)
    return total
