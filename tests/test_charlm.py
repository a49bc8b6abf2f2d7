"""The charlm task (data split by file, a causal decoder that learns), AdamW and the warm-up schedules."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from trainer import charlm
from trainer.config import ConfigError, TrainConfig, parse_schedule, validate, warmup_multiplier
from trainer.tasks import TaskOptions, make_task
from trainer.train import make_optimizer


@pytest.fixture(scope="module")
def corpus() -> charlm.CharCorpus:
    return charlm.load_corpus()


def test_split_is_by_file_fixed_and_disjoint(corpus):
    assert set(corpus.train_files).isdisjoint(corpus.test_files)
    assert len(corpus.test_files) >= 5 and len(corpus.train_files) >= 4 * len(corpus.test_files) - 4
    again = charlm.load_corpus()
    assert again.digest == corpus.digest and again.test_files == corpus.test_files
    # the text of a test file occurs in the test bytes and not in the training bytes
    probe = (Path(corpus.source) / corpus.test_files[0]).read_bytes()[:4000]
    assert probe in corpus.test.tobytes() and probe not in corpus.train.tobytes()
    h = corpus.unigram_entropy()
    assert 2.5 < h < 4.0  # source code: about 4.5 bits per character


def test_fallback_to_every_stdlib_module(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    c = charlm.load_corpus(tmp_path)
    assert c.test_files == ("m04.py", "m09.py") and len(c.train_files) == 10
    (tmp_path / "m00.py").unlink()
    for i in range(1, 12):
        (tmp_path / f"m{i:02d}.py").unlink()
    with pytest.raises(ValueError, match="needs Python source files"):
        charlm.load_corpus(tmp_path)


def test_windows_predict_the_next_byte():
    data = np.frombuffer(b"abcdefghij", np.uint8)
    x, y = charlm.windows(data, 3)
    assert x.tolist() == [list(b"abc"), list(b"def"), list(b"ghi")]
    assert y.tolist() == [list(b"bcd"), list(b"efg"), list(b"hij")]


def test_decoder_is_causal():
    torch.manual_seed(0)
    model = charlm.CharGPT(context=16, layers=2, width=32, heads=2).eval()
    x = torch.randint(0, 256, (2, 16), dtype=torch.uint8)
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, 256, (2, 6), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)
    # a fresh model predicts nearly uniformly: loss ln 256
    assert charlm.char_loss(a, x.long()).item() == pytest.approx(math.log(256), rel=0.02)


def test_every_layer_gets_exact_per_example_norms():
    """GradientNoise covers every charlm parameter by per-example norms (positions included: they are
    looked up as (N, T) ids), so a K = 1 step is complete without a split, and its ingredients equal
    those of exact per-example gradients (torch.func)."""
    import warnings

    from tests.trainer_helpers import per_example_grads
    from trainer.noise import GradientNoise

    torch.manual_seed(0)
    model = charlm.CharGPT(context=8, layers=1, width=32, heads=2)
    x = torch.randint(0, 256, (6, 8), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, dims=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # torch.func on SDPA (CPU)
        g = per_example_grads(model, charlm.char_loss, x, y)
    gns = GradientNoise(model)
    assert not gns.fallback and {"tok", "pos", "head", "ln_f", "blocks.0.attn.qkv"} <= set(gns.covered)
    charlm.char_loss(model(x), y).backward()
    s = gns.step()
    assert s.complete and not s.micro_batch and len(s.per_example) == sum(1 for _ in model.parameters())
    assert float(s.g_small_sq) == pytest.approx(float(g.square().sum(1).mean()), rel=1e-4)
    assert float(s.g_big_sq) == pytest.approx(float(g.mean(0).square().sum()), rel=1e-4)


def test_task_eval_sets_and_tokens():
    task = make_task("charlm", TaskOptions(context=32, layers=1, width=32), torch.device("cpu"))
    assert task.tokens_per_example == 32 and task.model_name == "gpt-c32-l1-w32-h1"
    x, y = task.next_batch(8)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.uint8
    assert task.info["unigram_entropy"] > 2.5 and task.train_size == task.info["train_size"]
    assert set(task.eval_sets) == {"train", "test"}
    fx, _ = task.fixed_sample(16)
    assert torch.equal(fx, task.fixed_sample(16)[0])


def test_adamw_decays_only_matrices_and_embeddings():
    model = charlm.CharGPT(context=8, layers=1, width=32, heads=1)
    opt = make_optimizer(TrainConfig(task="charlm", optimizer="adamw", lr=1e-3, weight_decay=0.1, beta2=0.95,
                                     eps=1e-6), model)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    assert isinstance(opt, torch.optim.AdamW)


def test_warmup_schedules():
    total, warm = 1000, 100
    wc = [warmup_multiplier("warmup-cosine", e, total, warm, 0.0) for e in (0, 50, 99, 100, 550, 1000)]
    assert wc[0] == pytest.approx(1 / 101) and wc[1] == pytest.approx(51 / 101)
    assert wc[3] == pytest.approx(1.0) and wc[4] == pytest.approx(0.5) and wc[5] == pytest.approx(0.0, abs=1e-12)
    wsd = [warmup_multiplier("wsd", e, total, warm, 0.2) for e in (100, 500, 800, 900, 1000)]
    assert wsd == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    s = parse_schedule("wsd:0.1", "lr", 500, total=1000, warmup="1ep")
    assert (s.kind, s.warmup, s.decay) == ("wsd", 500, 0.1) and s.multiplier(950) == pytest.approx(0.5)
    assert parse_schedule("warmup-cosine", "lr", None, total=1000, warmup="0.1").warmup == 100
    for bad, warmup in (("wsd:2", "0.05"), ("warmup-cosine", "1.5"), ("warmup-cosine", "1ep"),
                        ("warmup-cosine", "5000ex"), ("wsd:x", "0.05")):
        with pytest.raises(ConfigError):
            parse_schedule(bad, "lr", None, total=1000, warmup=warmup)


@pytest.mark.parametrize("opts, match", [
    (dict(task="digits", context=32), "charlm only"),
    (dict(task="charlm", optimizer="sgd", beta2=0.95), "Adam options"),
    (dict(task="charlm", optimizer="adamw", beta1=0.8, momentum=0.9), "give one of them"),
    (dict(task="charlm", optimizer="adamw", eps=0.0), "--eps"),
    (dict(task="charlm", optimizer="adamw", beta2=1.0), "--beta2"),
])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        validate(TrainConfig(**opts))


def test_charlm_trains_well_below_the_unigram_entropy(tmp_path, corpus):
    """A real run through the command line: AdamW with warm-up + cosine, 600 steps of a 2-layer decoder."""
    db = tmp_path / "lm.duckdb"
    cmd = [sys.executable, "-m", "trainer", "--task", "charlm", "--context", "32", "--layers", "2", "--width", "64",
           "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.1", "--lr-schedule", "warmup-cosine",
           "--steps", "600", "--batch", "32", "--eval-every", "200", "--threads", "1", "--db", str(db)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    con = duckdb.connect(str(db), read_only=True)
    try:
        run = con.execute("SELECT task, optimizer, tokens_per_step, batch_size, config FROM runs").fetchone()
        losses = dict(con.execute("SELECT split, loss FROM evals WHERE step = 600").fetchall())
        first = con.execute("SELECT loss FROM steps WHERE step = 1").fetchone()[0]
        share = con.execute("SELECT step, value FROM scalars WHERE name = 'gns_per_example'").fetchall()
        measured = con.execute("SELECT count(*) FROM steps WHERE b_small = 1 AND g_small_sq > 0").fetchone()[0]
    finally:
        con.close()
    assert run[:4] == ("charlm", "adamw", 32 * 32, 32)
    info = json.loads(run[4])["task_info"]
    h = info["unigram_entropy"]
    assert info["text_digest"] == corpus.digest
    assert first == pytest.approx(math.log(256), rel=0.05)  # starts at chance over bytes
    # well below what character frequencies alone give: the model uses the context
    assert losses["test"] < 0.8 * h, (losses, h)
    assert losses["train"] < 0.8 * h
    # every layer is covered by per-example norms, so every step is measured in one pass (B_small = 1)
    assert share == [(1, 1.0)] and measured == 600


def test_shipped_charlm_sample_sweep():
    """sample_runs/charlm: every run reached the target; tokens, Adam noise and curvature are recorded."""
    folder = Path(__file__).resolve().parents[1] / "sample_runs" / "charlm"
    con = duckdb.connect()
    try:
        runs = con.execute(f"SELECT run_id, batch_size, tokens_per_step, optimizer, status FROM "
                           f"'{folder}/runs.parquet'").fetchall()
        reached = {r for (r,) in con.execute(f"SELECT DISTINCT run_id FROM '{folder}/scalars.parquet' "
                                             "WHERE name = 'target_reached'").fetchall()}
        names = {n for (n,) in con.execute(f"SELECT DISTINCT name FROM '{folder}/scalars.parquet'").fetchall()}
    finally:
        con.close()
    assert len(runs) == 16 and {b for _, b, *_ in runs} == {16, 32, 64, 128}
    assert all(t == 32 * b and o == "adamw" and s == "finished" for _, b, t, o, s in runs)
    assert reached == {r for r, *_ in runs}
    assert {"sharpness", "b_noise_ghg", "b_simple_adam", "g_big_sq_adam"} <= names
