"""The store's tables, declared once as SQLAlchemy Core tables.

These names and columns are a public interface: analysts query them in plain SQL. Every column carries
its documentation in ``comment`` (printed by ``python -m collector schema`` and kept in DuckDB's catalog),
so the data dictionary cannot drift from the DDL. DuckDB DDL is compiled from these with the
duckdb_engine dialect; the same tables can be created on a server database later.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

SCHEMA_VERSION = 5
RUN_STATUSES = ("running", "finished", "diverged", "failed", "stale")


def _col(name: str, type_: sa.types.TypeEngine, doc: str, **kw) -> sa.Column:
    return sa.Column(name, type_, comment=doc, **kw)


RunId = sa.String
Double = sa.Double

runs = sa.Table(
    "runs",
    metadata,
    _col("run_id", RunId, "Unique run id (12 hex characters), the key every other table joins on.", primary_key=True),
    _col("name", sa.String, "Human-readable run name, e.g. 'b32-lr0.1'. Not unique.", nullable=False),
    _col("sweep", sa.String, "Sweep (group of runs compared together); NULL for a lone run."),
    _col("status", sa.String, "running, finished, diverged (non-finite loss), failed (exception) or stale (process died).",
         nullable=False),
    _col("task", sa.String, "Training task (dataset + model), e.g. digits, linreg, teacher, mnist."),
    _col("model", sa.String, "Model name/architecture."),
    _col("optimizer", sa.String, "Optimizer name: sgd or adam."),
    _col("lr", Double, "Base (peak) learning rate; per-step values are in steps.lr."),
    _col("momentum", Double, "SGD momentum (or Adam beta1)."),
    _col("weight_decay", Double, "Weight decay coefficient."),
    _col("batch_size", sa.Integer, "Global batch size B per optimizer step at the start of the run; per-step values in steps.batch_size."),
    _col("micro_batch_size", sa.Integer, "Examples per forward/backward pass (B / (accum_steps * world_size))."),
    _col("accum_steps", sa.Integer, "Gradient-accumulation micro-batches per optimizer step (K)."),
    _col("world_size", sa.Integer, "Data-parallel ranks."),
    _col("train_size", sa.BigInteger, "Training-set size N; NULL for an infinite stream (linreg, teacher)."),
    _col("seed", sa.BigInteger, "Random seed."),
    _col("device", sa.String, "Device the run trained on, e.g. cpu, cuda:0 (NVIDIA H100)."),
    _col("host", sa.String, "Host name of the training process."),
    _col("config", sa.JSON, "Full run configuration as JSON (every option, including schedules)."),
    _col("started_at", sa.DateTime(timezone=True), "When the run started (UTC)."),
    _col("ended_at", sa.DateTime(timezone=True), "When the run ended; NULL while running or if the process died."),
    _col("heartbeat_at", sa.DateTime(timezone=True), "Last sign of life from the training process; a running run whose heartbeat stops is stale."),
    _col("status_reason", sa.String, "Why the run ended with its status when that is not plain: the signal (SIGTERM), the exception, or how many logged rows were lost and why. NULL otherwise."),
    # Where the run ran (collector/provenance.py; docs/cluster.md): NULL where the launcher does not say.
    _col("cell_id", sa.String, "Cell of its sweep's grid, e.g. b64-lr0.1-s0 (batch, LR, seed), set by python -m trainer sweep; every attempt of a cell shares it. NULL for a run started on its own."),
    _col("attempt", sa.Integer, "Which try of its cell this run is: 1 for the first, 2 for the first retry (after a failure, a preemption or a requeue), ... See the sweep_cells view."),
    _col("launcher", sa.String, "What started the run: local, slurm, submitit or ray (python -m trainer sweep --launcher), slurm for a run inside a SLURM job, NULL otherwise."),
    _col("job_id", sa.String, "The launcher's job id: SLURM_JOB_ID, submitit's job id (e.g. 4242_3) or the Ray task id."),
    _col("array_job_id", sa.String, "SLURM_ARRAY_JOB_ID of the job array the run was a task of."),
    _col("array_task_id", sa.Integer, "SLURM_ARRAY_TASK_ID: the run's index in that job array."),
    _col("rank", sa.Integer, "Global rank of the process that wrote the run (RANK under torchrun; 0 otherwise)."),
    _col("git_commit", sa.String, "Git commit (HEAD) of the training code's repository, with '-dirty' when tracked files had uncommitted changes; NULL without git or outside a repository."),
    _col("tokens_per_step", sa.BigInteger, "Tokens per optimizer step at the start of the run: batch_size x context for the charlm task (tokens seen = steps.examples x tokens_per_step / batch_size, batch schedules included). NULL for tasks without tokens."),
)

steps = sa.Table(
    "steps",
    metadata,
    _col("run_id", RunId, "Run this step belongs to (runs.run_id).", primary_key=True),
    _col("step", sa.BigInteger, "Optimizer step, counted from 1.", primary_key=True),
    _col("examples", sa.BigInteger, "Cumulative training examples seen up to and including this step."),
    _col("wall_time", Double, "Seconds since the run started, at the end of this step."),
    _col("batch_size", sa.Integer, "Batch size of this step (batch schedules change it)."),
    _col("lr", Double, "Learning rate of this step (LR schedules change it)."),
    _col("loss", Double, "Training loss of this step's batch (mean over the batch); NaN/inf when diverged."),
    _col("g_small_sq", Double, "Gradient-noise ingredient: mean over micro-batches of the squared norm |g_small|^2 of each micro-batch's mean gradient. NULL when not measured this step."),
    _col("b_small", Double, "Gradient-noise ingredient: examples per small (micro-batch) gradient."),
    _col("g_big_sq", Double, "Gradient-noise ingredient: squared norm |g_big|^2 of the whole step's mean gradient (unclipped)."),
    _col("b_big", Double, "Gradient-noise ingredient: examples in the big gradient."),
    _col("b_simple", Double, "The trainer's running estimate of B_simple = tr(Sigma)/|G|^2 (ratio of EMAs of the unbiased estimates); NULL when not measured."),
)

evals = sa.Table(
    "evals",
    metadata,
    _col("run_id", RunId, "Run (runs.run_id).", primary_key=True),
    _col("step", sa.BigInteger, "Optimizer step after which the evaluation ran.", primary_key=True),
    _col("split", sa.String, "Data split evaluated: train, test, ...", primary_key=True),
    _col("examples", sa.BigInteger, "Cumulative training examples at that step."),
    _col("loss", Double, "Mean loss over the split."),
    _col("accuracy", Double, "Accuracy in [0, 1] (NULL for regression tasks)."),
)

scalars = sa.Table(
    "scalars",
    metadata,
    _col("run_id", RunId, "Run (runs.run_id).", primary_key=True),
    _col("step", sa.BigInteger, "Step the value belongs to.", primary_key=True),
    _col("name", sa.String, "Metric name as logged, e.g. grad_norm or an unknown log_step keyword.", primary_key=True),
    _col("value", Double, "The value."),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    _col("version", sa.Integer, "Schema version the store was migrated to.", primary_key=True, autoincrement=False),
    _col("applied_at", sa.DateTime(timezone=True), "When that migration was applied."),
    _col("sql_digest", sa.String, "Digest of the views and macros (schema/sql/*.sql) last applied; they are recreated when it changes."),
)

run_stats = sa.Table(
    "run_stats",
    metadata,
    _col("run_id", RunId, "Run (runs.run_id).", primary_key=True),
    _col("n_steps", sa.BigInteger, "Rows of this run in steps when these figures were made; run_summary trusts a row only while this still equals the count in steps (else it recomputes the run)."),
    _col("steps", sa.BigInteger, "Last logged step."),
    _col("examples", sa.BigInteger, "Largest cumulative examples logged."),
    _col("wall_time", Double, "Largest wall_time logged (seconds since the run started)."),
    _col("final_loss", Double, "Training loss at the last logged step (NaN/inf if it diverged there)."),
    _col("best_loss", Double, "Lowest finite training loss logged."),
    _col("has_nonfinite_loss", sa.Boolean, "Whether any logged training loss was NaN or infinite."),
)

DATA_TABLES = (runs, steps, evals, scalars)
# Kept up to date by the collector at every ingest, so run_summary reads one row per run instead of
# aggregating every step. A cache: it can always be rebuilt from `steps` (see the uncached_steps view).
DERIVED_TABLES = (run_stats,)
