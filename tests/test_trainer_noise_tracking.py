"""The stored steps.b_simple follows the true noise scale along real training runs, not only at a standstill.

Ground truth the trainer did not tune to:
- linreg: the closed form d(1 + sigma^2/|delta|^2) + 1 at the current weights (logged as b_simple_exact);
- digits: exact per-example gradients over the whole training set (torch.func) at the parameters of
  checkpoints along the run, down to a training loss of about 0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer_helpers import exact_b_simple, one_torch_thread, train_in_process
from trainer.gns import BSimpleEMA
from trainer.tasks import TaskOptions, make_task


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def at_checkpoints(steps: dict[str, np.ndarray], checkpoint_steps: np.ndarray, col: str) -> np.ndarray:
    """The value logged at the step after each checkpoint: that step's measurement used those parameters."""
    index = {int(s): i for i, s in enumerate(steps["step"])}
    return np.array([steps[col][index[int(c) + 1]] if int(c) + 1 in index else np.nan for c in checkpoint_steps])


@pytest.mark.parametrize(("accum", "method"), [(1, "per-example"), (4, "micro-batch")])
@pytest.mark.parametrize("seed", [0, 1])
def test_linreg_b_simple_tracks_the_closed_form_while_the_loss_falls(accum, method, seed):
    """The issue's run (--dim 32 --noise 1 --batch 64 --lr 0.01): K = 1 with per-example norms, and
    --accum 4 with micro-batch norms (B_small = 16; --accum 4 with per-example norms logs the same
    ingredients as K = 1).

    The closed form grows ~6x between steps 50 and 300 while the population loss falls. Over the
    well-measured part (closed form <= 10 B: beyond it one batch's |G|^2 estimate is noise ~sqrt(2/d)
    B_simple/B times its mean, and no short window can resolve it) the median relative error is < 25 %,
    the median signed error within +-20 % (no lag), and 90 % of values within a factor of 2. Measured:
    median 12-18 %, 95-100 % within 2x. The former 50-measurement EMA on the same ingredients erred 2-3x more.
    """
    batch = 64
    run, result = train_in_process(task="linreg", dim=32, noise=1.0, batch=batch, accum=accum, lr=0.01, steps=400,
                                   eval_every=5, seed=seed, gns_method=method)
    assert result.status == "finished"
    s = run.steps()
    assert np.isfinite(s["g_small_sq"]).all(), "every step is measured"
    ck = np.array([st for st, k, _ in run.scalars if k == "b_simple_exact"])
    exact = np.array(run.scalar("b_simple_exact"))
    pop = np.array([e["loss"] for e in run.evals if e["split"] == "population"])
    region = (exact <= 10 * batch) & (ck >= 10)
    assert region.sum() >= 40 and exact[region].max() > 5 * exact[region].min(), "B_simple grows several-fold"
    assert pop[region][-1] < 0.75 * pop[region][0], "while the loss falls"

    stored = at_checkpoints(s, ck, "b_simple")[region]
    rel = stored / exact[region] - 1
    assert np.median(np.abs(rel)) < 0.25, np.round(rel, 2)
    assert abs(np.median(rel)) < 0.20
    assert np.mean(np.abs(np.log(stored / exact[region])) < np.log(2)) >= 0.9
    n = at_checkpoints(s, ck, "b_simple_n")[region]
    assert np.all(n >= 1), "each value says how many measurements are behind it"

    old = BSimpleEMA(50 * batch)
    old_vals, _ = old.update_block(s["g_small_sq"], s["b_small"], s["g_big_sq"], s["b_big"], s["batch_size"])
    old_rel = at_checkpoints(s | {"old": old_vals}, ck, "old")[region] / exact[region] - 1
    assert np.median(np.abs(old_rel)) > 1.5 * np.median(np.abs(rel))


DIGITS_RUNS = {
    "k1": dict(batch=32, lr=0.1, epochs=30),  # the defaults: every step, per-example norms
    "accum4": dict(batch=64, accum=4, lr=0.1, epochs=50),  # the default at K >= 2: micro-batch norms, B_small = 16
}


@pytest.mark.parametrize("name", list(DIGITS_RUNS))
def test_digits_b_simple_against_exact_per_example_gradients(name):
    """Checkpoints every 40 steps; at each, exact |G|^2 and tr(Sigma) over all 1,438 training examples.

    The exact value at one checkpoint moves by +-50 % between nearby checkpoints (the SGD iterate itself
    is noisy), so the truth a running value can be held to is the ratio of the exact tr(Sigma) and
    |G|^2 averaged over the 5 checkpoints centred on it (+-80 steps). Checked once the training loss is
    below 0.5, down to ~0.1. Tolerance: median relative error < 40 % and 85 % of values within 2.5x
    (measured on seeds 0 and 1: K = 1 median 23-30 %, 88-90 % within 2x; --accum 4 with micro-batch
    norms median 24-26 %, 89-94 % within 2x). Why not tighter: B_simple here is 10-60x the batch, so
    one step's |G|^2 estimate scatters by 10-50x its mean; ~40 % error needs hundreds of measurements
    while B_simple doubles over a few hundred steps, so lag (values read 10-20 % low) adds to the noise.
    The raw ingredients allow a centred window offline.
    """
    options = DIGITS_RUNS[name]
    task = make_task("digits", TaskOptions(), torch.device("cpu"))
    x, y = task.eval_sets["train"]
    exact = []

    def on_eval(model):
        was = model.training
        model.eval()
        exact.append(exact_b_simple(model, task.loss_fn, x, y)[1:])
        model.train(was)

    run, result = train_in_process(on_eval=on_eval, eval_every=40, **options)
    s = run.steps()
    assert np.isfinite(s["g_small_sq"]).all(), "every step is measured"
    ck = np.array([e["step"] for e in run.evals if e["split"] == "train"])
    train_loss = np.array([e["loss"] for e in run.evals if e["split"] == "train"])
    g_sq, tr = (np.array(v)[:len(ck)] for v in zip(*exact, strict=True))
    window = np.ones(5)
    truth = np.convolve(tr, window, "same") / np.convolve(g_sq, window, "same")
    region = (train_loss < 0.5) & (np.arange(len(ck)) < len(ck) - 2)  # the centred window is whole
    assert train_loss[region].min() < 0.12, "down to a loss of about 0.1"
    assert truth[region].max() > 2 * truth[region].min(), "B_simple grows while the loss falls"
    stored = at_checkpoints(s, ck, "b_simple")[region]
    rel = stored / truth[region] - 1
    assert np.median(np.abs(rel)) < 0.40, np.round(rel, 2)
    assert np.mean(np.abs(np.log(stored / truth[region])) < np.log(2.5)) >= 0.85, np.round(rel, 2)


def test_per_example_norms_under_accumulation_equal_those_of_one_pass():
    """--accum 4 with per-example norms logs the same ingredients as K = 1: the norms
    are per example, so how the batch is cut does not matter (and the trajectory is the same)."""
    one, _ = train_in_process(batch=32, lr=0.1, steps=50, seed=2)
    four, _ = train_in_process(batch=32, lr=0.1, steps=50, seed=2, accum=4, gns_method="per-example")
    a, b = one.steps(), four.steps()
    assert np.all(b["b_small"] == 1) and np.all(b["b_big"] == 32)
    for col in ("g_small_sq", "g_big_sq", "loss"):
        np.testing.assert_allclose(b[col], a[col], rtol=2e-3)


def test_gns_sketch_reaches_gradient_noise_and_a_negative_k_is_refused(monkeypatch):
    """--gns-sketch K reaches GradientNoise (whose sketch is checked against torch.func in
    tests/test_gradient_noise.py): a charlm run measures every step with b_small = 1 through the
    projections; K < 0 is refused before anything runs."""
    import trainer.train as train_mod
    from trainer.config import ConfigError, TrainConfig, validate

    made = []

    class Recorded(train_mod.GradientNoise):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(kwargs.get("sketch"))

    monkeypatch.setattr(train_mod, "GradientNoise", Recorded)
    run, result = train_in_process(task="charlm", batch=8, steps=4, lr=3e-3, optimizer="adamw", seed=0, gns_sketch=4)
    assert result.status == "finished" and made == [4]
    s = run.steps()
    assert np.isfinite(s["g_small_sq"]).all() and (s["b_small"] == 1).all()
    with pytest.raises(ConfigError, match="--gns-sketch"):
        validate(TrainConfig(task="charlm", gns_sketch=-1))
