"""The Lightning callback with the real library: a tiny MLP fitted by `lightning.Trainer` on generated data.

Ground truth per step is taken inside the user's own module (its on_before_optimizer_step hook runs
after the callback's and before Lightning clips): torch.func per-example gradients of the step's
examples give mean_i |g_i|^2 (g_small_sq at b_small = 1), and the unclipped .grad gives |g_big|^2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from tests.integration_helpers import stored  # noqa: E402
from tests.trainer_helpers import one_torch_thread  # noqa: E402
from trainer.integrations.lightning import BatchscopeCallback  # noqa: E402

BATCH, ACCUM, STEPS = 16, 2, 8


class MLP(L.LightningModule):
    """The user's module: training_step calls self.net (not self), validation logs val_loss/val_acc."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.fail_at = fail_at
        self.truth: dict[int, dict] = {}
        self._step_batches: list = []

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step + 1 == self.fail_at:
            raise RuntimeError(f"boom at step {self.fail_at}")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self._step_batches.append((x, y, loss.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def on_before_optimizer_step(self, optimizer):
        x = torch.cat([b[0] for b in self._step_batches])
        y = torch.cat([b[1] for b in self._step_batches])
        params = {k: v.detach() for k, v in self.net.named_parameters()}

        def loss_one(p, xi, yi):
            out = torch.func.functional_call(self.net, p, (xi[None],))
            return nn.functional.cross_entropy(out, yi[None])

        per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        sq = sum(g.reshape(len(x), -1).square().sum(1) for g in per.values())
        self.truth[self.global_step + 1] = {
            "g_small_sq": float(sq.mean()), "n": len(x), "lr": optimizer.param_groups[0]["lr"],
            "loss": sum(b[2] for b in self._step_batches) / len(self._step_batches),
            "g_big_sq": float(sum(p.grad.square().sum() for p in self.parameters()))}
        self._step_batches = []

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
                                                 "interval": "step"}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy 2-core machine."""
    with one_torch_thread():
        yield


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 6, generator=g)
    y = (x[:, :3].argmax(1) + (torch.rand(512, generator=g) < 0.2).long()) % 3
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:448], y[:448]), batch_size=BATCH,
                                        shuffle=True, generator=g)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[448:], y[448:]), batch_size=64)
    return train, val


def fit(module, callback, **kw):
    trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=0.05,
                        val_check_interval=ACCUM * 4, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers etc.
        trainer.fit(module, train, val)
    return trainer


def test_finished_run_with_noise_on_every_step_matching_per_example_truth(tmp_path):
    db = tmp_path / "runs.duckdb"
    L.seed_everything(7, verbose=False)
    module = MLP()
    trainer = fit(module, None, callbacks=[BatchscopeCallback(db=db, name="mlp", sweep="s", task="blobs")])
    assert trainer.global_step == STEPS
    run, steps, evals = stored(db)

    assert run["status"] == "finished" and run["name"] == "mlp" and run["sweep"] == "s" and run["task"] == "blobs"
    assert (run["batch_size"], run["micro_batch_size"], run["accum_steps"], run["world_size"]) == (32, 16, 2, 1)
    assert (run["optimizer"], run["lr"], run["momentum"], run["seed"], run["train_size"]) == ("sgd", 0.2, 0.5, 7, 448)
    assert run["model"] == "MLP" and run["device"] == "cpu"

    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:
        truth = module.truth[s["step"]]
        assert truth["n"] == BATCH * ACCUM
        assert s["examples"] == s["step"] * BATCH * ACCUM and s["batch_size"] == BATCH * ACCUM
        assert s["b_small"] == 1.0 and s["b_big"] == BATCH * ACCUM  # every layer is Linear: per-example norms
        assert s["g_small_sq"] == pytest.approx(truth["g_small_sq"], rel=1e-4)
        assert s["g_big_sq"] == pytest.approx(truth["g_big_sq"], rel=1e-4)  # unclipped (clip 0.05 bites)
        assert s["lr"] == pytest.approx(truth["lr"]) and s["lr"] == pytest.approx(0.2 * 0.5 ** ((s["step"] - 1) // 3))
        assert s["loss"] == pytest.approx(truth["loss"], rel=1e-5)  # mean over the micro-batches
    assert max(s["g_big_sq"] for s in steps) > 0.05**2  # so the clipping did change .grad after measuring

    assert [(e["step"], e["split"], e["examples"]) for e in evals] == [(4, "test", 128), (8, "test", 256)]
    assert all(0 < e["loss"] < 3 and 0 <= e["accuracy"] <= 1 for e in evals)
    assert evals[-1]["loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))


def test_a_raising_module_leaves_a_failed_run_with_its_steps(tmp_path):
    db = tmp_path / "runs.duckdb"
    with pytest.raises(RuntimeError, match="boom at step 5"):
        fit(MLP(fail_at=5), None, callbacks=[BatchscopeCallback(db=db, name="fails")])
    run, steps, _ = stored(db)
    assert run["status"] == "failed" and "RuntimeError: boom at step 5" in run["status_reason"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["g_small_sq"] is not None and s["g_big_sq"] is not None for s in steps)



def test_sigterm_stops_lightning_gracefully_with_every_step_held_logged(tmp_path):
    """Preemption: Lightning's own SIGTERM handler (installed before the run starts, so ours chains to it)
    stops fit() at the next batch; the steps the callback held for its B_simple block are logged and the
    run ends failed, named by the signal."""
    db = tmp_path / "runs.duckdb"
    script = f"""
import os, signal, sys
sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]
import lightning.pytorch as L
from tests.test_integration_lightning import MLP, fit
from trainer.integrations.lightning import BatchscopeCallback

class Preempted(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5 and batch_idx % {ACCUM} == {ACCUM} - 1:  # step 5 is done and held
            os.kill(os.getpid(), signal.SIGTERM)

fit(MLP(), None, callbacks=[BatchscopeCallback(db={str(db)!r}, name="preempted"), Preempted()])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run, steps, _ = stored(db)
    assert (run["status"], run["status_reason"]) == ("failed", "SIGTERM")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(s["g_small_sq"] is not None for s in steps)


def test_tokens_as_the_x_axis(tmp_path):
    """unit='tokens': examples and batch_size count tokens, b_small / b_big too (B_simple in tokens)."""
    db = tmp_path / "runs.duckdb"
    cb = BatchscopeCallback(db=db, name="tok", unit="tokens", tokens=lambda batch: 10 * len(batch[0]), noise=True)
    fit(MLP(), None, callbacks=[cb])
    _, steps, _ = stored(db)
    assert [s["examples"] for s in steps] == [320 * k for k in range(1, STEPS + 1)]
    assert all(s["batch_size"] == 320 and s["b_big"] == 320 and s["b_small"] == 10 for s in steps)


def test_unknown_unit_is_refused_at_construction():
    with pytest.raises(ValueError, match="unit must be one of"):
        BatchscopeCallback(name="x", unit="sequences")


class Scaled(MLP):
    """A parameter outside any covered layer: with one micro-batch on one device it has no small batch."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) * self.gain, y)

    def on_before_optimizer_step(self, optimizer):
        pass


@pytest.mark.parametrize("accum", [1, 2])
def test_uncovered_parameters_leave_the_noise_empty_at_k1_and_filled_with_accumulation(tmp_path, accum):
    db = tmp_path / "runs.duckdb"
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=accum, accelerator="cpu", devices=1, logger=False,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[BatchscopeCallback(db=db, name="gain")])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(Scaled(), loaders()[0])
    run, steps, _ = stored(db)
    assert run["status"] == "finished" and len(steps) == 4
    if accum == 1:  # a partial estimate (the Linear layers only) would be biased: nothing is logged
        assert all(s["g_small_sq"] is None and s["b_big"] is None and s["loss"] is not None for s in steps)
        assert any("no small batch" in str(w.message) for w in seen)
    else:  # the gain is measured by micro-batches, the Linear layers per example: b_small = 1 equivalent
        assert all(s["g_small_sq"] > 0 and s["b_small"] == 1.0 and s["b_big"] == 2 * BATCH for s in steps)


DDP_SCRIPT = """
import json, sys, warnings
import lightning.pytorch as L
sys.path.insert(0, {tests!r})
from test_integration_lightning import MLP, loaders
from trainer.integrations.lightning import BatchscopeCallback

L.seed_everything(3, verbose=False)
warnings.simplefilter("ignore")
trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, strategy="ddp", accelerator="cpu", devices=2,
                    limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[BatchscopeCallback(db={db!r}, name="ddp")])
module = MLP()
trainer.fit(module, loaders()[0])
with open({truth!r}.format(trainer.global_rank), "w") as f:
    json.dump(module.truth, f)  # this rank's per-example truth over its own shard
"""


@pytest.mark.slow
def test_ddp_two_gloo_processes_write_one_run_with_every_ranks_noise(tmp_path):
    """strategy="ddp" under torchrun (Lightning sees torchrun's variables and launches nothing itself, so
    both ranks start at once; its own launcher would start rank 1 only when rank 0 reaches fit). Only
    rank 0 writes, and each step's ingredients and loss are the global batch's: the mean over both ranks
    of their own torch.func per-example truths (their shards differ, so rank 0's alone would not match)."""
    db = tmp_path / "runs.duckdb"
    script = tmp_path / "fit_ddp.py"
    truth = str(tmp_path / "truth-{}.json")
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), db=str(db), truth=truth))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, steps, _ = stored(db)
    assert run["status"] == "finished" and (run["world_size"], run["batch_size"], run["accum_steps"]) == (2, 64, 2)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    t0, t1 = (json.loads(Path(truth.format(r)).read_text()) for r in (0, 1))
    for s in steps:
        a, b = t0[str(s["step"])], t1[str(s["step"])]
        assert a["n"] == b["n"] == 32 and abs(a["g_small_sq"] - b["g_small_sq"]) > 1e-3 * a["g_small_sq"]
        assert s["examples"] == 64 * s["step"] and s["b_big"] == 64 and s["b_small"] == 1.0
        assert s["g_small_sq"] == pytest.approx((a["g_small_sq"] + b["g_small_sq"]) / 2, rel=1e-4)
        assert s["g_big_sq"] == pytest.approx(a["g_big_sq"], rel=1e-4) == b["g_big_sq"]  # the all-reduced .grad
        assert s["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-5)


class TinyLM(L.LightningModule):
    """Embedding + Linear on token ids (N, T): every parameter has a per-example rule at K = 1."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

    def training_step(self, batch, batch_idx):
        ids, = batch
        logits = self.head(self.emb(ids))[:, :-1]  # embeds the model input itself (see the noise rules)
        return nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_token_model_at_k1_is_measured_per_example_on_every_step(tmp_path):
    db = tmp_path / "runs.duckdb"
    ids = torch.randint(0, 11, (256, 9), generator=torch.Generator().manual_seed(0))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=BATCH)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[BatchscopeCallback(db=db, name="lm", unit="tokens")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyLM(), train)
    _, steps, _ = stored(db)
    assert len(steps) == 5
    assert all(s["b_small"] == 9 and s["b_big"] == BATCH * 9 and s["g_small_sq"] > s["g_big_sq"] for s in steps)
