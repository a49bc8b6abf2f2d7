"""GradientNoise on a torch.compile'd model: the per-example hooks do not survive tracing (the graph keeps
the forward hooks' effects, not the gradient hooks they register), so the step must say so instead of
reporting a zero noise term as complete; the parameters then move to micro-batch hooks, which do run.
backend="aot_eager": the same graph capture and compiled autograd function as inductor, no C++ compiler."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.trainer_helpers import one_torch_thread, per_example_grads, small_models
from trainer.noise import GradientNoise


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_model_reports_the_missing_hooks_then_measures_by_micro_batches(how):
    make, data, loss_fn = small_models()["mlp"]
    torch.manual_seed(0)
    model = make()
    x, y = data(torch.Generator().manual_seed(1), 16)
    g = per_example_grads(model, loss_fn, x, y)
    with one_torch_thread():
        if how == "torch.compile":
            net = torch.compile(model, backend="aot_eager")
            gns = GradientNoise(net)
        else:  # attached first, compiled in place after
            gns = GradientNoise(model)
            model.compile(backend="aot_eager")
            net = model
        with pytest.warns(RuntimeWarning, match="per-example hooks of 3 layer"):
            loss_fn(net(x), y).backward()
            s = gns.step()
        assert not s.measured and not s.complete and len(s.missing) == 6 and not gns.covered
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            for _ in range(2):
                net.zero_grad(set_to_none=True)
                for xk, yk in zip(x.chunk(2), y.chunk(2), strict=True):
                    (loss_fn(net(xk), yk) / 2).backward()
                s = gns.step()
    assert s.complete and s.b_small == 8 and len(s.micro_batch) == 6
    want = np.mean([float(gk.mean(0).square().sum()) for gk in g.chunk(2)])
    assert float(s.g_small_sq) == pytest.approx(want, rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)
