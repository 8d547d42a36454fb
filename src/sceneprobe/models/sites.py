"""Canonical site names ↔ diffusers modules.

The public vocabulary (DESIGN.md): ``unet.down{b}.attn{j}``, ``unet.mid.attn0``, ``unet.up{b}.attn{j}``,
``vae.enc.mid.attn0``, ``vae.dec.mid.attn0``. A site names one *spatial self-attention* layer:

* in a ``UNet2DModel`` / ``AutoencoderKL`` it is the ``Attention`` module ``down_blocks.b.attentions.j`` (etc.);
* in Stable Diffusion's ``UNet2DConditionModel`` it is ``down_blocks.b.attentions.j.transformer_blocks.0.attn1``
  (attn2 is cross-attention to text and is not a site).

Two readings of a site (``kind``): ``"attn"`` is the output of the output projection ``to_out[0]`` before the residual
add — the paper's exact site, shape (B, H·W, C); ``"block"`` is the ``Attention`` module's own output, which in
``UNet2DModel``/VAE includes the residual, shape (B, C, H, W). Raw module paths (``unet:down_blocks.0.attentions.0``)
are accepted wherever a site name is.
"""
from __future__ import annotations

import re

from torch import nn

from ..errors import fail

_BLOCK = {"down": "down_blocks", "up": "up_blocks"}
_CANON = re.compile(r"^unet\.(down|up)(\d+)\.attn(\d+)$|^unet\.mid\.attn(\d+)$|^vae\.(enc|dec)\.mid\.attn(\d+)$")
_PATH = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|^mid_block\.attentions\.(\d+)")


def _is_self_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention
    return isinstance(module, Attention) and not getattr(module, "is_cross_attention", False)


def site_path(site: str) -> tuple[str, str]:
    """Canonical name → (model key ``'unet'``/``'vae'``, module path of the spatial attention container).

    For SD the container (a ``Transformer2DModel``) holds the self-attention at ``transformer_blocks.0.attn1``;
    :func:`resolve` descends into it.
    """
    if ":" in site:
        model, path = site.split(":", 1)
        if model not in ("unet", "vae"):
            raise fail(f"site {site!r}: raw module paths look like unet:down_blocks.0.attentions.0 or vae:decoder.mid_block.attentions.0")
        return model, path
    m = _CANON.match(site)
    if not m:
        raise fail(f"unknown site {site!r}; sites look like unet.down0.attn0, unet.mid.attn0, unet.up1.attn2, vae.dec.mid.attn0")
    if m.group(1):
        return "unet", f"{_BLOCK[m.group(1)]}.{m.group(2)}.attentions.{m.group(3)}"
    if m.group(4) is not None:
        return "unet", f"mid_block.attentions.{m.group(4)}"
    part = "encoder" if m.group(5) == "enc" else "decoder"
    return "vae", f"{part}.mid_block.attentions.{m.group(6)}"


def site_name(model: str, path: str) -> str:
    """(model key, module path) → canonical name; the inverse of :func:`site_path`."""
    if model == "vae":
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.(\d+)", path)
        if m:
            return f"vae.{'enc' if m.group(1) == 'encoder' else 'dec'}.mid.attn{m.group(2)}"
        return f"vae:{path}"
    m = _PATH.match(path)
    if m and m.group(1):
        return f"unet.{'down' if m.group(1) == 'down_blocks' else 'up'}{m.group(2)}.attn{m.group(3)}"
    if m:
        return f"unet.mid.attn{m.group(4)}"
    return f"unet:{path}"


def resolve(model: nn.Module, model_key: str, site: str) -> nn.Module:
    """The self-attention ``Attention`` module a site names inside ``model``."""
    key, path = site_path(site)
    if key != model_key:
        raise fail(f"site {site!r} belongs to the {key}, not the {model_key}")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise fail(f"site {site!r} ({path}) does not exist in this {model_key}; its sites: "
                   f"{', '.join(list_sites(model, model_key)) or 'none'}") from None
    if _is_self_attention(module):
        return module
    for sub in ("transformer_blocks.0.attn1", "attn1"):
        try:
            inner = module.get_submodule(sub)
        except AttributeError:
            continue
        if _is_self_attention(inner):
            return inner
    raise fail(f"site {site!r} ({path}) is not a self-attention module")


def list_sites(model: nn.Module, model_key: str) -> list[str]:
    """Every spatial self-attention site of ``model`` in forward order (down → mid → up; encoder → decoder)."""
    names: list[str] = []
    for path, module in model.named_modules():
        if not _is_self_attention(module):
            continue
        if model_key == "unet" and ".attn2" in path:
            continue
        container = re.sub(r"\.transformer_blocks\.\d+\.attn1$", "", path)
        name = site_name(model_key, container)
        if name not in names:
            names.append(name)
    order = {"down": 0, "mid": 1, "up": 2, "enc": 0, "dec": 1}

    def key(n: str) -> tuple:
        m = re.match(r"^(unet|vae)\.(?:(down|up)(\d+)|(mid)|(enc|dec)\.mid)\.attn(\d+)$", n)
        if not m:
            return (9, n)
        part = m.group(2) or m.group(4) or m.group(5)
        return (order[part], int(m.group(3) or 0), int(m.group(6)))
    return sorted(names, key=key)
