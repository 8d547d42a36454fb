"""The emergence step k with uncertainty: its bootstrap distribution covers a planted onset, and the stated rule for
"present by step s" answers on both sides."""
from __future__ import annotations

import numpy as np
import pytest

from sceneprobe.report import emergence as emg


def _planted(onset: int, n: int = 80, steps: int = 8, seed: int = 0, noise: float = 0.15):
    """Per-image Dice gains (S, n): 0 before ``onset``, a plateau of 0.3 from it, image noise on top."""
    rng = np.random.default_rng(seed)
    mean = np.where(np.arange(steps) >= onset, 0.3, 0.0)
    return mean[:, None] + noise * rng.standard_normal((steps, n))


@pytest.mark.parametrize("onset", [2, 5])
def test_k_interval_covers_the_planted_onset(onset):
    d = emg.k_distribution("mean", [_planted(onset)], list(range(8)), 0.9, n_boot=500, seed=0)
    assert d.lo <= onset <= d.hi
    assert d.mode == onset or d.probs.get(onset, 0) > 0.2
    assert d.p_none == 0


def test_first_steps_rule_and_no_gain():
    g = np.array([[0.0, -1.0], [0.5, -0.5], [1.0, -0.2]])     # column 0 reaches 0.9 × 1.0 at step 2; column 1 never gains
    assert emg.first_steps(g, [0, 1, 2], 0.9).tolist() == [2, -1]
    assert emg.first_steps(g, [0, 1, 2], 0.5).tolist() == [1, -1]


def test_skill_gains_are_ratios_of_sums():
    mse = np.array([[1.0, 3.0], [0.5, 0.5]])
    ref = np.array([[2.0, 2.0], [2.0, 2.0]])
    idx = np.array([[0, 1], [0, 0]])
    g = emg.step_gains("skill", [mse, ref], idx)
    np.testing.assert_allclose(g, [[0.0, 0.5], [0.75, 0.75]])


def test_present_by_rule_on_both_sides():
    # a clear onset (little image noise) is decided; a plateau as noisy as the 0.9 line's margin is not (below)
    early = emg.k_distribution("mean", [_planted(1, noise=0.05)], list(range(8)), 0.9, n_boot=500, seed=0)
    late = emg.k_distribution("mean", [_planted(6, noise=0.05)], list(range(8)), 0.9, n_boot=500, seed=0)
    assert emg.by_step_verdict(early, 4) == "yes"
    assert emg.by_step_verdict(late, 4) == "no"
    vague = emg.k_distribution("mean", [_planted(1, noise=0.15)], list(range(8)), 0.9, n_boot=500, seed=0)
    assert vague.lo <= 1 and vague.hi > 4 and emg.by_step_verdict(vague, 4) == "inconclusive"
    none = emg.k_distribution("mean", [-np.ones((8, 20))], list(range(8)), 0.9, n_boot=50, seed=0)
    assert none.mode is None and none.p_none == 1.0 and emg.by_step_verdict(none, 4) == "no"
