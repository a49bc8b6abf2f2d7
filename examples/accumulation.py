"""batchscope with gradient accumulation: K micro-batches per optimizer step, gradient clipping, AdamW.

    python examples/accumulation.py --db runs.duckdb --accum 4

Each micro-batch's gradient norm is taken by parameter hooks as autograd produces it (no copy of the
gradient); per-example norms cover the Linear, Conv and LayerNorm layers of this small CNN. Measure
before clipping: the noise scale is defined on the unclipped gradient.
"""

import argparse

import torch
from torch import nn

import collector
from trainer.noise import GradientNoise

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--batch", type=int, default=64, help="examples per optimizer step")
p.add_argument("--accum", type=int, default=4, help="micro-batches per step (K)")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--clip", type=float, default=1.0)
args = p.parse_args()
micro = args.batch // args.accum

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LayerNorm(8 * 8 * 8),
                      nn.Linear(8 * 8 * 8, 2))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
gns = GradientNoise(model)


def batch(n):
    """8x8 images: is the bright blob in the left or the right half?"""
    y = torch.randint(0, 2, (n,))
    x = torch.randn(n, 1, 8, 8)
    x[torch.arange(n), 0, 4, 2 + 4 * y] += 3.0
    return x, y


with collector.start_run(args.db, name=f"accum{args.accum}-b{args.batch}", sweep="examples", task="blobs",
                         lr=args.lr, batch_size=args.batch, micro_batch_size=micro, accum_steps=args.accum,
                         optimizer="adamw", seed=0, config=vars(args)) as run:
    examples = 0
    for step in range(1, args.steps + 1):
        lr = opt.param_groups[0]["lr"]  # the LR this step uses
        x, y = batch(args.batch)
        loss = 0.0
        for xk, yk in zip(x.chunk(args.accum), y.chunk(args.accum), strict=True):
            micro_loss = nn.functional.cross_entropy(model(xk), yk) / args.accum
            micro_loss.backward()
            loss += micro_loss.item()
        stats = gns.step()  # the default loss_scale is 1/K, matching `/ args.accum` above
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)  # after measuring
        opt.step()
        sched.step()
        opt.zero_grad()
        examples += args.batch
        run.log_step(step, examples=examples, loss=loss, lr=lr, batch_size=args.batch, **stats.as_dict())
    print(f"run {run.run_id}: {args.steps} steps logged to {args.db}")
