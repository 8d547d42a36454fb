"""Train the labeller on rendered scenes with exact labels, and score it on held-out scenes.

Loss per batch (random horizontal flips; depth and masks flip with the image)::

    L = mean |z − ẑ| + BCE(s, ŝ),   z = (log d − μ) / σ   (μ, σ: log-depth statistics of the training split)

L1 on standardised log-depth treats a 10 % error the same near and far; BCE is the saliency head's 2-class loss.

Held-out metrics (:func:`evaluate_labeller`, per image then averaged, as for the probes): depth RMSE in standardised
units — prediction and truth both mapped by ``(d − mean) / std`` with the mean and std of the *true* depth over the
scored images —, Spearman ρ and Pearson r; saliency Dice and IoU of ``logit > 0``. A relative-inverse-depth model
(DPT) is scored against inverse depth 1/z, each side standardised by its own mean and std (its scale and shift are
arbitrary); Spearman ρ is unaffected by that choice.

Files: ``out/`` (diffusers folder, ``training.json`` inside: config, seeds, data, command, metrics, wall time) and
``out.parent/train_<out.name>/`` (``checkpoint.pt``, ``metrics.jsonl``, ``eval.json``, ``config.yaml``) unless
``train_dir`` says otherwise.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text
from ..config import Config, dump_yaml, to_dict
from ..errors import fail
from ..models.io import save_model
from ..train.loop import LoopSpec, on_model_device, train_loop
from ..world.render import FAR_DEPTH
from .model import Labeller, label_images

MIN_DEPTH = 1e-3
# Knobs that LabellerConfig may not (yet) carry: used when the config section lacks them.
DEFAULTS = {"layers_per_block": 1, "norm_num_groups": 8, "lr_min_ratio": 0.05, "checkpoint_every": 250, "log_every": 25}


def _opt(lc, key: str):
    return getattr(lc, key, DEFAULTS[key])


def check_labelled(data, what: str = "training") -> None:
    """The labeller learns from, and is scored on, depth and saliency labels: both must be there."""
    for name, arr in (("depth", data.depth), ("saliency", data.saliency)):
        if arr is None:
            raise fail(f"dataset {data.root} has no {name} labels ({name}/ folder), needed for {what} the labeller; "
                       f"render scenes with `sceneprobe scenes` or add {name}/ files")


def heldout(data):
    """The test split, else the validation split; an error when neither has images."""
    for split in ("test", "val"):
        sub = data.subset(split)
        if len(sub):
            return sub
    raise fail(f"dataset {data.root} has no test or val images to score the labeller on; add a split.json with a "
               f"test split or render more scenes")


def labeller_loss(model, rgb: torch.Tensor, depth: torch.Tensor, sal: torch.Tensor, g: torch.Generator, batch: int):
    """One random batch (with horizontal flips) from uint8 images (N, 3, H, W), depth (N, H, W), masks (N, H, W)."""
    idx = torch.randint(len(rgb), (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    x = rgb[idx].float().div(127.5).sub(1.0)                         # (B, 3, H, W)
    d, s = depth[idx], sal[idx].float()                              # (B, H, W)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    d = torch.where(flip[:, None, None], d.flip(-1), d)
    s = torch.where(flip[:, None, None], s.flip(-1), s)
    c = model.config if hasattr(model, "config") else model.module.config
    x, d, s = on_model_device(model, x, d, s)
    z = (d.clamp(MIN_DEPTH, c.far_depth).log() - c.log_depth_mean) / c.log_depth_std
    out = model(x)
    l_depth = (out.log_depth_z - z).abs().mean()
    l_sal = F.binary_cross_entropy_with_logits(out.saliency_logits, s)
    return l_depth + l_sal, {"depth_l1": float(l_depth.detach()), "saliency_bce": float(l_sal.detach())}


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean()) / (x.std() or 1.0)


def evaluate_labeller(labeller, data, batch: int = 64, images: np.ndarray | None = None,
                      pred: dict | None = None) -> dict:
    """Scores of ``labeller`` on ``data``'s held-out split (test, else val); a dict of floats for the report.

    ``images`` (optional, (n, H, W, 3) uint8, the held-out images in the same order) are labelled instead of the
    clean renders, e.g. their VAE reconstructions; the truth stays the renders' exact labels. ``pred``: the
    labeller's :func:`label_images` of those images, when the caller already has it."""
    from ..probe.metrics import depth_metrics, nanmean, saliency_metrics   # pure numpy; no stage state
    check_labelled(data, "scoring")
    test = heldout(data)
    if images is not None and images.shape != test.rgb.shape:
        raise fail(f"images to score the labeller on have shape {images.shape}, but the held-out split has "
                   f"{test.rgb.shape}")
    if pred is None:
        pred = label_images(labeller, test.rgb if images is None else images, batch=batch)
    truth = test.depth.astype(np.float64)
    kind = getattr(labeller, "depth_kind", "depth")
    if kind == "depth":
        mean, std = truth.mean(), truth.std() or 1.0
        p, t = (pred["depth"] - mean) / std, (truth - mean) / std
    else:                                                            # relative inverse depth: compare with 1/z
        p, t = _standardise(pred["depth"]), _standardise(1.0 / np.clip(truth, MIN_DEPTH, None))
    res = {"split": str(test.split[0]), "n_images": len(test), "depth_kind": kind,
           **{f"depth_{k}": nanmean(v) for k, v in depth_metrics(p, t).items()}}
    if pred.get("saliency") is not None:
        res.update({f"saliency_{k}": nanmean(v) for k, v in saliency_metrics(pred["saliency"], test.saliency).items()})
    return res


@torch.no_grad()
def vae_reconstructions(vae, rgb: np.ndarray, batch: int = 32) -> np.ndarray:
    """uint8 images (n, H, W, 3) → their VAE reconstructions decode(to_latent(mode q(z|x))), uint8 (n, H, W, 3).

    What the generate protocol's images are made of: the labeller labels decoded latents, not renders."""
    from .model import images_to_tensor
    from ..sample import decode, to_latent, to_uint8
    vae.eval()
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(rgb), batch):
        x = images_to_tensor(rgb[i:i + batch]).to(dev)                             # (b, 3, H, W) in [−1, 1]
        z = to_latent(vae, vae.encode(x).latent_dist.mode())                       # (b, c, h, w) diffusion space
        out.append(to_uint8(decode(vae, z)))
    return np.concatenate(out)


@dataclass
class HeldoutViews:
    """The held-out renders' VAE reconstructions ``recon`` (n, H, W, 3) uint8 and one labeller's
    :func:`label_images` of both image sets (``labels["clean"]``, ``labels["vae_reconstruction"]``): what
    :func:`labeller_provenance` and :func:`readout_labeller_provenance` both need, made once for both."""
    recon: np.ndarray
    labels: dict[str, dict]


def heldout_views(labeller, data, vae, batch: int = 64) -> HeldoutViews:
    """``labeller``'s labels of ``data``'s held-out renders and of the run's VAE reconstructions of them."""
    test = heldout(data)
    recon = vae_reconstructions(vae, test.rgb)
    return HeldoutViews(recon, {k: label_images(labeller, im, batch)
                                for k, im in (("clean", test.rgb), ("vae_reconstruction", recon))})


def labeller_provenance(labeller, data, vae, batch: int = 64, views: HeldoutViews | None = None) -> dict:
    """The labeller's accuracy on the held-out scenes as rendered (``clean``) and as the run's VAE reconstructs them
    (``vae_reconstruction``), against the renders' exact labels — the second bounds what the labeller's labels of
    generated images (the ``generate`` protocol's labels) can be trusted for. Keys of each: those of
    :func:`evaluate_labeller` (``depth_rmse``, ``depth_spearman``, ``depth_pearson``, ``saliency_dice``,
    ``saliency_iou``, ``n_images``, ``split``, ``depth_kind``). ``views``: ``labeller``'s :func:`heldout_views`,
    when the caller already has them."""
    views = views or heldout_views(labeller, data, vae, batch)
    return {"what": "labeller vs exact labels of held-out rendered scenes: clean renders and their VAE "
                    "reconstructions (decode(to_latent(mode q(z|x))))",
            "clean": evaluate_labeller(labeller, data, batch, pred=views.labels["clean"]),
            "vae_reconstruction": evaluate_labeller(labeller, data, batch, images=views.recon,
                                                    pred=views.labels["vae_reconstruction"])}


def labeller_agreement(reference, other, images: np.ndarray, batch: int = 64,
                       labels: tuple[dict, dict] | None = None) -> dict:
    """How far two labellers agree on the same uint8 images (n, H, W, 3): ``other`` scored with ``reference``'s
    labels as the truth, by :func:`evaluate_labeller`'s rules (depth standardised by the reference depth's mean and
    std over the images; Spearman ρ, Pearson r, RMSE per image; saliency Dice and IoU of the two masks), averaged
    over images. The ceiling of a read-out by ``other`` scored against labels made by ``reference``. ``labels``:
    both labellers' :func:`label_images` of ``images`` (reference's, other's), when the caller already has them."""
    from ..probe.metrics import depth_metrics, nanmean, saliency_metrics
    if labels is None:
        labels = label_images(reference, images, batch), label_images(other, images, batch)
    a, b = labels
    t = a["depth"].astype(np.float64)
    mean, std = t.mean(), t.std() or 1.0
    res = {"n_images": int(len(images)),
           **{f"depth_{k}": nanmean(v) for k, v in depth_metrics((b["depth"] - mean) / std, (t - mean) / std).items()}}
    res.update({f"saliency_{k}": nanmean(v) for k, v in saliency_metrics(b["saliency"], a["saliency"]).items()})
    return res


def readout_labeller_provenance(labeller, reader, data, vae, batch: int = 64,
                                views: HeldoutViews | None = None) -> dict:
    """The read-out labeller (``reader``) beside the labels' labeller on the run's held-out scenes: each against the
    exact labels, and ``reader`` against ``labeller`` (:func:`labeller_agreement`), on the clean renders and on the
    run's VAE reconstructions of them. ``views``: ``labeller``'s :func:`heldout_views`, when the caller already has
    them (:func:`labeller_provenance` needs the same)."""
    test = heldout(data)
    views = views or heldout_views(labeller, data, vae, batch)
    recon = views.recon
    # each labeller labels each image set once; the scores and the agreements share those labels
    ref = views.labels
    read = {k: label_images(reader, im, batch) for k, im in (("clean", test.rgb), ("vae_reconstruction", recon))}
    return {"what": "read-out labeller vs exact labels, and vs the labels' labeller (agreement: the labels' labeller "
                    "as the truth), on held-out rendered scenes and their VAE reconstructions",
            "clean": evaluate_labeller(reader, data, batch, pred=read["clean"]),
            "vae_reconstruction": evaluate_labeller(reader, data, batch, images=recon,
                                                    pred=read["vae_reconstruction"]),
            "agreement": {k: labeller_agreement(labeller, reader, im, batch, labels=(ref[k], read[k]))
                          for k, im in (("clean", test.rgb), ("vae_reconstruction", recon))}}


def train_labeller(cfg: Config, data, out: Path, resume: bool = False, force: bool = False, progress: bool = True,
                   fp16: bool = False, train_dir: Path | None = None, command: str | None = None,
                   depth_model=None) -> Path:
    """Train a :class:`Labeller` (``cfg.labeller``) on ``data``'s train split; write ``out`` and the training folder.

    ``fp16`` saves half-precision weights (and scores the rounded model). ``depth_model`` (a
    :class:`~sceneprobe.labeller.dpt.DepthModelLabeller`) is scored on the same held-out images, for comparison.
    """
    out = Path(out)
    lc = cfg.labeller
    tdir = Path(train_dir) if train_dir else out.parent / f"train_{out.name}"
    if out.exists() and not (resume or force):
        raise fail(f"{out} already exists; pass --resume to continue its training, --force to retrain, "
                   f"or choose another --out")
    check_labelled(data)
    train = data.subset("train")
    if len(train) < lc.batch_size:
        raise fail(f"dataset {data.root} has {len(train)} training images, fewer than the batch size {lc.batch_size}; "
                   f"render more scenes or lower labeller.batch_size")
    if lc.steps < 1 or lc.lr <= 0:
        raise fail(f"config labeller: steps must be >= 1 and lr > 0, got steps={lc.steps}, lr={lc.lr}")
    heldout(data)                                                    # fail now, not after training
    depth = torch.from_numpy(np.clip(train.depth, MIN_DEPTH, FAR_DEPTH).astype(np.float32))   # (N, H, W)
    log_d = depth.log()
    torch.manual_seed(lc.seed)
    model = Labeller(channels=tuple(lc.channels), layers_per_block=_opt(lc, "layers_per_block"),
                     norm_num_groups=_opt(lc, "norm_num_groups"), far_depth=FAR_DEPTH,
                     log_depth_mean=float(log_d.mean()), log_depth_std=float(log_d.std()))
    rgb = torch.from_numpy(train.rgb).permute(0, 3, 1, 2).contiguous()   # (N, 3, H, W) uint8
    sal = torch.from_numpy(train.saliency.astype(np.uint8))              # (N, H, W)
    if force and not resume and (tdir / "checkpoint.pt").exists():
        (tdir / "checkpoint.pt").unlink()
    tdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tdir / "config.yaml", dump_yaml(cfg))

    def loss_fn(m, g, step):
        return labeller_loss(m, rgb, depth, sal, g, lc.batch_size)

    spec = LoopSpec(out=tdir, steps=lc.steps, lr=lc.lr, lr_min_ratio=_opt(lc, "lr_min_ratio"),
                    warmup=min(100, lc.steps // 10), checkpoint_every=_opt(lc, "checkpoint_every"),
                    log_every=_opt(lc, "log_every"), seed=lc.seed, desc="train-labeller")
    t0 = time.time()
    model, _ = train_loop(model, loss_fn, spec, resume=resume, progress=progress)
    wall = time.time() - t0
    if fp16:
        model = model.half().float()                                 # score what is shipped: fp16-rounded weights
    model.eval()
    metrics = evaluate_labeller(model, data)
    if depth_model is not None:
        metrics["depth_model"] = {"path": str(getattr(depth_model, "path", "")),
                                  **evaluate_labeller(depth_model, data)}
    atomic_write_json(tdir / "eval.json", metrics)
    meta = {}
    if (Path(data.root) / "meta.json").is_file():
        meta = json.loads((Path(data.root) / "meta.json").read_text())
    losses = [json.loads(ln) for ln in (tdir / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (tdir / "metrics.jsonl").is_file() else []
    record = {
        "what": "sceneprobe labeller: depth (camera-space z) + saliency from an RGB image in [-1, 1]",
        "sceneprobe_version": __version__, "preset": cfg.preset, "labeller_config": to_dict(lc),
        "seed": lc.seed, "dtype": "float16" if fp16 else "float32", "command": command,
        "data": {"root": str(data.root), "seed": meta.get("seed"), "n": len(data), "n_train": len(train),
                 "size": int(train.rgb.shape[1])},
        "train_wall_s": round(wall, 1), "resumed": bool(resume),
        "final_loss": losses[-1] if losses else None, "eval": metrics,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    save_model(model, out, fp16=fp16)
    atomic_write_json(out / "training.json", record)
    return out
