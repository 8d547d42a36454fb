"""The text as a control (issue 21, part 5): how much of "the U-Net encodes the scene beyond the layout" survives the
prompt-only probe and the model's unconditional half — planted on both sides of the rule."""
from __future__ import annotations

import numpy as np
import pytest

from sceneprobe.config import ReportConfig
from sceneprobe.probe.sweep import per_image_key
from sceneprobe.report.analysis import analyse
from sceneprobe.report.summary import _text_control

P, SITE, N = "sd", "unet.down0.attn0", 60


def _study(prompt_dice: float, uncond_dice: float, unet_dice: float = 0.8):
    """Rows and per-test-image Dice arrays of a pipeline study with one U-Net site, its uncond reading, the
    position-only and the prompt-only baselines; val = test means."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.02, N)
    means = {("ldm", SITE, 0): unet_dice, ("uncond", SITE, 0): uncond_dice,
             ("baseline", "position@8x8", -1): 0.5, ("baseline", "prompt@8x8", -1): prompt_dice}
    rows, arrays = [], {}
    for (model, site, step), m in means.items():
        for split in ("val", "test"):
            rows.append({"protocol": P, "model": model, "site": site, "step": step, "timestep": 999 if step >= 0
                         else -1, "task": "saliency", "split": split, "metric": "dice", "value": m, "lambda_edge": ""})
        arrays[per_image_key(P, model, site, step, "saliency", "dice")] = np.clip(m + noise, 0, 1)
    return rows, arrays


def _text(prompt_dice, uncond_dice):
    rows, arrays = _study(prompt_dice, uncond_dice)
    _, _, findings = analyse(rows, arrays, {f"{P}/{SITE}": "position@8x8"}, ReportConfig(n_boot=200))
    return findings[P]


def test_a_verdict_the_prompt_explains_does_not_survive_it():
    f = _text(prompt_dice=0.79, uncond_dice=0.795)
    t = f["text"]["saliency"]
    assert t["layout"].verdict == "yes" and t["layout_site"] == "position@8x8"
    assert t["prompt"].verdict == "no" and t["prompt_site"] == "prompt@8x8"
    assert t["uncond"].verdict == "no"
    text = "\n".join(_text_control(f))
    assert "does **not** survive the prompt" in text and "about as much without the text" in text


def test_a_verdict_beyond_the_prompt_survives_it():
    f = _text(prompt_dice=0.52, uncond_dice=0.6)
    t = f["text"]["saliency"]
    assert t["layout"].verdict == "yes" and t["prompt"].verdict == "yes" and t["uncond"].verdict == "yes"
    text = "\n".join(_text_control(f))
    assert "survives the prompt: the U-Net is above what the prompt alone predicts" in text
    assert "the text adds to what the U-Net holds" in text
    assert t["prompt"].mean == pytest.approx(0.8 - 0.52, abs=1e-9)


def test_the_strongest_baseline_may_be_the_prompt_and_the_layout_comparison_excludes_it():
    f = _text(prompt_dice=0.7, uncond_dice=0.8)
    assert f["strongest"]["saliency"] == "prompt@8x8"          # the verdict vs the strongest already counts the text
    assert f["text"]["saliency"]["layout_site"] == "position@8x8"


def test_no_text_section_without_text_controls():
    rows, arrays = _study(0.5, 0.5)
    rows = [r for r in rows if r["site"] != "prompt@8x8" and r["model"] != "uncond"]
    _, _, findings = analyse(rows, arrays, {f"{P}/{SITE}": "position@8x8"}, ReportConfig(n_boot=200))
    assert findings[P]["text"] == {} and _text_control(findings[P]) == []


def test_a_transformer_denoiser_is_named_as_such_in_its_protocol_section():
    from sceneprobe.report.summary import protocol_summary
    for site, word, other in (("dit.block0.attn", "transformer", "U-Net"), (SITE, "U-Net", "transformer")):
        rows, arrays = _study(0.6, 0.7)
        rows = [{**r, "site": site if r["site"] == SITE else r["site"]} for r in rows]
        arrays = {k.replace(SITE, site): v for k, v in arrays.items()}
        res, _, findings = analyse(rows, arrays, {f"{P}/{site}": "position@8x8"}, ReportConfig(n_boot=200))
        text = "\n".join(protocol_summary(res, P, findings[P], ReportConfig(n_boot=200)))
        assert f"Does the {word} linearly encode" in text and other not in text
