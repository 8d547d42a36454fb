"""Image read-out per step: the labeller applied to the decoded x̂₀ of every denoising step, scored like the probes.

The paper's central argument is that the probe knows the scene *before the image shows it*. The fair comparison is
not "probe vs noise" but "probe vs what a good image model can read from the step's best guess of the image": the
decoded x̂₀ = ``scheduler.step(...).pred_original_sample`` of the trained U-Net at step i (written by the capture of
the ``ldm`` store for its test rows, ``captures/<protocol>/ldm/x0/step_XX/<id>.png``). The labeller labels those
images; they are scored per test image against the same labels as the probes (``captures/<protocol>/labels.safetensors``:
the labeller's labels of the *final* image for ``generate``, exact labels for ``noised``). Where the probe curve is
above this read-out curve, the activations hold scene information the image does not (yet) show.

Which labeller reads x̂₀ matters in ``generate``: if it is the one that made the labels, the last steps' x̂₀ is (almost)
the final image and the read-out scores itself (Dice ≈ 1 by construction). The study therefore reads x̂₀ with a second,
independent labeller (``run/labeller_readout/``: another seed, architecture and training world; ``readout.labeller``);
its last-step value is then the *agreement of two labellers* on the final image, the ceiling any curve scored against
these labels can reach. Each row records who made the labels (``labels_by``: a labeller folder's name, or ``exact``)
and who made the read-out (``readout_by``).

Metrics per (step, test image) — the probes' definitions (:mod:`sceneprobe.probe.metrics`):

* saliency (the labeller's mask = logit > 0, its own decision rule): ``dice``, ``iou``; threshold-free on its logit:
  ``auroc``, ``ap`` (average precision), NaN for an image whose label mask is empty or full;
* depth, standardised with the mean and std of the label depth over the *train* rows (as the probe sweep does),
  y = (g(d) − μ)/σ with g the probes' ``probe.depth_target`` (identity, or 1/d for ``inverse``): ``mse``, ``rmse``, ``pearson``, ``spearman``; the same over non-sky pixels (label depth
  < ``SKY_FRACTION``·far depth): ``mse_nonsky``, ``rmse_nonsky``, ``spearman_nonsky``; on raw depth (same units as the
  labels): ``absrel`` = mean |d̂ − d|/d and ``delta1`` = fraction with max(d̂/d, d/d̂) < 1.25, and their ``_nonsky``
  versions. A skill over a layout prior is 1 − Σ mse / Σ mse_prior over the same images (per-image ``mse`` here).

File ``run/readout/<protocol>.csv`` (long form, sorted, fixed formatting)::

    protocol, step, timestep, row, sample_id, task, metric, value, labels_by, readout_by

``row`` is the store row (aligned with ``labels.safetensors`` and every capture store of the protocol): the test rows,
``np.flatnonzero(split == 2)``, in increasing order — the same images, in the same order, as the probes' per-test-image
values, so a paired bootstrap of probe − read-out is a plain difference of aligned arrays. ``run/readout/<protocol>.json``
holds what was labelled with which labeller and how depth was standardised.

Read it with :func:`load_readout` (``Readout.values[(task, metric)]`` is a (steps, n_test) float64 array).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_json, atomic_write_text
from ..errors import fail

SKY_FRACTION = 0.99          # a label pixel with depth ≥ 0.99 · far depth is sky
COLUMNS = ("protocol", "step", "timestep", "row", "sample_id", "task", "metric", "value", "labels_by", "readout_by")
SALIENCY_METRICS = ("dice", "iou", "auroc", "ap")
DEPTH_METRICS = ("mse", "rmse", "pearson", "spearman", "mse_nonsky", "rmse_nonsky", "spearman_nonsky", "absrel",
                 "delta1", "absrel_nonsky", "delta1_nonsky")


@dataclass
class Readout:
    """The read-out curve data of one protocol: per (task, metric) a (steps, n_test) array over aligned test images."""
    protocol: str
    steps: list[int]
    timesteps: list[int]
    rows: np.ndarray                 # (n_test,) store rows, increasing
    sample_ids: np.ndarray           # (n_test,)
    values: dict[tuple[str, str], np.ndarray]
    labels_by: str = ""              # who made the labels: a labeller folder's name, or "exact" (rendered labels)
    readout_by: str = ""             # which labeller read each step's x̂₀ (a folder name)

    @property
    def site(self) -> str:
        """The read-out's name in results.csv: ``<readout labeller>(x0)``."""
        return f"{self.readout_by or 'labeller'}(x0)"

    def curve(self, task: str, metric: str) -> np.ndarray:
        """Mean over test images (NaN-aware) per step, (steps,)."""
        v = self.values[(task, metric)]
        with np.errstate(all="ignore"):
            return np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in v])


def readout_path(run: Path, protocol: str) -> Path:
    return Path(run) / "readout" / f"{protocol}.csv"


# ------------------------------------------------------------------------------------------------------- metrics
def _label(labeller, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(depth (n, H, W), saliency logits (n, H, W) or None, mask (n, H, W) bool) from uint8 images."""
    from .model import Labeller, images_to_tensor, label_images
    if not isinstance(labeller, Labeller):
        lab = label_images(labeller, images, batch)
        sal = lab.get("saliency")
        return lab["depth"], None, (np.zeros_like(lab["depth"], bool) if sal is None else sal.astype(bool))
    labeller.eval()
    depth, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out = labeller(images_to_tensor(images[i:i + batch]))
            depth.append(out.depth.float().numpy())
            logits.append(out.saliency_logits.float().numpy())
    d, z = np.concatenate(depth), np.concatenate(logits)
    return d, z, z > 0


def _masked_mse(p: np.ndarray, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    err = np.where(keep, (p - t) ** 2, 0.0).reshape(len(p), -1).sum(1)
    cnt = keep.reshape(len(p), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, err / np.maximum(cnt, 1), np.nan)


def _masked_spearman(p: np.ndarray, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    from ..probe.metrics import spearman
    out = np.full(len(p), np.nan)
    for i in range(len(p)):
        k = keep[i].reshape(-1)
        if k.sum() >= 2:
            out[i] = spearman(p[i].reshape(1, -1)[:, k], t[i].reshape(1, -1)[:, k])[0]
    return out


def _rel_metrics(pred: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image AbsRel and δ<1.25 over the pixels ``keep`` (raw, positive depth)."""
    d = np.maximum(truth.astype(np.float64), 1e-6)
    p = np.maximum(pred.astype(np.float64), 1e-6)
    n = keep.reshape(len(d), -1).sum(1)
    absrel = np.where(keep, np.abs(p - d) / d, 0.0).reshape(len(d), -1).sum(1)
    delta = np.where(keep, np.maximum(p / d, d / p) < 1.25, False).reshape(len(d), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, absrel / np.maximum(n, 1), np.nan), np.where(n > 0, delta / np.maximum(n, 1), np.nan)


def _ranking(logits: np.ndarray | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image AUROC and average precision of the saliency logits (NaN without logits or with a one-class mask)."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    n = len(mask)
    auroc, ap = np.full(n, np.nan), np.full(n, np.nan)
    if logits is None:
        return auroc, ap
    for i in range(n):
        y = mask[i].reshape(-1).astype(bool)
        if 0 < y.sum() < y.size:
            s = logits[i].reshape(-1).astype(np.float64)
            auroc[i], ap[i] = roc_auc_score(y, s), average_precision_score(y, s)
    return auroc, ap


def depth_target(d: np.ndarray, target: str = "depth") -> np.ndarray:
    """What depth probes predict: depth itself, or 1/depth (``inverse``, MiDaS's convention), float64."""
    d = np.asarray(d, np.float64)
    if target not in ("depth", "inverse"):
        raise fail(f"depth target {target!r} is unknown; choose depth or inverse")
    return d if target == "depth" else 1.0 / np.maximum(d, 1e-3)


def score_readout(depth_pred: np.ndarray, logits: np.ndarray | None, mask_pred: np.ndarray, depth_true: np.ndarray,
                  mask_true: np.ndarray, mean: float, std: float, far_depth: float,
                  target: str = "depth") -> dict[tuple[str, str], np.ndarray]:
    """Per-image read-out metrics (see the module docstring) of one step: {(task, metric): (n,)}.

    ``mean``, ``std`` standardise ``depth_target(d, target)``; AbsRel and δ use the raw depths."""
    from ..probe.metrics import dice, iou, pearson, rmse, spearman
    p = (depth_target(depth_pred, target) - mean) / std
    t = (depth_target(depth_true, target) - mean) / std
    nonsky = depth_true < SKY_FRACTION * far_depth
    everything = np.ones_like(nonsky)
    mse = ((p - t) ** 2).reshape(len(p), -1).mean(1)
    mse_ns = _masked_mse(p, t, nonsky)
    absrel, delta1 = _rel_metrics(depth_pred, depth_true, everything)
    absrel_ns, delta1_ns = _rel_metrics(depth_pred, depth_true, nonsky)
    auroc, ap = _ranking(logits, mask_true)
    return {("saliency", "dice"): dice(mask_pred, mask_true), ("saliency", "iou"): iou(mask_pred, mask_true),
            ("saliency", "auroc"): auroc, ("saliency", "ap"): ap,
            ("depth", "mse"): mse, ("depth", "rmse"): rmse(p, t), ("depth", "pearson"): pearson(p, t),
            ("depth", "spearman"): spearman(p, t), ("depth", "mse_nonsky"): mse_ns,
            ("depth", "rmse_nonsky"): np.sqrt(mse_ns), ("depth", "spearman_nonsky"): _masked_spearman(p, t, nonsky),
            ("depth", "absrel"): absrel, ("depth", "delta1"): delta1, ("depth", "absrel_nonsky"): absrel_ns,
            ("depth", "delta1_nonsky"): delta1_ns}


# ---------------------------------------------------------------------------------------------------------- stage
def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.6g}"


def _name(path) -> str:
    return Path(str(path)).name if str(path or "") else "labeller"


def _weights_hash(path) -> str | None:
    """Hash of a labeller folder's weights file (None when there is none to read)."""
    import hashlib
    f = Path(str(path or "")) / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if str(path or "") and f.is_file() else None


def labels_provenance(protocol_root: Path, protocol: str) -> dict:
    """Who made a protocol's labels: ``{"by": name, "path": folder or None}`` (``labels.json`` beside the labels of
    ``generate``; ``noised`` labels are the renderer's, ``by`` = ``exact``)."""
    if protocol != "generate":
        return {"by": "exact", "path": None}
    try:
        info = json.loads((Path(protocol_root) / "labels.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"by": "labeller", "path": None}
    path = info.get("saliency_labeller") or info.get("depth_labeller") or None
    return {"by": _name(path) if path else "labeller", "path": path}


def run_readout(run: Path, protocol: str, labeller, target: str = "depth") -> Path:
    """Label every step's x̂₀ of the ``ldm`` store's test rows and write ``run/readout/<protocol>.csv`` (+ ``.json``).

    ``labeller`` reads x̂₀; the labels are whatever ``captures/<protocol>/labels.safetensors`` holds (``labels.json``
    says who made them). Where the two are one labeller (same folder or same weights) in ``generate``, the ``.json``
    says the read-out scores itself (``readout_is_labels_labeller``)."""
    from PIL import Image

    from ..capture.images import x0_image_path
    from ..capture.store import CaptureStore, load_labels
    run = Path(run)
    store = CaptureStore(run / "captures" / protocol / "ldm")
    ro = store.manifest.get("readout")
    if not ro:
        raise fail(f"capture store {store.root} has no x̂₀ read-out images; recapture it with this version of "
                   f"sceneprobe (`sceneprobe capture --force`)")
    labels = load_labels(store.root.parent)
    split = np.asarray(labels["split"])
    rows = np.flatnonzero(split == 2)
    if list(rows) != list(ro["rows"]):
        raise fail(f"read-out rows of {store.root} do not match the test rows of {store.root.parent / 'labels.safetensors'}"
                   f"; recapture and relabel")
    if getattr(labeller, "depth_kind", "depth") != "depth":
        raise fail("the image read-out needs a labeller whose depth is camera-space z (the run's labeller), not a "
                   "relative inverse-depth model")
    train = depth_target(labels["depth"][split == 0], target)
    mean, std = float(train.mean()), float(train.std()) or 1.0
    far = float(getattr(getattr(labeller, "config", None), "far_depth", 0) or 0) or _far_depth()
    ids = [int(store.manifest["sample_ids"][r]) for r in rows]
    made = labels_provenance(store.root.parent, protocol)
    rpath = getattr(labeller, "path", None)
    readout_by = _name(rpath)
    same = protocol == "generate" and bool(made["path"]) and bool(rpath) and (
        Path(str(made["path"])).resolve() == Path(str(rpath)).resolve()
        or (_weights_hash(made["path"]) is not None and _weights_hash(made["path"]) == _weights_hash(rpath)))
    d_true, m_true = labels["depth"][rows].astype(np.float64), labels["saliency"][rows].astype(bool)
    out_rows = []
    for step, timestep in zip(store.steps, store.timesteps):
        paths = [x0_image_path(store.root, step, i) for i in ids]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise fail(f"read-out image {missing[0]} is missing; rerun the capture with --force")
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        d, z, m = _label(labeller, images)
        vals = score_readout(d, z, m, d_true, m_true, mean, std, far, target)
        for (task, metric), v in vals.items():
            for k, (r, sid) in enumerate(zip(rows, ids)):
                out_rows.append((protocol, step, timestep, int(r), sid, task, metric, float(v[k])))
    out_rows.sort(key=lambda x: (x[5], x[6], x[1], x[3]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in out_rows:
        w.writerow([*map(str, r[:7]), _fmt(r[7]), made["by"], readout_by])
    final = _final_image_scores(store.root.parent, rows, labeller, d_true, m_true, mean, std, far, target) \
        if protocol == "generate" else None
    path = readout_path(run, protocol)
    atomic_write_text(path, buf.getvalue())
    atomic_write_json(path.with_suffix(".json"), {
        "protocol": protocol, "what": "labeller on the decoded x0 (scheduler.step pred_original_sample) of each step",
        "labels": "labeller on the final image" if protocol == "generate" else "exact (rendered) labels",
        "labeller": str(rpath or ""), "labels_by": made["by"], "labels_labeller": made["path"],
        "readout_by": readout_by, "readout_is_labels_labeller": same,
        "last_step": ("the read-out labeller is the labels' labeller: its last steps score ≈ 1 by construction"
                      if same else "agreement of two different labellers on (almost) the final image"
                      if protocol == "generate" else "the read-out labeller against exact labels"),
        "n_test": int(len(rows)), "steps": store.steps,
        "depth_standardisation": {"mean": mean, "std": std, "target": target,
                                  "from": "label depth (or 1/depth for target inverse) over the train rows"},
        "sky": f"label depth >= {SKY_FRACTION} * {far}", "saliency_rule": "labeller logit > 0",
        "final_image": final})
    return path


def _final_image_scores(protocol_root: Path, rows: np.ndarray, labeller, d_true, m_true, mean, std, far,
                        target) -> dict | None:
    """The read-out labeller on the *final* generated images of the test rows (``samples.safetensors``), scored like a
    step against the labels (means over images): with the labels' labeller this is 1 by construction, with another
    one it is the two labellers' agreement — the ceiling of the read-out curve."""
    from safetensors.numpy import load_file
    path = Path(protocol_root) / "samples.safetensors"
    if not path.is_file():
        return None
    images = load_file(str(path))["images"][rows]
    d, z, m = _label(labeller, images)
    vals = score_readout(d, z, m, d_true, m_true, mean, std, far, target)
    from ..probe.metrics import nanmean
    return {"what": "read-out labeller on the final generated images (test rows) vs the labels",
            **{f"{task}_{metric}": nanmean(v) for (task, metric), v in vals.items()}}


def _far_depth() -> float:
    from ..world.render import FAR_DEPTH
    return float(FAR_DEPTH)


def load_readout(run: Path, protocol: str) -> Readout | None:
    """The read-out of ``run/readout/<protocol>.csv``, or None when the file does not exist (no read-out stage)."""
    path = readout_path(run, protocol)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        recs = list(csv.DictReader(f))
    if not recs:
        raise fail(f"read-out file {path} is empty; rerun `sceneprobe run` to rebuild it")
    steps = sorted({int(r["step"]) for r in recs})
    ts = {int(r["step"]): int(r["timestep"]) for r in recs}
    rows = np.array(sorted({int(r["row"]) for r in recs}))
    sid = {int(r["row"]): int(r["sample_id"]) for r in recs}
    si, ri = {s: i for i, s in enumerate(steps)}, {r: i for i, r in enumerate(rows)}
    values: dict[tuple[str, str], np.ndarray] = {}
    for r in recs:
        key = (r["task"], r["metric"])
        if key not in values:
            values[key] = np.full((len(steps), len(rows)), np.nan)
        values[key][si[int(r["step"])], ri[int(r["row"])]] = float(r["value"])
    first = recs[0]
    return Readout(protocol, steps, [ts[s] for s in steps], rows, np.array([sid[r] for r in rows]), values,
                   labels_by=first.get("labels_by") or "", readout_by=first.get("readout_by") or "")


def readout_info(run: Path, protocol: str) -> dict | None:
    """``run/readout/<protocol>.json`` (what was labelled, how depth was standardised), or None."""
    try:
        return json.loads(readout_path(run, protocol).with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


__all__ = ["Readout", "depth_target", "labels_provenance", "load_readout", "readout_info", "readout_path", "run_readout", "score_readout"]
