"""A transformers DPT depth model from a local folder, as the depth labeller (photographs, the Stable Diffusion path).

``DepthModelLabeller(path)`` loads ``DPTForDepthEstimation.from_pretrained(path, local_files_only=True)`` — never the
hub. Pre-processing: the folder's ``preprocessor_config.json`` through ``DPTImageProcessor`` when present; otherwise
a documented default — resize (bilinear) to the config's ``image_size`` and map [0, 255] to [−1, 1]
(``(x/255 − 0.5) / 0.5``, DPTImageProcessor's default mean and std). The prediction is resized (bilinear) back to
the image size.

Depth label. DPT (like MiDaS, the paper's labeller) predicts *relative inverse depth*: large = near, defined up to an
unknown scale and shift, so it cannot be inverted into metric depth (1/(a·y + b) needs a and b). We keep it as it is
and say so: ``depth_kind = "inverse_depth"``. Linear probes and Spearman ρ only need a consistent ordering (a probe
learns the sign), and :func:`~sceneprobe.labeller.train.evaluate_labeller` scores it against 1/z.
Saliency comes from a trained :class:`~sceneprobe.labeller.model.Labeller` if one is given, else it is ``None``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import fail
from .model import check_images, label_images


def _processor_class():
    try:                                   # transformers ≥ 5 without torchvision: the PIL processor, no warning
        from transformers import DPTImageProcessorPil as cls
    except ImportError:                    # pragma: no cover - older transformers
        from transformers import DPTImageProcessor as cls
    return cls


class DepthModelLabeller:
    """Depth from a local DPT folder; saliency from ``saliency_labeller`` (a Labeller) or None."""

    depth_kind = "inverse_depth"

    def __init__(self, path: Path, saliency_labeller=None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise fail(f"--depth-model {self.path} does not exist; pass a local folder saved by transformers "
                       f"(DPTForDepthEstimation.save_pretrained)")
        if not (self.path / "config.json").is_file():
            raise fail(f"--depth-model {self.path} has no config.json; it is not a transformers model folder")
        from transformers import DPTForDepthEstimation
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = DPTForDepthEstimation.from_pretrained(self.path, local_files_only=True).float().eval()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise fail(f"--depth-model {self.path} could not be loaded as a DPT depth model "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.processor = None
        if (self.path / "preprocessor_config.json").is_file():
            self.processor = _processor_class().from_pretrained(self.path, local_files_only=True)
        self.saliency_labeller = saliency_labeller

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"].float()
        size = int(self.model.config.image_size)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return x if x.shape[-2:] == (size, size) else F.interpolate(x, size=(size, size), mode="bilinear",
                                                                     align_corners=False)

    @torch.no_grad()
    def label(self, images: np.ndarray, batch: int = 64) -> dict:
        """``depth`` (N, H, W) float32 relative inverse depth; ``saliency`` (N, H, W) uint8 or None."""
        check_images(images)
        H, W = images.shape[1:3]
        out = []
        for i in range(0, len(images), batch):
            pred = self.model(pixel_values=self._pixels(images[i:i + batch])).predicted_depth   # (B, h', w')
            out.append(F.interpolate(pred[:, None].float(), size=(H, W), mode="bilinear",
                                     align_corners=False)[:, 0].numpy())
        sal = label_images(self.saliency_labeller, images, batch)["saliency"] if self.saliency_labeller else None
        return {"depth": np.concatenate(out).astype(np.float32), "saliency": sal}
