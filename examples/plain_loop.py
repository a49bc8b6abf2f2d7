"""batchscope in a plain PyTorch loop: one device, one micro-batch per step (K = 1).

    python examples/plain_loop.py --db runs.duckdb
    python -m dashboard --db runs.duckdb          # the run, its loss and its noise scale

GradientNoise takes per-example gradient norms from hooks (B_small = 1), so every step yields the
noise-scale ingredients at no extra forward or backward pass.
"""

import argparse

import torch
from torch import nn

import collector
from trainer.noise import GradientNoise

p = argparse.ArgumentParser()
p.add_argument("--db", default="runs.duckdb")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=0.1)
args = p.parse_args()

torch.manual_seed(0)
teacher = nn.Linear(20, 4)  # the data: noisy labels of a random linear teacher
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
gns = GradientNoise(model)  # hooks on every Linear: per-example norms


def batch(n):
    x = torch.randn(n, 20)
    y = torch.distributions.Categorical(logits=2 * teacher(x)).sample()
    return x, y


x_test, y_test = batch(1000)
with collector.start_run(args.db, name=f"plain-b{args.batch}-lr{args.lr}", sweep="examples", task="teacher",
                         lr=args.lr, batch_size=args.batch, optimizer="sgd", seed=0) as run:
    examples = 0
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        stats = gns.step()  # after backward, before clipping and opt.step()
        opt.step()
        opt.zero_grad()
        examples += args.batch
        run.log_step(step, examples=examples, loss=loss.item(), lr=args.lr, batch_size=args.batch,
                     **stats.as_dict())  # g_small_sq, b_small, g_big_sq, b_big
        if step % 50 == 0:
            with torch.no_grad():
                out = model(x_test)
                run.log_eval(step, split="test", loss=nn.functional.cross_entropy(out, y_test).item(),
                             accuracy=(out.argmax(1) == y_test).float().mean().item(), examples=examples)
    print(f"run {run.run_id}: {args.steps} steps logged to {args.db}")
