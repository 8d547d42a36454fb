"""The paper's trainer as a probe of the sweep (``probe.solver: adam``, for parity): Adam on Huber / 2-class CE with
the checkpoint of the lowest val loss (:func:`sceneprobe.probe.fit.fit_adam`), its threshold chosen on val as the
exact fit's."""
from __future__ import annotations

import torch

from ..capture.store import CaptureStore
from ..config import ProbeConfig
from . import fit
from .fitted_probe import Probe, layout_of
from .protocol_labels import ProtocolLabels
from .split_features import _features
from .thresholds import with_val_threshold


def fit_paper_adam(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, cfg: ProbeConfig) -> Probe:
    """The paper's trainer (Adam, Huber / 2-class CE, 30 epochs, batch 4); checkpoint chosen on val loss.

    Holds the train and val rows of one (site, step) in memory, as the paper's loader does. With ``probe.layout:
    input`` the layout channels are appended to the activations (Adam has no penalty to exempt them from)."""
    C, h, w = store.shape(site)
    layout = layout_of(labels, h, w, cfg)
    tr, va = labels.idx(0), labels.idx(1)
    xt, nbad = _features(store.read(site, step, tr))
    xv, _ = _features(store.read(site, step, va))
    if layout is not None:
        xt, xv = (torch.cat([x, layout.float()[None].expand(len(x), -1, -1, -1)], 1) for x in (xt, xv))
    common = dict(upsample=cfg.upsample, bias=cfg.bias, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                  seed=cfg.seed)
    rd = fit.fit_adam(xt, torch.from_numpy(labels.depth[tr]), xv, torch.from_numpy(labels.depth[va]), "depth", **common)
    rs = fit.fit_adam(xt, torch.from_numpy(labels.saliency[tr]), xv, torch.from_numpy(labels.saliency[va]), "saliency",
                      **common)
    theta_d = torch.cat([rd.weight[:, 0], rd.bias[:1]]) if cfg.bias else rd.weight[:, 0]
    wl = rs.weight[:, 1] - rs.weight[:, 0]                                     # 2-class softmax → logit difference
    theta_s = torch.cat([wl, (rs.bias[1] - rs.bias[0])[None]]) if cfg.bias else wl
    tau = 0.0
    if cfg.bias:
        theta_s, tau = with_val_threshold(store, site, step, labels, theta_s, layout)
    return Probe(theta_d, theta_s, torch.ones(xt.shape[1], dtype=torch.float64), (0.0, 0.0),
                 {"depth": ("epoch", float(rd.best_epoch)), "saliency": ("epoch", float(rs.best_epoch))}, nbad, tau,
                 layout)
