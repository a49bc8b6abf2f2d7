"""GradientNoise where autograd does more than one plain backward per forward: activation checkpointing
(a layer reused inside reentrant checkpoints; the whole model checkpointed), a gradient penalty's double
backward, layers a step does not use with zeroed (not None) gradients, and a norm-like class with a
sub-layer. Each must be exact against torch.func or say that it is not measured, never a wrong "complete"."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.trainer_helpers import mixed_truth, per_example_grads
from trainer.noise import GradientNoise


def _data(n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _exact(s, g):
    assert s.complete and not s.missing
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


class _Shared(nn.Module):
    """One layer used in two reentrant checkpoint blocks (ALBERT-style sharing): every call is a recompute
    inside backward, so its second call there is a real second use, not a recompute to ignore."""

    def __init__(self, ckpt: bool):
        super().__init__()
        self.a, self.mid, self.c, self.ckpt = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 4), ckpt

    def block(self, h):
        return torch.tanh(self.mid(h))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        for _ in range(2):
            h = checkpoint(self.block, h, use_reentrant=True) if self.ckpt else self.block(h)
        return self.c(h)


def test_a_layer_reused_in_reentrant_checkpoints_is_reported_missing_not_wrong():
    torch.manual_seed(0)
    model = _Shared(ckpt=True)
    x, y = _data()
    gns = GradientNoise(model, warn=False)
    F.cross_entropy(model(x), y).backward()
    s = gns.step()
    assert not s.complete and set(s.missing) == {"mid.weight", "mid.bias"}
    model.ckpt = False  # the same function: the other layers' per-example part is exact
    g = per_example_grads(model, F.cross_entropy, x, y)
    keep = torch.cat([torch.full((p.numel(),), not n.startswith("mid.")) for n, p in model.named_parameters()])
    assert float(s.g_small_sq) == pytest.approx(float(g[:, keep].square().sum(1).mean()), rel=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_a_whole_model_checkpoint_counts_each_micro_batch_once(k):
    """checkpoint(model, x, use_reentrant=False) recomputes the root forward inside backward: not a new
    micro-batch (it doubled micro_batches and examples and halved nothing else)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
    x, y = _data()
    g = per_example_grads(model, F.cross_entropy, x, y)
    gns = GradientNoise(model)
    for xk, yk in zip(x.chunk(k), y.chunk(k), strict=True):
        (F.cross_entropy(checkpoint(model, xk, use_reentrant=False), yk) / k).backward()
    s = gns.step()
    assert s.micro_batches == k and s.examples == 16
    _exact(s, g)


def test_a_gradient_penalty_double_backward_falls_back_instead_of_counting_twice():
    """autograd.grad(create_graph=True) on the inputs, then backward of loss + penalty: the output-gradient
    hooks fire in both passes, and the penalty reaches the weights by a path the rules do not model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 4))
    x, y = _data()
    gns = GradientNoise(model, warn=False)
    xg = x.clone().requires_grad_(True)
    ce = F.cross_entropy(model(xg), y, reduction="sum")
    gx, = torch.autograd.grad(ce, xg, create_graph=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*create_graph=True.*")
        ((ce + gx.square().sum()) / len(x)).backward()
    s = gns.step()
    assert not s.complete and len(s.missing) == 4
    model.zero_grad(set_to_none=True)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.e1, self.e2, self.c = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 4)
        self.use = "e1"

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(getattr(self, self.use)(h)))


def test_a_layer_a_step_does_not_use_stays_per_example():
    """An expert or branch unused this step keeps a zeroed .grad under zero_grad(set_to_none=False): its
    examples' gradients are 0, not a layer whose hooks were traced away; every step stays exact."""
    torch.manual_seed(0)
    model = _Branches()
    x, y = _data()
    gns = GradientNoise(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for use in ("e1", "e2", "e1", "e2"):
            model.use = use
            g = per_example_grads(model, F.cross_entropy, x, y)
            model.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            s = gns.step()
            assert {"e1", "e2"} <= set(gns.covered)
            unused = "e2" if use == "e1" else "e1"
            cols = torch.cat([torch.full((p.numel(),), not n.startswith(unused)) for n, p in model.named_parameters()])
            _exact(s, g[:, cols])  # the unused layer's columns are zero: leave them out of torch.func's


class _GatedNorm(nn.Module):
    """Named like a norm, with a norm's own parameters, but a zero-initialised sub-layer: the first-output
    check would pass, and the rule would go wrong once the sub-layer trains."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.gate = nn.Linear(d, d)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x):
        return self.weight * F.layer_norm(x, x.shape[-1:]) + self.gate(x)


def test_a_norm_like_class_with_a_sub_layer_is_not_taken_for_a_norm():
    model = nn.Sequential(nn.Linear(12, 16), _GatedNorm(16), nn.Linear(16, 4))
    gns = GradientNoise(model, warn=False)
    assert "1" not in gns.covered and "1.gate" in gns.covered


class _FunctionalTie(nn.Module):
    """The head reuses the embedding table functionally (logits = F.linear(h, emb.weight), as OLMo and many
    GPT codebases do): one module owns the weight, two ops use it."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(13, 8), nn.Linear(8, 8)

    def forward(self, idx):
        return F.linear(torch.tanh(self.mid(self.emb(idx))), self.emb.weight)


def test_a_weight_also_used_outside_its_layer_is_not_measured_by_that_layer_alone():
    """The embedding's rule sees only the lookup's share of the weight's per-example gradient (tr was 4 % low,
    reported complete): the first forward's graph shows the second use, and the layer falls back before the
    backward, so that very step measures it by micro-batches (exact at K = 2), never by a partial rule."""
    torch.manual_seed(0)
    model = _FunctionalTie()
    x = torch.randint(0, 13, (16, 5), generator=torch.Generator().manual_seed(2))
    y = (x + 1) % 13

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 13), target.reshape(-1))

    g = per_example_grads(model, loss_fn, x, y)
    gns = GradientNoise(model)
    model.zero_grad(set_to_none=True)
    for xk, yk in zip(x.chunk(2), y.chunk(2), strict=True):
        (loss_fn(model(xk), yk) / 2).backward()
    s = gns.step()
    assert "emb" not in gns.covered and "mid" in gns.covered
    assert s.complete and s.micro_batch == ("emb.weight",) and set(s.per_example) == {"mid.weight", "mid.bias"}
    cols = torch.cat([torch.full((p.numel(),), n == "emb.weight") for n, p in model.named_parameters()])
    want_g, want_tr, want_big = mixed_truth(g[:, ~cols], g[:, cols])
    assert float(s.g_sq) == pytest.approx(want_g, rel=1e-4)
    assert float(s.tr_sigma) == pytest.approx(want_tr, rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(want_big, rel=1e-4)
