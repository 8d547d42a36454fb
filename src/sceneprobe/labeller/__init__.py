"""The labeller: labels images with depth and saliency (the role MiDaS and TRACER play in the paper).

* :class:`Labeller` (``model.py``): a small encoder-decoder CNN with a depth head and a saliency head, trained on
  rendered scenes with exact labels (``train.py``: :func:`train_labeller`, :func:`evaluate_labeller`).
* :class:`DepthModelLabeller` (``dpt.py``): a local transformers DPT depth model instead (photographs, Stable
  Diffusion); its depth is relative *inverse* depth (``depth_kind``).
* :func:`label_images` labels arrays; :func:`label_path` (``apply.py``) labels a capture's samples or a folder.
* :func:`labeller_provenance`: its accuracy on held-out renders and on their VAE reconstructions (``train.py``);
  :mod:`.readout`: the labeller on each denoising step's decoded x̂₀ (the image read-out curve).

The shipped labeller of the ``cpu`` preset lives in ``sceneprobe/pretrained/cpu/labeller`` (:func:`shipped_labeller`);
its independent second, the image read-out's labeller, in ``sceneprobe/pretrained/cpu/labeller_readout``.
"""
from __future__ import annotations

from pathlib import Path

from .apply import label_folder, label_path, label_samples
from .dpt import DepthModelLabeller
from .model import Labeller, LabellerOutput, label_images, load_labeller
from .train import HeldoutViews, evaluate_labeller, heldout_views, labeller_agreement, labeller_provenance, \
    readout_labeller_provenance, train_labeller, vae_reconstructions


def shipped_labeller_path(preset: str = "cpu") -> Path:
    """Folder of the labeller shipped with a preset's default checkpoint (may not exist for every preset)."""
    from ..models.io import shipped_root
    return shipped_root(preset) / "labeller"


def shipped_readout_labeller_path(preset: str = "cpu") -> Path:
    """Folder of the shipped read-out labeller (an independent second labeller: another seed, architecture and
    training world; it reads each step's x̂₀ so that the ``generate`` read-out does not score itself)."""
    from ..models.io import shipped_root
    return shipped_root(preset) / "labeller_readout"


__all__ = ["DepthModelLabeller", "HeldoutViews", "Labeller", "LabellerOutput", "evaluate_labeller", "heldout_views",
           "label_folder", "label_images",
           "label_path", "label_samples", "labeller_agreement", "labeller_provenance", "load_labeller",
           "readout_labeller_provenance", "shipped_labeller_path", "shipped_readout_labeller_path", "train_labeller",
           "vae_reconstructions"]
