-- Quantities of the Curves, Noise scale and run pages (issues 13 and 15): tokens seen, the noise scale
-- Adam sees (preconditioned B_simple) and B_noise from curvature. Executed (CREATE OR REPLACE) after
-- 30_sweep_cells.sql whenever this file changes; see schema/migrations.py.

-- Tokens per training example of each run: tokens seen at a step = steps.examples * tokens_per_example
-- (runs.tokens_per_step is batch_size x context at the start; batch schedules keep the context).
-- NULL for tasks without tokens. Example: SELECT s.step, s.examples * t.tokens_per_example AS tokens
-- FROM steps s JOIN run_tokens t USING (run_id);
CREATE OR REPLACE VIEW run_tokens AS
SELECT run_id, CAST(tokens_per_step AS DOUBLE) / nullif(batch_size, 0) AS tokens_per_example
FROM runs;

-- The preconditioned gradient's noise ingredients (scalars g_small_sq_adam, b_small_adam, g_big_sq_adam,
-- b_big_adam: the trainer's P g with P = 1/(sqrt(v_hat) + eps)), one row per measured step, with the
-- same unbiased estimators as noise_estimates applies to steps' ingredients.
CREATE OR REPLACE VIEW noise_estimates_adam AS
WITH p AS (
    SELECT run_id, step,
           max(value) FILTER (WHERE name = 'g_small_sq_adam') AS g_small_sq,
           max(value) FILTER (WHERE name = 'b_small_adam') AS b_small,
           max(value) FILTER (WHERE name = 'g_big_sq_adam') AS g_big_sq,
           max(value) FILTER (WHERE name = 'b_big_adam') AS b_big
    FROM scalars WHERE name IN ('g_small_sq_adam', 'b_small_adam', 'g_big_sq_adam', 'b_big_adam')
    GROUP BY run_id, step
)
SELECT p.run_id, p.step, s.examples, s.loss, s.batch_size, p.g_small_sq, p.b_small, p.g_big_sq, p.b_big,
       (p.b_big * p.g_big_sq - p.b_small * p.g_small_sq) / (p.b_big - p.b_small) AS g2,
       (p.g_small_sq - p.g_big_sq) / (1.0 / p.b_small - 1.0 / p.b_big) AS trace_sigma
FROM p LEFT JOIN steps s USING (run_id, step)
WHERE isfinite(p.g_small_sq) AND isfinite(p.g_big_sq) AND isfinite(p.b_small) AND isfinite(p.b_big)
  AND p.b_big > p.b_small;

-- Preconditioned B_simple over training, tr(P Sigma P)/|P G|^2, by noise_scale's centred window rule
-- (noise_window_sums), so it can be read beside the plain B_simple step by step.
-- Example: SELECT step, b_simple, n_noise FROM noise_scale_adam(run_ids := ['...']) ORDER BY step;
CREATE OR REPLACE MACRO noise_scale_adam(noise_window := 0.1, run_ids := NULL) AS TABLE
SELECT * EXCLUDE (g2_avg, trace_sigma_avg)
FROM noise_scale_of('noise_estimates_adam', noise_window := noise_window, run_ids := run_ids);

-- B_noise = tr(H Sigma)/(G'HG) (McCandlish et al. 2018) per run, from the curvature scalars of its
-- evaluations (--curvature), beside B_simple from the same micro-batch gradients: each a ratio of the
-- means of its unbiased estimates over the evaluations in the last `tail` fraction of the run's measured
-- evaluation steps (a single evaluation's ratio is noisy). n_evals counts them.
-- Example: SELECT * FROM b_noise_summary(run_ids := ['...']);
CREATE OR REPLACE MACRO b_noise_summary(tail := 0.2, run_ids := NULL) AS TABLE
WITH p AS (
    SELECT run_id, step,
           max(value) FILTER (WHERE name = 'b_noise_tr_h_sigma') AS tr_h_sigma,
           max(value) FILTER (WHERE name = 'b_noise_ghg') AS ghg,
           max(value) FILTER (WHERE name = 'b_noise_tr_sigma') AS tr_sigma,
           max(value) FILTER (WHERE name = 'b_noise_g_sq') AS g_sq
    FROM scalars
    WHERE name IN ('b_noise_tr_h_sigma', 'b_noise_ghg', 'b_noise_tr_sigma', 'b_noise_g_sq')
      AND (run_ids IS NULL OR run_id IN (SELECT unnest(run_ids)))
    GROUP BY run_id, step
),
e AS (SELECT run_id, min(step) AS lo, max(step) AS hi FROM p GROUP BY run_id)
SELECT p.run_id, count(*) AS n_evals, max(p.step) AS last_step,
       avg(p.tr_h_sigma) / nullif(avg(p.ghg), 0) AS b_noise,
       avg(p.tr_sigma) / nullif(avg(p.g_sq), 0) AS b_simple_same_batches
FROM p JOIN e USING (run_id)
WHERE p.step >= e.hi - tail * (e.hi - e.lo)
GROUP BY p.run_id;
