-- Analysis macros: the fits of dashboard/analysis/ that SQL can express, over the store's tables.
-- Executed (CREATE OR REPLACE) after 10_core.sql whenever this file changes; see schema/migrations.py.
-- Each macro returns the same columns, with the same numbers, as its Python twin in dashboard/analysis/
-- (tests/test_analysis_sql.py checks it). Examples: docs/sql-examples.md.
--
-- Smoothing is by buckets of `width` consecutive steps (1..w, w+1..2w, ...), each represented by its
-- centroid (mean step, mean examples, mean finite loss): one GROUP BY instead of a window sort, so it
-- stays fast on millions of steps, and the centroid does not lag like a trailing average.

-- The training curve downsampled to one point per bucket of `width` steps (width 1: the raw finite losses).
-- Example: SELECT * FROM smoothed_steps(50) WHERE run_id = '...' ORDER BY bucket;
CREATE OR REPLACE MACRO smoothed_steps(width := 1) AS TABLE
SELECT run_id, (step - 1) // width AS bucket, avg(step) AS step, avg(examples) AS examples,
       avg(loss) AS loss, count(*) AS n
FROM steps
WHERE isfinite(loss)
GROUP BY run_id, (step - 1) // width;

-- Per run and target: the first bucket whose mean training loss is at or below the target, interpolated
-- (steps, examples) between its centroid and the previous bucket's. Every run in `runs` or `steps` appears
-- once per target; reached = false when it never got there. hit_value / best_value / final_value are
-- smoothed losses (at the hit, lowest, last); diverged: a non-finite loss was logged or status says so.
-- b_simple: tr(Sigma)/|G|^2 as a ratio of the sums of the unbiased per-step estimates over measured steps
-- within [steps/(1+noise_window), steps*(1+noise_window)]; g2, trace_sigma: their means; n_noise: count.
-- Example: SELECT r.batch_size, r.lr, c.* FROM crossings([0.5, 0.3], width := 20) c JOIN runs r USING (run_id);
CREATE OR REPLACE MACRO crossings(targets, width := 1, noise_window := 0.25) AS TABLE
WITH b0 AS (  -- one pass over steps: bucket centroids of the finite losses, and what per-run stats need
    SELECT run_id, (step - 1) // width AS bucket,
           avg(CASE WHEN isfinite(loss) THEN step END) AS step,
           avg(CASE WHEN isfinite(loss) THEN examples END) AS examples,
           avg(CASE WHEN isfinite(loss) THEN loss END) AS loss,
           max(step) AS last_step, bool_or(NOT isfinite(loss)) AS nonfinite
    FROM steps
    GROUP BY run_id, (step - 1) // width
),
b AS (SELECT run_id, bucket, step, examples, loss FROM b0 WHERE loss IS NOT NULL),
per_run AS (
    SELECT run_id, max(last_step) AS last_step, coalesce(bool_or(nonfinite), false) AS nonfinite
    FROM b0 GROUP BY run_id
),
bl AS (
    SELECT *, lag(step) OVER w AS prev_step, lag(examples) OVER w AS prev_examples, lag(loss) OVER w AS prev_loss,
           min(loss) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_min
    FROM b
    WINDOW w AS (PARTITION BY run_id ORDER BY bucket)
),
stats AS (
    SELECT run_id, min(loss) AS best_value, arg_max(loss, bucket) AS final_value FROM b GROUP BY run_id
),
-- running-minimum records: the first bucket at/below a target is the record with the largest loss <= target
rec AS (SELECT * FROM bl WHERE prev_min IS NULL OR loss < prev_min),
ids AS (SELECT run_id FROM runs UNION SELECT run_id FROM per_run),
grid AS (SELECT ids.run_id, t.target FROM ids CROSS JOIN (SELECT unnest(targets)::DOUBLE AS target) t),
hit AS (
    SELECT g.run_id, g.target, r.step, r.examples, r.loss AS hit_value,
           r.prev_step, r.prev_examples, r.prev_loss
    FROM grid g ASOF LEFT JOIN rec r ON g.run_id = r.run_id AND g.target >= r.loss
),
pts AS (
    SELECT run_id, target, hit_value IS NOT NULL AS reached, hit_value,
           CASE WHEN prev_step IS NULL THEN step
                ELSE prev_step + (prev_loss - target) / (prev_loss - hit_value) * (step - prev_step) END AS steps,
           CASE WHEN prev_step IS NULL THEN examples
                ELSE prev_examples + (prev_loss - target) / (prev_loss - hit_value) * (examples - prev_examples)
           END AS examples
    FROM hit
),
m AS (
    SELECT run_id, step,
           (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small) AS g2,
           (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big) AS trace_sigma
    FROM steps
    WHERE noise_window IS NOT NULL  -- noise_window := NULL skips B_simple (then see noise_around)
      AND isfinite(g_small_sq) AND isfinite(g_big_sq) AND isfinite(b_small) AND isfinite(b_big)
      AND b_big > b_small
),
nz AS (
    SELECT p.run_id, p.target, count(*) AS n_noise, avg(m.g2) AS g2, avg(m.trace_sigma) AS trace_sigma,
           sum(m.trace_sigma) / nullif(sum(m.g2), 0) AS b_simple
    FROM pts p JOIN m ON m.run_id = p.run_id
        AND m.step BETWEEN ceil(p.steps / (1 + noise_window)) AND floor(p.steps * (1 + noise_window))
    WHERE p.reached
    GROUP BY p.run_id, p.target
)
SELECT p.run_id, p.target, p.reached, p.steps, p.examples, p.hit_value, s.best_value, s.final_value,
       pr.last_step,
       coalesce(pr.nonfinite, false) OR coalesce(r.status = 'diverged', false) AS diverged,
       nz.b_simple, nz.g2, nz.trace_sigma, coalesce(nz.n_noise, 0) AS n_noise
FROM pts p
LEFT JOIN stats s USING (run_id)
LEFT JOIN per_run pr USING (run_id)
LEFT JOIN runs r USING (run_id)
LEFT JOIN nz USING (run_id, target)
ORDER BY p.target DESC, p.run_id;

-- B_simple around given steps of given runs (two lists of equal length): the ratio of the sums of the
-- unbiased |G|^2 and tr(Sigma) estimates over measured steps in [s/(1+noise_window), s*(1+noise_window)]
-- (noise_at in Python). Cheaper than crossings' own noise columns when only a few runs matter, e.g. the
-- best-LR run of each batch size: SELECT * FROM noise_around(['a1b2c3d4e5f6'], [412.5]);
CREATE OR REPLACE MACRO noise_around(run_ids, at_steps, noise_window := 0.25) AS TABLE
WITH p AS (
    SELECT unnest(run_ids)::VARCHAR AS run_id, unnest(at_steps)::DOUBLE AS steps
),
m AS (
    SELECT run_id, step,
           (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small) AS g2,
           (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big) AS trace_sigma
    FROM steps
    WHERE list_contains(run_ids, run_id)
      AND isfinite(g_small_sq) AND isfinite(g_big_sq) AND isfinite(b_small) AND isfinite(b_big)
      AND b_big > b_small
)
SELECT p.run_id, p.steps, count(m.step) AS n_noise, avg(m.g2) AS g2, avg(m.trace_sigma) AS trace_sigma,
       sum(m.trace_sigma) / nullif(sum(m.g2), 0) AS b_simple
FROM p LEFT JOIN m ON m.run_id = p.run_id
    AND m.step BETWEEN ceil(p.steps / (1 + noise_window)) AND floor(p.steps * (1 + noise_window))
GROUP BY p.run_id, p.steps;

-- For each target and batch size, the learning rate with the fewest steps to target (best_per_batch in
-- Python). Seeds of one (batch_size, lr) cell are combined by the median, a seed that never reached the
-- target counting as infinitely slow (so a cell counts only if more than half its seeds reached it). Cells
-- within `rtol` of the fewest steps tie; the middle LR of the tie (lower of two middles) wins.
-- lr_at_edge: the best LR is the smallest or largest tried, so the optimum may lie outside the grid.
-- Example: SELECT * FROM best_lr_per_batch([0.3], width := 20, sweep_name := 'digits-sweep');
CREATE OR REPLACE MACRO best_lr_per_batch(targets, width := 1, noise_window := 0.25, rtol := 0.0,
                                          sweep_name := NULL) AS TABLE
WITH h AS (
    SELECT c.*, r.batch_size::DOUBLE AS batch_size, r.lr::DOUBLE AS lr,
           c.reached AND isfinite(c.steps) AS ok
    FROM crossings(targets, width := width, noise_window := noise_window) c JOIN runs r USING (run_id)
    WHERE (sweep_name IS NULL OR r.sweep = sweep_name) AND isfinite(r.batch_size) AND isfinite(r.lr)
),
cells AS (
    SELECT target, batch_size, lr, count(*) AS n_runs, count(*) FILTER (ok) AS n_reached,
           count(*) FILTER (diverged) AS n_diverged,
           CASE WHEN 2 * count(*) FILTER (ok) > count(*)
                THEN quantile_cont(CASE WHEN ok THEN steps ELSE 'inf'::DOUBLE END, 0.5) END AS steps,
           CASE WHEN 2 * count(*) FILTER (ok) > count(*)
                THEN quantile_cont(CASE WHEN ok THEN examples ELSE 'inf'::DOUBLE END, 0.5) END AS examples,
           arg_min(run_id, steps) FILTER (ok) AS run_id,
           arg_min(b_simple, steps) FILTER (ok) AS b_simple, arg_min(g2, steps) FILTER (ok) AS g2,
           arg_min(trace_sigma, steps) FILTER (ok) AS trace_sigma, arg_min(n_noise, steps) FILTER (ok) AS n_noise
    FROM h GROUP BY target, batch_size, lr
),
tied AS (
    SELECT *, row_number() OVER t - 1 AS rnk, count(*) OVER t AS m
    FROM (SELECT *, min(steps) OVER (PARTITION BY target, batch_size) AS best FROM cells) c
    WHERE steps IS NOT NULL AND steps <= best * (1 + rtol)
    WINDOW t AS (PARTITION BY target, batch_size ORDER BY lr ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
pick AS (SELECT * FROM tied WHERE rnk = (m - 1) // 2),
summary AS (
    SELECT target, batch_size, sum(n_runs) AS n_runs, sum(n_reached) AS n_reached,
           sum(n_diverged) AS n_diverged, count(*) AS n_lrs, min(lr) AS lr_min, max(lr) AS lr_max,
           min(lr) FILTER (steps IS NOT NULL) AS lr_min_reached, max(lr) FILTER (steps IS NOT NULL) AS lr_max_reached
    FROM cells GROUP BY target, batch_size
)
SELECT s.target, s.batch_size, p.lr IS NOT NULL AS reached, p.lr, p.steps, p.examples, p.run_id,
       s.n_runs, s.n_reached, s.n_diverged, s.n_lrs, s.lr_min, s.lr_max, s.lr_min_reached, s.lr_max_reached,
       (p.lr = s.lr_min OR p.lr = s.lr_max) AS lr_at_edge,
       p.b_simple, p.g2, p.trace_sigma, p.n_noise
FROM summary s LEFT JOIN pick p USING (target, batch_size)
ORDER BY s.target DESC, s.batch_size;

-- The critical batch size per target: S(B) = S_min + E_min/B fitted on log S to the best-LR steps of each
-- batch size (fit_tradeoff in Python, same grid over ln B_crit in steps of 0.01 from 10^4 below the
-- smallest to 10^4 above the largest batch, refined by a parabola; no bootstrap interval here: use Python
-- for that). b_crit is NULL, with a reason, when fewer than 3 batch sizes reached the target or the optimum
-- runs off the grid (no benefit from larger batches, or perfect 1/B scaling throughout).
-- Example: SELECT target, b_crit, s_min, e_min, r2, reason FROM critical_batch([0.5, 0.4, 0.3], width := 20);
CREATE OR REPLACE MACRO critical_batch(targets, width := 1, noise_window := 0.25, rtol := 0.0,
                                       sweep_name := NULL) AS TABLE
WITH pts AS (
    SELECT target, batch_size AS b, ln(steps) AS y
    FROM best_lr_per_batch(targets, width := width, noise_window := noise_window, rtol := rtol,
                           sweep_name := sweep_name)
    WHERE reached AND steps > 0
),
st AS (
    SELECT target, count(*) AS n, min(b) AS bmin, max(b) AS bmax, var_pop(y) * count(*) AS sst
    FROM pts GROUP BY target
),
g AS (
    SELECT target, k, ln(bmin) - ln(1e4) + k * 0.01 AS lnc, kmax
    FROM (SELECT target, bmin, CAST(ceil(((ln(bmax) + ln(1e4)) - (ln(bmin) - ln(1e4))) / 0.01) AS BIGINT) AS kmax,
                 unnest(range(0, CAST(ceil(((ln(bmax) + ln(1e4)) - (ln(bmin) - ln(1e4))) / 0.01) AS BIGINT) + 1)) AS k
          FROM st WHERE n >= 3)
),
sse AS (
    SELECT g.target, g.k, g.kmax, g.lnc, var_pop(p.y - ln(1 + exp(g.lnc) / p.b)) * count(*) AS sse
    FROM g JOIN pts p USING (target) GROUP BY g.target, g.k, g.kmax, g.lnc
),
bestk AS (SELECT target, arg_min(k, sse) AS k, any_value(kmax) AS kmax FROM sse GROUP BY target),
ref AS (
    SELECT bk.target, bk.k, bk.kmax, s1.lnc, s0.sse AS s0, s1.sse AS s1, s2.sse AS s2
    FROM bestk bk
    JOIN sse s1 ON s1.target = bk.target AND s1.k = bk.k
    LEFT JOIN sse s0 ON s0.target = bk.target AND s0.k = bk.k - 1
    LEFT JOIN sse s2 ON s2.target = bk.target AND s2.k = bk.k + 1
),
est AS (
    SELECT target, k, kmax,
           CASE WHEN k > 0 AND k < kmax THEN exp(lnc + 0.01 * greatest(-1.0, least(1.0,
                CASE WHEN s0 - 2 * s1 + s2 > 0 THEN 0.5 * (s0 - s2) / (s0 - 2 * s1 + s2) ELSE 0.0 END))) END AS c
    FROM ref
),
fit AS (
    SELECT e.target, e.k, e.kmax, e.c, avg(p.y - ln(1 + e.c / p.b)) AS a,
           var_pop(p.y - ln(1 + e.c / p.b)) * count(*) AS sse
    FROM est e JOIN pts p USING (target) GROUP BY e.target, e.k, e.kmax, e.c
)
SELECT t.target, f.c AS b_crit, exp(f.a) AS s_min, exp(f.a) * f.c AS e_min,
       CASE WHEN st.sst > 0 THEN 1 - f.sse / st.sst END AS r2, coalesce(st.n, 0) AS n_batches,
       st.bmin AS batch_min, st.bmax AS batch_max,
       CASE WHEN coalesce(st.n, 0) = 0 THEN 'no batch size reached the target'
            WHEN st.n < 3 THEN 'only ' || st.n || ' batch size(s) reached the target; the frontier needs at least 3'
            WHEN f.k = 0 THEN 'steps to target do not fall with batch size: B_crit is below the smallest batch'
            WHEN f.k = f.kmax THEN 'steps fall as 1/B over the whole range (perfect scaling): B_crit is above the largest batch'
       END AS reason
FROM (SELECT unnest(targets)::DOUBLE AS target) t
LEFT JOIN st USING (target)
LEFT JOIN fit f USING (target)
ORDER BY t.target DESC;

-- The LR x batch grid (Masters & Luschi 2018) from run_summary: per (batch_size, lr) cell the runs that
-- finished, diverged or are unfinished, and medians of the final metrics over the finished, finite runs.
-- base_lr = lr / batch_size is the alternative axis. Example:
-- SELECT batch_size, lr, state, final_loss FROM lr_batch_grid WHERE sweep = 'digits-sweep' ORDER BY ALL;
CREATE OR REPLACE VIEW lr_batch_grid AS
WITH k AS (
    SELECT *, CASE WHEN diverged OR status = 'diverged' OR NOT isfinite(final_loss) THEN 'diverged'
                   WHEN status IN ('running', 'stale') THEN 'unfinished'
                   WHEN status = 'failed' THEN 'failed' ELSE 'ok' END AS kind
    FROM run_summary
    WHERE batch_size IS NOT NULL AND lr IS NOT NULL
)
SELECT sweep, batch_size, lr, lr / batch_size AS base_lr, count(*) AS n_runs,
       count(*) FILTER (kind = 'ok') AS n_ok, count(*) FILTER (kind = 'diverged') AS n_diverged,
       count(*) FILTER (kind = 'unfinished') AS n_unfinished, count(*) FILTER (kind = 'failed') AS n_failed,
       CASE WHEN count(*) FILTER (kind = 'ok') > 0 THEN 'ok' WHEN count(*) FILTER (kind = 'diverged') > 0
            THEN 'diverged' WHEN count(*) FILTER (kind = 'unfinished') > 0 THEN 'unfinished' ELSE 'failed' END AS state,
       median(final_loss) FILTER (kind = 'ok') AS final_loss,
       median(final_test_loss) FILTER (kind = 'ok') AS final_test_loss,
       median(final_test_accuracy) FILTER (kind = 'ok') AS final_test_accuracy
FROM k GROUP BY sweep, batch_size, lr;

-- Generalization gap per run at its last evaluation (from run_summary) with the SGD noise scale
-- g = lr * N / (B * (1 - momentum)) of Smith et al. (2017); NULL for infinite streams (no train_size).
-- Matched-epoch comparisons: dashboard.analysis.generalization. Example:
-- SELECT batch_size, median(gap_loss), median(noise_g) FROM generalization_runs WHERE NOT diverged GROUP BY 1;
CREATE OR REPLACE VIEW generalization_runs AS
SELECT run_id, name, sweep, status, diverged, batch_size, lr, momentum, train_size, epochs,
       final_train_loss, final_test_loss, gap_loss, final_train_accuracy, final_test_accuracy, gap_accuracy,
       CASE WHEN coalesce(momentum, 0) < 1 THEN lr * train_size / (batch_size * (1 - coalesce(momentum, 0))) END
           AS noise_g
FROM run_summary;
