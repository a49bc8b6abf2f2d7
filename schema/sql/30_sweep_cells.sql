-- Sweep cells: the (batch, LR, seed) points of sweeps started by `python -m trainer sweep`, whatever
-- the launcher. Executed (CREATE OR REPLACE) whenever this file changes; see schema/migrations.py.

-- One row per cell of a sweep: its attempts (every try of the cell is a run with the same cell_id and the
-- next attempt number), the status of the latest attempt, whether any attempt settled it (finished, or
-- diverged: a point of the stability map), whether one is alive now, and the runs involved.
-- A re-launched sweep runs exactly the cells with done = false and running = false.
-- Example: SELECT * FROM sweep_cells WHERE sweep = 'digits-grid' AND attempts > 1;
CREATE OR REPLACE VIEW sweep_cells AS
SELECT sweep, cell_id,
       count(*) AS attempts,
       max(attempt) AS last_attempt,
       arg_max(status, coalesce(attempt, 0)) AS status,
       bool_or(status IN ('finished', 'diverged')) AS done,
       bool_or(status = 'running') AS running,
       arg_max(run_id, coalesce(attempt, 0)) AS last_run_id,
       arg_max(run_id, coalesce(attempt, 0)) FILTER (WHERE status IN ('finished', 'diverged')) AS result_run_id,
       min(started_at) AS first_started_at,
       max(ended_at) AS last_ended_at
FROM run_status
WHERE cell_id IS NOT NULL
GROUP BY sweep, cell_id;

-- One row per run that belongs to a sweep cell: its attempt, how many attempts its cell has, and whether
-- it is superseded, i.e. not the run that stands for its cell (that is the attempt that settled the cell,
-- else the latest one). Fits and the LR x batch map should use one run per cell: NOT superseded.
-- Example: SELECT r.* FROM runs r JOIN run_attempts a USING (run_id) WHERE a.sweep = 'grid' AND NOT a.superseded;
CREATE OR REPLACE VIEW run_attempts AS
SELECT r.run_id, r.sweep, r.cell_id, r.attempt, c.attempts,
       r.run_id <> coalesce(c.result_run_id, c.last_run_id) AS superseded
FROM runs r
JOIN sweep_cells c USING (sweep, cell_id);
