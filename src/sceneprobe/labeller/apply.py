"""Label images on disk: a capture's ``samples.safetensors`` or a folder of images.

* ``…/samples.safetensors`` (``images`` (N, H, W, 3) uint8, ``split`` (N,) int8, optional ``sample_ids``) →
  ``labels.safetensors`` beside it (the format of :mod:`sceneprobe.capture.store`, rows aligned with the stores), so
  ``sceneprobe probe`` scores the generated images against the labeller's labels, as the paper did with MiDaS/TRACER.
* a folder of images (or a dataset folder with ``rgb/``) → ``out/`` laid out as a dataset: ``rgb/``, ``depth/*.npy``,
  ``saliency/*.png`` (0/255), ``split.json``, so :func:`~sceneprobe.world.dataset.load_dataset` reads it back.

Both write ``labels.json``: which labeller, and what the depth is (``depth_kind``: ``depth`` = camera-space z,
``inverse_depth`` = a DPT's relative inverse depth).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write_json
from ..owned import atomic_folder, check_out_folder
from ..errors import fail
from .model import label_images


def _describe(labeller) -> dict:
    sal = getattr(labeller, "saliency_labeller", labeller)
    return {"depth_kind": labeller.depth_kind, "depth_labeller": str(getattr(labeller, "path", "")),
            "saliency_labeller": str(getattr(sal, "path", "")) if sal is not None else None}


def label_samples(labeller, src: Path, out: Path | None = None, force: bool = False, batch: int = 64) -> Path:
    """``samples.safetensors`` → ``labels.safetensors`` (depth, saliency, split, sample_ids) and ``labels.json``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ..capture.store import save_labels
    src = Path(src)
    out = Path(out) if out else src.with_name("labels.safetensors")
    if out.exists() and not force:
        raise fail(f"labels file {out} already exists; pass --force to relabel or choose another --out")
    try:
        raw = load_file(str(src))
    except (SafetensorError, OSError) as e:
        raise fail(f"{src} is not a readable safetensors file ({str(e).splitlines()[0]}); recapture the samples") \
            from None
    if "images" not in raw or "split" not in raw:
        raise fail(f"{src} lacks an 'images' or 'split' tensor; it is not a samples file written by "
                   f"`sceneprobe capture`")
    lab = label_images(labeller, raw["images"], batch)
    if lab["saliency"] is None:
        raise fail("probe labels need saliency too: pass --labeller (a trained labeller) alongside --depth-model")
    extra = {"sample_ids": raw["sample_ids"]} if "sample_ids" in raw else {}
    if out.name == "labels.safetensors":
        save_labels(out.parent, lab["depth"], lab["saliency"], raw["split"], **extra)
    else:
        from safetensors.numpy import save_file
        save_file({"depth": lab["depth"], "saliency": lab["saliency"], "split": raw["split"].astype(np.int8), **extra},
                  str(out))
    atomic_write_json(out.with_suffix(".json"), {"source": str(src), "n": int(len(lab["depth"])),
                                                 **_describe(labeller)})
    return out


def label_folder(labeller, src: Path, out: Path, force: bool = False, batch: int = 64) -> Path:
    """Images of ``src`` → dataset folder ``out`` with the labeller's depth (and saliency, when it has one)."""
    from ..world.dataset import load_dataset
    from ..world.splits import SPLITS
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise fail(f"--out {out} is the image folder itself; choose a new folder for the labelled copy")
    check_out_folder(out, force)
    data = load_dataset(src)
    lab = label_images(labeller, data.rgb, batch)
    with atomic_folder(out, force) as tmp:
        for sub in ("rgb", "depth") + (("saliency",) if lab["saliency"] is not None else ()):
            (tmp / sub).mkdir()
        for i, name in enumerate(data.names):
            Image.fromarray(data.rgb[i]).save(tmp / "rgb" / f"{name}.png")
            np.save(tmp / "depth" / f"{name}.npy", lab["depth"][i])
            if lab["saliency"] is not None:
                Image.fromarray(lab["saliency"][i] * np.uint8(255)).save(tmp / "saliency" / f"{name}.png")
        atomic_write_json(tmp / "split.json",
                          {s: [n for n, k in zip(data.names, data.split) if k == s] for s in SPLITS})
        atomic_write_json(tmp / "labels.json", {"source": str(src), "n": len(data), **_describe(labeller)})
    return out


def label_path(labeller, src: Path, out: Path | None = None, force: bool = False, batch: int = 64) -> Path:
    """Dispatch on ``src``: a ``.safetensors`` samples file or a folder of images (then ``out`` is required)."""
    src = Path(src)
    if src.is_file() and src.suffix == ".safetensors":
        return label_samples(labeller, src, out, force, batch)
    if src.is_dir() and (src / "samples.safetensors").is_file() and out is None:
        return label_samples(labeller, src / "samples.safetensors", None, force, batch)
    if not src.exists():
        raise fail(f"--images {src} does not exist; pass a samples.safetensors file or a folder of images")
    if src.is_file():
        raise fail(f"--images {src} is a file but not .safetensors; pass a samples.safetensors or a folder of images")
    if out is None:
        raise fail(f"labelling the folder {src} needs --out (a new folder for the labelled dataset)")
    return label_folder(labeller, src, out, force, batch)
