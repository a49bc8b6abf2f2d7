-- Core views and macros: the questions people ask of a store, in plain SQL.
-- Executed (CREATE OR REPLACE) whenever this file changes; see schema/migrations.py.

-- Per-run figures over the steps of table `tbl` (steps, or a batch about to be ingested): row count,
-- last step, examples, wall time, final and best training loss, whether any loss was non-finite.
-- Example: SELECT * FROM run_stats_of('steps') WHERE run_id = '...';
CREATE OR REPLACE MACRO run_stats_of(tbl) AS TABLE
SELECT run_id,
       count(*) AS n_steps,
       max(step) AS steps,
       max(examples) AS examples,
       max(wall_time) AS wall_time,
       arg_max(loss, step) AS final_loss,
       min(loss) FILTER (WHERE isfinite(loss)) AS best_loss,
       coalesce(bool_or(NOT isfinite(loss)), false) AS has_nonfinite_loss
FROM query_table(tbl) GROUP BY run_id;

-- The steps of every run whose row in the run_stats cache is missing or out of date (its n_steps
-- differs from the rows in steps: steps written outside the collector). Usually empty.
-- Example (refresh the cache): INSERT OR REPLACE INTO run_stats SELECT * FROM run_stats_of('uncached_steps');
CREATE OR REPLACE VIEW uncached_steps AS
SELECT * FROM steps
WHERE run_id IN (
    SELECT c.run_id
    FROM (SELECT run_id, count(*) AS n_steps FROM steps GROUP BY run_id) c
    LEFT JOIN run_stats r USING (run_id)
    WHERE r.n_steps IS DISTINCT FROM c.n_steps
);

-- Per-run step figures (run_stats_of's columns) for every run with steps: from the run_stats cache where
-- it is current, else computed from the steps themselves (uncached_steps).
CREATE OR REPLACE VIEW run_step_stats AS
SELECT * FROM run_stats
WHERE run_id NOT IN (SELECT DISTINCT run_id FROM uncached_steps)
  AND run_id IN (SELECT DISTINCT run_id FROM steps)
UNION ALL BY NAME
SELECT * FROM run_stats_of('uncached_steps');

-- The runs table with the effective status: a running run whose heartbeat is over 60 s old is 'stale'
-- (its process died without a word). Cheap: no steps are read.
CREATE OR REPLACE VIEW run_status AS
SELECT * REPLACE (CASE WHEN status = 'running' AND heartbeat_at < now() - INTERVAL 60 SECOND THEN 'stale'
                       ELSE status END AS status)
FROM runs;

-- One row per run: effective status (a running run whose heartbeat is over 60 s old is 'stale'),
-- progress, final/best losses and accuracies, and the generalization gap (test - train) at the last eval.
-- Step figures come from the run_stats cache where it is current, else from the steps themselves.
CREATE OR REPLACE VIEW run_summary AS
WITH eval_stats AS (
    SELECT run_id,
           arg_max(loss, step) FILTER (WHERE split = 'train') AS final_train_loss,
           arg_max(loss, step) FILTER (WHERE split = 'test') AS final_test_loss,
           min(loss) FILTER (WHERE split = 'test' AND isfinite(loss)) AS best_test_loss,
           arg_max(accuracy, step) FILTER (WHERE split = 'train') AS final_train_accuracy,
           arg_max(accuracy, step) FILTER (WHERE split = 'test') AS final_test_accuracy,
           max(accuracy) FILTER (WHERE split = 'test') AS best_test_accuracy
    FROM evals GROUP BY run_id
)
SELECT r.run_id, r.name, r.sweep, r.status,
       r.task, r.model, r.optimizer, r.lr, r.momentum, r.weight_decay, r.batch_size, r.micro_batch_size,
       r.accum_steps, r.world_size, r.train_size, r.seed, r.device, r.host,
       r.started_at, r.ended_at, r.heartbeat_at,
       coalesce(s.steps, 0) AS steps, coalesce(s.examples, 0) AS examples, s.wall_time,
       CASE WHEN r.train_size > 0 THEN s.examples / r.train_size END AS epochs,
       s.final_loss, s.best_loss,
       e.final_train_loss, e.final_test_loss, e.best_test_loss,
       e.final_train_accuracy, e.final_test_accuracy, e.best_test_accuracy,
       e.final_test_loss - e.final_train_loss AS gap_loss,
       e.final_train_accuracy - e.final_test_accuracy AS gap_accuracy,
       (r.status = 'diverged' OR coalesce(s.has_nonfinite_loss, false)) AS diverged
FROM run_status r
LEFT JOIN run_step_stats s USING (run_id)
LEFT JOIN eval_stats e USING (run_id);
