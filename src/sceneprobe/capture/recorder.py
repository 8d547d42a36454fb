"""Record self-attention outputs with owned forward hooks (a context manager that removes exactly its own handles).

A site (``models/sites.py``) names one spatial self-attention layer. Two readings (``kind``):

* ``"attn"`` — the output of ``attn.to_out[0]``: the attention branch after its output projection, before the residual
  add (the paper's exact site). It is (B, H·W, C) with tokens in row-major (h, w) order, so it is reshaped to
  (B, C, H, W) with the spatial size seen by a forward pre-hook on the site's container (the ``Attention`` itself in
  ``UNet2DModel``/``AutoencoderKL``, the ``Transformer2DModel`` in Stable Diffusion, whose input is (B, C, H, W)).
* ``"block"`` — the ``Attention`` module's own output; in ``UNet2DModel``/VAE it includes the residual, (B, C, H, W);
  in Stable Diffusion's attn1 it is (B, H·W, C) and is reshaped the same way.

Every call of a hooked module yields one entry (the U-Net runs once per denoising step, so one entry per step).
Entries are either kept in memory (``recorder.outputs[site]``, a list) or handed to ``on_output(site, tensor)`` for
streaming, in which case nothing is kept. With classifier-free guidance the batch is [uncond, cond];
``keep_half="cond"`` keeps only the conditional half (``"uncond"`` the unconditional one: the ``uncond`` reading).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import fail
from ..models.sites import list_sites, resolve, site_path

OnOutput = Callable[[str, torch.Tensor], None]
KINDS = ("attn", "block")


class SiteHooks:
    """Owned forward hooks on sites; the shared part of :class:`Recorder` and the interventions' ``Editor``.

    Every site is resolved before anything is registered (a bad site leaves no hook behind). On ``__enter__`` each site
    gets a pre-hook on its container (to note the spatial size H×W) and an output hook made by ``self._hook(site)``
    (subclasses define it), after any ``_extra_hooks()``; ``__exit__`` removes exactly these handles, also after an
    exception.
    """

    def __init__(self, models: Mapping[str, nn.Module], sites: Sequence[str], kind: str = "attn"):
        if kind not in KINDS:
            raise fail(f"site kind {kind!r} is unknown; choose attn (before the residual, the paper's) or block")
        self.models, self.kind = dict(models), kind
        self.sites: list[str] = list(dict.fromkeys(sites))
        self._targets: list[tuple[str, nn.Module, nn.Module]] = []
        for site in self.sites:
            key, path = site_path(site)
            if key not in self.models:
                raise fail(f"site {site!r} belongs to the {key}, which this recorder was not given")
            attn = resolve(self.models[key], key, site)
            container = self.models[key].get_submodule(path)
            target = attn.to_out[0] if kind == "attn" else attn
            self._targets.append((site, container, target))
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hw: dict[str, tuple[int, int]] = {}

    def _extra_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks besides the sites' (registered first); none by default."""
        return []

    def _hook(self, site: str):
        raise NotImplementedError

    def __enter__(self):
        try:
            self.handles.extend(self._extra_hooks())
            for site, container, target in self._targets:
                self.handles.append(container.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True))
                self.handles.append(target.register_forward_hook(self._hook(site)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove exactly the handles this object added (safe to call twice)."""
        try:
            for h in self.handles:
                h.remove()
        finally:
            self.handles.clear()

    def _pre_hook(self, site: str):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                self._hw[site] = (int(x.shape[2]), int(x.shape[3]))
        return fn

    def to_spatial(self, site: str, y: torch.Tensor) -> torch.Tensor:
        """(B, H·W, C) → (B, C, H, W) (token index = h·W + w); 4D tensors pass through."""
        if y.ndim == 4:
            return y
        b, hw, c = y.shape
        h, w = self._hw.get(site, (math.isqrt(hw), hw // max(1, math.isqrt(hw))))
        if h * w != hw:
            raise RuntimeError(f"site {site}: {hw} tokens do not match the spatial size {h}x{w}")
        return y.transpose(1, 2).reshape(b, c, h, w)



class Recorder(SiteHooks):
    """``with Recorder({"unet": unet, "vae": vae}) as rec: ...`` → ``rec.outputs[site]``: list of (B, C, H, W)."""

    def __init__(self, models: Mapping[str, nn.Module], sites: Sequence[str] | None = None, kind: str = "attn",
                 on_output: OnOutput | None = None, keep_half: str | None = None):
        if keep_half not in (None, "cond", "uncond"):
            raise fail(f"keep_half {keep_half!r} is unknown; use None, 'cond' or 'uncond'")
        if sites is None:
            sites = [s for key, m in dict(models).items() for s in list_sites(m, key)]
        super().__init__(models, sites, kind)
        self.on_output, self.keep_half = on_output, keep_half
        self.outputs: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()

    def _hook(self, site: str):
        def fn(module, inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            y = self.to_spatial(site, y.detach())  # (B, C, H, W)
            if self.keep_half == "cond":
                y = y[y.shape[0] // 2:]  # CFG batch is [uncond, cond]
            elif self.keep_half == "uncond":
                y = y[:y.shape[0] // 2]
            if self.on_output is not None:
                self.on_output(site, y)
            else:
                self.outputs[site].append(y)
        return fn


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (tests: a recorder leaves none behind)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
