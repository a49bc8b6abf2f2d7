"""The callbacks' shared step recorder without a framework: rows held back for one online-B_simple update
per block come out as if each step had been folded in alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.gns import TrackingBSimple
from trainer.integrations._common import StepRecorder
from trainer.noise import NoiseStats
from trainer.steplog import GNS_TARGET_RSE


class Rows:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log_step(self, step, **row):
        self.rows.append((step, row))


def test_blocks_of_rows_carry_the_same_online_b_simple_as_one_step_at_a_time():
    gen = np.random.default_rng(0)
    run, rec = Rows(), StepRecorder(None)
    rec.run = run
    one = TrackingBSimple(GNS_TARGET_RSE)
    expected, measured = [], []
    for step in range(1, 61):
        rec.micro_batch(32)
        rec.loss(torch.tensor(1.0 / step))
        g_small, g_big = 1.0 + gen.random(), 0.1 + 0.05 * gen.random()
        stats = None if step % 7 == 0 else NoiseStats(torch.tensor(g_small, dtype=torch.float64), 1.0,
                                                     torch.tensor(g_big, dtype=torch.float64), 32.0)
        rec.step(step, 0.1, stats)
        if stats is not None:
            measured.append(step)
            expected.append(float(one.update_block([g_small], [1.0], [g_big], [32.0])[0][0]))
    assert len(run.rows) < 60  # some rows are still held back
    rec.flush()
    assert [s for s, _ in run.rows] == list(range(1, 61))
    by_step = dict(run.rows)
    assert all("b_simple" not in by_step[s] for s in range(7, 61, 7)) and rec.skipped == 8
    np.testing.assert_allclose([by_step[s]["b_simple"] for s in measured], expected, rtol=1e-12)
    assert [by_step[s]["examples"] for s in (1, 60)] == [32, 60 * 32]
    assert by_step[5]["loss"] == pytest.approx(0.2)
