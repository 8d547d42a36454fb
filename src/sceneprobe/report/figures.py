"""Report figures (matplotlib, Agg): site × step heatmaps, best-site curves per step, probe predictions vs truth."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..errors import SceneprobeError  # noqa: E402
from ..probe.metrics import HEADLINE  # noqa: E402
from .results_index import MAIN_MODEL, Results, baseline_label, group_label  # noqa: E402

DPI = 100
LIMITS = {"dice": (0.0, 1.0), "spearman": (-0.2, 1.0), "skill": (-0.5, 1.0)}
STYLE = {("ldm", "unet"): ("C0", "-", "o"), ("ldm", "vae.dec"): ("C1", "-", "s"), ("ldm", "vae.enc"): ("C1", ":", "x"),
         ("permuted", "unet"): ("C3", "--", "v"), ("fresh", "unet"): ("C2", "--", "^"),
         ("permuted", "vae.dec"): ("C5", "--", "<"), ("fresh", "vae.dec"): ("C4", "--", ">"),
         ("ldm", "input"): ("k", "-.", "d")}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # fixed metadata: the same results give the same bytes
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def heatmap(res: Results, protocol: str, task: str, out: Path) -> Path:
    """One panel per model: rows = sites, columns = steps, colour = test headline metric."""
    metric = HEADLINE[task]
    models = res.models(protocol)
    steps = res.steps(protocol)
    sites = sorted({s for m in models for s in res.sites(protocol, m)})
    fig, axes = plt.subplots(1, len(models), figsize=(2.0 + (0.9 + 0.42 * len(steps)) * len(models),
                                                      1.4 + 0.4 * len(sites)),
                             squeeze=False, sharey=True, layout="constrained")
    lo, hi = LIMITS.get(metric, (None, None))
    im = None
    for k, (ax, model) in enumerate(zip(axes[0], models)):
        grid = np.full((len(sites), len(steps)), np.nan)
        for i, s in enumerate(sites):
            for j, st in enumerate(steps):
                v = res.get(protocol, model, s, st, task, "test")
                grid[i, j] = np.nan if v is None else v
        im = ax.imshow(grid, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_yticks(range(len(sites)), sites, fontsize=7)
        ax.tick_params(labelleft=k == 0)
        ax.set_xlabel("step (0 = noisiest)", fontsize=8)
        ax.set_title(model, fontsize=9)
        if grid.size <= 400:
            for (i, j), v in np.ndenumerate(grid):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if (hi is None or v < (lo + hi) / 2) else "black")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=f"test {metric}")
    fig.suptitle(f"{protocol}: {task} probes, test {metric} per site and step", fontsize=10)
    return _save(fig, out / f"heatmap_{protocol}_{task}.png")


def curves(res: Results, protocol: str, task: str, out: Path, findings: dict | None = None) -> Path:
    """Test headline metric of the val-chosen best site per step, one line per (model, site family), the U-Net's
    95 % CI as a band, the strongest baseline dotted and (where there is one) the image read-out dashed."""
    metric = HEADLINE[task]
    f = findings or {}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for model, fam in res.groups(protocol):
        c = res.curve(protocol, model, fam, task)
        if not c:
            continue
        color, ls, mk = STYLE.get((model, fam), (None, ":", "."))
        ax.plot([p.step for p in c], [p.test for p in c], ls, marker=mk, color=color, label=group_label(model, fam))
    band = f.get("emergence", {}).get(task, {}).get("curve", [])
    if band:
        ax.fill_between([p.step for p, _ in band], [e.lo for _, e in band], [e.hi for _, e in band], color="C0",
                        alpha=0.15, lw=0, label="U-Net, pointwise 95 % CI")
    ro = f.get("readout", {}).get(task, [])
    if ro:
        ax.plot([st for st, _, _ in ro], [r.mean for _, r, _ in ro], "--", color="k", marker=".",
                label="image read-out (labeller on x̂₀)" + (" vs mean map" if task == "depth" else ""))
    s = f.get("strongest", {}).get(task)
    base = res.baseline(protocol, s, task) if s else None
    if base is not None and task == "depth":
        # skill of the strongest baseline over the position-only probe is not one number: skill 0 = layout prior
        ax.axhline(0.0, color="grey", ls=":", label="position-only baseline (skill 0)")
    elif base is not None:
        ax.axhline(base, color="grey", ls=":", label=f"strongest baseline: {baseline_label(s)}")
    ax.set_xlabel("denoising step (0 = noisiest)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"test {metric} (best site on val)")
    lo, hi = LIMITS.get(metric) or (None, None)
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float) if np.isfinite(y)]
    if lo is not None and ys and min(ys) < lo:           # every named curve stays inside the axes
        lo = min(ys) - 0.05
    ax.set_ylim(lo, hi)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes: it covers no curve
    ax.set_title(f"{protocol}: {task}", fontsize=10)
    return _save(fig, out / f"curves_{protocol}_{task}.png")


def _to_rgb(images: np.ndarray) -> np.ndarray:
    """Any of (N, H, W, 3) / (N, 3, H, W), uint8 / [0, 1] / [−1, 1] floats → (N, H, W, 3) float in [0, 1]."""
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(0, 2, 3, 1)
    a = a.astype(np.float32)
    if a.max() > 1.5:
        a = a / 255.0
    elif a.min() < -0.01:
        a = (a + 1) / 2
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return np.clip(a, 0, 1)


def load_images(run: Path, protocol: str) -> np.ndarray | None:
    """generate: ``captures/generate/samples.safetensors['images']``; otherwise ``labels.safetensors['rgb']``."""
    from safetensors import safe_open
    root = Path(run) / "captures" / protocol
    for path, key in ((root / "samples.safetensors", "images"), (root / "labels.safetensors", "rgb")):
        if path.is_file():
            with safe_open(str(path), framework="np") as f:
                if key in f.keys():
                    return _to_rgb(f.get_tensor(key))
    return None


def predictions(run: Path, protocol: str, model: str, site: str, step: int,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(standardised depth (n, h, w), saliency logit (n, h, w)) of a saved probe on the given store rows."""
    from safetensors.torch import load_file

    from ..capture.store import CaptureStore
    from ..probe.sweep import probe_path
    t = load_file(str(probe_path(run, protocol, model, site, step)))
    x = CaptureStore(Path(run) / "captures" / protocol / model).read(site, step, rows).double()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    wd, ws = t["depth.weight"].double()[:, 0], t["saliency.weight"].double()
    d = torch.einsum("nchw,c->nhw", x, wd) + t["depth.bias"].double()[0]
    s = torch.einsum("nchw,c->nhw", x, ws[:, 1] - ws[:, 0]) + (t["saliency.bias"][1] - t["saliency.bias"][0]).double()
    return d.numpy(), s.numpy()


def prediction_grid(run: Path, res: Results, protocol: str, out: Path, n_images: int = 4) -> Path | None:
    """Test images: RGB (if available), true depth, depth probe at early/middle/late steps, true mask, mask probe.

    The site per task is the U-Net's best on val (over all steps); steps are the first, middle and last."""
    from ..probe.fit import upsample_nearest
    from ..probe.sweep import load_protocol_labels
    bd, bs = res.best(protocol, MAIN_MODEL, "unet", "depth"), res.best(protocol, MAIN_MODEL, "unet", "saliency")
    if bd is None or bs is None:
        return None
    labels = load_protocol_labels(Path(run) / "captures" / protocol)
    rows = labels.idx(2)[:n_images]
    steps = res.steps(protocol, MAIN_MODEL)
    picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    images = load_images(run, protocol)
    H, W = labels.size
    cols: list[tuple[str, np.ndarray, dict]] = []
    if images is not None and len(images) == len(labels.split):
        cols.append(("image", images[rows], {}))
    dkw = dict(cmap="magma_r", vmin=float(labels.depth[rows].min()), vmax=float(labels.depth[rows].max()))
    mkw = dict(cmap="gray", vmin=0, vmax=1)
    try:
        dp = [upsample_nearest(torch.from_numpy(predictions(run, protocol, MAIN_MODEL, bd.site, st, rows)[0]), H, W)
              for st in picks]
        sp = [upsample_nearest(torch.from_numpy(predictions(run, protocol, MAIN_MODEL, bs.site, st, rows)[1]), H, W)
              for st in picks]
    except (FileNotFoundError, SceneprobeError):                               # probes or captures removed since
        return None
    cols.append(("depth (truth)", labels.depth[rows], dkw))
    cols += [(f"depth probe\nstep {st}", d.numpy(), dkw) for st, d in zip(picks, dp)]
    cols.append(("mask (truth)", labels.saliency[rows], mkw))
    cols += [(f"mask probe\nstep {st}", s.numpy() > 0, mkw) for st, s in zip(picks, sp)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.25 * len(cols), 1.3 * len(rows) + 0.6), squeeze=False)
    for j, (title, arr, kw) in enumerate(cols):
        for i in range(len(rows)):
            ax = axes[i, j]
            ax.imshow(arr[i].astype(np.float32), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"{protocol}: test images; depth site {bd.site}, saliency site {bs.site}", fontsize=8)
    return _save(fig, out / f"predictions_{protocol}.png")
