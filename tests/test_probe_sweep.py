"""The probe sweep on synthetic stores: recovery, chance, determinism, resume, no test leakage, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sceneprobe.capture.store import load_labels, save_labels
from sceneprobe.cli import main
from sceneprobe.config import ProbeConfig
from sceneprobe.errors import SceneprobeError
from sceneprobe.probe import exact_fit, split_features, sweep
from sceneprobe.probe.synthetic import synthetic_run

torch.set_num_threads(1)
SMALL = dict(n=40, channels=8, size=16, steps=2, models=("ldm",))
BOTH = ProbeConfig(plain_protocols=("noised",))    # the synthetic runs' protocol: the plain probe beside the fair one


def _value(rows, **kw):
    hits = [r["value"] for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, hits)
    return hits[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("planted"), sites={"unet.down0.attn0": 16, "unet.mid.attn0": 4},
                        noise=0.05, **SMALL)
    return run, sweep.run_probes(run, BOTH, progress=False)


def test_probe_recovers_planted_signal(planted):
    run, csv = planted
    rows = sweep.read_results(csv)
    best = dict(protocol="noised", model="ldm", site="unet.down0.attn0", step=1, split="test")
    assert _value(rows, task="saliency", metric="dice", **best) > 0.95
    assert _value(rows, task="depth", metric="spearman", **best) > 0.95
    assert _value(rows, task="depth", metric="rmse", **best) < 0.2
    base = dict(protocol="noised", model="baseline", site="mean-map", step=-1, split="test")
    assert _value(rows, task="saliency", metric="dice", **best) > _value(rows, task="saliency", metric="dice", **base)
    # a probe file per (site, step) with both tasks
    t = load_file(str(run / "probes/noised/ldm/unet.mid.attn0/step_01.safetensors"))
    assert t["depth.weight"].shape == (8, 1) and t["saliency.weight"].shape == (8, 2)
    torch.testing.assert_close(t["saliency.weight"][:, 0], -t["saliency.weight"][:, 1])


def test_probe_stays_at_chance_without_signal(planted, tmp_path):
    """Shuffled labels: the features describe another scene, so a probe can learn at most the dataset's layout
    (ground-plane gradient, objects near the centre), far below the true-label probe.
    A signal-free store (the synthetic "permuted" model) scores ρ ≈ 0 and no better than the baseline."""
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 16, "unet.mid.attn0": 4}, noise=0.05,
                        shuffle_labels=True, **{**SMALL, "models": ("ldm", "permuted")})
    rows = sweep.read_results(sweep.run_probes(run, BOTH, progress=False))
    true = sweep.read_results(planted[1])
    base = dict(protocol="noised", model="baseline", site="mean-map", step=-1, split="test")
    for step in (0, 1):
        q = dict(protocol="noised", site="unet.down0.attn0", step=step, split="test")
        for task, metric in (("depth", "spearman"), ("saliency", "dice")):
            shuffled = _value(rows, model="ldm", task=task, metric=metric, **q)
            assert shuffled < _value(true, model="ldm", task=task, metric=metric, **q) - 0.2
            assert _value(rows, model="permuted", task=task, metric=metric, **q) < \
                _value(rows, task=task, metric=metric, **base) + 0.05
        # the layout-fair probe of signal-free features is the position-only baseline: skill ≈ 0 …
        assert abs(_value(rows, model="permuted", task="depth", metric="skill", **q)) < 0.05
        # … while the plain probe (no prior) of the same features cannot even represent the layout: ρ ≈ 0
        assert abs(_value(rows, model="permuted.noprior", task="depth", metric="spearman", **q)) < 0.2
        assert _value(rows, model="permuted.noprior", task="depth", metric="skill", **q) < -0.2


def test_results_are_deterministic_and_resumable(planted, tmp_path, monkeypatch):
    run, csv = planted
    first = csv.read_bytes()
    other = synthetic_run(tmp_path, sites={"unet.down0.attn0": 16, "unet.mid.attn0": 4}, noise=0.05, **SMALL)
    assert sweep.run_probes(other, BOTH, progress=False).read_bytes() == first   # fresh rerun: same bytes
    calls = []
    real = sweep.probe_one
    monkeypatch.setattr(sweep, "probe_one", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    assert sweep.run_probes(run, BOTH, progress=False).read_bytes() == first     # resumed: nothing refit
    assert calls == []
    (run / "probes/noised/ldm/unet.mid.attn0/step_00.safetensors").unlink()
    sweep.run_probes(run, BOTH, progress=False)
    assert calls == [("unet.mid.attn0", 0)]
    assert csv.read_bytes() == first
    calls.clear()
    sweep.run_probes(run, ProbeConfig(lambdas=(0.1, 1.0)), progress=False)                # new config: all refit
    assert len(calls) == 4
    sweep.run_probes(run, BOTH, progress=False)
    assert csv.read_bytes() == first


def test_test_split_never_influences_the_fit(tmp_path):
    a = synthetic_run(tmp_path / "a", sites={"unet.down0.attn0": 8}, noise=0.5, **SMALL)
    b = synthetic_run(tmp_path / "b", sites={"unet.down0.attn0": 8}, noise=0.5, **SMALL)
    lab = load_labels(b / "captures/noised")
    test = lab["split"] == 2
    lab["saliency"][test] = 1 - lab["saliency"][test]          # corrupt the test labels only
    lab["depth"][test] = -lab["depth"][test]
    save_labels(b / "captures/noised", **lab)
    # depth standardisation uses train stats only, so corrupting test depth changes nothing upstream
    ra = sweep.read_results(sweep.run_probes(a, BOTH, progress=False))
    rb = sweep.read_results(sweep.run_probes(b, BOTH, progress=False))
    for step in (0, 1):
        ta = load_file(str(a / f"probes/noised/ldm/unet.down0.attn0/step_{step:02d}.safetensors"))
        tb = load_file(str(b / f"probes/noised/ldm/unet.down0.attn0/step_{step:02d}.safetensors"))
        for k in ta:
            if "test." not in k:                               # per-test-image scores differ, the fit must not
                torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0)
    val = lambda rows: [(r["task"], r["metric"], r["value"]) for r in rows if r["split"] == "val"]
    assert val(ra) == val(rb)
    assert [r["value"] for r in ra if r["split"] == "test"] != [r["value"] for r in rb if r["split"] == "test"]


def test_streaming_passes_equal_cached(tmp_path, monkeypatch):
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 8}, noise=0.5, n=40, channels=8, size=16, steps=1,
                        models=("ldm",))
    store = sweep.CaptureStore(run / "captures/noised/ldm")
    labels = sweep.load_protocol_labels(run / "captures/noised", store.n)
    cached = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, BOTH)
    for mod in (split_features, exact_fit):                    # where the sweep reads them
        monkeypatch.setattr(mod, "CACHE_BYTES", 0)
        monkeypatch.setattr(mod, "CHUNK", 7)
    streamed = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, BOTH)
    for c, s in zip(cached, streamed):                         # the layout-fair probe and the plain one
        assert c.lam == s.lam
        torch.testing.assert_close(c.depth, s.depth, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c.saliency, s.saliency, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_sweep_probe_is_the_exact_brute_force_fit(tmp_path, bias):
    """The chosen λ's probes equal sklearn fits on every pixel of the nearest-upsampled, RMS-scaled features."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sceneprobe.probe.fit import upsample_nearest
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 4}, noise=1.0, n=30, channels=6, size=8, steps=1,
                        models=("ldm",))
    store = sweep.CaptureStore(run / "captures/noised/ldm")
    labels = sweep.load_protocol_labels(run / "captures/noised", store.n)
    p, _ = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, ProbeConfig(bias=bias, layout="none"))
    tr = labels.idx(0)
    x = upsample_nearest(store.read("unet.down0.attn0", 0, tr).double(), 8, 8)
    X = x.permute(0, 2, 3, 1).reshape(-1, 6).numpy() / p.scale[:6].numpy()  # scaled features, one row per pixel
    P = len(X)
    r = Ridge(alpha=p.lam[0] * P, fit_intercept=bias, solver="cholesky").fit(X, labels.depth[tr].reshape(-1))
    np.testing.assert_allclose(p.depth[:6].numpy() * p.scale[:6].numpy(), r.coef_, rtol=1e-8, atol=1e-10)
    lr = LogisticRegression(C=1 / (p.lam[1] * P), fit_intercept=bias, tol=1e-12, max_iter=10_000)
    lr.fit(X, labels.saliency[tr].reshape(-1))
    np.testing.assert_allclose(p.saliency[:6].numpy() * p.scale[:6].numpy(), lr.coef_[0], atol=1e-5)
    if bias:
        np.testing.assert_allclose(p.depth[6], r.intercept_, atol=1e-8)
        # the val-chosen decision threshold τ is folded into the intercept: logit − τ > 0
        np.testing.assert_allclose(p.saliency[6] + p.threshold, lr.intercept_[0], atol=1e-5)


def test_layout_fair_probe_is_the_exact_fit_with_free_layout_weights(tmp_path):
    """With the layout channels the chosen probes are the exact minimisers of the stated objectives: on every label
    pixel of the nearest-upsampled rows [x/s | L | 1], the gradient of (1/P)Σ(y − ŷ)² + λ‖w‖² (depth) and of
    (1/P)ΣCE + (λ/2)‖w‖² (saliency) vanishes, with the layout weights and the intercept unpenalised."""
    from sceneprobe.probe.fit import upsample_nearest
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 4}, noise=1.0, n=30, channels=6, size=8, steps=1,
                        models=("ldm",))
    store = sweep.CaptureStore(run / "captures/noised/ldm")
    labels = sweep.load_protocol_labels(run / "captures/noised", store.n)
    p, plain = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, BOTH)
    assert p.layout.shape == (2, 4, 4) and len(p.depth) == 6 + 2 + 1 and len(plain.depth) == 6 + 1
    tr = labels.idx(0)
    x = store.read("unet.down0.attn0", 0, tr).double()
    x = torch.cat([x, p.layout[None].expand(len(x), -1, -1, -1)], 1)                   # (n, 8, 4, 4)
    X = upsample_nearest(x, 8, 8).permute(0, 2, 3, 1).reshape(-1, 8)
    X = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1).numpy()          # (P, 9)
    P = len(X)
    pen = np.r_[p.scale[:6].numpy() ** 2, 0, 0, 0]                                      # λ‖s·w‖², layout + bias free
    y = labels.depth[tr].reshape(-1).astype(np.float64)
    th = p.depth.numpy()
    g = 2 * X.T @ (X @ th - y) / P + 2 * p.lam[0] * pen * th
    assert np.abs(g).max() < 1e-6                    # the design holds the layout in float32 (as the activations)
    m = labels.saliency[tr].reshape(-1).astype(np.float64)
    ts = p.saliency.numpy().copy()
    ts[-1] += p.threshold                                                               # the maximum-likelihood fit
    g = X.T @ (1 / (1 + np.exp(-(X @ ts))) - m) / P + p.lam[1] * pen * ts
    assert np.abs(g).max() < 1e-6


def _layout_run(tmp_path, kind: str):
    """A store whose features carry either only position (the same map in every image) or only the scene (each
    image's labels minus the mean layout, mixed into 6 channels, plus noise: no position code)."""
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 8}, noise=0.05, n=80, channels=6, size=16, steps=1,
                        models=("ldm",))
    lab = load_labels(run / "captures/noised")
    store = sweep.CaptureStore(run / "captures/noised/ldm")
    n = store.n
    rng = np.random.default_rng(3)
    if kind == "position":
        yy, xx = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
        code = np.stack([yy, xx, yy * xx, yy ** 2, np.sin(3 * xx), np.cos(2 * yy)])       # (6, 8, 8): where, not what
        x = np.broadcast_to(code, (n, 6, 8, 8)) + 0.01 * rng.standard_normal((n, 6, 8, 8))
    else:
        d = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(lab["depth"]).float()[:, None], 8)[:, 0]
        m = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(lab["saliency"]).float()[:, None], 8)[:, 0]
        d = (d - d.mean(0, keepdim=True)).numpy()               # each image's departure from the mean layout:
        m = (m - m.mean(0, keepdim=True)).numpy()               # what the scene adds, with no layout left in it
        x = np.stack([d, m, d + m, d - m, 2 * d, 2 * m], 1) + 0.3 * rng.standard_normal((n, 6, 8, 8))
    from sceneprobe.capture.store import shard_path, write_rows
    write_rows(shard_path(store.root, "unet.down0.attn0", 0), 0, torch.from_numpy(np.ascontiguousarray(x)).float())
    return sweep.read_results(sweep.run_probes(run, BOTH, progress=False))


def test_position_without_scene_does_not_beat_the_layout_baseline(tmp_path):
    rows = _layout_run(tmp_path, "position")
    q = dict(protocol="noised", site="unet.down0.attn0", step=0, split="test")
    assert _value(rows, model="ldm", task="depth", metric="skill", **q) < 0.05
    base = _value(rows, model="baseline", site="position@8x8", step=-1, split="test", task="saliency",
                  metric="dice", protocol="noised")
    assert _value(rows, model="ldm", task="saliency", metric="dice", **q) < base + 0.05


def test_scene_without_position_beats_the_layout_baseline(tmp_path):
    rows = _layout_run(tmp_path, "scene")
    q = dict(protocol="noised", site="unet.down0.attn0", step=0, split="test")
    base = _value(rows, model="baseline", site="position@8x8", step=-1, split="test", task="saliency",
                  metric="dice", protocol="noised")
    assert _value(rows, model="ldm", task="depth", metric="skill", **q) > 0.3
    assert _value(rows, model="ldm", task="saliency", metric="dice", **q) > base + 0.1
    # and the layout prior is what the plain probe of the same features lacks
    assert _value(rows, model="ldm", task="depth", metric="skill", **q) > \
        _value(rows, model="ldm.noprior", task="depth", metric="skill", **q) + 0.1


@pytest.mark.parametrize("cfg", [ProbeConfig(bias=True, upsample="area"),
                                 ProbeConfig(solver="adam", epochs=2, lambdas=())])
def test_options_run_end_to_end(tmp_path, cfg):
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 8}, noise=0.2, n=24, channels=8, size=16, steps=1,
                        models=("ldm",))
    rows = sweep.read_results(sweep.run_probes(run, cfg, progress=False))
    sel = "epoch" if cfg.solver == "adam" else "lambda"
    assert {r["metric"] for r in rows if r["model"] == "ldm"} >= {"dice", "iou", "rmse", "spearman", "pearson", sel}
    assert _value(rows, model="ldm", task="saliency", split="test", metric="dice") > 0.5


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SceneprobeError, match="no captures"):
        sweep.run_probes(tmp_path, ProbeConfig(), progress=False)
    (tmp_path / "captures/noised/ldm").mkdir(parents=True)
    with pytest.raises(SceneprobeError, match="no capture store with labels"):
        sweep.run_probes(tmp_path, ProbeConfig(), progress=False)
    assert main(["probe", "--run", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SceneprobeError, match="solver"):
        sweep.run_probes(tmp_path, ProbeConfig(solver="sgd"), progress=False)


def test_labels_must_align_and_have_all_splits(tmp_path):
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 4}, n=12, channels=4, size=8, steps=1, models=("ldm",))
    lab = load_labels(run / "captures/noised")
    save_labels(run / "captures/noised", lab["depth"], lab["saliency"], np.zeros_like(lab["split"]))
    with pytest.raises(SceneprobeError, match="no val rows"):
        sweep.run_probes(run, ProbeConfig(), progress=False)
    save_labels(run / "captures/noised", lab["depth"][:10], lab["saliency"][:10], lab["split"][:10])
    with pytest.raises(SceneprobeError, match="rows but the capture stores have"):
        sweep.run_probes(run, ProbeConfig(), progress=False)


def test_cli_probe_prints_results_path_last(tmp_path, capsys):
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 4}, n=16, channels=4, size=8, steps=1, models=("ldm",))
    assert main(["probe", "--run", str(run), "--preset", "tiny", "--no-progress", "--adopt"]) == 0   # no marker
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run / "report" / "results.csv")


def test_per_image_scores_lambda_edges_and_baselines(planted):
    run, csv = planted
    rows = sweep.read_results(csv)
    arrays = sweep.read_per_image(run / "report/per_image.safetensors")
    n_test = len(arrays["noised/test-rows"])
    for r in rows:
        if r["split"] != "test" or r["metric"].startswith("skill") or r["metric"] == "threshold":
            continue
        a = arrays[sweep.per_image_key(r["protocol"], r["model"], r["site"], r["step"], r["task"], r["metric"])]
        assert len(a) == n_test
        assert float(f"{np.nanmean(a):.6g}") == r["value"], r                  # extract once, score many times
    # depth skill = 1 − ΣMSE / ΣMSE(position-only at the site's native size)
    key = lambda m, s, st, k: arrays[sweep.per_image_key("noised", m, s, st, "depth", k)]
    sk = 1 - key("ldm", "unet.mid.attn0", 1, "mse").sum() / key("baseline", "position@4x4", -1, "mse").sum()
    assert _value(rows, protocol="noised", model="ldm", site="unet.mid.attn0", step=1, task="depth", split="test",
                  metric="skill") == pytest.approx(sk, rel=1e-5)
    sites = {r["site"] for r in rows if r["model"] == "baseline"}
    assert sites == {"position@4x4", "mean-map", "all-salient"}            # labels are 16×16: mean map = position@16x16
    # every probe row carries the λ-edge flag column; the default grid is wide enough here
    assert {r["lambda_edge"] for r in rows} <= {"", "low", "high"}
    narrow = synthetic_run(run.parent / "narrow", sites={"unet.down0.attn0": 16}, noise=0.05, **SMALL)
    edge = sweep.read_results(sweep.run_probes(narrow, ProbeConfig(lambdas=(10.0, 100.0, 1e3)), progress=False))
    chosen = {(r["step"], r["task"]): r["value"] for r in edge if r["metric"] == "lambda" and r["model"] == "ldm"}
    for r in (r for r in edge if r["model"] == "ldm"):
        lam = chosen[r["step"], r["task"]]
        assert r["lambda_edge"] == {10.0: "low", 1e3: "high"}.get(lam, ""), r
    assert chosen[1, "depth"] == 10.0                                            # strong signal: wants less λ


def test_inverse_depth_target(tmp_path):
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 8}, noise=0.05, **SMALL)
    rows = sweep.read_results(sweep.run_probes(run, ProbeConfig(depth_target="inverse"), progress=False))
    q = dict(protocol="noised", model="ldm", site="unet.down0.attn0", step=1, task="depth", split="test")
    assert _value(rows, metric="skill", **q) > 0.5 and _value(rows, metric="spearman", **q) > 0.9
    labels = sweep.load_protocol_labels(run / "captures/noised", None, "inverse")
    raw = load_labels(run / "captures/noised")["depth"]
    np.testing.assert_allclose(labels.target_units(labels.depth.astype(np.float64)), 1 / raw, rtol=1e-5)


def test_relative_depth_errors_remove_offset_and_scale():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 8, 8))
    e = sweep.relative_depth_errors(y + np.array([1.0, -2.0, 0.5])[:, None, None], y)   # a per-image offset only
    np.testing.assert_allclose(e["mse_centred"], 0, atol=1e-12)
    np.testing.assert_allclose(e["mse_ssi"], 0, atol=1e-12)
    e = sweep.relative_depth_errors(3 * y + 1, y)                                      # scale: centred sees it
    assert (e["mse_centred"] > 1).all()
    np.testing.assert_allclose(e["mse_ssi"], 0, atol=1e-12)
    noise = rng.standard_normal((3, 8, 8))
    e = sweep.relative_depth_errors(noise, y)                  # = the least-squares residual of y on [ŷ, 1]
    for i in range(3):
        A = np.c_[noise[i].ravel(), np.ones(64)]
        res = y[i].ravel() - A @ np.linalg.lstsq(A, y[i].ravel(), rcond=None)[0]
        assert e["mse_ssi"][i] == pytest.approx((res ** 2).mean(), rel=1e-10)


def test_a_probe_whose_refinement_does_not_converge_is_not_reported(tmp_path, monkeypatch):
    """The val-best λ is refined to its float64 minimiser; if that does not converge (an ill-posed fit), the next
    best λ above it is taken instead."""
    from sceneprobe.probe import fit
    run = synthetic_run(tmp_path, sites={"unet.down0.attn0": 8}, noise=0.05, n=40, channels=8, size=16, steps=1,
                        models=("ldm",))
    store = sweep.CaptureStore(run / "captures/noised/ldm")
    labels = sweep.load_protocol_labels(run / "captures/noised", store.n)
    cfg = ProbeConfig(plain=False)
    first, _ = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, cfg)
    real = fit.logistic_refine
    refused = first.lam[1]

    def refine(chunks, P, lam, *a, **k):
        th, n, ok = real(chunks, P, lam, *a, **k)
        return th, n, ok and lam > refused                     # pretend λ ≤ the first choice does not converge
    monkeypatch.setattr(fit, "logistic_refine", refine)
    second, _ = sweep.fit_exact(store, "unet.down0.attn0", 0, labels, cfg)
    assert second.lam[1] > refused and second.lam[0] == first.lam[0]


def _brute_tune(sc, v, n_cand=47):
    """The per-threshold reference: score every candidate τ with the scorer's own rule (v − τ > 0), then pick."""
    cands = sweep.threshold_candidates(v, n_cand)
    dice = sc.saliency(v[:, None] - cands[None, :, None, None])["dice"]                 # (n, K)
    ok = np.isfinite(dice)
    score = np.where(ok, dice, 0.0).sum(0) / np.maximum(ok.sum(0), 1)
    best = np.nanmax(score)
    good = np.flatnonzero(score >= best - 1e-12)
    return dice, best, cands[good[np.argmin(np.abs(cands[good]))]]


@pytest.mark.parametrize("H,h,valid", [(16, 4, False), (10, 4, False), (12, 6, True)])
def test_one_pass_thresholds_equal_per_threshold_scoring(H, h, valid):
    """Dice at every candidate threshold from one sort equals scoring each threshold on its own, bit for bit —
    integer and non-integer upsampling factors, a per-image valid mask, ties between logits and with candidates
    (rounded logits), a NaN logit — and so do the chosen τ and its Dice, for L probes at once."""
    from sceneprobe.probe.metrics import NearestScorer
    rng = np.random.default_rng(H + h)
    n, L = 9, 4
    depth = rng.normal(size=(n, H, H)).astype(np.float32)
    mask = (rng.uniform(size=(n, H, H)) < 0.3).astype(np.uint8)
    mask[0] = 0                                                                    # an image without salient pixels
    sc = NearestScorer(depth, mask, h, h, valid=rng.uniform(size=(n, H, H)) < 0.8 if valid else None)
    z = np.round(rng.normal(size=(n, L, h, h)) * 3, 1)                             # many ties
    z[1, 2, 0, 0] = np.nan
    best, tau = sweep.tune_thresholds(sc, z)
    cands = [sweep.threshold_candidates(z[:, i]) for i in range(L)]
    one_pass = sweep.dice_at_thresholds(sc, z.reshape(n, L, -1), cands)
    for i in range(L):
        dice, b, t = _brute_tune(sc, z[:, i])
        np.testing.assert_array_equal(one_pass[i], dice)
        assert best[i] == b and tau[i] == t
        assert sweep.tune_threshold(sc, z[:, i]) == (b, t)


def test_one_pass_threshold_planted_cases():
    """Planted: logits that separate the salient pixels at τ ≈ 2 (and not at 0) reach Dice near 1 there; logits
    that are the mask's complement are best all-salient (τ below every logit); both equal brute-force scoring."""
    from sceneprobe.probe.metrics import NearestScorer
    rng = np.random.default_rng(1)
    n, H, h = 12, 8, 8
    mask = np.zeros((n, H, H), np.uint8)
    for i in range(n):
        y, x = rng.integers(1, 5, 2)
        mask[i, y:y + 3, x:x + 3] = 1
    sc = NearestScorer(rng.normal(size=(n, H, H)).astype(np.float32), mask, h, h)
    sep = np.where(mask > 0, 3.0, 1.0) + rng.uniform(-0.5, 0.5, (n, H, H))       # salient ⇔ logit > 2
    inv = np.where(mask > 0, -1.0, 1.0)                                             # anti-correlated
    for z in (sep, inv):
        _, b, t = _brute_tune(sc, z)
        assert sweep.tune_threshold(sc, z) == (b, t)
    b, t = sweep.tune_threshold(sc, sep)
    assert b > 0.95 and 1.0 <= t <= 3.0                     # the candidates are quantiles: near the gap, not in it
    b, t = sweep.tune_threshold(sc, inv)
    assert t < inv.min()                                                            # every pixel salient
