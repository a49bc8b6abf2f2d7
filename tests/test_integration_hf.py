"""The Hugging Face callback with the real library: a tiny Llama built from a config (nothing downloaded)
trained by `transformers.Trainer` on token sequences generated here.

Ground truth comes from the Trainer itself (logging_steps=1): its logged `grad_norm` is the pre-clip
norm (so g_big_sq must be its square although max_grad_norm clips every step), `learning_rate` the LR
of the step and `loss` the step's loss. A second training without the callback must end with the same
parameters: taking over the clipping changes nothing in the updates.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from collector.store import read_connection  # noqa: E402
from trainer.integrations.hf import BatchscopeCallback  # noqa: E402

VOCAB, T, MICRO, ACCUM, STEPS = 24, 12, 8, 2, 8
REPO = Path(__file__).resolve().parents[1]


def sequences(n: int, seed: int) -> list[dict]:
    """Token sequences from a sparse random Markov chain: learnable, so the loss falls."""
    nxt = torch.randint(0, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        tok = [int(torch.randint(0, VOCAB, (1,), generator=g))]
        for _ in range(T - 1):
            tok.append(int(nxt[tok[-1], torch.randint(0, 3, (1,), generator=g)]))
        ids = torch.tensor(tok)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def make_trainer(out: Path, callbacks: list, **kw) -> transformers.Trainer:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=T))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=3e-3, max_grad_norm=0.05, logging_steps=1, eval_strategy="steps",
        eval_steps=4, per_device_eval_batch_size=32, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, lr_scheduler_type="linear", dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=sequences(256, 1),
                                eval_dataset=sequences(64, 2), callbacks=callbacks)


def stored(db):
    with read_connection(db) as con:
        runs = con.sql("SELECT * FROM runs").pl().to_dicts()
        steps = con.sql("SELECT * FROM steps ORDER BY step").pl().to_dicts()
        evals = con.sql("SELECT * FROM evals ORDER BY step").pl().to_dicts()
    assert len(runs) == 1
    return runs[0], steps, evals


def test_finished_run_with_unclipped_noise_on_every_step_and_unchanged_updates(tmp_path):
    db = tmp_path / "runs.duckdb"
    cb = BatchscopeCallback(db=db, name="llama", sweep="hf", task="markov")
    trainer = make_trainer(tmp_path / "a", [cb])
    trainer.train()
    run, steps, evals = stored(db)
    logs = {h["step"]: h for h in trainer.state.log_history if "grad_norm" in h}

    assert run["status"] == "finished" and (run["name"], run["sweep"], run["task"]) == ("llama", "hf", "markov")
    assert (run["batch_size"], run["micro_batch_size"], run["accum_steps"], run["world_size"]) == (16, 8, 2, 1)
    assert (run["optimizer"], run["lr"], run["seed"], run["train_size"]) == ("adamw", 3e-3, 0, 256)
    assert run["model"] == "LlamaForCausalLM"
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) == sorted(logs)
    for s in steps:
        h = logs[s["step"]]
        assert s["examples"] == s["step"] * MICRO * ACCUM and s["batch_size"] == MICRO * ACCUM
        assert s["b_big"] == MICRO * ACCUM and s["b_small"] == 1.0  # per-example + micro-batch blocks
        assert s["g_small_sq"] > s["g_big_sq"] > 0.05**2  # noisier small batches; clipping bit every step
        assert s["g_big_sq"] == pytest.approx(h["grad_norm"] ** 2, rel=1e-4)
        assert s["lr"] == pytest.approx(h["learning_rate"], rel=1e-6)
        assert s["loss"] == pytest.approx(h["loss"], rel=1e-4)
    assert trainer.args.max_grad_norm == 0.05  # given back

    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [(e["step"], e["split"], e["examples"]) for e in evals] == [(4, "test", 64), (8, "test", 128)]
    assert [e["loss"] for e in evals] == pytest.approx([h["eval_loss"] for h in eval_logs])

    plain = make_trainer(tmp_path / "b", [])
    plain.train()
    for (name, p), q in zip(trainer.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_tokens_as_the_x_axis_and_the_context_manager_fails_the_run(tmp_path):
    db = tmp_path / "runs.duckdb"
    cb = BatchscopeCallback(db=db, name="tok", unit="tokens")

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyError("user callback failed")

    trainer = make_trainer(tmp_path / "a", [cb, Stop()])
    with pytest.raises(KeyError), cb:
        trainer.train()
    run, steps, _ = stored(db)
    assert run["status"] == "failed" and "KeyError" in run["status_reason"]
    tokens = MICRO * ACCUM * T
    assert [s["examples"] for s in steps] == [tokens, 2 * tokens, 3 * tokens]
    assert all(s["batch_size"] == tokens == s["b_big"] and s["b_small"] == T for s in steps)


def test_a_model_that_raises_in_a_script_leaves_a_failed_run_with_its_steps(tmp_path):
    """No Trainer event reports an exception: a script that dies of one fails the run at exit."""
    db = tmp_path / "runs.duckdb"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from pathlib import Path
        from test_integration_hf import make_trainer
        from trainer.integrations.hf import BatchscopeCallback
        trainer = make_trainer(Path({str(tmp_path / "out")!r}), [BatchscopeCallback(db={str(db)!r}, name="dies")])
        import torch
        calls = [0]
        def failing(module, args):
            calls[0] += torch.is_grad_enabled()  # training forwards only, not the evaluation's
            if calls[0] == 2 * 5 + 1:  # the first micro-batch of step 6
                raise FloatingPointError("model blew up")
        trainer.model.register_forward_pre_hook(failing)
        trainer.train()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1 and "FloatingPointError: model blew up" in proc.stderr
    run, steps, _ = stored(db)
    assert run["status"] == "failed" and run["status_reason"] == "FloatingPointError: model blew up"
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(s["g_small_sq"] is not None and s["g_big_sq"] is not None for s in steps)
