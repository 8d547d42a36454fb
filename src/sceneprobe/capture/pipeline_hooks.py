"""Owned hooks that record the canonical sites of any family's denoiser and VAE while its diffusers pipeline samples.

One :class:`PipelineRecorder` is a context manager around one pipeline call (``capture/pipelines.py``). It adds:

* a forward pre-hook on the denoiser that counts its calls within the current step. Only the *first* call of a step
  is recorded: the pipelines of SD/SDXL/PixArt/SD3 call the denoiser once per step on the batch [uncond, cond]; FLUX's
  true CFG calls it twice, the conditional pass first (``cache_context("cond")``), so the first call is always the
  one that sees the prompt.
* per site, a forward hook on its reading (``kind``): ``"attn"`` = ``attn.to_out[0]``, the attention branch after
  its output projection and before the residual (the paper's site); FLUX's single-stream attention has no output
  projection (its ``proj_out`` mixes attention and MLP), so there it is the attention module's own output, before
  ``proj_out`` and the residual. ``"block"`` = the attention module's output (a U-Net's or VAE's includes the
  residual; a DiT adds its residual outside the module, so there it differs from ``attn`` only by dropout).
* for U-Net and VAE sites, a pre-hook on the site's container that notes its H×W (its input is (B, C, H, W)).

Positions: a U-Net or VAE reading (B, H·W, C) is reshaped row-major to (B, C, H, W); a transformer reading (B, T, C)
is placed on the latent grid by :func:`sceneprobe.models.sites.token_grid` (patch size, FLUX's 2×2 packing; FLUX
single-stream: the T − rows·cols text tokens ahead of the image are dropped, never positions). The cond half: a batch
of 2B rows is [uncond, cond] in every one of these pipelines (``torch.cat([negative_prompt_embeds, prompt_embeds])``),
so its second half is kept; a batch of B rows (no CFG, or FLUX) is kept whole. ``half="uncond"`` keeps the first
half instead (the unconditional branch's activations in the same pass: the ``uncond`` reading), and then a batch
without one is an error.

The VAE sites record only while :attr:`vae_armed` is set (the caller decodes each step's latent under it), so the
pipeline's own final decode is never recorded twice.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import fail
from ..models.sites import TokenGrid, resolve, site_path, token_grid

OnSite = Callable[[str, int, torch.Tensor], None]   # (site, step, rows (B, C, h, w))


class PipelineRecorder:
    """``with PipelineRecorder(models, sites, ...) as rec:`` call the pipeline; advance :meth:`next_step` after each
    step's update. ``models``: ``{"unet" | "transformer": denoiser, "vae": vae}``."""

    def __init__(self, models: Mapping[str, nn.Module], sites: Sequence[str], kind: str, batch: int,
                 latent_hw: tuple[int, int], denoiser_config: dict, on_site: OnSite, half: str = "cond"):
        if kind not in ("attn", "block"):
            raise fail(f"site kind {kind!r} is unknown; choose attn (before the residual, the paper's) or block")
        if half not in ("cond", "uncond"):
            raise fail(f"half {half!r} is unknown; use cond or uncond")
        self.models, self.kind, self.batch, self.on_site = dict(models), kind, int(batch), on_site
        self.half = half
        self.denoiser_key = "transformer" if "transformer" in self.models else "unet"
        self.latent_hw, self.config = tuple(latent_hw), dict(denoiser_config)
        self.step, self.calls, self.vae_armed = 0, 0, False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hw: dict[str, tuple[int, int]] = {}
        self._targets: list[tuple[str, str, nn.Module | None, nn.Module]] = []
        for site in dict.fromkeys(sites):          # resolve every site before any hook is added
            key, path = site_path(site)
            if key not in self.models:
                raise fail(f"site {site!r} belongs to the {key}, which this pipeline does not have")
            attn = resolve(self.models[key], key, site)
            out = getattr(attn, "to_out", None)
            target = out[0] if kind == "attn" and isinstance(out, nn.ModuleList) and len(out) else attn
            container = None if key == "transformer" else self.models[key].get_submodule(path)
            self._targets.append((site, key, container, target))

    # ------------------------------------------------------------------------------------------------ ownership
    def __enter__(self):
        try:
            den = self.models[self.denoiser_key]
            self.handles.append(den.register_forward_pre_hook(self._count))
            for site, key, container, target in self._targets:
                if container is not None:
                    self.handles.append(container.register_forward_pre_hook(self._note_hw(site), with_kwargs=True))
                self.handles.append(target.register_forward_hook(self._hook(site, key)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove exactly the handles this recorder added (safe to call twice)."""
        try:
            for h in self.handles:
                h.remove()
        finally:
            self.handles.clear()

    # ------------------------------------------------------------------------------------------------ the steps
    def next_step(self) -> None:
        """The pipeline finished a step's update: later denoiser calls belong to the next step."""
        self.step, self.calls = self.step + 1, 0

    def _count(self, module, args) -> None:
        self.calls += 1

    def _note_hw(self, site: str):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                self._hw[site] = (int(x.shape[2]), int(x.shape[3]))
        return fn

    def _hook(self, site: str, key: str):
        def fn(module, inputs, output):
            if key == "vae":
                if not self.vae_armed:
                    return
            elif self.calls != 1:                      # a second pass of the step (FLUX's true-CFG uncond pass)
                return
            y = output[0] if isinstance(output, tuple) else output
            y = self.to_grid(site, key, y.detach())   # (B', C, h, w)
            if y.shape[0] == 2 * self.batch:           # [uncond, cond]
                y = y[self.batch:] if self.half == "cond" or key == "vae" else y[:self.batch]
            elif self.half == "uncond" and key != "vae":
                raise RuntimeError(f"site {site}: no unconditional half in a batch of {y.shape[0]}")
            elif y.shape[0] != self.batch:
                raise RuntimeError(f"site {site}: batch {y.shape[0]}, expected {self.batch} or {2 * self.batch}")
            self.on_site(site, self.step, y)
        return fn

    def grid(self, site: str, tokens: int) -> TokenGrid:
        """Where a transformer site's ``tokens`` lie on the latent grid (FLUX single-stream: text tokens first)."""
        g = token_grid(site, self.config, self.latent_hw)
        text = tokens - g.rows * g.cols
        if text < 0 or (text and not site.startswith("flux.single")):
            raise RuntimeError(f"site {site}: {tokens} tokens do not fit the {g.rows}x{g.cols} image grid")
        return dataclasses.replace(g, text_before=text)

    def to_grid(self, site: str, key: str, y: torch.Tensor) -> torch.Tensor:
        """A site's reading → (B, C, h, w) on its grid; 4-D readings (a U-Net's or VAE's ``block``) pass through."""
        if y.ndim == 4:
            return y
        b, t, c = y.shape
        if key == "transformer":
            return self.grid(site, t).to_grid(y)                              # (B, C, rows, cols)
        h, w = self._hw[site]
        if h * w != t:
            raise RuntimeError(f"site {site}: {t} tokens do not match the spatial size {h}x{w}")
        return y.transpose(1, 2).reshape(b, c, h, w)                          # (B, C, H, W)
