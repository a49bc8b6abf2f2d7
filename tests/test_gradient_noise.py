"""GradientNoise (trainer/noise.py) against exact per-example gradients from torch.func.

Per step, each mode's ingredients are deterministic functions of the per-example gradients, so they
are checked exactly (to float32 rounding): per-example norms give mean_i |g_i|^2, accumulation hooks
give mean_k |mean_{i in k} g_i|^2, DDP gives mean over ranks of |local gradient|^2, and |g_big|^2 is
the norm of the batch mean. Then the unbiased |G|^2 and tr(Sigma) built from them are checked in
expectation against the population values of a finite pool sampled with replacement.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.trainer_helpers import mixed_truth, one_torch_thread, per_example_grads, small_models, spawn_two
from trainer.noise import GradientNoise

MODELS = small_models()
RTOL = 2e-5  # float32 sums of a few hundred terms vs float64 torch.func


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    with one_torch_thread(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # torch.func on SDPA (CPU)
        yield


def setup(name: str, n: int = 16, seed: int = 1):
    make, data, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y = data(torch.Generator().manual_seed(seed), n)
    return model, loss_fn, x, y, per_example_grads(model, loss_fn, x, y)


def micro_steps(model, loss_fn, x, y, k):
    model.zero_grad(set_to_none=True)
    for xk, yk in zip(x.chunk(k), y.chunk(k), strict=True):
        (loss_fn(model(xk), yk) / k).backward()


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_per_example_norms_are_exact_per_step(name):
    model, loss_fn, x, y, g = setup(name)
    gns = GradientNoise(model)
    loss_fn(model(x), y).backward()
    s = gns.step()
    assert s.complete and not s.micro_batch and s.b_small == 1.0 and s.b_big == len(x)
    assert len(s.per_example) == sum(1 for p in model.parameters())
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=RTOL)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=RTOL)
    # the same with accumulation (K = 4): still per-example norms, and the update is the batch mean
    micro_steps(model, loss_fn, x, y, 4)
    s4 = gns.step()
    assert s4.micro_batches == 4 and s4.b_small == 1.0
    assert float(s4.g_small_sq) == pytest.approx(float(s.g_small_sq), rel=RTOL)
    assert float(s4.g_big_sq) == pytest.approx(float(s.g_big_sq), rel=1e-4)


class _Checkpointed(torch.nn.Module):
    """An MLP whose middle layers run under activation checkpointing (recomputed during backward)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(12, 20), torch.nn.Linear(20, 20), torch.nn.Linear(20, 4)
        self.reentrant, self.checkpoint = reentrant, True

    def middle(self, h):
        return self.c(torch.tanh(self.b(h)))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.relu(self.a(x))
        return checkpoint(self.middle, h, use_reentrant=self.reentrant) if self.checkpoint else self.middle(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_keeps_every_layer_per_example_and_exact(reentrant):
    """Checkpointing recomputes the middle layers inside backward. Non-reentrant: the first forward hooked
    them and the recompute must not count as a second call (it made them fall back, with no small batch at
    K = 1); reentrant: the first forward runs without grad, the recompute is the one measured."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    x, y = MODELS["mlp"][1](torch.Generator().manual_seed(1), 16)
    loss_fn = torch.nn.functional.cross_entropy
    model.checkpoint = False  # torch.func does not run through checkpointing: the same function without it
    g = per_example_grads(model, loss_fn, x, y)
    model.checkpoint = True
    gns = GradientNoise(model)
    for k in (1, 2, 1):
        micro_steps(model, loss_fn, x, y, k)
        s = gns.step()
        assert s.complete and len(s.per_example) == 6 and not s.micro_batch
        assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
        assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


@pytest.mark.parametrize("seq", [False, True])
def test_hugging_face_conv1d_is_covered_like_linear(seq):
    """GPT-2's transformers.pytorch_utils.Conv1D (a Linear with the weight stored (in, out)) has the Linear
    rule, on rows and on sequences: exact against torch.func, every parameter per example."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(20, 12), torch.nn.Tanh(), Conv1D(4, 20))
    x = torch.randn(16, 5, 12) if seq else torch.randn(16, 12)
    y = torch.randn(16, 5, 4) if seq else torch.randn(16, 4)
    loss_fn = torch.nn.functional.mse_loss
    g = per_example_grads(model, loss_fn, x, y)
    gns = GradientNoise(model)
    loss_fn(model(x), y).backward()
    s = gns.step()
    assert set(gns.covered.values()) == {"Conv1D"} and len(gns.covered) == 2
    assert s.complete and len(s.per_example) == 4
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


class _NanoLayerNorm(torch.nn.Module):
    """nanoGPT's LayerNorm (optional bias), not nn.LayerNorm."""

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d)) if bias else None

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _NotANorm(torch.nn.Module):
    """Named like a norm, with a norm's parameters, but it does not normalise: must not be covered."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * torch.tanh(x)


def _norm_layer(kind: str, d: int):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    make = {"llama": LlamaRMSNorm, "t5": T5LayerNorm, "gemma": GemmaRMSNorm,
            "nanogpt": lambda d: _NanoLayerNorm(d, bias=True), "nanogpt_nobias": lambda d: _NanoLayerNorm(d, False),
            "notanorm": _NotANorm}[kind]
    layer = make(d)
    with torch.no_grad():  # away from the initial ones / zeros, so that w and 1 + w differ in the check
        layer.weight.add_(0.1 * torch.randn(d))
    return layer


@pytest.mark.parametrize("kind", ["llama", "t5", "gemma", "nanogpt", "nanogpt_nobias", "notanorm"])
def test_a_models_own_norm_classes_are_covered_once_their_output_is_checked(kind):
    """Hugging Face's RMSNorm classes (Llama's w * x_hat, Gemma's (1 + w) * x_hat, T5's), nanoGPT's LayerNorm:
    each is covered after its first output matched w * x_hat + b, and is exact against torch.func on
    sequences; a *Norm* class that does not normalise falls back to micro-batches (exact there at K = 2)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), _norm_layer(kind, 16), torch.nn.Linear(16, 4))
    x, y = torch.randn(16, 5, 12), torch.randn(16, 5, 4)
    loss_fn = torch.nn.functional.mse_loss
    g = per_example_grads(model, loss_fn, x, y)
    n_norm = sum(p.numel() for p in model[1].parameters())
    gns = GradientNoise(model, warn=False)
    loss_fn(model(x), y).backward()
    s = gns.step()
    if kind == "notanorm":
        assert "1" not in gns.covered and s.missing == ("1.weight",)
        micro_steps(model, loss_fn, x, y, 2)
        s = gns.step()
        assert s.complete and s.micro_batch == ("1.weight",)
        return
    assert gns.covered["1"] == type(model[1]).__name__ and s.complete and not s.micro_batch
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)
    norm_cols = g[:, 12 * 16 + 16: 12 * 16 + 16 + n_norm]  # the norm's own share is not negligible
    assert float(norm_cols.square().sum(1).mean()) > 1e-3 * float(g.square().sum(1).mean())


class _Scale(torch.nn.Module):
    """A layer of the user's own: y = w * x over the last dim (no rule built in)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * x


def test_a_registered_rule_covers_a_users_own_layer(monkeypatch):
    """register_rule(cls, rule, fits): the user's layer goes from micro-batches (no small batch at K = 1) to
    per example, exact against torch.func; fits is asked in the forward; a bad registration is refused."""
    import trainer.per_example as pe
    from trainer.noise import register_rule

    monkeypatch.setattr(pe, "_REGISTERED", {})
    monkeypatch.setattr(pe, "_FITS", dict(pe._FITS))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), _Scale(16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(16, 5, 12), torch.randn(16, 5, 4)
    loss_fn = torch.nn.functional.mse_loss
    g = per_example_grads(model, loss_fn, x, y)
    before = GradientNoise(model, warn=False)
    assert "1" not in before.covered
    before.close()
    asked = []

    def scale_sq(m, a, d):  # per example: sum over positions of d * a, then its squared norm, summed
        return (d * a).sum(1).square().sum()

    def scale_fits(m, a, out):
        asked.append(tuple(a.shape))
        return a.dim() == 3

    register_rule(_Scale, scale_sq, scale_fits)
    gns = GradientNoise(model)
    loss_fn(model(x), y).backward()
    s = gns.step()
    assert gns.covered["1"] == "_Scale" and s.complete and asked == [(16, 5, 16)]
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    for bad in ((torch.Tensor, scale_sq), (_Scale, None)):
        with pytest.raises(TypeError, match="register_rule"):
            register_rule(*bad)


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_create_graph_backward_gives_the_same_ingredients_and_no_graph(name):
    """The rules run in autograd's hooks, which have grad mode on only under create_graph=True: there they
    take detached inputs (no graph through the noise sums), elsewhere the tensors themselves."""
    model, loss_fn, x, y, _ = setup(name)
    gns = GradientNoise(model)
    loss_fn(model(x), y).backward()
    plain = gns.step()
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        loss_fn(model(x), y).backward(create_graph=True)
    graph = gns.step()
    model.zero_grad(set_to_none=True)  # the graph's reference cycle through .grad
    assert graph.complete and not graph.g_small_sq.requires_grad
    assert torch.equal(graph.g_small_sq, plain.g_small_sq)
    assert torch.equal(graph.g_big_sq.detach(), plain.g_big_sq)


class _HostReads(TorchDispatchMode):
    """Counts the ATen ops that read a tensor's value back to the host (.item(), float(), bool(): a device
    synchronisation on an accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "per_example", "k"), [("mlp", True, 1), ("transformer", True, 1),
                                                         ("cnn", True, 2), ("mlp", False, 2)])
def test_measuring_reads_nothing_back_to_the_host(name, per_example, k):
    """Hooks, rules and step() keep every value on the device: no host read per step (on a GPU each would
    stall the queue of kernels the Python runs ahead of)."""
    model, loss_fn, x, y, _ = setup(name)
    gns = GradientNoise(model, per_example=per_example)
    micro_steps(model, loss_fn, x, y, k)
    gns.step()  # the first step builds the plan
    with _HostReads() as mode:
        micro_steps(model, loss_fn, x, y, k)
        s = gns.step()
    assert s.complete and mode.reads == 0
    assert s.as_dict()["g_small_sq"] > 0  # (the one read, when the loop logs it)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_hooks_are_exact_per_step(name, k):
    model, loss_fn, x, y, g = setup(name)
    gns = GradientNoise(model, per_example=False)
    micro_steps(model, loss_fn, x, y, k)
    s = gns.step()
    want_small = float(np.mean([float(gk.mean(0).square().sum()) for gk in g.chunk(k)]))
    assert s.complete and not s.per_example and s.b_small == len(x) / k and s.b_big == len(x)
    assert float(s.g_small_sq) == pytest.approx(want_small, rel=RTOL)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


def test_loss_scale_and_uneven_micro_batches():
    """Micro-batches weighted by their share (b_k / B) and a GradScaler-like factor: same answer."""
    model, loss_fn, x, y, g = setup("mlp", n=15)
    gns = GradientNoise(model, per_example=False)
    parts = [(0, 4), (4, 15)]
    scale = 1024.0
    model.zero_grad(set_to_none=True)
    for a, b in parts:
        (loss_fn(model(x[a:b]), y[a:b]) * (b - a) / 15 * scale).backward()
    s = gns.step(loss_scale=[(b - a) / 15 * scale for a, b in parts])
    assert s.b_small == pytest.approx(2 / (1 / 4 + 1 / 11))
    want = np.mean([float(g[a:b].mean(0).square().sum()) for a, b in parts])
    assert float(s.g_small_sq) == pytest.approx(want, rel=RTOL)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


def test_fallback_for_layers_without_a_rule():
    """nn.MultiheadAttention has no per-example rule: its parameters fall back to micro-batch norms.

    K = 1: no small batch for them, so the step says it is incomplete and covers the other parameters
    exactly. K = 2: the two blocks' unbiased |G|^2 and tr(Sigma) add up exactly.
    """
    model, loss_fn, x, y, g = setup("mha")
    names = [n for n, _ in model.named_parameters()]
    gns = GradientNoise(model)
    assert "mha" not in gns.covered and {"tok", "pos", "ln1", "head"} <= set(gns.covered)
    fallback = np.array([n.startswith("mha.") for n in names])
    cols = np.concatenate([np.full(p.numel(), f) for p, f in zip(model.parameters(), fallback, strict=True)])
    g_pe, g_mb = g[:, ~torch.from_numpy(cols)], g[:, torch.from_numpy(cols)]
    with pytest.warns(RuntimeWarning, match="no small batch"):
        loss_fn(model(x), y).backward()
        s1 = gns.step()
    assert not s1.complete and set(s1.missing) == {n for n in names if n.startswith("mha.")}
    assert float(s1.g_small_sq) == pytest.approx(float(g_pe.square().sum(1).mean()), rel=RTOL)

    micro_steps(model, loss_fn, x, y, 2)
    s2 = gns.step()
    assert s2.complete and set(s2.micro_batch) == set(s1.missing) and s2.b_small == 1.0
    want_g, want_tr, want_big = mixed_truth(g_pe, g_mb)
    assert float(s2.g_sq) == pytest.approx(want_g, rel=1e-4)
    assert float(s2.tr_sigma) == pytest.approx(want_tr, rel=1e-4)
    assert float(s2.g_big_sq) == pytest.approx(want_big, rel=1e-4)
    # per-example-equivalent ingredients reproduce the same estimates
    assert float(s2.g_small_sq) == pytest.approx(want_g + want_tr, rel=1e-4)


class _Tied(torch.nn.Module):
    """Token embedding tied to the output head (GPT-2, nanoGPT): per position (`last=False`) or from the last
    position only; `reuse` calls `mid` (or the head) twice in one forward."""

    def __init__(self, padding_idx=None, last=False, reuse=None):
        super().__init__()
        nn = torch.nn
        self.emb, self.mid = nn.Embedding(13, 8, padding_idx=padding_idx), nn.Linear(8, 8)
        self.out = nn.Linear(8, 13, bias=False)
        self.out.weight = self.emb.weight
        self.last, self.reuse = last, reuse

    def forward(self, idx):
        h = torch.tanh(self.mid(self.emb(idx)))
        if self.reuse == "mid":
            h = torch.tanh(self.mid(h))
        if self.last:
            h = h[:, -1]
        out = self.out(h)
        return out + 0.1 * self.out(h) if self.reuse == "head" else out


def _tied_data(last: bool):
    x = torch.randint(0, 13, (8, 5), generator=torch.Generator().manual_seed(2))
    return x, (x[:, -1] + 1) % 13 if last else (x + 1) % 13


@pytest.mark.parametrize(("padding_idx", "last"), [(None, False), (0, False), (None, True)])
def test_a_weight_tied_between_embedding_and_head_is_measured_per_example(padding_idx, last):
    """|E_i + H_i|^2 = the Embedding rule + the Linear rule + 2 <E_i, H_i>: exact against torch.func at K = 1
    (complete, nothing by micro-batches) and K = 2, with a padding row and with a head on the last position."""
    torch.manual_seed(0)
    model = _Tied(padding_idx, last)
    x, y = _tied_data(last)
    loss_fn = torch.nn.functional.cross_entropy if last else MODELS["transformer"][2]
    g = per_example_grads(model, loss_fn, x, y)
    gns = GradientNoise(model)
    assert {"emb", "mid", "out"} == set(gns.covered)
    for k in (1, 2):
        micro_steps(model, loss_fn, x, y, k)
        s = gns.step()
        assert s.complete and not s.micro_batch and set(s.per_example) == {"emb.weight", "mid.weight", "mid.bias"}
        assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
        assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


@pytest.mark.parametrize("reuse", ["mid", "head"])
def test_reused_layers_fall_back_and_a_tied_pair_falls_back_together(reuse):
    """A layer called twice per forward has no exact per-example norm from one call: its parameters are
    measured by micro-batches. When it is the tied head, the embedding sharing its weight goes with it."""
    torch.manual_seed(0)
    model = _Tied(reuse=reuse)
    x, y = _tied_data(False)
    loss_fn = MODELS["transformer"][2]
    g = per_example_grads(model, loss_fn, x, y)
    gns = GradientNoise(model)
    micro_steps(model, loss_fn, x, y, 2)
    s = gns.step()
    fell = {"mid.weight", "mid.bias"} if reuse == "mid" else {"emb.weight"}
    assert s.complete and set(s.micro_batch) == fell and set(s.per_example) == {"emb.weight", "mid.weight",
                                                                                 "mid.bias"} - fell
    assert ("emb" in gns.covered) == (reuse == "mid") and ("mid" in gns.covered) == (reuse == "head")
    names = [n for n, _ in model.named_parameters()]
    cols = torch.cat([torch.full((p.numel(),), n in fell) for n, p in zip(names, model.parameters(), strict=True)])
    want_g, want_tr, want_big = mixed_truth(g[:, ~cols], g[:, cols])
    assert float(s.g_sq) == pytest.approx(want_g, rel=1e-4)
    assert float(s.tr_sigma) == pytest.approx(want_tr, rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(want_big, rel=1e-4)


@pytest.mark.parametrize(("name", "per_example", "k"), [("mlp", True, 1), ("mlp", False, 2),
                                                        ("transformer", True, 1)])
def test_unbiased_in_expectation(name, per_example, k):
    """Averaged over batches drawn with replacement, |G|^2 and tr(Sigma) match the pool's exact values."""
    model, loss_fn, x, y, g = setup(name, n=256, seed=3)
    mean = g.mean(0)
    exact = (float(mean @ mean), float((g - mean).square().sum(1).mean()))
    gns = GradientNoise(model, per_example=per_example)
    gen, draws = torch.Generator().manual_seed(4), []
    for _ in range(150):
        idx = torch.randint(0, len(x), (16,), generator=gen)
        micro_steps(model, loss_fn, x[idx], y[idx], k)
        s = gns.step()
        draws.append((float(s.g_sq), float(s.tr_sigma)))
    est = np.array(draws)
    se = est.std(0) / np.sqrt(len(est))
    for got, err, want in zip(est.mean(0), se, exact, strict=True):
        assert abs(got - want) < 4 * err, (got, want, err)


# --- DDP: two real gloo processes --------------------------------------------------------------

# (model, per_example, K, comm_hook, no_sync, buckets): "tiny" buckets (a parameter or two each) viewed
# by the gradients (gradient_as_bucket_view), after DDP's rebuild on step 2
DDP_CASES = [("mlp", True, 1, True, True, "one"), ("mlp", False, 2, True, True, "one"), ("cnn", True, 1, True, True, "one"),
             ("transformer", True, 2, True, True, "one"), ("mlp", True, 2, False, True, "one"),
             ("mha", True, 1, True, True, "one"), ("mlp", False, 2, True, False, "one"),
             ("mha", True, 1, True, True, "tiny"), ("mlp", False, 1, True, True, "tiny")]
TINY = {"bucket_cap_mb": 0.0005, "gradient_as_bucket_view": True}


class Sometimes(torch.nn.Module):
    """Linear a, a bare `scale` (no rule: measured by ranks) and Linear b; with `twice`, a is called twice
    in one forward, so its per-example rule no longer fits and it falls back part-way through a step."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(12, 20), torch.nn.Linear(20, 4)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 20))
        self.twice = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.twice:
            h = torch.tanh(self.a(h[:, :12]))
        return self.b(h * self.scale)


def _ddp_cases(rank: int, world: int, rdzv: str, out: str) -> None:
    """Every DDP case in one pair of processes (a spawn costs seconds; a case, a fraction of one). A case
    that raises saves its traceback for its own test to show."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        special = {"half": _half_case, "sometimes": _sometimes_case, "ignored": _ignored_case, "uneven": _uneven_case}
        for case in [*DDP_CASES, *special]:
            path = f"{out}.{case if isinstance(case, str) else '-'.join(map(str, case))}.{rank}"
            try:
                torch.save(special[case](rank, world) if isinstance(case, str) else _ddp_case(rank, world, *case),
                           path)
            except Exception:
                torch.save({"error": traceback.format_exc()}, path)
    finally:
        dist.destroy_process_group()


def _ddp_case(rank: int, world: int, name: str, per_example: bool, k: int, comm: bool, no_sync: bool,
              buckets: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    make, data, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = DDP(make(), **(TINY if buckets == "tiny" else {}))
    x, y = data(torch.Generator().manual_seed(1), 16)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    gns = GradientNoise(model, per_example=per_example, comm_hook=comm)
    steps = []
    for _ in range(2):  # the same batch twice (no optimizer step): the first step may switch methods
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for j, (xk, yk) in enumerate(zip(xs.chunk(k), ys.chunk(k), strict=True)):
                with model.no_sync() if no_sync and j < k - 1 else contextlib.nullcontext():
                    (loss_fn(model(xk), yk) / k).backward()
            launched = gns._cur.comm is not None  # the sums left with the gradients, before step()
            s = gns.step()
        steps.append({"stats": s.as_dict(), "complete": s.complete, "launched": launched,
                      "warnings": [str(w.message) for w in caught]})
    return {"steps": steps, "hook": gns.comm_hook,
            "grad": torch.cat([p.grad.reshape(-1) for p in model.parameters()])}


def _sometimes_case(rank: int, world: int) -> dict:
    """Sometimes under DDP, by ranks whatever K (accumulation=False): 2 micro-batches under no_sync, `a`
    called twice in the second, the same batch for 2 steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, data, loss_fn = MODELS["mlp"]
    torch.manual_seed(0)
    model = DDP(Sometimes())
    x, y = data(torch.Generator().manual_seed(6), 16)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    gns = GradientNoise(model, accumulation=False, warn=False)
    steps = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        for j, (xk, yk) in enumerate(zip(xs.chunk(2), ys.chunk(2), strict=True)):
            model.module.twice = j == 1
            with model.no_sync() if j == 0 else contextlib.nullcontext():
                (loss_fn(model(xk), yk) / 2).backward()
        s = gns.step()
        steps.append({"stats": s.as_dict(), "complete": s.complete, "missing": s.missing,
                      "per_example": s.per_example, "by_ranks": s.micro_batch, "fallback": gns.fallback})
    return {"steps": steps}


def _ignored_case(rank: int, world: int) -> dict:
    """The MLP under DDP told to ignore 4.bias (not reduced over the ranks): K = 1, per example and by ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    make, data, loss_fn = MODELS["mlp"]
    x, y = data(torch.Generator().manual_seed(1), 16)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    out = {}
    for per_example in (True, False):
        torch.manual_seed(0)
        net = make()
        DDP._set_params_and_buffers_to_ignore_for_model(net, ["4.bias"])
        model = DDP(net)
        gns = GradientNoise(model, per_example=per_example)
        loss_fn(model(xs), ys).backward()
        s = gns.step()
        out[per_example] = (s.as_dict(), s.complete, s.per_example + s.micro_batch + s.missing, sorted(gns.covered))
    return out


def _uneven_case(rank: int, world: int) -> dict:
    """Local batches of 10 and 6 (and 8 and 8), with GradientNoise's comm hook and without: what as_dict says."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import trainer.noise_stats as ns

    make, data, loss_fn = MODELS["mlp"]
    x, y = data(torch.Generator().manual_seed(1), 16)
    out = {}
    for split in ((10, 6), (8, 8)):
        for comm in (True, False):
            ns._UNEVEN.clear()
            torch.manual_seed(0)
            model = DDP(make())
            gns = GradientNoise(model, comm_hook=comm)
            xs, ys = x.split(split)[rank], y.split(split)[rank]
            loss_fn(model(xs), ys).backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = gns.step().as_dict()
            out[split, comm] = (row, [str(w.message) for w in caught])
    return out


def test_ddp_uneven_local_batches_are_reported_not_silent(ddp_out):
    """The ingredients assume equal local batches (each rank's b_big is its own count times the world): when
    the ranks' counts differ, as_dict() says so once, with the true total, on every rank; equal ones are quiet."""
    r0, r1 = (torch.load(f"{ddp_out}.uneven.{r}") for r in (0, 1))
    for res in (r0, r1):
        assert "error" not in res, res.get("error")
        for comm in (True, False):
            row, said = res[(10, 6), comm]
            assert len(said) == 1 and "local batches differ (16 examples in all" in said[0]
            assert res[(8, 8), comm][1] == [] and res[(8, 8), comm][0]["b_big"] == 16


def test_ddp_parameters_ddp_ignores_are_not_measured(ddp_out):
    """A parameter DDP ignores is not data-parallel (each rank keeps its own gradient): it is in neither
    batch, and its layer gets no per-example rule (the rule would count it); both ranks agree."""
    r0, r1 = (torch.load(f"{ddp_out}.ignored.{r}") for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    _, _, _, _, g = setup("mlp")
    model = MODELS["mlp"][0]()
    keep = torch.cat([torch.full((p.numel(),), n != "4.bias") for n, p in model.named_parameters()])
    g = g[:, keep]
    for pe in (True, False):
        stats, complete, names, covered = r0[pe]
        assert stats == pytest.approx(r1[pe][0], rel=1e-6) and complete
        assert "4.bias" not in names and len(names) == 5 and "4" not in covered
        assert stats["g_big_sq"] == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)
    assert r0[False][0]["b_small"] == 8 and r0[False][0]["g_small_sq"] == pytest.approx(_small(g, 8), rel=RTOL)
    w = torch.cat([torch.full((p.numel(),), n.startswith("4.")) for n, p in model.named_parameters() if n != "4.bias"])
    assert r0[True][0]["g_small_sq"] == pytest.approx(_mixed(g[:, ~w], g[:, w], 8), rel=1e-4)


def test_sparse_gradients_are_refused_at_once():
    from torch import nn

    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="sparse gradients are not supported.*'0'"):
        GradientNoise(model)
    GradientNoise(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))).close()


def test_ddp_a_layer_that_falls_back_part_way_through_a_step(ddp_out):
    """Under the comm hook, a layer that stops fitting in micro-batch 2 is missing from that step (its
    local gradient is in the buckets, its per-example terms only half there): neither block counts it, and
    the rank block of `scale` stays exact. From the next step it is measured by ranks with `scale`."""
    r0, r1 = (torch.load(f"{ddp_out}.sometimes.{r}") for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    _, data, loss_fn = MODELS["mlp"]
    torch.manual_seed(0)
    model = Sometimes()
    x, y = data(torch.Generator().manual_seed(6), 16)
    parts = []
    for j, (xk, yk) in enumerate(zip(x.chunk(4), y.chunk(4), strict=True)):  # rank r's micro-batch j % 2
        model.twice = j % 2 == 1
        parts.append(per_example_grads(model, loss_fn, xk, yk))
    g = torch.cat(parts)
    col = {n: torch.full((p.numel(),), True) for n, p in model.named_parameters()}

    def cols(keep) -> torch.Tensor:
        return torch.cat([c if n in keep else ~c for n, c in col.items()])

    s1, s2 = r0["steps"]
    assert not s1["complete"] and set(s1["missing"]) == {"a.weight", "a.bias"}
    assert set(s1["per_example"]) == {"b.weight", "b.bias"} and s1["by_ranks"] == ("scale",)
    pe, rk = cols({"b.weight", "b.bias"}), cols({"scale"})
    assert s1["stats"]["b_small"] == 1.0
    assert s1["stats"]["g_small_sq"] == pytest.approx(_mixed(g[:, pe], g[:, rk], 8), rel=1e-4)
    assert s1["stats"]["g_big_sq"] == pytest.approx(float(g[:, pe | rk].mean(0).square().sum()), rel=1e-4)
    assert s2["complete"] and set(s2["by_ranks"]) == {"a.weight", "a.bias", "scale"}
    assert set(s1["fallback"]) == set(s2["fallback"]) == {"a.weight", "a.bias", "scale"}
    rk2 = cols({"a.weight", "a.bias", "scale"})
    assert s2["stats"]["g_small_sq"] == pytest.approx(_mixed(g[:, pe], g[:, rk2], 8), rel=1e-4)
    assert s2["stats"]["g_big_sq"] == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)
    for a, b in zip(r0["steps"], r1["steps"], strict=True):
        assert a["stats"] == pytest.approx(b["stats"], rel=1e-6)


def _small(g: torch.Tensor, b: int) -> float:
    """mean over the batches of b examples of |their mean gradient|^2."""
    return float(np.mean([float(gk.mean(0).square().sum()) for gk in g.chunk(len(g) // b)]))


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> str:
    return spawn_two(_ddp_cases, tmp_path_factory.mktemp("ddp"))


def _mixed(g_pe: torch.Tensor, g_rk: torch.Tensor, b_rk: int) -> float:
    """The per-example-equivalent g_small_sq (b_small = 1) of a per-example block and a rank block
    (b_small = b_rk): their unbiased |G|^2 and tr(Sigma) add up."""
    n = len(g_pe)
    pe_small, pe_big = float(g_pe.square().sum(1).mean()), float(g_pe.mean(0).square().sum())
    rk_small, rk_big = _small(g_rk, b_rk), float(g_rk.mean(0).square().sum())
    g_sq = (n * pe_big - pe_small) / (n - 1) + (n * rk_big - b_rk * rk_small) / (n - b_rk)
    tr = (pe_small - pe_big) / (1 - 1 / n) + (rk_small - rk_big) / (1 / b_rk - 1 / n)
    return g_sq + tr


@pytest.mark.parametrize(("name", "per_example", "k", "comm", "no_sync", "buckets"), DDP_CASES)
def test_ddp_two_gloo_processes(ddp_out, name, per_example, k, comm, no_sync, buckets):
    """Each rank's local gradient (or its micro-batches, or its examples) is the small batch, the
    all-reduced one the big batch; both ranks report the same ingredients, whether the sums travel behind
    the gradients (GradientNoise's DDP communication hook) or in an all-reduce of their own.

    Under the comm hook, parameters without a per-example rule are measured by ranks from the buckets
    (b_small = the rank's 8 examples; for nn.MultiheadAttention's, only their views in a bucket), until a
    step with 2 micro-batches switches them to micro-batch hooks (b_small = 8 / k). A loop that syncs every
    micro-batch (no no_sync) voids the buckets' step, with a warning, and is measured by micro-batches after.
    Tiny buckets: the rank block is summed over several buckets, before and after DDP rebuilds them."""
    _, _, _, _, g = setup(name)
    case = "-".join(map(str, (name, per_example, k, comm, no_sync, buckets)))
    r0, r1 = (torch.load(f"{ddp_out}.{case}.{r}") for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    assert r0["hook"] == r1["hook"] == comm
    big = float(g.mean(0).square().sum())
    assert float(r0["grad"].double().square().sum()) == pytest.approx(big, rel=1e-4)
    if per_example and name == "mha":  # per-example blocks plus the rank block of the mha parameters
        model = MODELS[name][0]()
        cols = torch.cat([torch.full((p.numel(),), nm.startswith("mha.")) for nm, p in model.named_parameters()])
        want = [(1.0, _mixed(g[:, ~cols], g[:, cols], 8))] * 2
    elif per_example:
        want = [(1.0, float(g.square().sum(1).mean()))] * 2
    elif no_sync:
        want = [(8.0, _small(g, 8)), (8 / k, _small(g, 8 // k))]
    else:
        want = [None, (8 / k, _small(g, 8 // k))]
    for step, (a, b, w) in enumerate(zip(r0["steps"], r1["steps"], want, strict=True), 1):
        assert a["stats"] == pytest.approx(b["stats"], rel=1e-6) and a["launched"] == b["launched"] == comm
        if w is None:
            assert a["stats"] == {} and not a["complete"]
            assert any("more than once in one step" in m for m in a["warnings"]), a["warnings"]
            continue
        s = a["stats"]
        assert a["complete"], (step, a)
        assert s["b_big"] == 16 and s["g_big_sq"] == pytest.approx(big, rel=1e-4)
        assert s["b_small"] == w[0], step
        assert s["g_small_sq"] == pytest.approx(w[1], rel=1e-4 if name == "mha" else RTOL), step


def test_a_layer_without_the_batch_dimension_falls_back():
    """Positions embedded once as (T, d) and broadcast over the batch (charlm, nanoGPT): the embedding
    sees no examples, so its gradient is measured by micro-batches, never mistaken for T examples."""
    from torch import nn

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(13, 8), nn.Embedding(6, 8), nn.Linear(8, 13)

        def forward(self, idx):
            return self.head(torch.tanh(self.tok(idx) + self.pos(torch.arange(idx.shape[1]))))

    torch.manual_seed(0)
    model = Broadcast()
    x = torch.randint(0, 13, (6, 6), generator=torch.Generator().manual_seed(2))  # N == T on purpose
    y = (x + 1) % 13
    loss_fn = MODELS["transformer"][2]
    g = per_example_grads(model, loss_fn, x, y)
    gns = GradientNoise(model, warn=False)
    loss_fn(model(x), y).backward()
    s1 = gns.step()
    assert not s1.complete and s1.missing == ("pos.weight",)
    micro_steps(model, loss_fn, x, y, 2)
    s2 = gns.step()
    assert s2.complete and s2.micro_batch == ("pos.weight",)
    pos = slice(13 * 8, 13 * 8 + 6 * 8)  # tok, then pos, then head in parameter order
    g_pe = torch.cat([g[:, :pos.start], g[:, pos.stop:]], 1)
    g_mb = g[:, pos]
    n = len(x)
    pe_small, pe_big = float(g_pe.square().sum(1).mean()), float(g_pe.mean(0).square().sum())
    mb_small = np.mean([float(gk.mean(0).square().sum()) for gk in g_mb.chunk(2)])
    mb_big = float(g_mb.mean(0).square().sum())
    want_tr = (pe_small - pe_big) / (1 - 1 / n) + (mb_small - mb_big) / (2 / n - 1 / n)
    assert float(s2.tr_sigma) == pytest.approx(want_tr, rel=1e-4)


def test_a_plain_user_loop_logs_the_noise_columns_on_every_step(tmp_path):
    """The module docstring's loop, with the real collector and a real DuckDB store."""
    import duckdb

    import collector
    from trainer.gns import b_simple_window

    make, data, loss_fn = MODELS["mlp"]
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gns = GradientNoise(model)
    gen, k = torch.Generator().manual_seed(5), 2
    db = tmp_path / "runs.duckdb"
    with collector.start_run(db=db, name="user-loop") as run:
        for step in range(1, 41):
            x, y = data(gen, 32)
            for xk, yk in zip(x.chunk(k), y.chunk(k), strict=True):
                loss = loss_fn(model(xk), yk) / k
                loss.backward()
            stats = gns.step()
            opt.step()
            opt.zero_grad()
            run.log_step(step, examples=32 * step, loss=float(loss.detach()) * k, **stats.as_dict())
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT g_small_sq, b_small, g_big_sq, b_big FROM steps ORDER BY step").fetchall()
    con.close()
    assert len(rows) == 40 and all(r[1] == 1.0 and r[3] == 32.0 and r[0] > r[2] > 0 for r in rows)
    assert b_simple_window(*map(np.array, zip(*rows, strict=True))) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "per_example", "k"), [("mlp", True, 1), ("transformer", True, 1), ("mlp", False, 2)])
def test_autocast_and_grad_scaler(dtype, name, per_example, k):
    """Mixed precision on the CPU: under torch.autocast the layer output gradients are half precision (the
    rules sum in float32), and with a GradScaler every gradient the hooks and `.grad` see is multiplied by
    the scale: step(loss_scale=scale / K) gives the float32 model's exact ingredients."""
    model, loss_fn, x, y, g = setup(name)
    gns = GradientNoise(model, per_example=per_example)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    got = []
    for scaled in (True, False):
        model.zero_grad(set_to_none=True)
        for xk, yk in zip(x.chunk(k), y.chunk(k), strict=True):
            with torch.autocast("cpu", dtype=dtype):
                loss = loss_fn(model(xk), yk) / k
            (scaler.scale(loss) if scaled else loss).backward()
        s = gns.step(loss_scale=scaler.get_scale() / k if scaled else None)
        got.append((float(s.g_small_sq), float(s.g_big_sq)))
    if per_example:
        want = (float(g.square().sum(1).mean()), float(g.mean(0).square().sum()))
    else:
        want = (float(np.mean([float(gk.mean(0).square().sum()) for gk in g.chunk(k)])), float(g.mean(0).square().sum()))
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-3  # seen: 1e-3 and 2e-4 (8 and 11 bits of mantissa)
    for scaled_or_not in got:
        assert scaled_or_not == pytest.approx(want, rel=tol)
    assert got[0] == pytest.approx(got[1], rel=tol / 4)  # the scale is a power of two: it divides out


def test_a_layer_that_falls_back_part_way_through_a_step():
    """Sticky fallback: a layer whose call stops fitting in the second micro-batch (here: called twice)
    has per-example terms for the first one only, so that step reports its parameters missing and keeps
    the rest exact; from the next step on they are measured by micro-batches, exactly."""
    from torch import nn

    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 20), nn.Linear(20, 4)
            self.twice = False

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if self.twice:
                h = torch.tanh(self.a(h[:, :12]))
            return self.b(h)

    torch.manual_seed(0)
    model = Sometimes()
    _, data, loss_fn = MODELS["mlp"]
    x, y = data(torch.Generator().manual_seed(6), 16)
    gns = GradientNoise(model, warn=False)
    assert set(gns.covered) == {"a", "b"} and not gns.fallback
    model.zero_grad(set_to_none=True)
    for j, (xk, yk) in enumerate(zip(x.chunk(2), y.chunk(2), strict=True)):
        model.twice = j == 1
        (loss_fn(model(xk), yk) / 2).backward()
    s = gns.step()
    assert not s.complete and set(s.missing) == {"a.weight", "a.bias"} and set(s.per_example) == {"b.weight", "b.bias"}
    assert gns.fallback == ("a.weight", "a.bias") and set(gns.covered) == {"b"}
    g = per_example_grads(model, loss_fn, x, y)  # the model now calls `a` twice: exact gradients of that
    micro_steps(model, loss_fn, x, y, 2)
    s2 = gns.step()
    assert s2.complete and set(s2.micro_batch) == {"a.weight", "a.bias"}
    n_a = model.a.weight.numel() + model.a.bias.numel()
    g_mb, g_pe = g[:, :n_a], g[:, n_a:]
    pe_small, pe_big = float(g_pe.square().sum(1).mean()), float(g_pe.mean(0).square().sum())
    mb_small = np.mean([float(gk.mean(0).square().sum()) for gk in g_mb.chunk(2)])
    mb_big = float(g_mb.mean(0).square().sum())
    n = len(x)
    want_tr = (pe_small - pe_big) / (1 - 1 / n) + (mb_small - mb_big) / (2 / n - 1 / n)
    assert float(s2.tr_sigma) == pytest.approx(want_tr, rel=1e-4)
    assert float(s2.g_big_sq) == pytest.approx(pe_big + mb_big, rel=1e-4)


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_sketched_norms_are_unbiased_and_leave_the_users_rng_alone(name):
    """sketch=k: the weights of sequence Linear layers and convolutions are estimated from k random
    projections per example. Over many draws at a fixed step the mean is the exact mean_i |g_i|^2 (within
    4 standard errors), a single draw is close, |g_big|^2 stays exact, and the global RNG is untouched."""
    model, loss_fn, x, y, g = setup(name)
    want = float(g.square().sum(1).mean())
    gns = GradientNoise(model, sketch=2)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    got = []
    for _ in range(200):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        s = gns.step()
        got.append(float(s.g_small_sq))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=RTOL)
    got = np.array(got)
    assert got.std() > 0  # the sketch was used
    assert abs(got.mean() - want) < 4 * got.std(ddof=1) / np.sqrt(len(got)), (got.mean(), want)
    assert got.std() < 0.5 * want  # one draw: the other layers are exact, and the examples average


def _half_case(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    make, data, loss_fn = MODELS["mlp"]
    x, y = data(torch.Generator().manual_seed(1), 16)
    xs, ys = x.chunk(world)[rank].half(), y.chunk(world)[rank]
    stats = {}
    for per_example in (True, False):
        for comm in (True, False):
            torch.manual_seed(0)
            model = DDP(make().half())
            gns = GradientNoise(model, per_example=per_example, comm_hook=comm)
            loss_fn(model(xs).float(), ys).backward()
            stats[per_example, comm] = (gns.comm_hook, gns.step().as_dict())
    return stats


def test_ddp_half_precision_buckets_send_the_sums_on_their_own(ddp_out):
    """fp16 parameters give fp16 buckets, which would round the sums: the hook all-reduces them in float32
    on their own, and both ranks get what the separate all-reduce in step() gives. By ranks, the fp16
    bucket's norm (in float32) equals the micro-batch hooks' on each rank's one micro-batch."""
    r0, r1 = (torch.load(f"{ddp_out}.half.{r}") for r in (0, 1))
    assert "error" not in r0 and "error" not in r1, r0.get("error") or r1.get("error")
    for pe, b_small in ((True, 1.0), (False, 8.0)):
        assert r0[pe, True][0] and not r0[pe, False][0]
        for r in (r0, r1):
            assert r[pe, True][1] == pytest.approx(r[pe, False][1], rel=1e-5) and r[pe, True][1]["b_small"] == b_small
        assert r0[pe, True][1] == pytest.approx(r1[pe, True][1], rel=1e-6)
