"""Tasks: a dataset (finite and resident on the device, or an infinite stream) plus a model and a loss.

- digits   scikit-learn's 8x8 digits (shipped), fixed 80/20 split, MLP 64-128-10. Trains in seconds.
- linreg   fresh Gaussian sample every step; its noise scale is known in closed form (calibration).
- teacher  infinite stream labelled by a fixed random teacher network: no overfitting, pure
           optimisation speed, the regime of the critical-batch-size theory.
- mnist, cifar10  the standard files from --data-dir (see trainer/datasets.py).
- charlm   a small GPT-style decoder on the bytes of Python's standard-library sources, split by file
           (trainer/charlm.py); loss in nats per character, tokens per example = --context.

No model uses batch norm: it would make micro-batch gradients differ from slices of the batch gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer import charlm, datasets
from trainer.gns import linreg_b_simple, linreg_population_loss

TASKS = ("digits", "linreg", "teacher", "mnist", "cifar10", "charlm")
EVAL_CHUNK = 4096
CURVATURE_EXAMPLES = 512  # fixed examples behind --curvature: half for the Hessian, half for gradients
# charlm: defaults that reach a test loss of 1.57 nats/char (unigram entropy 3.12) in 1,000 AdamW steps of
# B = 32 (lr 3e-3, warmup-cosine), 3.4 CPU-minutes on one core; evaluation on fixed subsets (a full pass
# over 25k windows would cost more than the training between two evaluations)
CHARLM_DEFAULTS = {"context": 64, "layers": 2, "width": 128}
CHARLM_EVAL_WINDOWS = 512
CHARLM_CURVATURE_WINDOWS = 32  # an HVP costs ~2.5 forward+backward passes of its 16 windows (bench/charlm.md)


@dataclass
class TaskOptions:
    """Task knobs from the command line (each task reads the ones it needs)."""

    dim: int | None = None  # linreg/teacher input dimension
    noise: float = 1.0  # linreg label noise sigma
    data_dir: str | None = None  # mnist/cifar10
    context: int | None = None  # charlm: characters per example (default CHARLM_DEFAULTS)
    layers: int | None = None  # charlm: transformer blocks
    width: int | None = None  # charlm: model width (heads of 32)


@dataclass
class Task:
    """Everything the training loop needs to know about a task."""

    name: str
    model_name: str
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_size: int | None  # None: infinite stream (an "epoch" is then undefined)
    classification: bool
    device: torch.device
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default=None)
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)
    exact_eval: Callable[[nn.Module], dict[str, float]] | None = field(repr=False, default=None)
    info: dict = field(default_factory=dict)  # task constants worth storing in runs.config
    eval_chunk: int = EVAL_CHUNK  # examples per forward pass when evaluating
    tokens_per_example: int | None = None  # charlm: the context; None for tasks without tokens
    # a fixed draw of n training examples, the same at every call (curvature measurements)
    fixed_sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = field(repr=False, default=None)
    curvature_examples: int = CURVATURE_EXAMPLES

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `n` training examples (device tensors)."""
        return self.sample(n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Mean loss (and accuracy) per evaluation split, as device tensors: the caller decides when to sync."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        was_training = model.training
        model.eval()
        for split, (x, y) in self.eval_sets.items():
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            for xs, ys in zip(x.split(self.eval_chunk), y.split(self.eval_chunk), strict=True):
                out_k = model(xs)
                loss_sum += self.loss_fn(out_k, ys) * len(xs)
                if self.classification:
                    correct += (out_k.argmax(-1) == ys).sum()
            # accuracy per target: per example for classifiers, per character for charlm
            out[split] = (loss_sum / len(x), correct / y.numel() if self.classification else None)
        model.train(was_training)
        return out


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn() -> nn.Sequential:
    """A CIFAR-10 CNN without batch norm (two conv blocks, one hidden linear layer)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def _dataset_sampler(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Callable:
    """Shuffle each epoch without replacement; a batch may straddle two epochs (no dropped examples).

    The permutation lives on the device and batches are gathered there: no per-step host work
    beyond two integers.
    """
    n = x.shape[0]
    state = {"perm": torch.randperm(n, generator=gen, device=x.device), "pos": 0}

    def sample(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = []
        while size > 0:
            if state["pos"] >= n:
                state["perm"] = torch.randperm(n, generator=gen, device=x.device)
                state["pos"] = 0
            take = min(size, n - state["pos"])
            pieces.append(state["perm"][state["pos"]:state["pos"] + take])
            state["pos"] += take
            size -= take
        idx = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return x[idx], y[idx]

    return sample


def _fixed_subset(x: torch.Tensor, y: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """The first n examples of one fixed permutation (the same for every run and seed)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2718281)).to(x.device)

    def fixed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = perm[:n]
        return x[idx], y[idx]

    return fixed


def _fixed_draw(sample_with: Callable[[int, torch.Generator], tuple], device: torch.device,
                seed: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A stream task's fixed sample: n examples drawn afresh from one seed at every call (not the
    training generator, whose position must not depend on whether curvature is measured)."""
    def fixed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_with(n, torch.Generator(device=device).manual_seed(seed + 15485863))

    return fixed


def _dataset_task(name: str, model_name: str, build: Callable[[], nn.Module], train, test,
                  device: torch.device, gen: torch.Generator) -> Task:
    x_tr, y_tr = (torch.from_numpy(a).to(device) for a in train)
    x_te, y_te = (torch.from_numpy(a).to(device) for a in test)
    return Task(name, model_name, build, F.cross_entropy, len(x_tr), True, device,
                sample=_dataset_sampler(x_tr, y_tr, gen),
                eval_sets={"train": (x_tr, y_tr), "test": (x_te, y_te)},
                info={"train_size": len(x_tr), "test_size": len(x_te)},
                fixed_sample=_fixed_subset(x_tr, y_tr))


def _charlm(opts: TaskOptions, device: torch.device, gen: torch.Generator) -> Task:
    context = opts.context or CHARLM_DEFAULTS["context"]
    layers = opts.layers or CHARLM_DEFAULTS["layers"]
    width = opts.width or CHARLM_DEFAULTS["width"]
    heads = charlm.heads_for(width)
    corpus = charlm.load_corpus()
    x_tr, y_tr = (t.to(device) for t in charlm.windows(corpus.train, context))
    x_te, y_te = (t.to(device) for t in charlm.windows(corpus.test, context))
    pick = torch.Generator().manual_seed(31415)
    sub_tr = torch.randperm(len(x_tr), generator=pick)[:CHARLM_EVAL_WINDOWS].to(device)
    sub_te = torch.randperm(len(x_te), generator=pick)[:CHARLM_EVAL_WINDOWS].to(device)
    return Task(
        "charlm", f"gpt-c{context}-l{layers}-w{width}-h{heads}",
        lambda: charlm.CharGPT(context, layers, width, heads), charlm.char_loss, len(x_tr), True, device,
        sample=_dataset_sampler(x_tr, y_tr, gen),
        eval_sets={"train": (x_tr[sub_tr], y_tr[sub_tr]), "test": (x_te[sub_te], y_te[sub_te])},
        info={"train_size": len(x_tr), "test_size": len(x_te), "context": context, "layers": layers,
              "width": width, "heads": heads, "vocab": charlm.VOCAB, "train_chars": len(corpus.train),
              "test_chars": len(corpus.test), "unigram_entropy": corpus.unigram_entropy(),
              "eval_windows": CHARLM_EVAL_WINDOWS, "stdlib": corpus.source, "text_digest": corpus.digest,
              "train_files": list(corpus.train_files), "test_files": list(corpus.test_files)},
        eval_chunk=128, tokens_per_example=context, fixed_sample=_fixed_subset(x_tr, y_tr),
        curvature_examples=CHARLM_CURVATURE_WINDOWS,
    )


def _linreg(opts: TaskOptions, device: torch.device, gen: torch.Generator, seed: int) -> Task:
    d, sigma = opts.dim or 10, opts.noise
    w_star = torch.randn(d, generator=torch.Generator().manual_seed(seed + 7919)).to(device)

    def sample_with(n: int, g: torch.Generator):
        x = torch.randn(n, d, generator=g, device=device)
        y = x @ w_star + sigma * torch.randn(n, generator=g, device=device)
        return x, y

    def sample(n: int):
        return sample_with(n, gen)

    def build() -> nn.Module:
        model = nn.Linear(d, 1, bias=False)
        nn.init.zeros_(model.weight)  # start at w = 0, so |delta|^2 = |w*|^2
        return model

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(-1) - y).square().mean()

    def exact(model: nn.Module) -> dict[str, float]:
        """Population loss and the closed-form B_simple at the current weights (no sampling noise)."""
        delta_sq = float((model.weight.detach().reshape(-1) - w_star).square().sum())
        return {"loss": linreg_population_loss(delta_sq, sigma), "delta_sq": delta_sq,
                "b_simple_exact": linreg_b_simple(d, sigma, delta_sq) if delta_sq > 0 else math.inf}

    return Task("linreg", f"linear-{d}", build, loss_fn, None, False, device, sample=sample,
                exact_eval=exact, info={"dim": d, "noise": sigma},
                fixed_sample=_fixed_draw(sample_with, device, seed))


def _teacher(opts: TaskOptions, device: torch.device, gen: torch.Generator, seed: int) -> Task:
    d, classes, hidden = opts.dim or 32, 10, 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 104729)
        teacher = mlp([d, 64, classes]).to(device).requires_grad_(False)

    def sample_with(n: int, g: torch.Generator):
        x = torch.randn(n, d, generator=g, device=device)
        return x, teacher(x).argmax(-1)

    def sample(n: int):
        return sample_with(n, gen)

    eval_gen = torch.Generator(device=device).manual_seed(seed + 1299709)
    x_test = torch.randn(EVAL_CHUNK, d, generator=eval_gen, device=device)
    return Task("teacher", f"mlp-{d}-{hidden}-{hidden}-{classes}", lambda: mlp([d, hidden, hidden, classes]),
                F.cross_entropy, None, True, device, sample=sample,
                eval_sets={"test": (x_test, teacher(x_test).argmax(-1))},
                info={"dim": d, "classes": classes, "teacher": f"mlp-{d}-64-{classes}"},
                fixed_sample=_fixed_draw(sample_with, device, seed))


def make_task(name: str, opts: TaskOptions, device: torch.device, seed: int = 0) -> Task:
    """Build a task: loads (and checks) its data, so a missing file fails here, before any run starts.

    `seed` drives the data order (and the stream tasks' samples); model init is seeded by the caller.
    Raises datasets.DataError or ValueError with a one-line message.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if name == "digits":
        x, y = datasets.load_digits()
        tr, te = datasets.split_indices(len(x))
        return _dataset_task("digits", "mlp-64-128-10", lambda: mlp([64, 128, 10]),
                             (x[tr], y[tr]), (x[te], y[te]), device, gen)
    if name == "linreg":
        return _linreg(opts, device, gen, seed)
    if name == "charlm":
        return _charlm(opts, device, gen)
    if name == "teacher":
        return _teacher(opts, device, gen, seed)
    if name in ("mnist", "cifar10"):
        if not opts.data_dir:
            raise ValueError(f"--task {name} needs --data-dir DIR holding the standard {name} files")
        load = datasets.load_mnist if name == "mnist" else datasets.load_cifar10
        train, test = load(opts.data_dir, "train"), load(opts.data_dir, "test")
        if name == "mnist":
            return _dataset_task("mnist", "mlp-784-256-10", lambda: mlp([784, 256, 10]), train, test, device, gen)
        return _dataset_task("cifar10", "cnn-32-64-256", small_cnn, train, test, device, gen)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
