-- Analysis: every derived quantity batchscope shows, defined once. The dashboard's pages (through
-- dashboard/queries.py), the Python API (dashboard/analysis runs these same macros over frames, see
-- schema/frames.py) and SQL users all read these; nothing restates them. Examples: docs/sql-examples.md.
-- Executed (CREATE OR REPLACE) after 10_core.sql whenever this file changes; see schema/migrations.py.
--
-- The rules, in one sentence each:
-- * A step is measured when its four noise ingredients are finite and b_big > b_small (noise_estimates).
-- * B_simple at step s is the ratio of the sums of the unbiased tr(Sigma) and |G|^2 estimates over the
--   measured steps m with s/(1+w) <= m <= s(1+w): a window centred on s (in log step), w = noise_window
--   (default 0.1); n_noise counts the measurements behind it, so a noisy value can look noisy.
-- * The smoothed loss is the mean over buckets of a fixed number of EXAMPLES, width_examples (bucket =
--   floor((examples - 1) / width)), at the bucket's centroid; 0 keeps the raw points. Every batch size then
--   averages the same number of examples, hence about the same gradient noise.
-- * A crossing is the first bucket at or below the target, interpolated (steps, examples) from the bucket
--   before it; a run already at or below the target at its first point has no measured crossing (censored).
-- * A run stalled when its mean training loss over the last 5 % of its steps is above 90 % of its initial loss
--   (the lesser of its first loss and the mean over its first 5 %): it never left it (e.g. chance, ln 10 on digits).

-- Measured steps with the unbiased per-step estimates g2 = |G|^2 and trace_sigma = tr(Sigma)
-- (McCandlish et al. 2018, App. A). Raw, unclamped: single-step g2 is often negative.
-- Example: SELECT run_id, avg(g2), avg(trace_sigma) FROM noise_estimates GROUP BY run_id;
CREATE OR REPLACE VIEW noise_estimates AS
SELECT run_id, step, examples, loss, batch_size, g_small_sq, b_small, g_big_sq, b_big,
       (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small) AS g2,
       (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big) AS trace_sigma
FROM steps
WHERE isfinite(g_small_sq) AND isfinite(g_big_sq) AND isfinite(b_small) AND isfinite(b_big) AND b_big > b_small;

-- Running sums of the estimates per run (cum_g2, cum_trace, cum_n at each measured step): any window's sum
-- is a difference of two of them. run_ids := NULL means every run.
CREATE OR REPLACE MACRO noise_cumulative(run_ids := NULL) AS TABLE
SELECT run_id, step, sum(g2) OVER w AS cum_g2, sum(trace_sigma) OVER w AS cum_trace, count(*) OVER w AS cum_n
FROM noise_estimates
WHERE run_ids IS NULL OR run_id IN (SELECT unnest(run_ids))
WINDOW w AS (PARTITION BY run_id ORDER BY step ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW);

-- B_simple around the points of a table or CTE named `pts` (columns run_id, at_step) from the running sums in
-- a table or CTE named `cum` (noise_cumulative's columns): the one window rule above. Columns: run_id,
-- at_step, n_noise, g2, trace_sigma (window means), b_simple (NULL without measurements).
CREATE OR REPLACE MACRO noise_window_sums(pts, cum, noise_window := 0.1) AS TABLE
WITH p AS (
    SELECT DISTINCT run_id, at_step::DOUBLE AS at_step, at_step * (1 + noise_window) AS hi,
           at_step / (1 + noise_window) AS lo
    FROM query_table(pts) WHERE isfinite(at_step)
),
c AS (SELECT run_id, step::DOUBLE AS step, cum_g2, cum_trace, cum_n FROM query_table(cum)),
h AS (SELECT p.run_id, p.at_step, c.cum_g2, c.cum_trace, c.cum_n FROM p ASOF LEFT JOIN c ON p.run_id = c.run_id AND p.hi >= c.step),
l AS (SELECT p.run_id, p.at_step, c.cum_g2, c.cum_trace, c.cum_n FROM p ASOF LEFT JOIN c ON p.run_id = c.run_id AND p.lo > c.step),
s AS (
    SELECT h.run_id, h.at_step, coalesce(h.cum_n, 0) - coalesce(l.cum_n, 0) AS n_noise,
           coalesce(h.cum_g2, 0) - coalesce(l.cum_g2, 0) AS sg, coalesce(h.cum_trace, 0) - coalesce(l.cum_trace, 0) AS st
    FROM h JOIN l USING (run_id, at_step)
)
SELECT run_id, at_step, n_noise,
       CASE WHEN n_noise > 0 THEN sg / n_noise END AS g2,
       CASE WHEN n_noise > 0 THEN st / n_noise END AS trace_sigma,
       CASE WHEN n_noise > 0 THEN st / nullif(sg, 0) END AS b_simple
FROM s;

-- B_simple around the points of a table or CTE named `pts` (columns run_id, at_step), by the window rule.
-- Example: WITH p AS (SELECT run_id, 400.0 AS at_step FROM runs) SELECT * FROM noise_at_points('p');
CREATE OR REPLACE MACRO noise_at_points(pts, noise_window := 0.1, run_ids := NULL) AS TABLE
WITH c AS (SELECT * FROM noise_cumulative(run_ids := run_ids))
SELECT * FROM noise_window_sums(pts, 'c', noise_window := noise_window);

-- B_simple over training from the estimates in a table or view named `estimates` (noise_estimates' columns
-- run_id, step, examples, loss, batch_size, g2, trace_sigma): one row per measured step with the raw
-- estimates, their window means (g2_avg, trace_sigma_avg), b_simple and n_noise, by the centred window rule.
CREATE OR REPLACE MACRO noise_scale_of(estimates, noise_window := 0.1, run_ids := NULL) AS TABLE
WITH m AS MATERIALIZED (
    SELECT run_id, step, examples, loss, batch_size, g2, trace_sigma, step AS at_step FROM query_table(estimates)
    WHERE run_ids IS NULL OR run_id IN (SELECT unnest(run_ids))
),
c AS (
    SELECT run_id, step, sum(g2) OVER w AS cum_g2, sum(trace_sigma) OVER w AS cum_trace, count(*) OVER w AS cum_n
    FROM m WINDOW w AS (PARTITION BY run_id ORDER BY step ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT m.run_id, m.step, m.examples, m.loss, m.batch_size, m.g2, m.trace_sigma, w.g2 AS g2_avg,
       w.trace_sigma AS trace_sigma_avg, w.b_simple, w.n_noise
FROM m JOIN noise_window_sums('m', 'c', noise_window := noise_window) w
    ON w.run_id = m.run_id AND w.at_step = m.step;

-- B_simple over training: one row per measured step with the raw estimates (g2, trace_sigma), their
-- window means (g2_avg, trace_sigma_avg), b_simple and n_noise, by the centred window rule above.
-- Example: SELECT step, b_simple, n_noise FROM noise_scale(run_ids := ['...']) ORDER BY step;
CREATE OR REPLACE MACRO noise_scale(noise_window := 0.1, run_ids := NULL) AS TABLE
SELECT * FROM noise_scale_of('noise_estimates', noise_window := noise_window, run_ids := run_ids);

-- B_simple around given steps of given runs (two lists of equal length), by the same rule.
-- Example: SELECT * FROM noise_around(['a1b2c3d4e5f6'], [412.5]);
CREATE OR REPLACE MACRO noise_around(run_ids, at_steps, noise_window := 0.1) AS TABLE
WITH p AS (SELECT unnest(run_ids)::VARCHAR AS run_id, unnest(at_steps)::DOUBLE AS at_step)
SELECT run_id, at_step AS steps, n_noise, g2, trace_sigma, b_simple
FROM noise_at_points('p', noise_window := noise_window, run_ids := run_ids);

-- The points of a metric, lower is better (accuracies negated): 'train_loss' is the per-step training loss
-- from steps, '<split>_loss' / '<split>_accuracy' come from evals. Columns: run_id, step, examples, value.
CREATE OR REPLACE MACRO metric_points(metric := 'train_loss', run_ids := NULL) AS TABLE
SELECT run_id, step, examples, loss AS value FROM steps
WHERE metric = 'train_loss' AND (run_ids IS NULL OR run_id IN (SELECT unnest(run_ids)))
UNION ALL
SELECT run_id, step, examples, CASE WHEN suffix(metric, '_accuracy') THEN -accuracy ELSE loss END AS value
FROM evals
WHERE metric <> 'train_loss' AND split = regexp_replace(metric, '_(loss|accuracy)$', '')
  AND (run_ids IS NULL OR run_id IN (SELECT unnest(run_ids)));

-- Bucket means of the points in a table or CTE named `pts` (metric_points' columns) over width_examples
-- examples (0: every point its own bucket), at the centroid of the finite values (mean step, mean examples,
-- mean value, n of them; value stays lower-is-better); nonfinite / last_step: whether the bucket held a
-- non-finite value, and its last step. Buckets with n = 0 are kept (they carry the non-finite values).
CREATE OR REPLACE MACRO smoothed_points(pts, width_examples := 0) AS TABLE
SELECT run_id, CASE WHEN width_examples > 0 THEN CAST(floor((examples - 1) / width_examples) AS BIGINT) ELSE step END
           AS bucket,
       avg(step) FILTER (WHERE isfinite(value)) AS step, avg(examples) FILTER (WHERE isfinite(value)) AS examples,
       avg(value) FILTER (WHERE isfinite(value)) AS value, count(*) FILTER (WHERE isfinite(value)) AS n,
       coalesce(bool_or(NOT isfinite(value)), false) AS nonfinite, max(step) AS last_step
FROM query_table(pts)
WHERE width_examples <= 0 OR examples IS NOT NULL
GROUP BY ALL;

-- The smoothed metric: per run, bucket means over width_examples examples (0: the raw finite points),
-- at the centroid (mean step, mean examples). value is the metric itself (accuracies not negated).
-- Example: SELECT * FROM smoothed_loss(4096) WHERE run_id = '...' ORDER BY step;
CREATE OR REPLACE MACRO smoothed_loss(width_examples := 0, metric := 'train_loss', run_ids := NULL) AS TABLE
WITH mp AS (SELECT * FROM metric_points(metric := metric, run_ids := run_ids))
SELECT run_id, bucket, step, examples, value * CASE WHEN suffix(metric, '_accuracy') THEN -1 ELSE 1 END AS value, n
FROM smoothed_points('mp', width_examples := width_examples) WHERE n > 0;

-- Per run: how it ended. initial_loss: the lesser of the first finite training loss and the mean over the
-- first 5 % of steps (a loss that rises at a too-high LR and settles back at chance is not progress);
-- end_loss: the mean over the last 5 %; scheduled: its batch size changed during training. outcome: 'diverged' (status, or a
-- non-finite loss), 'unfinished' (running or stale), 'failed', 'stalled' (end_loss above 90 % of
-- initial_loss), else 'trained'. Example: SELECT outcome, count(*) FROM run_outcomes() GROUP BY ALL;
CREATE OR REPLACE MACRO run_outcomes(run_ids := NULL) AS TABLE
WITH st AS MATERIALIZED (
    SELECT run_id, step, loss, batch_size FROM steps WHERE run_ids IS NULL OR run_id IN (SELECT unnest(run_ids))
),
k AS (SELECT run_id, max(step) AS steps FROM st GROUP BY run_id),
s AS (
    SELECT st.run_id, st.step, st.loss, st.batch_size, k.steps AS last, greatest(1, k.steps // 20) AS tail
    FROM st JOIN k USING (run_id)
),
a AS (
    SELECT run_id, any_value(last) AS last_step,
           least(avg(loss) FILTER (WHERE step <= tail AND isfinite(loss)),
                 arg_min(loss, step) FILTER (WHERE isfinite(loss))) AS initial_loss,
           avg(loss) FILTER (WHERE step > last - tail AND isfinite(loss)) AS end_loss,
           min(batch_size) AS batch_min, max(batch_size) AS batch_max,
           coalesce(bool_or(NOT isfinite(loss)), false) AS nonfinite
    FROM s GROUP BY run_id
)
SELECT r.run_id, a.last_step, a.initial_loss, a.end_loss, a.batch_min, a.batch_max,
       coalesce(a.batch_min <> a.batch_max, false) AS scheduled,
       CASE WHEN r.status = 'diverged' OR coalesce(a.nonfinite, false) THEN 'diverged'
            WHEN r.status IN ('running', 'stale') THEN 'unfinished'
            WHEN r.status = 'failed' THEN 'failed'
            WHEN a.end_loss > 0.9 * a.initial_loss THEN 'stalled'
            ELSE 'trained' END AS outcome
FROM run_status r LEFT JOIN a USING (run_id)
WHERE run_ids IS NULL OR r.run_id IN (SELECT unnest(run_ids));

-- Per run, what a crossing needs besides its smoothed points: from the buckets in a table or CTE named
-- `buckets` (smoothed_points' columns) nonfinite (any non-finite value), last_point (the last step) and the
-- first, best and final smoothed values (lower-is-better); from the outcomes in one named `outcomes`
-- (run_outcomes' columns) outcome, scheduled, initial_loss, end_loss; batch_size, lr, sweep, status from runs.
CREATE OR REPLACE MACRO crossing_runs(buckets, outcomes, run_ids := NULL) AS TABLE
WITH bad AS (
    SELECT run_id, bool_or(nonfinite) AS nonfinite, max(last_step) AS last_point,
           arg_min(value, bucket) FILTER (WHERE n > 0) AS first_value, min(value) FILTER (WHERE n > 0) AS best_value,
           arg_max(value, bucket) FILTER (WHERE n > 0) AS final_value
    FROM query_table(buckets) GROUP BY run_id
),
ids AS (SELECT run_id FROM runs WHERE run_ids IS NULL OR run_id IN (SELECT unnest(run_ids)) UNION SELECT run_id FROM bad)
SELECT ids.run_id, coalesce(bd.nonfinite, false) AS nonfinite, bd.last_point, bd.first_value, bd.best_value,
       bd.final_value, o.outcome, coalesce(o.scheduled, false) AS scheduled, o.initial_loss, o.end_loss,
       r.batch_size::DOUBLE AS batch_size, r.lr::DOUBLE AS lr, r.sweep, r.status
FROM ids LEFT JOIN bad bd USING (run_id) LEFT JOIN query_table(outcomes) o USING (run_id)
LEFT JOIN runs r USING (run_id);

-- The running-minimum records of the buckets in a table or CTE named `buckets` (smoothed_points' columns):
-- each bucket whose value is below every earlier one, with the bucket before it. The first bucket at or
-- below any target is the record with the largest value <= target, so crossings of any target need only
-- these rows (the dashboard keeps them per run and moves the target over them).
CREATE OR REPLACE MACRO crossing_records(buckets) AS TABLE
WITH bl AS (
    SELECT run_id, bucket, step, examples, value,
           lag(step) OVER w AS prev_step, lag(examples) OVER w AS prev_examples, lag(value) OVER w AS prev_value,
           min(value) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_min
    FROM query_table(buckets) WHERE n > 0
    WINDOW w AS (PARTITION BY run_id ORDER BY bucket)
)
SELECT run_id, bucket, step, examples, value, prev_step, prev_examples, prev_value FROM bl
WHERE prev_min IS NULL OR value < prev_min;

-- The crossings of `targets` from the records in a table or CTE named `records` (crossing_records' columns)
-- and per-run facts in one named `info` (crossing_runs' columns): crossings' columns, with the B_simple ones
-- empty (crossings fills them).
CREATE OR REPLACE MACRO crossings_of(records, info, targets, metric := 'train_loss') AS TABLE
WITH i AS (SELECT * FROM query_table(info)),
rec AS (SELECT * FROM query_table(records)),
tg AS (SELECT unnest(targets)::DOUBLE AS target),
grid AS (
    SELECT i.run_id, tg.target, tg.target * CASE WHEN suffix(metric, '_accuracy') THEN -1 ELSE 1 END AS t
    FROM i CROSS JOIN tg
),
hit AS (
    SELECT g.run_id, g.target, g.t, r.step, r.examples, r.value AS hit_value, r.prev_step, r.prev_examples, r.prev_value
    FROM grid g ASOF LEFT JOIN rec r ON g.run_id = r.run_id AND g.t >= r.value
),
pts AS (
    SELECT run_id, target, hit_value IS NOT NULL AND prev_step IS NOT NULL AS reached,
           hit_value IS NOT NULL AND prev_step IS NULL AS censored, hit_value,
           CASE WHEN prev_step IS NOT NULL THEN prev_step + (prev_value - t) / (prev_value - hit_value) * (step - prev_step)
           END AS steps,
           CASE WHEN prev_step IS NOT NULL
                THEN prev_examples + (prev_value - t) / (prev_value - hit_value) * (examples - prev_examples) END AS examples,
           CASE WHEN prev_step IS NULL THEN step END AS bound_steps,
           CASE WHEN prev_step IS NULL THEN examples END AS bound_examples
    FROM hit
)
SELECT p.run_id, p.target, p.reached, p.censored, p.steps, p.examples, p.bound_steps, p.bound_examples,
       CASE WHEN i.scheduled AND p.reached AND p.steps > 0 THEN p.examples / p.steps ELSE i.batch_size END
           AS effective_batch,
       sg * p.hit_value AS hit_value, sg * i.first_value AS first_value, sg * i.best_value AS best_value,
       sg * i.final_value AS final_value, i.last_point AS last_step,
       i.nonfinite OR coalesce(i.outcome = 'diverged', false) AS diverged,
       coalesce(i.outcome = 'stalled', false) AS stalled, i.scheduled, coalesce(i.outcome, 'trained') AS outcome,
       NULL::DOUBLE AS b_simple, NULL::DOUBLE AS g2, NULL::DOUBLE AS trace_sigma, 0::BIGINT AS n_noise,
       i.batch_size, i.lr, i.sweep, i.status,
       CASE WHEN p.reached THEN NULL
            WHEN i.last_point IS NULL THEN 'no ' || metric || ' logged'
            WHEN i.best_value IS NULL THEN 'no finite ' || metric
            WHEN p.censored THEN printf('already at or below the target at its first point (step %g): not measured',
                                        p.bound_steps)
            WHEN i.nonfinite OR i.outcome = 'diverged'
                THEN printf('diverged before reaching the target (best %.4g)', sg * i.best_value)
            WHEN i.outcome = 'stalled'
                THEN printf('stalled: never left its initial loss (%.4g to %.4g)', i.initial_loss, i.end_loss)
            WHEN i.outcome = 'unfinished' THEN printf('still running (best so far %.4g)', sg * i.best_value)
            ELSE printf('never reached the target within its budget (best %.4g)', sg * i.best_value)
       END AS reason
FROM pts p
CROSS JOIN (SELECT CASE WHEN suffix(metric, '_accuracy') THEN -1 ELSE 1 END AS sg) k(sg)
JOIN i USING (run_id)
ORDER BY p.target DESC, p.run_id;

-- Per run and target: steps and examples to reach the target on the smoothed metric (rules above).
-- reached: a measured crossing. censored: already at/below the target at the first point, so the
-- crossing was not measured (bound_steps, bound_examples: that first point, an upper bound). hit_value,
-- first_value, best_value, final_value: smoothed values. effective_batch: examples/steps at the crossing
-- for runs whose batch size changed (else batch_size). b_simple, g2, trace_sigma, n_noise: B_simple at the
-- crossing (noise_window := NULL skips it). outcome (see run_outcomes) and reason: why not reached (NULL
-- when reached). Every run appears once per target.
-- Example: SELECT batch_size, lr, steps, reason FROM crossings([0.5, 0.3], width_examples := 4096);
CREATE OR REPLACE MACRO crossings(targets, width_examples := 0, metric := 'train_loss', noise_window := 0.1,
                                  run_ids := NULL) AS TABLE
WITH mp AS (SELECT * FROM metric_points(metric := metric, run_ids := run_ids)),
b AS MATERIALIZED (SELECT * FROM smoothed_points('mp', width_examples := width_examples)),
o AS (SELECT * FROM run_outcomes(run_ids := run_ids)),
i AS (SELECT * FROM crossing_runs('b', 'o', run_ids := run_ids)),
rc AS (SELECT * FROM crossing_records('b')),
h AS MATERIALIZED (SELECT * FROM crossings_of('rc', 'i', targets, metric := metric)),
atp AS (SELECT DISTINCT run_id, steps AS at_step FROM h WHERE reached AND noise_window IS NOT NULL),
nz AS (SELECT * FROM noise_at_points('atp', noise_window := coalesce(noise_window, 0), run_ids := run_ids))
SELECT h.* REPLACE (nz.b_simple AS b_simple, nz.g2 AS g2, nz.trace_sigma AS trace_sigma,
                    coalesce(nz.n_noise, 0) AS n_noise)
FROM h LEFT JOIN nz ON nz.run_id = h.run_id AND nz.at_step = h.steps AND h.reached
ORDER BY h.target DESC, h.run_id;

-- Steps to one target per run (a thin view of crossings). Example:
-- SELECT r.batch_size, t.steps FROM steps_to_target(0.3) t JOIN runs r USING (run_id) WHERE t.reached;
CREATE OR REPLACE MACRO steps_to_target(target, width_examples := 0, metric := 'train_loss') AS TABLE
SELECT run_id, reached, censored, steps, examples, reason
FROM crossings([target], width_examples := width_examples, metric := metric, noise_window := NULL);

-- For each target and batch size, the learning rate with the fewest steps to target, over the hits in a
-- table or CTE named `hits` (crossings' columns). Seeds of one (batch_size, lr) cell are combined by the
-- median, a seed that never reached the target counting as infinitely slow and a censored one at its
-- bound (so a cell counts only if more than half its seeds got there). Cells within `rtol` of the fewest
-- steps tie; the middle LR of the tie (lower of two middles) wins. censored: the best cell's crossing was
-- not measured; scheduled: its runs changed batch size (effective_batch = median examples/steps).
-- lr_at_edge: the best LR is the smallest or largest tried, so the optimum may lie outside the grid.
-- in_fit, fit_batch: whether the row is a point of the B_crit fit (a measured crossing), and at which batch
-- size (the effective one): the fit's inputs, read by critical_batch_of and by fit_tradeoff in Python.
CREATE OR REPLACE MACRO best_lr_of(hits, rtol := 0.0, include_diverged := true) AS TABLE
WITH h AS (
    SELECT *, reached AND isfinite(steps) AND (include_diverged OR NOT diverged) AS ok,
           censored AND (include_diverged OR NOT diverged) AS cens
    FROM query_table(hits) WHERE isfinite(batch_size) AND isfinite(lr)
),
cells AS (
    SELECT target, batch_size, lr, count(*) AS n_runs, count(*) FILTER (ok) AS n_reached,
           count(*) FILTER (cens) AS n_censored, count(*) FILTER (diverged) AS n_diverged,
           CASE WHEN 2 * count(*) FILTER (ok OR cens) > count(*) THEN quantile_cont(
                CASE WHEN ok THEN steps WHEN cens THEN bound_steps ELSE 'inf'::DOUBLE END, 0.5) END AS steps,
           CASE WHEN 2 * count(*) FILTER (ok OR cens) > count(*) THEN quantile_cont(
                CASE WHEN ok THEN examples WHEN cens THEN bound_examples ELSE 'inf'::DOUBLE END, 0.5) END AS examples,
           median(effective_batch) FILTER (ok) AS effective_batch,
           coalesce(bool_or(scheduled) FILTER (ok OR cens), false) AS scheduled,
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
    SELECT target, batch_size, sum(n_runs) AS n_runs, sum(n_reached) AS n_reached, sum(n_censored) AS n_censored,
           sum(n_diverged) AS n_diverged, count(*) AS n_lrs, min(lr) AS lr_min, max(lr) AS lr_max,
           min(lr) FILTER (steps IS NOT NULL) AS lr_min_reached, max(lr) FILTER (steps IS NOT NULL) AS lr_max_reached
    FROM cells GROUP BY target, batch_size
)
SELECT s.target, s.batch_size, p.lr IS NOT NULL AS reached, coalesce(p.n_censored > 0, false) AS censored,
       coalesce(p.scheduled, false) AS scheduled, p.lr, p.steps, p.examples,
       coalesce(p.effective_batch, CASE WHEN p.lr IS NOT NULL THEN s.batch_size END) AS effective_batch, p.run_id,
       s.n_runs, s.n_reached, s.n_censored, s.n_diverged, s.n_lrs, s.lr_min, s.lr_max, s.lr_min_reached,
       s.lr_max_reached, (p.lr = s.lr_min OR p.lr = s.lr_max) AS lr_at_edge,
       p.b_simple, p.g2, p.trace_sigma, p.n_noise,
       coalesce(p.lr IS NOT NULL AND p.n_censored = 0 AND p.steps > 0 AND isfinite(p.steps)
                AND coalesce(p.effective_batch, s.batch_size) > 0, false) AS in_fit,
       coalesce(p.effective_batch, s.batch_size) AS fit_batch
FROM summary s LEFT JOIN pick p USING (target, batch_size)
ORDER BY s.target DESC, s.batch_size;

-- best_lr_of over crossings, in one call. Example:
-- SELECT * FROM best_lr_per_batch([0.3], width_examples := 4096, sweep_name := 'digits-sample');
CREATE OR REPLACE MACRO best_lr_per_batch(targets, width_examples := 0, metric := 'train_loss', noise_window := 0.1,
                                          rtol := 0.0, sweep_name := NULL, run_ids := NULL) AS TABLE
WITH h AS (
    SELECT * FROM crossings(targets, width_examples := width_examples, metric := metric, noise_window := noise_window,
                            run_ids := run_ids)
    WHERE sweep_name IS NULL OR sweep = sweep_name
)
SELECT * FROM best_lr_of('h', rtol := rtol);

-- The critical batch size per target over best-LR rows in a table or CTE named `best` (best_lr_of's columns):
-- S(B) = S_min + E_min/B fitted on log S at the effective batch size (fit_tradeoff in Python, same grid over
-- ln B_crit in steps of 0.01 from 10^4 below the smallest to 10^4 above the largest batch, refined by a
-- parabola; Python adds bootstrap intervals). b_crit is NULL, with a reason, when fewer than min_batches batch
-- sizes have a measured crossing or the optimum runs off the grid. warnings: caveats that do not stop the
-- fit, the same list as Python's TradeoffFit.warnings (LR grid edge, censored or scheduled batch sizes,
-- B_crit extrapolated beyond the batches measured, B_crit not bounded on one side by the data: the profile
-- SSE at a grid end is within n*ln(SSE/SSE_min) <= 2.706 of the optimum, 90 %). b_simple: pooled over the
-- best runs (ratio of their summed tr(Sigma) and |G|^2 estimates at the crossing), n_noise_runs of them.
CREATE OR REPLACE MACRO critical_batch_of(best, min_batches := 3) AS TABLE
WITH bst AS (SELECT * FROM query_table(best)),
tg AS (SELECT DISTINCT target FROM bst),
pts AS (SELECT target, fit_batch AS b, min(ln(steps)) AS y FROM bst WHERE in_fit GROUP BY ALL),
st AS (
    SELECT target, count(*) AS n, min(b) AS bmin, max(b) AS bmax, var_pop(y) * count(*) AS sst
    FROM pts GROUP BY target
),
g AS (
    SELECT target, k, ln(bmin) - ln(1e4) + k * 0.01 AS lnc, kmax
    FROM (SELECT target, bmin, CAST(ceil(((ln(bmax) + ln(1e4)) - (ln(bmin) - ln(1e4))) / 0.01) AS BIGINT) AS kmax,
                 unnest(range(0, CAST(ceil(((ln(bmax) + ln(1e4)) - (ln(bmin) - ln(1e4))) / 0.01) AS BIGINT) + 1)) AS k
          FROM st WHERE n >= min_batches)
),
sse AS (
    SELECT g.target, g.k, g.kmax, g.lnc, var_pop(p.y - ln(1 + exp(g.lnc) / p.b)) * count(*) AS sse
    FROM g JOIN pts p USING (target) GROUP BY g.target, g.k, g.kmax, g.lnc
),
bestk AS (
    SELECT target, arg_min(k, sse) AS k, any_value(kmax) AS kmax, min(sse) AS sse_min,
           max(sse) FILTER (k = 0) AS sse_lo, max(sse) FILTER (k = kmax) AS sse_hi
    FROM sse GROUP BY target
),
ref AS (
    SELECT bk.*, s1.lnc, s0.sse AS s0, s1.sse AS s1, s2.sse AS s2
    FROM bestk bk
    JOIN sse s1 ON s1.target = bk.target AND s1.k = bk.k
    LEFT JOIN sse s0 ON s0.target = bk.target AND s0.k = bk.k - 1
    LEFT JOIN sse s2 ON s2.target = bk.target AND s2.k = bk.k + 1
),
est AS (
    SELECT *, CASE WHEN k > 0 AND k < kmax THEN exp(lnc + 0.01 * greatest(-1.0, least(1.0,
                CASE WHEN s0 - 2 * s1 + s2 > 0 THEN 0.5 * (s0 - s2) / (s0 - 2 * s1 + s2) ELSE 0.0 END))) END AS c
    FROM ref
),
fit AS (
    SELECT e.target, e.k, e.kmax, e.c, e.sse_min, e.sse_lo, e.sse_hi, avg(p.y - ln(1 + e.c / p.b)) AS a,
           var_pop(p.y - ln(1 + e.c / p.b)) * count(*) AS sse
    FROM est e JOIN pts p USING (target) GROUP BY ALL
),
lists AS (
    SELECT target,
           list(printf('%g', batch_size) ORDER BY batch_size) FILTER (reached AND lr_at_edge AND n_lrs > 1) AS edge,
           list(printf('%g', batch_size) ORDER BY batch_size) FILTER (censored) AS cens,
           list(printf('%g', batch_size) ORDER BY batch_size) FILTER (in_fit AND scheduled) AS sched,
           count(*) FILTER (in_fit AND n_noise > 0) AS n_noise_runs,
           sum(trace_sigma * n_noise) FILTER (in_fit AND n_noise > 0)
               / nullif(sum(g2 * n_noise) FILTER (in_fit AND n_noise > 0), 0) AS b_simple
    FROM bst GROUP BY target
),
out AS (
    SELECT t.target, st.n, st.bmin, st.bmax, st.sst, f.*, l.edge, l.cens, l.sched, l.b_simple, l.n_noise_runs,
           CASE WHEN coalesce(st.n, 0) = 0 THEN 'no batch size reached the target'
                WHEN st.n < min_batches THEN printf('only %d batch size(s) reached the target; the frontier needs at least %d',
                                                    st.n, min_batches)
                WHEN f.k = 0 THEN printf('steps to target do not fall with batch size over B = %g..%g: B_crit is below '
                                         'the smallest batch (or the spread is noise)', st.bmin, st.bmax)
                WHEN f.k = f.kmax THEN printf('steps fall as 1/B over the whole range B = %g..%g (perfect scaling): '
                                              'B_crit is above the largest batch; sweep larger batches', st.bmin, st.bmax)
           END AS reason
    FROM tg t LEFT JOIN st USING (target) LEFT JOIN fit f USING (target) LEFT JOIN lists l USING (target)
)
SELECT target, CASE WHEN reason IS NULL THEN c END AS b_crit, CASE WHEN reason IS NULL THEN exp(a) END AS s_min,
       CASE WHEN reason IS NULL THEN exp(a) * c END AS e_min,
       CASE WHEN sst > 0 AND reason IS NULL THEN 1 - sse / sst END AS r2, coalesce(n, 0) AS n_batches,
       bmin AS batch_min, bmax AS batch_max, reason,
       list_concat(
           CASE WHEN len(coalesce(edge, [])) > 0 THEN ['best LR at the edge of the LR grid for B = '
                || array_to_string(edge, ', ') || ': steps there may be overestimated'] ELSE [] END,
           CASE WHEN len(coalesce(cens, [])) > 0 THEN ['B = ' || array_to_string(cens, ', ')
                || ': already at or below the target at the first point, so steps to target are not measured: '
                || 'left out of the fit'] ELSE [] END,
           CASE WHEN len(coalesce(sched, [])) > 0 THEN ['B = ' || array_to_string(sched, ', ')
                || ': the batch size changes during these runs: fitted at the effective batch E/S'] ELSE [] END,
           CASE WHEN reason IS NULL AND (c < bmin OR c > bmax) THEN [printf(
                'B_crit = %.3g lies outside the batch sizes measured (%g..%g): extrapolated', c, bmin, bmax)] ELSE [] END,
           CASE WHEN reason IS NULL AND (sse_lo <= sse_min * exp(2.706 / n) OR sse_hi <= sse_min * exp(2.706 / n))
                THEN ['the data do not bound B_crit on one side (90 % profile interval reaches the grid end)'] ELSE [] END,
           CASE WHEN reason IS NULL AND n = 3 AND min_batches = 3
                THEN ['only 3 batch sizes: one degree of freedom, treat the interval with care'] ELSE [] END
       ) AS warnings,
       b_simple, coalesce(n_noise_runs, 0) AS n_noise_runs
FROM out ORDER BY target DESC;

-- critical_batch_of over best_lr_per_batch, in one call (the README's and the Tradeoff page's B_crit).
-- Example: SELECT target, b_crit, reason, warnings FROM critical_batch([0.5, 0.3], width_examples := 4096);
CREATE OR REPLACE MACRO critical_batch(targets, width_examples := 0, metric := 'train_loss', noise_window := 0.1,
                                       rtol := 0.0, sweep_name := NULL, run_ids := NULL, min_batches := 3) AS TABLE
WITH bb AS (
    SELECT * FROM best_lr_per_batch(targets, width_examples := width_examples, metric := metric,
                                    noise_window := noise_window, rtol := rtol, sweep_name := sweep_name,
                                    run_ids := run_ids)
)
SELECT * FROM critical_batch_of('bb', min_batches := min_batches);

-- The LR x batch grid (Masters & Luschi 2018): per (batch_size, lr) cell the runs that trained, stalled
-- (never left their initial loss: a failure, not a stable LR), diverged, are unfinished or failed, and
-- medians of the final metrics over the trained, finite runs. state: the best thing any run of the cell
-- did, in the order ok, stalled, diverged, unfinished, failed. base_lr = lr / batch_size. Example:
-- SELECT batch_size, lr, state, final_loss FROM lr_batch_grid WHERE sweep = 'digits-sample' ORDER BY ALL;
CREATE OR REPLACE VIEW lr_batch_grid AS
WITH k AS (
    SELECT s.*, CASE WHEN o.outcome = 'trained' AND isfinite(s.final_loss) THEN 'ok'
                     WHEN o.outcome = 'trained' THEN 'diverged' ELSE o.outcome END AS kind
    FROM run_summary s JOIN run_outcomes() o USING (run_id)
    WHERE s.batch_size IS NOT NULL AND s.lr IS NOT NULL
)
SELECT sweep, batch_size, lr, lr / batch_size AS base_lr, count(*) AS n_runs,
       count(*) FILTER (kind = 'ok') AS n_ok, count(*) FILTER (kind = 'stalled') AS n_stalled,
       count(*) FILTER (kind = 'diverged') AS n_diverged,
       count(*) FILTER (kind = 'unfinished') AS n_unfinished, count(*) FILTER (kind = 'failed') AS n_failed,
       CASE WHEN count(*) FILTER (kind = 'ok') > 0 THEN 'ok' WHEN count(*) FILTER (kind = 'stalled') > 0 THEN 'stalled'
            WHEN count(*) FILTER (kind = 'diverged') > 0 THEN 'diverged'
            WHEN count(*) FILTER (kind = 'unfinished') > 0 THEN 'unfinished' ELSE 'failed' END AS state,
       median(final_loss) FILTER (kind = 'ok') AS final_loss,
       median(final_test_loss) FILTER (kind = 'ok') AS final_test_loss,
       median(final_test_accuracy) FILTER (kind = 'ok') AS final_test_accuracy
FROM k GROUP BY sweep, batch_size, lr;

-- Generalization gap per run at its last evaluation (from run_summary) with the SGD noise scale
-- g = lr * N / (B * (1 - momentum)) of Smith et al. (2017); NULL for infinite streams (no train_size).
-- Matched training loss / examples: dashboard.analysis.generalization. Example:
-- SELECT batch_size, median(gap_loss), median(noise_g) FROM generalization_runs WHERE NOT diverged GROUP BY 1;
CREATE OR REPLACE VIEW generalization_runs AS
SELECT run_id, name, sweep, status, diverged, batch_size, lr, momentum, train_size, epochs,
       final_train_loss, final_test_loss, gap_loss, final_train_accuracy, final_test_accuracy, gap_accuracy,
       CASE WHEN coalesce(momentum, 0) < 1 THEN lr * train_size / (batch_size * (1 - coalesce(momentum, 0))) END
           AS noise_g
FROM run_summary;
