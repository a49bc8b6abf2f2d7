"""The Hugging Face callback with the real library: a tiny Llama built from a config (nothing downloaded)
trained by `transformers.Trainer` on token sequences generated here.

Ground truth comes from the Trainer itself (logging_steps=1): its logged `grad_norm` is the pre-clip
norm (so g_big_sq must be its square although max_grad_norm clips every step), `learning_rate` the LR
of the step and `loss` the step's loss. A second training without the callback must end with the same
parameters: taking over the clipping changes nothing in the updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.integration_helpers import stored  # noqa: E402
from tests.trainer_helpers import one_torch_thread  # noqa: E402
from trainer.integrations.hf import BatchscopeCallback  # noqa: E402

VOCAB, T, MICRO, ACCUM, STEPS = 24, 12, 8, 2, 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy 2-core machine."""
    with one_torch_thread():
        yield


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


def make_trainer(out: Path, callbacks: list, accum: int = ACCUM, **kw) -> transformers.Trainer:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=T))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=accum,
        max_steps=STEPS, learning_rate=3e-3, max_grad_norm=0.05, logging_steps=1, eval_strategy="steps",
        eval_steps=4, per_device_eval_batch_size=32, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, lr_scheduler_type="linear", dataloader_num_workers=0, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=sequences(256, 1),
                                eval_dataset=sequences(64, 2), callbacks=callbacks)


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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and "FloatingPointError: model blew up" in proc.stderr
    run, steps, _ = stored(db)
    assert run["status"] == "failed" and run["status_reason"] == "FloatingPointError: model blew up"
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(s["g_small_sq"] is not None and s["g_big_sq"] is not None for s in steps)



def test_sigterm_logs_the_steps_the_callback_held_then_ends_the_run_failed(tmp_path):
    """Preemption (SLURM, Kubernetes, torchrun after another rank died): the callback holds steps for one
    online-B_simple update per block; the SIGTERM must log them before it ends the run, not drop them."""
    db = tmp_path / "runs.duckdb"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from pathlib import Path
        import transformers
        from test_integration_hf import make_trainer
        from trainer.integrations.hf import BatchscopeCallback
        class Preempted(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # after batchscope's: step 5 is held
                if state.global_step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
        cb = BatchscopeCallback(db={str(db)!r}, name="preempted")
        make_trainer(Path({str(tmp_path / "out")!r}), [cb, Preempted()]).train()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]  # it still dies of the signal
    run, steps, _ = stored(db)
    assert (run["status"], run["status_reason"]) == ("failed", "SIGTERM")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(s["g_small_sq"] is not None and s["b_simple"] is not None for s in steps[1:])


DDP_SCRIPT = """
import json, os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
import torch
import torch.distributed as dist
import transformers
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from test_integration_hf import make_trainer
from trainer.integrations.hf import BatchscopeCallback

out, db = Path({out!r}), {db!r}
rank = int(os.environ["RANK"])


class LocalNorms(transformers.TrainerCallback):
    # the truth: each rank's local gradient, as DDP hands it to its all-reduce (a communication hook)
    def __init__(self):
        self.trainer, self.sq, self.steps = None, 0.0, []

    def on_train_begin(self, args, state, control, **kw):
        self.trainer.model_wrapped.register_comm_hook(None, self.hook)

    def hook(self, state, bucket):
        self.sq += float(bucket.buffer().double().square().sum())
        return allreduce_hook(None, bucket)

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(self.sq)
        self.sq = 0.0


def train(name, accum, extra=(), **cb):
    trainer = make_trainer(out / name, [BatchscopeCallback(db=db, name=name, **cb), *extra], accum=accum)
    for c in extra:
        c.trainer = trainer
    trainer.train()
    return trainer


# 1. every parameter by ranks (K = 1): g_small = each rank's local gradient, exactly the comm hook's
truth = LocalNorms()
logs = train("ranks", 1, [truth], per_example=False).state.log_history
(out / f"ranks-{{rank}}.json").write_text(json.dumps({{"local_sq": truth.steps, "logs": logs}}))
# 2. the default: per example where a layer has a rule (Linear, Embedding), by ranks and micro-batches else
logs = train("default", 2).state.log_history
(out / f"default-{{rank}}.json").write_text(json.dumps({{"logs": logs}}))


# 3. rank 1 is killed (SIGKILL) as step 4 begins: rank 0's run fails with the steps logged before
class Die(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if rank == 1 and state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)


train("dies", 1, [Die()])
"""


@pytest.fixture(scope="module")
def ddp_store(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One torchrun launch of 2 gloo ranks: two finished runs, then a third whose rank 1 is SIGKILLed."""
    tmp = tmp_path_factory.mktemp("hf-ddp")
    db, out = tmp / "runs.duckdb", tmp / "out"
    script = tmp / "train_ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), tests=str(Path(__file__).parent), out=str(out), db=str(db)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400, stdin=subprocess.DEVNULL)
    return db, out, proc


def grad_norms(logs: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in logs if "grad_norm" in h}


@pytest.mark.slow
def test_ddp_noise_is_every_ranks_local_gradient_against_the_all_reduced_one(ddp_store):
    """Under torchrun the callback gets the bare model; its hooks must still see each rank's local gradient.
    Truth from DDP itself: a communication hook's bucket norms (before the all-reduce) on every rank, and
    the Trainer's pre-clip grad_norm of the all-reduced gradient."""
    db, out, proc = ddp_store
    assert (out / "ranks-1.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    run, steps, _ = stored(db, "ranks")
    r0, r1 = (json.loads((out / f"ranks-{r}.json").read_text()) for r in (0, 1))
    logs = grad_norms(r0["logs"])
    assert run["status"] == "finished"
    assert (run["world_size"], run["batch_size"], run["micro_batch_size"], run["accum_steps"]) == (2, 16, 8, 1)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) == sorted(logs)
    for s, sq0, sq1 in zip(steps, r0["local_sq"], r1["local_sq"], strict=True):
        assert abs(sq0 - sq1) > 1e-3 * sq0  # the ranks' gradients differ: rank 0's alone would not do
        assert (s["b_small"], s["b_big"], s["batch_size"], s["examples"]) == (MICRO, 2 * MICRO, 16, 16 * s["step"])
        assert s["g_small_sq"] == pytest.approx((sq0 + sq1) / 2, rel=1e-4)
        assert s["g_big_sq"] == pytest.approx(logs[s["step"]]["grad_norm"] ** 2, rel=1e-4)
        assert s["loss"] == pytest.approx(logs[s["step"]]["loss"], rel=1e-4)  # the Trainer's: over both ranks


@pytest.mark.slow
def test_ddp_default_measures_per_example_on_every_step_and_a_killed_rank_fails_the_run(ddp_store):
    db, out, proc = ddp_store
    assert (out / "default-0.json").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    run, steps, _ = stored(db, "default")
    logs = grad_norms(json.loads((out / "default-0.json").read_text())["logs"])
    assert run["status"] == "finished" and (run["world_size"], run["batch_size"]) == (2, 2 * MICRO * ACCUM)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:  # Linear/Embedding per example, RMSNorm by micro-batches x ranks: b_small = 1 equivalent
        assert (s["b_small"], s["b_big"]) == (1.0, 2 * MICRO * ACCUM) and s["g_small_sq"] > s["g_big_sq"] > 0
        assert s["g_big_sq"] == pytest.approx(logs[s["step"]]["grad_norm"] ** 2, rel=1e-4)
        assert s["loss"] == pytest.approx(logs[s["step"]]["loss"], rel=1e-4)

    assert proc.returncode != 0  # the launch ends with the killed rank
    run, steps, _ = stored(db, "dies")
    # rank 0: a broken collective, or torchrun's SIGTERM (what the launch printed says which, if this fails)
    assert run["status"] == "failed" and run["status_reason"], (run, proc.stderr[-4000:])
    # step 3's row waited for its background all-reduce: kept if that had completed before rank 1 died
    assert [s["step"] for s in steps] in ([1, 2], [1, 2, 3])
    assert all(s["g_small_sq"] is not None and s["loss"] is not None for s in steps)
