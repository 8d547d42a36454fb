"""Interventions (issue #7): owned edit hooks, the Adam-on-activation edit, the equal-norm control, counterfactual
targets, one saliency edit end to end on a tiny run, and bad input."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from sceneprobe.capture.recorder import Recorder, hook_count  # noqa: E402
from sceneprobe.capture.store import CaptureStore  # noqa: E402
from sceneprobe.cli import main  # noqa: E402
from sceneprobe.config import load_config  # noqa: E402
from sceneprobe.errors import SceneprobeError  # noqa: E402
from sceneprobe.intervene import Editor, ProbeEdit, RandomEdit, load_probe_head, optimise_activation  # noqa: E402
from sceneprobe.intervene.context import probe_file  # noqa: E402
from sceneprobe.intervene.results import COLUMNS  # noqa: E402
from sceneprobe.intervene.run import run_interventions  # noqa: E402
from sceneprobe.intervene.task import CONDITIONS  # noqa: E402
from sceneprobe.intervene.targets import Transform, counterfactual_depth, counterfactual_mask, draw_transform, \
    translate  # noqa: E402
from sceneprobe.probe.metrics import dice  # noqa: E402

SITE = "unet.up1.attn0"


@pytest.fixture(scope="module")
def irun(tmp_path_factory, tiny_cfg, tiny_data, tiny_run) -> Path:
    """A copy of the tiny run with generate captures (ldm + permuted), a labeller trained a few steps, labels, probes."""
    from sceneprobe.capture.run import run_capture
    from sceneprobe.labeller import train_labeller
    from sceneprobe.models.io import load_ldm
    from sceneprobe.probe.sweep import run_probes
    from sceneprobe.study import label_generated
    run = tmp_path_factory.mktemp("interventions") / "run"
    for part in ("vae", "unet", "scheduler"):
        shutil.copytree(tiny_run / part, run / part)
    ldm = load_ldm(run)
    run_capture(tiny_cfg, run, "generate", ldm, progress=False)
    run_capture(tiny_cfg, run, "generate", ldm, control="permuted", progress=False)
    train_labeller(tiny_cfg, tiny_data, run / "labeller", progress=False)
    label_generated(run, run / "labeller")
    run_probes(run, tiny_cfg.probe, progress=False)
    from sceneprobe.owned import write_marker                                  # made by sceneprobe's own functions
    write_marker(run, "sceneprobe capture, train-labeller, probe (test fixture)")
    return run


@pytest.fixture(scope="module")
def unet(irun):
    from sceneprobe.models.io import load_ldm
    return load_ldm(irun).unet


def _x(unet, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = unet.config.sample_size
    return torch.randn(b, unet.config.in_channels, s, s, generator=g), torch.tensor(500)


# ------------------------------------------------------------------------------------------------------------ hooks
@torch.no_grad()
def test_editor_replaces_only_planned_steps_and_removes_exactly_its_hooks(unet):
    x, t = _x(unet)
    base = unet(x, t).sample
    foreign = unet.get_submodule("up_blocks.1.attentions.0").register_forward_hook(lambda *a: None)
    try:
        n0 = hook_count(unet)
        with Editor(unet, [SITE], lambda site, step, a: torch.zeros_like(a) if step == 1 else None) as ed:
            assert hook_count(unet) > n0
            same = unet(x, t).sample                                            # step 0: not edited
            edited = unet(x, t).sample                                          # step 1: zeroed
        assert hook_count(unet) == n0                                           # the foreign hook survives
        assert ed.applied == [(SITE, 1)]
        torch.testing.assert_close(same, base)
        assert not torch.allclose(edited, base)
        with pytest.raises(RuntimeError, match="boom"):                         # removed on errors too
            with Editor(unet, [SITE], lambda *a: None):
                raise RuntimeError("boom")
        assert hook_count(unet) == n0
        with pytest.raises(SceneprobeError):                                   # a bad site leaves nothing behind
            Editor(unet, [SITE, "unet.nowhere.attn9"], lambda *a: None)
        assert hook_count(unet) == n0
    finally:
        foreign.remove()
    assert hook_count(unet) == 0


@torch.no_grad()
def test_editor_sees_the_recorded_activation_and_identity_edit_changes_nothing(unet):
    x, t = _x(unet)
    with Recorder({"unet": unet}, [SITE]) as rec:
        base = unet(x, t).sample
    seen = []
    with Editor(unet, [SITE], lambda site, step, a: seen.append(a.clone()) or a.clone()):
        out = unet(x, t).sample
    torch.testing.assert_close(seen[0], rec.outputs[SITE][0])                   # (B, C, H, W), before the residual
    torch.testing.assert_close(out, base)


# ------------------------------------------------------------------------------------------------------------ edits
def test_optimisation_moves_the_probe_prediction_toward_the_target(irun, tiny_cfg):
    from sceneprobe.capture.store import CaptureStore
    store = CaptureStore(irun / "captures/generate/ldm")
    a0 = store.read(SITE, 0, [0, 1])                                            # (2, C, h, w) real activations
    head = load_probe_head(probe_file(irun, "ldm", SITE, 0), "saliency", 1, (32, 32))
    target = torch.zeros(2, 32, 32)
    target[0, 4:14, 18:30] = 1
    target[1, 20:30, 2:12] = 1
    # lr 5e-2: a layout-fair probe's feature weights can be small (its layout offset carries the prior), and the
    # thresholded mask only moves once the logit crosses 0
    a, before, after = optimise_activation(a0, head, target, lr=5e-2, iters=64)
    assert (after < before).all()
    assert torch.allclose(head.loss(a0, target), before)
    d0 = dice(head(a0) > 0, target > 0)
    d1 = dice(head(a) > 0, target > 0)
    assert (d1 >= d0).all() and d1.mean() > d0.mean()
    # batch independence: one sample alone is edited exactly as in the batch
    a_one, _, _ = optimise_activation(a0[1:], head, target[1:], lr=5e-2, iters=64)
    torch.testing.assert_close(a_one, a[1:], rtol=1e-5, atol=1e-6)
    # depth through the same file: Huber on standardised depth decreases too
    dh = load_probe_head(probe_file(irun, "ldm", SITE, 0), "depth", 1, (32, 32))
    _, b, f = optimise_activation(a0, dh, torch.linspace(-1, 1, 32)[None, :, None].expand(2, 32, 32), 5e-3, 16)
    assert (f < b).all()


@pytest.mark.parametrize("task,pool,size", [("saliency", 1, (32, 32)), ("depth", 2, (24, 40)), ("saliency", 3, (13, 9))])
def test_the_probe_gradient_is_autograds_and_the_edit_is_plain_adams(task, pool, size):
    """ProbeHead.grad factorises the gradient through the linear probe (w ⊗ ∂L/∂z, unpooled): it must equal autograd's
    through the whole head (pooling, offset, a non-integer nearest upsampling), and the fused Adam edit must be the
    textbook Adam on that gradient."""
    from sceneprobe.intervene.editor import ProbeHead
    g = torch.Generator().manual_seed(3)
    # as a site hands it over: a transposed view of (B, H·W, C), not contiguous
    a0 = torch.randn(3, 144, 5, generator=g).transpose(1, 2).reshape(3, 5, 12, 12)
    assert not a0.is_contiguous()
    h = 12 // pool
    head = ProbeHead(task, torch.randn(5, generator=g), 0.3, pool, size, torch.randn(h, h, generator=g))
    target = (torch.rand(3, *size, generator=g) > 0.5).float() if task == "saliency" else torch.randn(3, *size,
                                                                                                      generator=g)
    a = a0.clone().requires_grad_(True)
    ref = head.loss(a, target)
    ref.sum().backward()
    torch.testing.assert_close(head.grad(a0, target), a.grad, rtol=1e-5, atol=1e-8)
    # the edit against textbook Adam (the unfused, single-tensor reference with autograd's gradient)
    b = a0.clone().requires_grad_(True)
    opt = torch.optim.Adam([b], lr=1e-2, foreach=False)
    for _ in range(20):
        opt.zero_grad()
        head.loss(b, target).sum().backward()
        opt.step()
    edited, before, after = optimise_activation(a0, head, target, 1e-2, 20)
    torch.testing.assert_close(edited, b.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, head.loss(b.detach(), target), rtol=1e-5, atol=1e-6)
    assert (after < before).all()


@torch.no_grad()
def test_random_control_has_the_probe_edits_norm_and_a_fixed_direction(irun, unet):
    head = load_probe_head(probe_file(irun, "ldm", SITE, 0), "saliency", 1, (32, 32))
    x, t = _x(unet)
    target = torch.zeros(2, 32, 32)
    target[:, 8:20, 8:20] = 1
    pe = ProbeEdit({(SITE, 0): head}, target, 5e-3, 8)
    with Editor(unet, [SITE], pe):
        unet(x, t)
    assert set(pe.norms) == {(SITE, 0)} and (pe.norms[(SITE, 0)] > 0).all()
    keys = [(123, 0, 0), (123, 0, 1)]
    re = RandomEdit(pe.norms, keys, {SITE: 0}, {(SITE, 0): head}, target)
    seen = []
    with Editor(unet, [SITE], lambda s, st, a: seen.append(a.clone()) or re(s, st, a)):
        unet(x, t)
    torch.testing.assert_close(re.applied_norms[(SITE, 0)], pe.norms[(SITE, 0)], rtol=1e-4, atol=1e-5)
    # the direction depends on the edit's key only, not on the batch it runs in
    re1 = RandomEdit({(SITE, 0): pe.norms[(SITE, 0)][1:]}, keys[1:], {SITE: 0})
    d_batch = re(SITE, 0, seen[0]) - seen[0]
    d_alone = re1(SITE, 0, seen[0][1:]) - seen[0][1:]
    torch.testing.assert_close(d_alone, d_batch[1:])


@torch.no_grad()
def test_norm_matched_probe_edit_has_the_given_norm_and_its_own_direction(irun, unet):
    head = load_probe_head(probe_file(irun, "ldm", SITE, 0), "saliency", 1, (32, 32))
    perm = load_probe_head(probe_file(irun, "permuted", SITE, 0), "saliency", 1, (32, 32))
    x, t = _x(unet)
    target = torch.zeros(2, 32, 32)
    target[:, 8:20, 8:20] = 1
    pe = ProbeEdit({(SITE, 0): head}, target, 5e-3, 8)
    with Editor(unet, [SITE], pe):
        unet(x, t)
    free, matched, seen = ProbeEdit({(SITE, 0): perm}, target, 5e-3, 8), None, []
    with Editor(unet, [SITE], lambda s, st, a: seen.append(a.clone()) or free(s, st, a)):
        unet(x, t)
    matched = ProbeEdit({(SITE, 0): perm}, target, 5e-3, 8, match_norms=pe.norms)
    a = seen[0]
    d_free = free(SITE, 0, a) - a
    d_match = matched(SITE, 0, a) - a
    torch.testing.assert_close(matched.norms[(SITE, 0)], pe.norms[(SITE, 0)], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(matched.raw_norms[(SITE, 0)], free.norms[(SITE, 0)], rtol=1e-5, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(d_free.flatten(1), d_match.flatten(1))
    assert (cos > 0.9999).all()                                                # same direction, rescaled
    assert not torch.allclose(free.norms[(SITE, 0)], pe.norms[(SITE, 0)])      # the sizes did differ


def test_counterfactual_targets():
    m = np.zeros((8, 8), np.uint8)
    m[1:3, 1:3] = 1
    moved = counterfactual_mask(m, Transform("shift", 2, 3))
    assert moved.sum() == 4 and moved[3:5, 4:6].all()
    assert counterfactual_mask(m, Transform("shift", -2, 0)).sum() == 2       # moved partly out: fill 0
    d = np.arange(8, dtype=np.float32)[:, None].repeat(8, 1)                   # depth grows downwards
    up = counterfactual_depth(d, Transform("shift", -3, 0))
    assert up[0, 0] == 3 and (up[5:, 0] == 7).all()                            # edge-replicate fill
    np.testing.assert_array_equal(counterfactual_depth(d.T, Transform("mirror")), d.T[:, ::-1])
    np.testing.assert_array_equal(translate(d, 0, 0), d)
    for k in range(20):
        t = draw_transform(123, "saliency", k, (32, 32), 0.15, 0.25)
        assert t.kind == "shift" and 5 <= abs(t.dy) <= 8 and 5 <= abs(t.dx) <= 8
        assert t == draw_transform(123, "saliency", k, (32, 32), 0.15, 0.25)   # fixed by (seed, task, edit)
    kinds = {draw_transform(1, "depth", k, (32, 32), 0.15, 0.25).kind for k in range(20)}
    assert kinds == {"shift", "mirror"}
    with pytest.raises(SceneprobeError):
        draw_transform(1, "saliency", 0, (32, 32), 0.3, 0.2)


# ------------------------------------------------------------------------------------------------------ dose edits
@torch.no_grad()
def test_dose_edit_has_the_requested_relative_norm_along_the_given_direction(irun, unet):
    from sceneprobe.intervene import DirectionRecorder, DoseEdit
    from sceneprobe.intervene.editor import random_direction
    head = load_probe_head(probe_file(irun, "ldm", SITE, 0), "saliency", 1, (32, 32))
    perm = load_probe_head(probe_file(irun, "permuted", SITE, 0), "saliency", 1, (32, 32))
    x, t = _x(unet)
    target = torch.zeros(2, 32, 32)
    target[:, 8:20, 8:20] = 1
    key = (SITE, 0)
    rec = DirectionRecorder({"probe": {key: head}, "permuted_probe": {key: perm}}, target, 5e-3, 8)
    with Editor(unet, [SITE], rec) as ed:
        base = unet(x, t).sample
    assert ed.applied == [] and rec.seen == [key]                               # the recorder changes nothing
    torch.testing.assert_close(base, unet(x, t).sample)
    u = rec.dirs["probe"][key]                                                  # (2, C, H, W) unit rows
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(2))
    assert (rec.natural["probe"][key] > 0).all() and (rec.natural["probe"][key] < 0.5).all()
    assert (rec.after["probe"][key] < rec.before["probe"][key]).all()
    doses = [0.1, 0.5]
    seen = []
    de = DoseEdit([key], doses, [lambda k, shape, i=i: rec.dirs["probe"][k][i] for i in range(2)], {key: head}, target)
    with Editor(unet, [SITE], lambda s, st, a: seen.append(a.clone()) or de(s, st, a)):
        unet(x, t)
    torch.testing.assert_close(de.ratios[key], torch.tensor(doses), rtol=1e-5, atol=1e-6)   # ‖Δa‖/‖a‖ = dose
    a = seen[0]
    d = de(SITE, 0, a) - a
    cos = torch.nn.functional.cosine_similarity(d.flatten(1), u.flatten(1))
    assert (cos > 0.9999).all()                                                 # along the optimised direction
    # random arm: equal relative norm, direction fixed by the edit's key; a zero dose returns the activation itself
    rnd = DoseEdit([key], [0.25, 0.0], [lambda k, shape: random_direction(shape, (1, 2, 3))] * 2)
    out = rnd(SITE, 0, a)
    torch.testing.assert_close(rnd.ratios[key], torch.tensor([0.25, 0.0]), rtol=1e-5, atol=1e-7)
    assert torch.equal(out[1], a[1])
    assert rnd(SITE, 1, a) is None                                              # not a planned (site, step)


# ------------------------------------------------------------------------------------------------------ end to end
def _approx_equal_csv(a: bytes, b: bytes) -> None:
    """Two rows of the same edit from other batch mixes: equal up to float ulps the sampler amplifies (a block edit's
    pixel_change moved 1.3e-4 relative with the probes of PROBE_VERSION 4)."""
    a, b = next(csv.reader([a.decode()])), next(csv.reader([b.decode()]))
    for x, y in zip(a, b):
        try:
            assert float(x) == pytest.approx(float(y), rel=1e-3, abs=1e-6, nan_ok=True)
        except ValueError:
            assert x == y


def test_one_saliency_edit_end_to_end_writes_results_and_is_deterministic(irun, capsys):
    doses = [0.0, 0.5]
    cfg = load_config("tiny", overrides={"intervene": {"n_edits": 1, "iters": 4, "doses": doses}})
    md = run_interventions(cfg, irun, task="saliency", progress=False)
    out = irun / "interventions"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    arms = ("probe", "random", "permuted_probe")
    n = 1 + len(doses) * len(arms)                                              # 1 edit × (unedited + arms × doses)
    assert [r["condition"] for r in rows[:n]] == ["unedited", *arms * len(doses)]
    assert [float(r["dose"]) for r in rows[:n]] == [0.0] + [d for d in doses for _ in arms]
    assert [r["site_kind"] for r in rows] == ["attn"] * n + ["block"] * n
    for k in (0, n):
        block = rows[k:k + n]
        H = float(block[0]["headroom"])
        assert H > 0 and all(float(r["headroom"]) == H for r in block)
        for r in block:
            assert abs(float(r["gain"]) - (float(r["dice_cf"]) - float(r["dice_orig"]))) < 1e-5
            assert abs(float(r["delta_ratio"]) - float(r["dose"])) < 1e-4      # ‖Δa‖/‖a‖ = the dose, every arm
            if float(r["dose"]) == 0:                                            # zero dose: the unedited output
                assert float(r["pixel_change"]) == 0 and float(r["gain_vs_unedited"]) == 0
        probe = next(r for r in block if r["condition"] == "probe" and float(r["dose"]) == 0.5)
        assert float(probe["pixel_change"]) > 0 and 0 < float(probe["natural_ratio"]) < 0.5
    s = json.loads((out / "summary.json").read_text())
    assert set(s["kinds"]) == {"attn", "block"} and s["capture_site_kind"] == "attn"
    t = s["kinds"]["attn"]["tasks"]["saliency"]
    assert t["regeneration_max_abs_diff"] == 0                                  # the replay is the captured sample
    assert s["kinds"]["block"]["tasks"]["saliency"]["regeneration_max_abs_diff"] is None   # stopped early: no images
    assert t["steps"] == [0] and all(x.startswith("unet.up") for x in t["sites"])
    zero = t["doses"][0]
    assert zero["dose"] == 0 and zero["relative_gain"]["probe"]["mean"] == 0 and not zero["visible"]
    assert zero["verdict"] != "yes"
    block = CaptureStore(irun / "interventions/probes_block/captures/generate/ldm")
    assert block.manifest["site_kind"] == "block" and block.site_steps(t["sites"][0]) == [0]
    res = json.loads((out / "results.json").read_text())
    assert res["headline_kind"] == "attn" and set(res["kinds"]) == {"attn", "block"}
    claim = res["claims"]["saliency"]
    entry = res["kinds"]["attn"]["saliency"]
    assert claim["answer"] == entry["answer"] == t["claim"]["answer"] and claim["sentence"].startswith("Saliency edits")
    assert [d["dose"] for d in entry["doses"]] == doses and entry["natural"]["probe"]["ratio"] > 0
    g = entry["gain"]["probe"]
    assert set(g) == {"mean", "lo", "hi", "n"} and g["n"] == 1
    from sceneprobe.report.intervention_claims import intervention_claims     # the main report reads one claim per
    claims, _ = intervention_claims(res)                                        # (kind, task)
    assert [(c["where"], c["task"], c["answer"]) for c in claims] == [
        ("edits of the attention output", "saliency", entry["answer"]),
        ("edits of the residual stream", "saliency", res["kinds"]["block"]["saliency"]["answer"])]
    text = md.read_text()
    assert md == irun / "report/extra/interventions.md" and text.startswith("# Interventions")
    assert "](figures/interventions.png)" in text and "](figures/interventions_dose.png)" in text
    assert "**Does the edit work?**" in text and "residual stream" in text and "| 50 % | probe direction |" in text
    assert (irun / "report/figures/interventions.png").stat().st_size > 0
    assert (irun / "report/figures/interventions_dose.png").stat().st_size > 0
    assert (out / "images_attn.safetensors").is_file() and (out / "images_block.safetensors").is_file()
    first = (out / "results.csv").read_bytes().splitlines()
    # the CLI, same seed: the same rows for the same edit and dose (the tiny preset: 2 edits, its own doses)
    assert main(["intervene", "--run", str(irun), "--preset", "tiny", "--task", "saliency", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("interventions.md")
    again = (out / "results.csv").read_bytes().splitlines()
    tiny_doses = list(load_config("tiny").intervene.doses)
    assert len(again) == 1 + 2 * 2 * (1 + 3 * len(tiny_doses))                 # 2 edits, two kinds
    assert again[0] == first[0]
    with open(out / "results.csv", newline="") as f:
        rows2 = list(csv.DictReader(f))

    def key(r):
        return r["site_kind"], r["edit"], r["condition"], float(r["dose"])
    old = {key(r): i for i, r in enumerate(rows)}
    shared = [(old[key(r)], j) for j, r in enumerate(rows2) if key(r) in old]
    assert len(shared) == 2 * (1 + 3 * (0.5 in tiny_doses))                   # edit 0: unedited (+ dose 0.5), 2 kinds
    for i, j in shared:                                                        # the same edit: the same numbers
        _approx_equal_csv(again[1 + j], first[1 + i])                          # (other batch mix: float ulps)


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["intervene", "--run", str(tmp_path), "--preset", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no probes in") and "\n" not in err
    assert main(["intervene", "--run", str(tmp_path), "--preset", "tiny", "--task", "colour"]) == 2
    assert "--task" in capsys.readouterr().err
