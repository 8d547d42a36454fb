"""Intervention verdicts (issue #10) on planted per-edit rows: a real effect reads "yes", no effect or one inside the
CI does not, a control that beats the probe edit reads "no", and failures are said in plain words."""
from __future__ import annotations

import numpy as np
import pytest

from sceneprobe.intervene.verdicts import edit_verdict, gain
from sceneprobe.probe.stats import paired_bootstrap

N = 40


def rows(task: str, planted: dict[str, tuple[float, float, float, float]], seed: int = 0) -> list[dict]:
    """Per-edit rows: condition → (mean cf score, mean orig score, noise sd cf, noise sd orig)."""
    cf, orig = ("dice_cf", "dice_orig") if task == "saliency" else ("spearman_cf", "spearman_orig")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(N):
        for c, (mc, mo, sc, so) in planted.items():
            out.append({"edit": k, "condition": c, cf: mc + sc * rng.standard_normal(),
                        orig: mo + so * rng.standard_normal()})
    return out


def test_a_real_move_reads_yes_and_the_sentence_says_it_moves():
    r = rows("saliency", {"unedited": (0.05, 1.0, 0.02, 0.0), "probe": (0.7, 0.2, 0.05, 0.05),
                          "random": (0.06, 0.9, 0.02, 0.05), "permuted_probe": (0.08, 0.85, 0.02, 0.05)})
    v = edit_verdict(r, "saliency", min_effect=0.05, n_boot=500)
    assert v["answer"] == "yes" and v["beats_controls"] == "yes" and v["moved"] == "yes"
    assert v["strongest_control"] == "permuted_probe"                          # highest mean gain among controls
    assert v["sentence"].startswith("Saliency edits move the object")
    # the CI is the stats module's paired bootstrap over edits
    gp = [gain(x, "saliency") for x in r if x["condition"] == "probe"]
    gc = [gain(x, "saliency") for x in r if x["condition"] == "permuted_probe"]
    assert v["probe_minus"]["permuted_probe"] == paired_bootstrap(gp, gc, n_boot=500)


def test_no_effect_or_an_effect_inside_the_ci_is_not_yes():
    same = (0.05, 0.9, 0.05, 0.05)
    v = edit_verdict(rows("depth", {"unedited": same, "probe": same, "random": same}), "depth", 0.05, n_boot=500)
    assert v["answer"] == "no" and "fail" in v["sentence"]                     # gain ≈ −0.85: nothing moved
    # a small positive gain over the controls buried in noise: inconclusive, never yes
    noisy = rows("depth", {"unedited": (0.1, 0.05, 0.6, 0.6), "probe": (0.2, 0.05, 0.6, 0.6),
                           "random": (0.1, 0.05, 0.6, 0.6)}, seed=3)
    w = edit_verdict(noisy, "depth", 0.05, n_boot=500)
    assert w["answer"] != "yes" and w["probe_minus"][w["strongest_control"]]["lo"] < 0


def test_a_control_that_beats_the_probe_edit_reads_no():
    r = rows("depth", {"unedited": (0.2, 0.9, 0.02, 0.02), "probe": (0.5, 0.3, 0.03, 0.03),
                       "random": (0.8, 0.1, 0.03, 0.03)})
    v = edit_verdict(r, "depth", 0.05, n_boot=500)
    assert v["moved"] == "yes" and v["beats_controls"] == "no" and v["answer"] == "no"
    assert v["strongest_control"] == "random" and "equal-norm random edits" in v["sentence"]
    assert v["sentence"].startswith("Depth edits fail")


def test_damaged_object_and_unchanged_depth_are_named():
    dmg = rows("saliency", {"unedited": (0.05, 1.0, 0.02, 0.0), "probe": (0.06, 0.45, 0.02, 0.05),
                            "random": (0.05, 0.95, 0.02, 0.02)})
    v = edit_verdict(dmg, "saliency", 0.05, n_boot=500)
    assert v["answer"] == "no" and "damage the object instead of moving it" in v["sentence"]
    # a significant but tiny drop of the original-mask Dice (0.005, as measured on the shipped model) is no damage
    tiny = rows("saliency", {"unedited": (0.15, 1.0, 0.02, 0.0), "probe": (0.15, 0.995, 0.02, 0.002),
                             "random": (0.15, 0.996, 0.02, 0.002)})
    t = edit_verdict(tiny, "saliency", 0.05, n_boot=500)
    assert t["components"]["dice_orig probe - unedited"]["hi"] < 0                # significant …
    assert t["answer"] == "no" and "damage" not in t["sentence"] and "change almost nothing" in t["sentence"]
    still = rows("depth", {"unedited": (0.30, 1.0, 0.02, 0.0), "probe": (0.304, 0.998, 0.001, 0.001),
                           "random": (0.30, 0.999, 0.001, 0.001)})
    w = edit_verdict(still, "depth", 0.05, n_boot=500)
    assert w["answer"] == "no" and "change almost nothing" in w["sentence"]


def test_missing_controls_and_bad_min_effect():
    v = edit_verdict(rows("saliency", {"probe": (0.7, 0.2, 0.05, 0.05)}), "saliency", 0.05, n_boot=200)
    assert v["strongest_control"] is None and v["answer"] == "inconclusive"
    from sceneprobe.errors import SceneprobeError
    with pytest.raises(SceneprobeError):
        edit_verdict(rows("saliency", {"probe": (0.7, 0.2, 0.05, 0.05), "random": (0, 1, 0, 0)}), "saliency", -1.0)
