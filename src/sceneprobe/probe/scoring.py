"""Scoring a probe on val and test: every per-image metric of its native predictions (depth errors, rank and linear
correlations, ratio and relative errors, with and without sky; saliency Dice …), the position-only baseline's on the
same images, and depth skill over it."""
from __future__ import annotations

import numpy as np
import torch

from ..capture.store import CaptureStore
from ..config import ProbeConfig
from . import baselines as bl
from . import fit
from .fitted_probe import Probe
from .metrics import depth_ratio_metrics, nanmean
from .protocol_labels import SPLITS, ProtocolLabels
from .split_features import SplitFeatures, _predict


def native_metrics(labels: ProtocolLabels, code: int, h: int, w: int, zd: np.ndarray | None,
                   zs: np.ndarray | None) -> dict[tuple[str, str], np.ndarray]:
    """Every per-image metric (n,) of native predictions for the rows of split ``code``: ``zd`` (n, 1, h, w)
    standardised depth target, ``zs`` (n, 1, h', w') saliency logits (either may be None)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    if zd is not None:
        d = labels.scorer(code, h, w).depth(zd)
        ns = labels.nonsky_scorer(code, h, w).depth(zd)
        rows = labels.idx(code)
        H, W = labels.size
        up = fit.upsample_nearest(torch.from_numpy(np.array(zd[:, 0], dtype=np.float64)), H, W).numpy()  # a copy
        t_hat, t = labels.target_units(up), labels.target_units(labels.depth[rows].astype(np.float64))
        ratio_all, ratio_ns = depth_ratio_metrics(t_hat, t, None, ~labels.sky[rows])
        for suffix, m, ratio in (("", d, ratio_all), ("_nonsky", ns, ratio_ns)):
            out[("depth", "mse" + suffix)] = m["rmse"][:, 0] ** 2
            for k in ("rmse", "spearman", "pearson"):
                out[("depth", k + suffix)] = m[k][:, 0]
            for k, v in ratio.items():
                out[("depth", k + suffix)] = v
        out.update({("depth", k): v for k, v in relative_depth_errors(up, labels.depth[rows]).items()})
    if zs is not None:
        hs, ws = zs.shape[-2:]
        for k, v in labels.scorer(code, hs, ws).saliency(zs, ranking=True).items():
            out[("saliency", k)] = v[:, 0]
    return out


def relative_depth_errors(pred: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image errors that ignore what a per-image offset (and scale) explains, on standardised depth (n, H, W):

    * ``mse_centred`` = mean_p ((ŷ_p − ȳ̂) − (y_p − ȳ))²: the spatial error once each image's mean depth is removed
      (a third of the layout prior's error is the per-image mean);
    * ``mse_ssi`` = min_{a, b} mean_p (a·ŷ_p + b − y_p)² = var(y)·(1 − r²) (r = Pearson): the scale-and-shift-
      invariant error with which the field scores relative depth (MiDaS's least-squares alignment).
    Both become skills (``skill_centred``, ``skill_ssi``) over the position-only baseline like the headline."""
    p = pred.reshape(len(pred), -1).astype(np.float64)
    t = y.reshape(len(y), -1).astype(np.float64)
    pc, tc = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    mse_c = ((pc - tc) ** 2).mean(1)
    vp, vt, cov = (pc ** 2).mean(1), (tc ** 2).mean(1), (pc * tc).mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ssi = np.where(vp > 0, vt - cov ** 2 / np.where(vp > 0, vp, 1.0), vt)       # residual of the best a·ŷ + b
    return {"mse_centred": mse_c, "mse_ssi": np.maximum(ssi, 0.0)}


def skill(mse: np.ndarray, mse_ref: np.ndarray) -> float:
    """1 − Σ MSE / Σ MSE_ref over the images (both finite): the share of the reference's squared error removed."""
    ok = np.isfinite(mse) & np.isfinite(mse_ref)
    den = float(mse_ref[ok].sum())
    return 1.0 - float(mse[ok].sum()) / den if den > 0 else float("nan")


def prior_site(labels: ProtocolLabels, h: int, w: int) -> str:
    """Result-table name of the position-only baseline at h×w (``mean-map`` at the label resolution)."""
    return bl.MEAN_MAP if (h, w) == labels.size else bl.position_site(h, w)


def prior_metrics(labels: ProtocolLabels, code: int, h: int, w: int, upsample: str) -> dict:
    """Per-image metrics of the position-only baseline at h×w on split ``code`` (cached on the labels)."""
    key = ("metrics", code, h, w, upsample)
    if key not in labels._priors:
        pr = labels.prior(h, w, upsample)
        n = len(labels.idx(code))
        labels._priors[key] = native_metrics(labels, code, h, w, pr.depth_pred(n), pr.logits(n))
    return labels._priors[key]


def score(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, probe: Probe, cfg: ProbeConfig,
          device: torch.device | str = "cpu", feats: dict[int, SplitFeatures] | None = None,
          ) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str], np.ndarray]]:
    """({(task, split, metric): mean over images} on val and test, {(task, metric): per-test-image values}).

    Depth skill is over the position-only baseline at this site's native resolution, on the same images.
    ``feats``: split code → its activations (:class:`SplitFeatures`; read here when not given)."""
    out, per_image = {}, {}
    _, h, w = store.shape(site)
    feats = feats or {}
    for split, code in SPLITS.items():
        f = feats.get(code) or SplitFeatures(store, site, step, labels.idx(code))
        z = _predict(f, torch.stack([probe.depth, probe.saliency]).to(device), cfg.bias,
                     probe.layout).numpy()                                                      # (n, 2, h, w)
        m = native_metrics(labels, code, h, w, z[:, :1], z[:, 1:])
        ref = prior_metrics(labels, code, h, w, cfg.upsample)
        for task, metric in list(m):
            out[(task, split, metric)] = nanmean(m[(task, metric)])
        out[("depth", split, "skill")] = skill(m[("depth", "mse")], ref[("depth", "mse")])
        out[("depth", split, "skill_nonsky")] = skill(m[("depth", "mse_nonsky")], ref[("depth", "mse_nonsky")])
        for kind in ("centred", "ssi"):
            out[("depth", split, f"skill_{kind}")] = skill(m[("depth", f"mse_{kind}")], ref[("depth", f"mse_{kind}")])
        if split == "test":
            per_image = m
    for task, (name, value) in probe.selected.items():
        out[(task, "val", name)] = value
    out[("saliency", "val", "threshold")] = probe.threshold
    return out, per_image
