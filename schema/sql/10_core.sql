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
WITH step_stats AS (
    SELECT * FROM run_stats
    WHERE run_id NOT IN (SELECT DISTINCT run_id FROM uncached_steps)
      AND run_id IN (SELECT DISTINCT run_id FROM steps)
    UNION ALL BY NAME
    SELECT * FROM run_stats_of('uncached_steps')
),
eval_stats AS (
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
LEFT JOIN step_stats s USING (run_id)
LEFT JOIN eval_stats e USING (run_id);

-- Per run, the first step whose training loss, averaged over a trailing window of `smooth` logged
-- steps, is at or below `target`, linearly interpolated between that step and the one before it.
-- Runs that never reach the target are listed with reached = false and NULL step/examples.
-- Example: SELECT * FROM steps_to_target(0.3) JOIN runs USING (run_id);
CREATE OR REPLACE MACRO steps_to_target(target, smooth := 1) AS TABLE
WITH smoothed AS (
    SELECT run_id, step, examples,
           avg(loss) OVER (PARTITION BY run_id ORDER BY step ROWS BETWEEN smooth - 1 PRECEDING AND CURRENT ROW)
               AS smooth_loss
    FROM steps
    WHERE isfinite(loss)
),
lagged AS (
    SELECT *, lag(step) OVER w AS prev_step, lag(examples) OVER w AS prev_examples,
           lag(smooth_loss) OVER w AS prev_loss
    FROM smoothed
    WINDOW w AS (PARTITION BY run_id ORDER BY step)
),
first_hit AS (
    SELECT run_id,
           arg_min(step, step) AS hit_step, arg_min(examples, step) AS hit_examples,
           arg_min(smooth_loss, step) AS hit_loss, arg_min(prev_step, step) AS prev_step,
           arg_min(prev_examples, step) AS prev_examples, arg_min(prev_loss, step) AS prev_loss
    FROM lagged WHERE smooth_loss <= target GROUP BY run_id
)
SELECT r.run_id,
       h.run_id IS NOT NULL AS reached,
       CASE WHEN h.prev_step IS NULL OR h.prev_loss = h.hit_loss THEN h.hit_step
            ELSE h.prev_step + (h.prev_loss - target) / (h.prev_loss - h.hit_loss) * (h.hit_step - h.prev_step)
       END AS steps,
       CASE WHEN h.prev_step IS NULL OR h.prev_loss = h.hit_loss THEN h.hit_examples
            ELSE h.prev_examples + (h.prev_loss - target) / (h.prev_loss - h.hit_loss) * (h.hit_examples - h.prev_examples)
       END AS examples
FROM runs r LEFT JOIN first_hit h USING (run_id);

-- B_simple over training as a ratio of trailing-window sums of the unbiased |G|^2 and tr(Sigma)
-- estimates (McCandlish et al. 2018, App. A), over the last `window` measured steps.
-- Example: SELECT * FROM noise_scale(100) WHERE run_id = '...' ORDER BY step;
CREATE OR REPLACE MACRO noise_scale(window_steps := 100) AS TABLE
WITH est AS (
    SELECT run_id, step, examples, loss,
           (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small) AS g2,
           (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big) AS trace_sigma
    FROM steps
    WHERE g_small_sq IS NOT NULL AND g_big_sq IS NOT NULL AND b_big > b_small
      AND isfinite(g_small_sq) AND isfinite(g_big_sq)
)
SELECT run_id, step, examples, loss, g2, trace_sigma,
       sum(trace_sigma) OVER w / nullif(sum(g2) OVER w, 0) AS b_simple
FROM est
WINDOW w AS (PARTITION BY run_id ORDER BY step ROWS BETWEEN window_steps - 1 PRECEDING AND CURRENT ROW);
