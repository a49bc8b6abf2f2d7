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


def train_in_process(device: str = "cpu", on_eval=None, **options) -> tuple[RecordingRun, TrainResult]:
    """Run `train` on a RecordingRun with TrainConfig(**options).

    on_eval(model): called with the model at every evaluation (the same parameters the step rows
    after it were logged with), e.g. to compute exact per-example statistics there.
    """
    import torch

    cfg = TrainConfig(device=device, **options)
    task = make_task(cfg.task, TaskOptions(dim=cfg.dim, noise=cfg.noise, data_dir=cfg.data_dir),
                     torch.device(device), cfg.seed)
    if on_eval is not None:
        evaluate = task.evaluate

        def evaluate_and_call(model):
            on_eval(model)
            return evaluate(model)

        task.evaluate = evaluate_and_call
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


# --- small models and exact per-example gradients for the noise-scale tests ----------------------

def small_models():
    """name -> (model factory, input batch factory, loss): an MLP, a CNN, a transformer block, and one
    with nn.MultiheadAttention (packed projections: no per-example rule, the fallback)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """A pre-LN transformer block in the nanoGPT style: Linear q/k/v/o, LayerNorm, token and position
        embeddings, a Linear head; `mha=True` uses nn.MultiheadAttention instead."""

        def __init__(self, vocab=13, t=6, d=16, heads=2, mha=False):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.heads, self.mha = heads, (nn.MultiheadAttention(d, heads, batch_first=True) if mha else None)
            if not mha:
                self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.head = nn.Linear(d, vocab)

        def forward(self, idx):
            n, t = idx.shape
            pos = torch.arange(t, device=idx.device).expand(n, t)
            x = self.tok(idx) + self.pos(pos)
            h = self.ln1(x)
            if self.mha is not None:
                a, _ = self.mha(h, h, h, need_weights=False)
            else:
                q, k, v = self.qkv(h).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
                a = self.proj(a)
            x = x + a
            x = x + self.ff(self.ln2(x))
            return self.head(x)

    def seq_loss(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def images(gen, n):
        return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)

    def tokens(gen, n):
        x = torch.randint(0, 13, (n, 6), generator=gen)
        return x, (x * 3 + 1) % 13

    def vectors(gen, n):
        return torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)

    cnn = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(6, 5))
    mlp = lambda: nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 4))  # noqa: E731
    return {
        "mlp": (mlp, vectors, F.cross_entropy),
        "cnn": (cnn, images, F.cross_entropy),
        "transformer": (Block, tokens, seq_loss),
        "mha": (lambda: Block(mha=True), tokens, seq_loss),
    }


def exact_b_simple(model, loss_fn, x, y, chunk: int = 512) -> tuple[float, float, float]:
    """(B_simple, |G|^2, tr(Sigma)) over the whole set (x, y) at the model's parameters, from torch.func.

    Per-example gradients in chunks (float32), their norms and sum accumulated in float64.
    """
    import torch

    total, sq_sum = None, 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        g = per_example_grads(model, loss_fn, xs, ys, dtype=None)
        sq_sum += float(g.square().sum(dtype=torch.float64))
        part = g.sum(0, dtype=torch.float64)
        total = part if total is None else total + part
    mean = total / len(x)
    g_sq = float(mean @ mean)
    tr = sq_sum / len(x) - g_sq
    return tr / g_sq, g_sq, tr


def per_example_grads(model, loss_fn, x, y, dtype="float64"):
    """(N, P) matrix of exact per-example gradients (torch.func vmap(grad)), in parameter order (float64,
    or the parameters' dtype with dtype=None)."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g[k].reshape(len(x), -1) for k in params], 1)
    return flat.double() if dtype == "float64" else flat


def spawn_two(cases, tmp) -> str:
    """Run cases(rank, world, rendezvous file, output prefix) in 2 spawned processes (one spawn costs seconds:
    every case of a module goes in it); returns the prefix each case saved its results under."""
    import torch.multiprocessing as mp

    mp.start_processes(cases, args=(2, str(tmp / "rdzv"), str(tmp / "out")), nprocs=2, join=True, start_method="spawn")
    return str(tmp / "out")


def mixed_truth(g_pe, g_mb) -> tuple[float, float, float]:
    """(|G|^2, tr(Sigma), |g_big|^2) of a step with a per-example block (columns g_pe) and a block measured
    by 2 micro-batches (g_mb): the blocks' unbiased estimates add up."""
    n = len(g_pe)
    pe_small, pe_big = float(g_pe.square().sum(1).mean()), float(g_pe.mean(0).square().sum())
    mb_small = np.mean([float(gk.mean(0).square().sum()) for gk in g_mb.chunk(2)])
    mb_big = float(g_mb.mean(0).square().sum())
    want_g = (n * pe_big - pe_small) / (n - 1) + (n * mb_big - n / 2 * mb_small) / (n / 2)
    want_tr = (pe_small - pe_big) / (1 - 1 / n) + (mb_small - mb_big) / (2 / n - 1 / n)
    return want_g, want_tr, pe_big + mb_big
