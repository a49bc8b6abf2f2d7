"""batchscope under DistributedDataParallel: one run for the whole job, written by rank 0.

    torchrun --nproc-per-node 2 examples/ddp.py --db runs.duckdb     # gloo on CPU, NCCL on CUDA

Each rank's local gradient is the small batch and the all-reduced `.grad` the big one (GradientNoise on
the DDP-wrapped model); every rank calls `gns.step()` (the sums come with DDP's gradient all-reduce).
Only rank 0 starts the run; every rank's exception still ends it: rank 0's fails it, another rank's makes torchrun
stop rank 0, whose run then ends failed too.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import collector
from trainer.noise import GradientNoise

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--micro", type=int, default=16, help="examples per rank per step")
p.add_argument("--lr", type=float, default=0.05)
args = p.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
teacher = nn.Linear(20, 4).to(device)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)).to(device))
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
gns = GradientNoise(model)  # the DDP wrapper: local vs all-reduced gradients
gen = torch.Generator(device=device).manual_seed(1 + rank)  # each rank draws its own examples
batch = args.micro * world


def step_data():
    x = torch.randn(args.micro, 20, device=device, generator=gen)
    return x, torch.distributions.Categorical(logits=2 * teacher(x)).sample()


run = collector.start_run(args.db, name=f"ddp{world}-b{batch}", sweep="examples", task="teacher", lr=args.lr,
                          batch_size=batch, micro_batch_size=args.micro, world_size=world, optimizer="sgd",
                          momentum=0.9, seed=0, device=str(device)) if rank == 0 else None
try:
    for step in range(1, args.steps + 1):
        x, y = step_data()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # DDP all-reduces .grad here
        stats = gns.step()  # every rank; the sums came with the gradients' all-reduce
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
    print(f"run {run.run_id}: {args.steps} steps of {world} ranks logged to {args.db}")
dist.destroy_process_group()
