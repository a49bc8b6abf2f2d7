"""batchscope under FSDP2 (`fully_shard`): one run for the whole job, written by rank 0.

    torchrun --nproc-per-node 2 examples/fsdp.py --db runs.duckdb    # gloo on CPU, NCCL on CUDA

Each rank's hooks see its local examples, as under DDP, so the per-example norms are taken there; `.grad`
holds each rank's shard of the mean gradient, and GradientNoise adds the shards' norms up. Attach it
after `fully_shard` (which replaces the parameters), and call `gns.step()` on every rank: the ranks' sums
travel in one all-reduce of a few scalars.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import collector
from trainer.noise import GradientNoise

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--micro", type=int, default=16, help="examples per rank per step")
p.add_argument("--lr", type=float, default=3e-3)
args = p.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
if cuda:
    torch.cuda.set_device(device)
torch.manual_seed(0)  # the same initial weights on every rank before sharding
teacher = nn.Linear(20, 4).to(device)
model = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4)).to(device)
mesh = init_device_mesh(device.type, (world,))
for layer in (model[0], model[3]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
gns = GradientNoise(model)  # after fully_shard: Linear and LayerNorm by per-example norms
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
gen = torch.Generator(device=device).manual_seed(1 + rank)  # each rank draws its own examples
batch = args.micro * world


def step_data():
    x = torch.randn(args.micro, 20, device=device, generator=gen)
    return x, torch.distributions.Categorical(logits=2 * teacher(x)).sample()


run = collector.start_run(args.db, name=f"fsdp{world}-b{batch}", sweep="examples", task="teacher", lr=args.lr,
                          batch_size=batch, micro_batch_size=args.micro, world_size=world, optimizer="adamw",
                          seed=0, device=str(device)) if rank == 0 else None
try:
    for step in range(1, args.steps + 1):
        x, y = step_data()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # FSDP reduce-scatters the gradients: each rank keeps its shard of the mean
        stats = gns.step()  # every rank: one all-reduce of the per-example sums and the shards' norms
        opt.step()
        opt.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # the step's loss over every rank's examples
        if run is not None:
            run.log_step(step, examples=step * batch, loss=mean_loss.item() / world, lr=args.lr, batch_size=batch,
                         **stats.as_dict())
except BaseException as exc:
    if run is not None:
        run.finish("failed", reason=f"{type(exc).__name__}: {exc}")
    raise
if run is not None:
    run.finish()
    print(f"run {run.run_id}: {args.steps} steps of {world} sharded ranks logged to {args.db}")
dist.destroy_process_group()
