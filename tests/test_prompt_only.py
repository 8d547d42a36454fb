"""The prompt-only baseline (issue 21, part 5): a per-position ridge probe on the pooled text embedding over the layout
prior, fitted on train, tuned on val, scored on test like every baseline; what the prompt alone says."""
from __future__ import annotations

import numpy as np
import pytest

from sceneprobe.capture.split_codes import probe_split
from sceneprobe.capture.store import save_labels
from sceneprobe.config import ProbeConfig
from sceneprobe.probe.prompt_only import fit_ridge, load_embeddings, prompt_only_rows, save_embeddings
from sceneprobe.probe.sweep import load_protocol_labels


def test_ridge_for_every_lambda_equals_a_direct_solve():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 7))
    for lam, w in zip((1e-3, 0.1, 10.0), fit_ridge(x, y, (1e-3, 0.1, 10.0))):
        np.testing.assert_allclose(w, np.linalg.solve(x.T @ x + lam * 30 * np.eye(5), x.T @ y), rtol=1e-8)


def _rows(rows, site, split, task, metric):
    return next(r["value"] for r in rows if r["site"] == site and r["split"] == split and r["task"] == task
                and r["metric"] == metric)


@pytest.mark.parametrize("informative", [True, False])
def test_a_prompt_that_says_where_the_object_is_beats_the_layout_and_one_that_does_not_is_no_better(tmp_path,
                                                                                                  informative):
    """Object on the left or the right half, depth near or far: when the embedding's first dimension tells which,
    the prompt-only probe beats the position-only one by far; when it is noise, it is no better on test."""
    rng = np.random.default_rng(1)
    n, size = 240, 16
    left = rng.random(n) < 0.5
    sal = np.zeros((n, size, size), np.uint8)
    sal[left, 4:12, 1:7] = 1
    sal[~left, 4:12, 9:15] = 1
    depth = (2.0 + np.where(left, 1.0, 3.0)[:, None, None] + 0.1 * rng.random((n, size, size))).astype(np.float32)
    emb = rng.normal(size=(n, 6))
    if informative:
        emb[:, 0] = np.where(left, 1.0, -1.0) + 0.05 * rng.normal(size=n)
    root = tmp_path / "captures" / "sd"
    save_labels(root, depth, sal, probe_split(range(n)), sample_ids=np.arange(n))
    save_embeddings(root, emb.astype(np.float32), "test embedding")
    assert load_embeddings(root).shape == (n, 6)
    labels = load_protocol_labels(root, n)
    arrays: dict = {}
    cfg = ProbeConfig()
    rows = prompt_only_rows(root, labels, [(4, 4), (16, 16)], cfg, arrays)
    from sceneprobe.probe.sweep import baseline_rows
    base = baseline_rows(labels, [(4, 4), (16, 16)], cfg.upsample, {})
    dice_p, dice_b = _rows(rows, "prompt@16x16", "test", "saliency", "dice"), _rows(base, "mean-map", "test",
                                                                                   "saliency", "dice")
    skill_p = _rows(rows, "prompt@4x4", "test", "depth", "skill")              # over position@4x4
    if informative:
        assert dice_p > dice_b + 0.3 and dice_p > 0.9 and skill_p > 0.8
    else:
        assert dice_p < dice_b + 0.1 and skill_p < 0.1
    assert "sd/baseline/prompt@16x16/-1/saliency/dice" in arrays              # per-test-image, for the report's CIs
    assert len(arrays["sd/baseline/prompt@16x16/-1/saliency/dice"]) == len(labels.idx(2))


def test_no_embeddings_no_rows(tmp_path):
    root = tmp_path / "p"
    save_labels(root, np.ones((10, 4, 4), np.float32), np.zeros((10, 4, 4), np.uint8), probe_split(range(10)))
    assert prompt_only_rows(root, load_protocol_labels(root, 10), [(4, 4)], ProbeConfig(), {}) == []
