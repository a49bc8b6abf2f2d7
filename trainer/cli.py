"""Command line: `python -m trainer [options]` trains one run; `python -m trainer sweep ...` runs a grid.

Input is checked completely (options, device, data files) before the run is started, so a mistake
costs one line on stderr, exit code 2, and leaves nothing in the store.
"""

from __future__ import annotations

import argparse
import signal
import sys

# Their layers are too small for intra-op threads to pay off; on a busy 2-core machine the OpenMP
# threads cost 4x (measured: 1,349 digits steps in 3.5 s with one thread, 19 s with two).
SMALL_TASKS = ("digits", "linreg", "teacher")

DESCRIPTION = """\
Train a model and record every step (loss, learning rate, batch size, gradient-noise statistics)
and periodic train/test evaluations to a batchscope store (DuckDB).

examples:
  python -m trainer --batch 32 --lr 0.1                  digits, the default task (seconds on a CPU)
  python -m trainer --batch 256 --accum 4 --lr 0.3       4 micro-batches of 64 per step
  python -m trainer --task linreg --dim 20 --noise 0.5   calibration task: B_simple known exactly
  python -m trainer --task teacher --optimizer adam --lr 1e-3 --examples 500000
  python -m trainer --task charlm --optimizer adamw --lr 3e-3 --weight-decay 0.1 --lr-schedule warmup-cosine
                                                         a byte-level GPT on Python's own sources (minutes on a CPU)
  python -m trainer --batch 64 --batch-schedule x5@10,20 increase the batch instead of decaying the LR
  torchrun --nproc-per-node 2 -m trainer --batch 64     DDP: one run (rank 0 writes), 32 examples per rank
  python -m trainer sweep --batch 8,16,32,64,128,256,512,1024 --lr 0.003:1:8 --jobs 2
                                                         a batch x LR grid (see: python -m trainer sweep -h)
"""

EPILOG = """\
Runs go to --db (default: $BATCHSCOPE_DB, else ./runs.duckdb). Look at them with
`python -m dashboard` or in SQL: `python -m collector sql "SELECT * FROM run_summary"`.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_train_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of one run (a sweep takes the same ones, except --batch, --lr and --name)."""
    from trainer.tasks import TASKS

    what = p.add_argument_group("what to train")
    what.add_argument("--task", default="digits", metavar="|".join(TASKS),
                      help="dataset + model (default: digits, shipped with the package)")
    what.add_argument("--data-dir", metavar="DIR", help="directory with the standard mnist/cifar10 files (no download)")
    what.add_argument("--dim", type=integer, metavar="D", help="input dimension of linreg (default 10) / teacher (default 32)")
    what.add_argument("--noise", type=float, default=1.0, metavar="SIGMA", help="label noise sigma of linreg (default 1.0)")
    how = p.add_argument_group("how to train")
    if not sweep:
        how.add_argument("--batch", type=integer, default=32, help="examples per optimizer step B (default 32)")
        how.add_argument("--lr", type=float, default=0.1, help="(peak) learning rate (default 0.1)")
    how.add_argument("--optimizer", default="sgd", metavar="sgd|adam|adamw",
                     help="default sgd; adamw: decoupled weight decay on weight matrices and embeddings only")
    how.add_argument("--momentum", type=float, metavar="M", help="SGD momentum (default 0) or Adam beta1 (default 0.9)")
    how.add_argument("--weight-decay", type=float, default=0.0, metavar="WD", help="default 0")
    how.add_argument("--accum", type=integer, default=1, metavar="K",
                     help="gradient accumulation: K micro-batches of B/K per step, same update as the full batch")
    how.add_argument("--lr-schedule", default="constant", metavar="SPEC",
                     help="constant (default), cosine, warmup-cosine, wsd[:F] (warm-up, stable, linear decay "
                          "over the last F of the budget, default 0.2), or xF@M1,M2: multiply the LR by F at "
                          "epochs M1, M2 (or examples: 50000ex)")
    how.add_argument("--batch-schedule", metavar="SPEC", help="xF@M1,M2: multiply the batch size by F at those epochs (Smith et al.)")
    how.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (after measuring)")
    if not sweep:  # a sweep takes a list of seeds (trainer/sweep.py)
        how.add_argument("--seed", type=int, default=0, help="model init and data order (default 0)")
    how_long = p.add_argument_group("how long (default: 30 epochs of digits, 1000 linreg steps, 200k teacher examples)")
    how_long.add_argument("--steps", type=integer, metavar="N", help="optimizer steps")
    how_long.add_argument("--examples", type=integer, metavar="N", help="training examples")
    how_long.add_argument("--epochs", type=float, metavar="E", help="passes over the training set")
    how_long.add_argument("--target-loss", type=float, metavar="LOSS",
                          help="stop once the smoothed training loss reaches LOSS (the default budget is then 10x longer)")
    how_long.add_argument("--diverge-factor", type=float, default=100.0, metavar="F",
                          help="end the run as diverged when the smoothed loss exceeds F x the first loss "
                               "(default 100; 0: only a non-finite loss counts)")
    add_lm_options(p)
    rec = p.add_argument_group("measuring and recording")
    rec.add_argument("--eval-every", type=integer, metavar="STEPS",
                     help="evaluate train/test loss and accuracy every N steps (default: ~20 per run)")
    from trainer.config import TrainConfig

    gns_default = TrainConfig.gns_every
    rec.add_argument("--gns-every", type=int, default=gns_default, metavar="N",
                     help="at --accum 1, measure the gradient noise scale every N steps from per-example gradient "
                          f"norms taken in the same pass (default {gns_default}: every step; 0 = never). "
                          "With --accum K>=2 it is measured on every step from the micro-batches")
    rec.add_argument("--gns-method", default=TrainConfig.gns_method, metavar="auto|per-example|micro-batch",
                     help="per-example gradient norms (B_small = 1; layers without a rule use micro-batches) or "
                          "each micro-batch's norm (B_small = B/K; at --accum 1 a 2-way split); auto (the "
                          "default): per-example at --accum 1, micro-batch with --accum K>=2")
    rec.add_argument("--gns-sketch", type=int, default=TrainConfig.gns_sketch, metavar="K",
                     help="estimate the per-example norms of sequence Linear layers and convolutions from K random "
                          "projections per example (unbiased, O(T K) instead of O(T^2): cheaper for "
                          "transformers, noisier; default 0: exact)")
    rec.add_argument("--gns-window", type=float, metavar="EXAMPLES",
                     help="a fixed EMA window for the logged B_simple, in examples (default: none; the window "
                          "adapts to hold ~40%% relative error, see steps.b_simple and the b_simple_n scalar)")
    if not sweep:
        rec.add_argument("--name", help="run name (default: TASK-bB-lrLR)")
        rec.add_argument("--sweep", help="sweep (group of runs) this run belongs to")
    rec.add_argument("--db", metavar="PATH", help="store path, or a server URL http(s)://host:port (docs/remote.md) "
                     "(default: $BATCHSCOPE_DB or ./runs.duckdb)")
    rec.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N, mps")
    rec.add_argument("--threads", type=integer, metavar="N", help="CPU threads for torch (default: 1 for digits/linreg/teacher, whose layers are too "
                          "small to split; torch's choice otherwise)")
    rec.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only when stderr is a terminal)")


def add_lm_options(p: argparse.ArgumentParser) -> None:
    """charlm's model size, Adam's constants, the warm-up length and curvature (issue 13)."""
    from trainer.config import TrainConfig
    from trainer.tasks import CHARLM_DEFAULTS

    d = TrainConfig()
    lm = p.add_argument_group("language model (--task charlm), Adam and curvature")
    for opt, what in (("context", "characters per example"), ("layers", "transformer blocks"),
                      ("width", "model width (heads of 32)")):
        lm.add_argument(f"--{opt}", type=integer, metavar="N", help=f"{what} (default {CHARLM_DEFAULTS[opt]})")
    lm.add_argument("--beta1", type=float, metavar="B1", help="Adam beta1 (default 0.9; --momentum is the same)")
    lm.add_argument("--beta2", type=float, default=d.beta2, metavar="B2", help=f"Adam beta2 (default {d.beta2})")
    lm.add_argument("--eps", type=float, default=d.eps, metavar="EPS", help=f"Adam epsilon (default {d.eps:g})")
    lm.add_argument("--warmup", default=d.warmup, metavar="SPEC",
                    help=f"warm-up of warmup-cosine/wsd: a fraction of the budget (default {d.warmup}), "
                         "examples (2000ex) or epochs (1ep)")
    lm.add_argument("--curvature", action="store_true",
                    help="at every evaluation, log the sharpness (top Hessian eigenvalue) and B_noise = "
                         "tr(H Sigma)/G'HG on a fixed batch (costs tens of training steps per evaluation)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer", description=DESCRIPTION, epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p)
    return p


def config_from_args(args: argparse.Namespace):
    from trainer.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def prepare(cfg, env=None):
    """Validate everything and load the task's data; raises ConfigError/DataError/ValueError.
    Under torchrun (`env`, trainer/ddp.py) the device is this rank's (cuda:LOCAL_RANK on CUDA)."""
    import torch

    from trainer import ddp
    from trainer.config import plan, resolve_device, validate
    from trainer.tasks import TaskOptions, make_task

    env = env or ddp.DistEnv()
    validate(cfg, env.world)
    check_store_path(cfg.db)
    device = resolve_device(ddp.device_for(env, cfg.device))
    threads = cfg.threads or (1 if cfg.task in SMALL_TASKS and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    opts = TaskOptions(dim=cfg.dim, noise=cfg.noise, data_dir=cfg.data_dir, context=cfg.context, layers=cfg.layers,
                       width=cfg.width)
    task = make_task(cfg.task, opts, device, cfg.seed)  # the same seed on every rank: the same batches
    return task, plan(cfg, task.train_size, env.world)


def check_store_path(db: str | None) -> None:
    """Refuse a --db that cannot be a store before any training time is spent (one line, exit 2).

    A directory, or a file in a folder that does not exist (a typo would otherwise silently create
    a new tree of folders), is a ValueError; http(s):// URLs are left to the collector.
    """
    from collector.store import StoreError, resolve_db

    if db and db.startswith(("http://", "https://")):
        return
    try:
        path = resolve_db(db)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    if not path.parent.is_dir():
        raise ValueError(f"--db {path}: folder {path.parent} does not exist (create it first)")


def device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer` and `batchscope-train`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sweep":
        from trainer.sweep import main as sweep_main

        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    from trainer import ddp
    from trainer.config import ConfigError
    from trainer.datasets import DataError

    cfg = config_from_args(args)
    env = ddp.from_env()
    try:
        task, plan = prepare(cfg, env)
    except (ConfigError, DataError, ValueError, OSError) as exc:
        if env.writes:
            print(f"python -m trainer: error: {exc}", file=sys.stderr)
        return 2
    if not env.active:
        ddp.raise_on_sigterm("stopped by SIGTERM")
        return run_training(cfg, task, plan, progress=args.progress)
    ddp.init(env, task.device)
    try:
        return run_training(cfg, task, plan, progress=args.progress, env=env)
    finally:
        ddp.shutdown()


def run_training(cfg, task, plan, progress: bool | None = None, env=None) -> int:
    """Start the run (rank 0 only under DDP; the other ranks train into a NullRun) and train."""
    import torch

    import collector
    from trainer import ddp
    from trainer.train import train

    env = env or ddp.DistEnv()

    name = cfg.name or f"{cfg.task}-b{cfg.batch}-lr{cfg.lr:g}" + (f"-k{cfg.accum}" if cfg.accum > 1 else "")
    config = cfg.to_json() | {
        "task_info": task.info, "model": task.model_name, "torch": torch.__version__,
        "plan": {"max_steps": plan.max_steps, "max_examples": plan.max_examples, "eval_every": plan.eval_every,
                 "gns_every": plan.gns_every, "gns_window": plan.gns_window},
    }
    from trainer.config import adam_betas

    momentum = adam_betas(cfg)[0] if cfg.optimizer.startswith("adam") else (cfg.momentum or 0.0)
    tokens = {} if task.tokens_per_example is None else {"tokens_per_step": cfg.batch * task.tokens_per_example}
    if env.active:
        name += f"-ddp{env.world}" if not cfg.name else ""
        config |= {"world_size": env.world, "backend": "nccl" if task.device.type == "cuda" else "gloo"}
    where = device_label(task.device) + (f" x {env.world} ranks" if env.active else "")
    try:
        if not env.writes:
            train(cfg, task, ddp.NullRun(), progress=False, env=env)
            return 0
        with collector.start_run(
            db=cfg.db, name=name, sweep=cfg.sweep, config=config, task=cfg.task, model=task.model_name,
            optimizer=cfg.optimizer, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch, micro_batch_size=cfg.batch // env.world // cfg.accum, accum_steps=cfg.accum,
            world_size=env.world, train_size=task.train_size, seed=cfg.seed, device=where, **tokens,
        ) as run:
            print(f"run {run.run_id} ({name}) on {where} -> {run.db}", flush=True)
            result = train(cfg, task, run, progress=progress, env=env)
            if result.status == "diverged":
                run.finish("diverged")
    except KeyboardInterrupt:
        print("interrupted: the run is recorded as failed with every step logged so far", file=sys.stderr)
        return 130
    except ddp.TerminatedError as exc:  # preempted, `timeout`, or torchrun after another rank failed
        if env.writes:
            print(f"{exc}: the run is recorded as failed with every step trained so far", file=sys.stderr)
        return 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM killed
    parts = [f"{result.steps} steps", f"{result.examples} examples", f"{result.seconds:.1f} s",
             f"smoothed training loss {result.final_loss:.4g}"]
    for split, (loss, acc) in result.evals.items():
        parts.append(f"{split} loss {loss:.4g}" + (f" acc {acc:.3f}" if acc is not None else ""))
    if result.b_simple == result.b_simple:
        parts.append(f"B_simple {result.b_simple:.4g}")
    if cfg.target_loss is not None:
        parts.append("target reached" if result.reached_target else "target NOT reached")
    print(f"run {run.run_id} {result.status}: " + ", ".join(parts))
    print(f"stored in {run.db}  (run_id = '{run.run_id}')")
    return 0
