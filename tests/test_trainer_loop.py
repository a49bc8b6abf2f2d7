"""The training loop: accumulation is exact, schedules and stopping rules work, stats stay on the device."""

from __future__ import annotations

import copy
import gzip
import pickle

import numpy as np
import pytest
import torch

from tests.trainer_helpers import one_torch_thread, train_in_process
from trainer import datasets
from trainer.config import ConfigError, TrainConfig, parse_schedule, plan, validate
from trainer.step import compute_gradients
from trainer.tasks import TaskOptions, make_task
from trainer.train import make_optimizer


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("accum", [2, 4, 8])
def test_accumulation_update_equals_full_batch_update(optimizer, accum):
    """One step with --accum K moves the parameters exactly as one full-batch step (no batch norm here)."""
    task = make_task("digits", TaskOptions(), torch.device("cpu"))
    x, y = task.next_batch(64)
    torch.manual_seed(0)
    full = task.build_model()
    acc = copy.deepcopy(full)
    cfg = TrainConfig(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2, momentum=0.9, weight_decay=1e-3)
    opt_full, opt_acc = make_optimizer(cfg, full), make_optimizer(cfg, acc)

    task.loss_fn(full(x), y).backward()  # the plain PyTorch step
    opt_full.step()
    stats = compute_gradients(acc, task.loss_fn, x, y, accum)
    opt_acc.step()

    for p, q in zip(full.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert stats.b_small == 64 / accum and stats.b_big == 64


def test_accumulated_run_follows_the_full_batch_trajectory():
    """Whole runs: --accum 4 and --accum 1 (no measurement split) log the same losses step after step."""
    plain, _ = train_in_process(batch=64, lr=0.2, momentum=0.9, steps=60, accum=1, gns_every=0, seed=3)
    accum, _ = train_in_process(batch=64, lr=0.2, momentum=0.9, steps=60, accum=4, seed=3)
    a, b = plain.steps(), accum.steps()
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-4, atol=1e-5)
    assert "g_small_sq" not in a and np.isfinite(b["g_small_sq"]).all()  # never measured: NULL throughout


def test_digits_run_logs_consistent_steps_and_evals():
    run, result = train_in_process(batch=32, lr=0.1, epochs=3, eval_every=20, gns_every=5)
    s = run.steps()
    n_train = 1438
    assert result.status == "finished" and result.steps == len(s["step"]) == -(-3 * n_train // 32)
    np.testing.assert_array_equal(s["step"], np.arange(1, result.steps + 1))
    np.testing.assert_array_equal(s["examples"], 32 * s["step"])
    assert np.all(np.diff(s["wall_time"]) >= 0) and np.all(s["lr"] == 0.1) and np.all(s["batch_size"] == 32)
    measured = np.isfinite(s["g_small_sq"])
    np.testing.assert_array_equal(np.flatnonzero(measured) + 1, np.arange(5, result.steps + 1, 5))
    assert np.all(np.isnan(s["b_simple"][~measured])), "unmeasured steps leave b_simple NULL"
    assert np.isfinite(s["b_simple"][measured][-1]) and s["b_simple"][measured][-1] > 0
    assert s["loss"][-20:].mean() < s["loss"][:20].mean() / 2, "it learns"
    splits = {e["split"] for e in run.evals}
    assert splits == {"train", "test"}
    last = [e for e in run.evals if e["step"] == result.steps]
    assert len(last) == 2 and all(0 <= e["accuracy"] <= 1 for e in last)
    assert result.evals["test"][1] > 0.8


def test_batch_and_lr_schedules_follow_epochs():
    run, result = train_in_process(batch=32, lr=0.1, epochs=3, batch_schedule="x2@1,2", lr_schedule="x0.5@2",
                                   gns_every=0)
    s = run.steps()
    start_examples = s["examples"] - s["batch_size"]  # schedules look at the examples seen before the step
    np.testing.assert_array_equal(s["batch_size"], np.where(start_examples >= 2 * 1438, 128,
                                                            np.where(start_examples >= 1438, 64, 32)))
    np.testing.assert_allclose(s["lr"], np.where(start_examples >= 2 * 1438, 0.05, 0.1))
    np.testing.assert_array_equal(s["examples"], np.cumsum(s["batch_size"]))
    assert s["examples"][-1] >= 3 * 1438 > s["examples"][-2]


def test_cosine_schedule_and_parse_errors():
    cos = parse_schedule("cosine", "lr", 1000, total=1000)
    assert cos.multiplier(0) == 1 and cos.multiplier(500) == pytest.approx(0.5) and cos.multiplier(1000) == 0
    assert parse_schedule("x5@50000ex", "batch", None, None).milestones == (50000,)
    for bad in ("x5@10", "fast", "x-1@2", "x2@zero"):
        with pytest.raises(ConfigError):
            parse_schedule(bad, "batch", None, None)
    with pytest.raises(ConfigError, match="not a whole multiple"):
        plan(TrainConfig(batch=12, accum=4, batch_schedule="x1.5@1"), 1438)


def test_target_loss_stops_the_run_early():
    run, result = train_in_process(batch=32, lr=0.3, target_loss=0.5)
    assert result.reached_target and result.final_loss <= 0.5
    budget = 10 * 30 * 1438 // 32
    assert result.steps < budget / 10
    assert run.scalar("target_reached") == [1.0]


def test_non_finite_loss_ends_the_run_as_diverged():
    run, result = train_in_process(task="linreg", batch=32, lr=5.0, steps=500, diverge_factor=0.0)
    s = run.steps()
    assert result.status == "diverged"
    assert not np.isfinite(s["loss"]).all() and len(s["step"]) < 500
    assert run.scalar("diverged") == [1.0]


def test_exploding_finite_loss_is_diverged_too():
    """Cross-entropy rarely overflows: a loss 100x the first one also ends the run (--diverge-factor)."""
    run, result = train_in_process(batch=32, lr=1e4, steps=500)
    assert result.status == "diverged" and result.steps < 500
    _, kept = train_in_process(batch=32, lr=1e4, steps=100, diverge_factor=0.0)
    assert kept.status == "finished"


def test_no_host_sync_per_step(monkeypatch):
    """The loop reads the device only in blocks: no .item()/float() per step (they sync on CUDA)."""
    calls = {"n": 0}
    for name in ("item", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, **k):
            calls["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    _, result = train_in_process(batch=32, lr=0.1, steps=300, eval_every=1000, accum=2)
    assert result.steps == 300
    assert calls["n"] <= 10, f"{calls['n']} scalar reads in 300 steps"


def test_validation_messages():
    good = TrainConfig()
    validate(good)
    for bad, needle in [
        (dict(batch=0), "--batch"), (dict(lr=-1.0), "--lr"), (dict(batch=30, accum=4), "divisible"),
        (dict(task="imagenet"), "unknown task"), (dict(optimizer="lion"), "unknown optimizer"),
        (dict(device="tpu"), "device"), (dict(steps=10, epochs=1.0), "at most one"),
        (dict(task="linreg", epochs=2.0), "stream"), (dict(task="mnist"), "--data-dir"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            validate(TrainConfig(**bad))


# --- user data in the standard formats ----------------------------------------------------------

def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fake_mnist(root, n_train=200, n_test=50, gz=False) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * 20)  # learnable
        write_idx(raw / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)


def write_fake_cifar(root, per_batch=20) -> None:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_and_training(tmp_path, gz):
    write_fake_mnist(tmp_path, gz=gz)
    x, y = datasets.load_mnist(tmp_path, "train")
    assert x.shape == (200, 1, 28, 28) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert y.shape == (200,) and y.max() < 10
    run, result = train_in_process(task="mnist", data_dir=str(tmp_path), batch=20, lr=0.05, epochs=2)
    assert result.status == "finished" and result.steps == 20
    assert {e["split"] for e in run.evals} == {"train", "test"}


def test_cifar10_reader_and_training(tmp_path):
    write_fake_cifar(tmp_path)
    x, y = datasets.load_cifar10(tmp_path, "train")
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,)
    xt, _ = datasets.load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert xt.shape == (20, 3, 32, 32)
    _, result = train_in_process(task="cifar10", data_dir=str(tmp_path), batch=20, lr=0.01, steps=3, accum=2)
    assert result.status == "finished" and result.steps == 3


def test_readers_reject_bad_files(tmp_path):
    with pytest.raises(datasets.DataError, match="missing train-images-idx3-ubyte"):
        datasets.load_mnist(tmp_path, "train")
    write_fake_mnist(tmp_path)
    (tmp_path / "MNIST/raw/train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(datasets.DataError, match="header says"):
        datasets.load_mnist(tmp_path, "train")
    evil = tmp_path / "cifar"
    evil.mkdir()
    (evil / "data_batch_1").write_bytes(pickle.dumps(print))  # a pickle that would call code
    with pytest.raises(datasets.DataError, match="refusing"):
        datasets.load_cifar10(evil, "train")


def test_digits_data_ships_with_the_package():
    x, y = datasets.load_digits()
    assert x.shape == (1797, 64) and set(np.unique(y)) == set(range(10)) and x.max() == 1.0
    tr, te = datasets.split_indices(1797)
    assert len(tr) == 1438 and len(te) == 359 and not set(tr) & set(te)
    tr2, _ = datasets.split_indices(1797)
    np.testing.assert_array_equal(tr, tr2)


def _capture_steps(monkeypatch) -> dict:
    """Every step number handed to a RecordingRun, in {"steps": [...]}."""
    from tests.trainer_helpers import RecordingRun

    captured: dict = {}
    original = RecordingRun.log_steps

    def keep(self, cols):
        captured.setdefault("steps", []).extend(np.asarray(cols["step"]).tolist())
        original(self, cols)

    monkeypatch.setattr(RecordingRun, "log_steps", keep)
    return captured


def test_a_crash_mid_run_still_hands_over_every_step(monkeypatch):
    """An exception (or Ctrl-C) inside the loop: the buffered steps reach the run before it fails."""
    from tests.trainer_helpers import RecordingRun

    def boom(self, step, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(RecordingRun, "log_eval", boom)
    captured = _capture_steps(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(batch=32, lr=0.1, steps=200, eval_every=37)
    assert sorted(captured["steps"]) == list(range(1, 38))


def test_a_sigterm_during_the_crash_salvage_waits_for_it(monkeypatch):
    """A peer dies (the loop raises) and torchrun's SIGTERM lands while the except path logs the pending
    rows: the signal's exception must act after the salvage, not between its sync and its hand-over (that
    lost the unreduced tail: 50 of 59 steps stored under load)."""
    import os
    import signal

    from collector import signals
    from tests.trainer_helpers import RecordingRun
    from trainer import ddp, steplog

    def peer_died(self, step, **kw):
        raise RuntimeError("Connection reset by peer")

    original_sync = steplog.StepLog._sync

    def sync_then_sigterm(self, collective):
        out = original_sync(self, collective)
        if not collective:  # the salvage's sync: the signal arrives inside it
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(RecordingRun, "log_eval", peer_died)
    monkeypatch.setattr(steplog.StepLog, "_sync", sync_then_sigterm)
    captured = _capture_steps(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    ddp.raise_on_sigterm("stopped by SIGTERM")
    monkeypatch.setitem(signals._previous, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
    signal.signal(signal.SIGTERM, signals._on_signal)  # as a collector run installs it, chained
    try:
        with pytest.raises(RuntimeError, match="reset by peer"):
            train_in_process(batch=32, lr=0.1, steps=200, eval_every=37)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert sorted(captured["steps"]) == list(range(1, 38))


def test_a_block_whose_all_reduce_fails_is_logged_unreduced_not_dropped(monkeypatch):
    """Under DDP a peer that dies in the block's loss all-reduce makes sync() raise; the rows stay pending,
    and the except path's sync(collective=False) logs them without a loss, with their noise ingredients."""
    from tests.trainer_helpers import RecordingRun
    from trainer import steplog
    from trainer.gns import TrackingBSimple
    from trainer.step import StepGrads

    def reset(losses, world):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(steplog, "reduce_losses", reset)
    run = RecordingRun()
    log = steplog.StepLog(run, torch.device("cpu"), TrackingBSimple(0.4), sync_every=5, world=2)
    for step in range(1, 6):
        log.add(step, 8 * step, 8, 0.1, 0.01 * step,
                StepGrads(torch.tensor(1.0 / step), torch.tensor(2.0), 1.0, torch.tensor(1.0), 8.0))
    with pytest.raises(RuntimeError, match="reset"):
        log.sync()
    last = log.sync(collective=False)
    log.emit()
    rows = run.steps()
    assert last["step"].tolist() == rows["step"].tolist() == [1, 2, 3, 4, 5] and log.dropped == 0
    assert "loss" not in rows and (rows["g_small_sq"] == 2.0).all() and (rows["g_big_sq"] == 1.0).all()  # NULL
