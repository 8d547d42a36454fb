"""The activations of one (site, step) as the probes read them: streamed from the store in chunks of CHUNK images,
non-finite values read as 0, one split's chunks kept in memory up to CACHE_BYTES (:class:`SplitFeatures`), and the
native predictions x·θ of many probes at once (:func:`_predict`)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..capture.store import CaptureStore

CHUNK = 64                             # images per streamed chunk
CACHE_BYTES = 1 << 29                  # train rows kept in memory for the IRLS passes (else re-read from disk)


def _features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-finite activations (fp16 overflow in a control model) become 0; returns (x, how many were replaced)."""
    if bool(torch.isfinite(x.sum())):                                          # fast path: a sum of finite values
        return x, 0
    bad = ~torch.isfinite(x)
    nbad = int(bad.sum())
    return (torch.where(bad, torch.zeros((), dtype=x.dtype), x) if nbad else x), nbad


def _iter_images(store: CaptureStore, site: str, step: int,
                 rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for r, x in store.iter_rows(site, step, rows, CHUNK):
        yield r, _features(x)[0]                                               # (b, C, h, w) float32


class SplitFeatures:
    """The activations of one split of one (site, step) in the sweep's chunks (CHUNK images, float64): read from the
    store once and kept for every prediction the probe makes on that split (the λ path's, the threshold's, the
    scores of the layout-fair and the plain probe) when they fit in CACHE_BYTES, else re-read for each. Calling it
    gives the chunks."""

    def __init__(self, store: CaptureStore, site: str, step: int, rows: np.ndarray):
        self.store, self.site, self.step, self.rows = store, site, step, np.asarray(rows)
        C, h, w = store.shape(site)
        self.keep = len(self.rows) * C * h * w * 8 <= CACHE_BYTES
        self._kept: list[torch.Tensor] | None = None

    def _read(self) -> Iterator[torch.Tensor]:
        for _, x in _iter_images(self.store, self.site, self.step, self.rows):
            yield x.double()                                                   # (b, C, h, w)

    def __call__(self) -> Iterable[torch.Tensor]:
        if not self.keep:
            return self._read()
        if self._kept is None:
            self._kept = list(self._read())
        return self._kept


def _predict(feats: Callable[[], Iterable[torch.Tensor]], thetas: torch.Tensor, bias: bool,
             layout: torch.Tensor | None = None) -> torch.Tensor:
    """Native predictions x·θ (+ L·θ_L) (+ b) for every θ, on θ's device: (n, L, h, w) float64 on the CPU.

    ``feats()`` gives the activations in chunks (:class:`SplitFeatures`); θ = [features (C) | layout weights (k,
    with ``layout`` (k, h, w)) | bias]."""
    out = []
    k = 0 if layout is None else layout.shape[0]
    for x in feats():
        C = x.shape[1]
        z = torch.einsum("nchw,lc->nlhw", x.to(thetas.device, torch.float64), thetas[:, :C])
        if k:
            z = z + torch.einsum("khw,lk->lhw", layout.to(thetas.device, torch.float64), thetas[:, C:C + k])[None]
        if bias:
            z = z + thetas[:, -1][None, :, None, None]
        out.append(z.cpu())
    return torch.cat(out)
