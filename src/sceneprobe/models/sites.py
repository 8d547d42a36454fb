"""Canonical site names ↔ diffusers modules, and where a site's tokens lie on the latent's H×W grid.

The public vocabulary (DESIGN.md). A site names one *self-attention* layer over the image:

=============================  ==========================================================  ===========================
canonical name                 diffusers module path (model key ``unet``/``vae``/``transformer``)  family
=============================  ==========================================================  ===========================
``unet.down{b}.attn{j}``       ``down_blocks.b.attentions.j`` (``UNet2DModel``) or, in SD's  SD 1.x/2.x, our LDM
                               ``UNet2DConditionModel``, its ``transformer_blocks.0.attn1``
``unet.mid.attn{j}``           ``mid_block.attentions.j`` (…``.transformer_blocks.0.attn1``)
``unet.up{b}.attn{j}``         ``up_blocks.b.attentions.j`` (…``.transformer_blocks.0.attn1``)
``unet.down{b}.attn{j}.tb{k}`` ``down_blocks.b.attentions.j.transformer_blocks.k.attn1``    SDXL (stacks of 2 and 10)
                               (likewise ``unet.mid.attn{j}.tb{k}``, ``unet.up{b}.attn{j}.tb{k}``)
``vae.enc.mid.attn{j}``        ``encoder.mid_block.attentions.j``                           every VAE
``vae.dec.mid.attn{j}``        ``decoder.mid_block.attentions.j``
``dit.block{L}.attn``          ``transformer_blocks.L.attn1`` (self-attention)              PixArt-α/Σ
``mmdit.block{L}.attn.img``    ``transformer_blocks.L.attn`` (joint attention, image stream) SD3/3.5
``mmdit.block{L}.attn2``       ``transformer_blocks.L.attn2`` (image-only self-attention of  SD3.5 (``dual_attention_layers``)
                               SD3.5's dual-attention blocks)
``flux.double{L}.attn.img``    ``transformer_blocks.L.attn`` (double-stream, image stream)  FLUX.1
``flux.single{L}.attn``        ``single_transformer_blocks.L.attn`` (text + image tokens)   FLUX.1
=============================  ==========================================================  ===========================

``attn2`` of a U-Net or PixArt block is cross-attention to the text and is not a site. A U-Net stack of one transformer
block (SD 1.x/2.x) keeps its plain name (``.tb0`` is accepted too); a deeper stack (SDXL) must name its block.

Two readings of a site (``kind``): ``"attn"`` is the output of the output projection ``to_out[0]`` before the residual
add — the paper's exact site, shape (B, tokens, C); for SD3's and FLUX's joint attention that projection sees the image
stream only (the text stream has its own, ``to_add_out``); FLUX's single-stream attention has no output projection
(``pre_only``): its reading is the attention module's output, text tokens first. ``"block"`` is the attention module's
own output, which in ``UNet2DModel``/VAE includes the residual. Raw module paths (``unet:down_blocks.0.attentions.0``,
``transformer:transformer_blocks.3.attn``) are accepted wherever a site name is. How tokens lie on the latent grid:
:func:`token_grid`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import fail

MODEL_KEYS = ("unet", "vae", "transformer")
_BLOCK = {"down": "down_blocks", "up": "up_blocks"}
_UNET = re.compile(r"^unet\.(?:(down|up)(\d+)|mid)\.attn(\d+)(?:\.tb(\d+))?$")
_VAE = re.compile(r"^vae\.(enc|dec)\.mid\.attn(\d+)$")
_PATH = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|mid_block)\.attentions\.(\d+)"
                   r"(?:\.transformer_blocks\.(\d+)\.attn1)?$")
# Transformer sites: (canonical template, module path template, family key, site prefix), {L} = block index.
TRANSFORMER_SITES = (
    ("dit.block{L}.attn", "transformer_blocks.{L}.attn1", "pixart"),
    ("mmdit.block{L}.attn.img", "transformer_blocks.{L}.attn", "sd3"),
    ("mmdit.block{L}.attn2", "transformer_blocks.{L}.attn2", "sd3"),
    ("flux.double{L}.attn.img", "transformer_blocks.{L}.attn", "flux"),
    ("flux.single{L}.attn", "single_transformer_blocks.{L}.attn", "flux"),
)
_FAMILY_OF_CLASS = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3",
                    "FluxTransformer2DModel": "flux"}


def _template(t: str) -> re.Pattern:
    return re.compile("^" + re.escape(t).replace(re.escape("{L}"), r"(\d+)") + "$")


_T_NAME = [(_template(name), path, fam) for name, path, fam in TRANSFORMER_SITES]
_T_PATH = [(_template(path), name, fam) for name, path, fam in TRANSFORMER_SITES]
EXAMPLES = ("unet.down0.attn0, unet.mid.attn0, unet.up1.attn2, unet.down2.attn0.tb3, vae.dec.mid.attn0, "
            "dit.block0.attn, mmdit.block0.attn.img, flux.double0.attn.img, flux.single0.attn")


def _is_self_attention(module: nn.Module) -> bool:
    """A diffusers attention module (``Attention``, or the newer ``AttentionModuleMixin`` ones such as FLUX's) that is
    not cross-attention to the text."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention
    return isinstance(module, (Attention, AttentionModuleMixin)) and not getattr(module, "is_cross_attention", False)


def site_path(site: str) -> tuple[str, str]:
    """Canonical name → (model key ``'unet'``/``'vae'``/``'transformer'``, module path).

    For U-Net and VAE sites the path is the spatial attention *container* (for SD a ``Transformer2DModel``, holding the
    self-attention at ``transformer_blocks.k.attn1``; :func:`resolve` descends into it); for transformer sites it is
    the attention module itself.
    """
    if ":" in site:
        model, path = site.split(":", 1)
        if model not in MODEL_KEYS:
            raise fail(f"site {site!r}: raw module paths look like unet:down_blocks.0.attentions.0, "
                       f"vae:decoder.mid_block.attentions.0 or transformer:transformer_blocks.0.attn1")
        return model, path
    m = _UNET.match(site)
    if m:
        if m.group(1):
            return "unet", f"{_BLOCK[m.group(1)]}.{m.group(2)}.attentions.{m.group(3)}"
        return "unet", f"mid_block.attentions.{m.group(3)}"
    m = _VAE.match(site)
    if m:
        return "vae", f"{'encoder' if m.group(1) == 'enc' else 'decoder'}.mid_block.attentions.{m.group(2)}"
    for pattern, path, _ in _T_NAME:
        m = pattern.match(site)
        if m:
            return "transformer", path.replace("{L}", m.group(1))
    raise fail(f"unknown site {site!r}; sites look like {EXAMPLES}")


def site_family(site: str) -> str | None:
    """The family key a transformer site belongs to (``pixart``, ``sd3``, ``flux``); None for U-Net/VAE sites."""
    return next((fam for pattern, _, fam in _T_NAME if pattern.match(site)), None)


def _tb(site: str) -> int | None:
    m = _UNET.match(site)
    return int(m.group(4)) if m and m.group(4) is not None else None


def site_name(model: str, path: str, family: str | None = None, module: nn.Module | None = None) -> str:
    """(model key, module path) → canonical name; the inverse of :func:`site_path` (and of :func:`module_path`).

    A U-Net path down to ``transformer_blocks.k.attn1`` gets ``.tb{k}`` — unless ``module`` (the model) shows its
    stack has one block only (SD 1.x/2.x), which keeps the plain name; a container path gets the plain name. A
    transformer path needs the family or the model (``transformer_blocks.L.attn`` is SD3's in ``mmdit`` and FLUX's
    in ``flux``). Paths without a canonical name come back raw (``unet:…``).
    """
    if module is not None:
        family = family or _family_of(module)
        m = re.match(r"^(.*)\.transformer_blocks\.(\d+)\.attn1$", path)
        if model == "unet" and m:
            try:
                if len(module.get_submodule(m.group(1)).transformer_blocks) == 1:
                    path = m.group(1)
            except AttributeError:
                pass
    if model == "vae":
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.(\d+)$", path)
        if m:
            return f"vae.{'enc' if m.group(1) == 'encoder' else 'dec'}.mid.attn{m.group(2)}"
        return f"vae:{path}"
    if model == "transformer":
        names = [name.replace("{L}", m.group(1)) for pattern, name, fam in _T_PATH
                 if (family is None or fam == family) and (m := pattern.match(path))]
        return names[0] if len(names) == 1 else f"transformer:{path}"
    m = _PATH.match(path)
    if not m:
        return f"{model}:{path}"
    base = (f"unet.{'down' if m.group(1) == 'down_blocks' else 'up'}{m.group(2)}" if m.group(1) else "unet.mid")
    return f"{base}.attn{m.group(3)}" + (f".tb{m.group(4)}" if m.group(4) is not None else "")


def _family_of(model: nn.Module) -> str | None:
    return _FAMILY_OF_CLASS.get(type(model).__name__)


def resolve(model: nn.Module, model_key: str, site: str) -> nn.Module:
    """The self-attention module a site names inside ``model``."""
    key, path = site_path(site)
    if key != model_key:
        raise fail(f"site {site!r} belongs to the {key}, not the {model_key}")
    fam, own = site_family(site), _family_of(model)
    if fam is not None and own is not None and fam != own:
        raise fail(f"site {site!r} is a site of a {fam} transformer, not of this {type(model).__name__}; its sites: "
                   f"{', '.join(list_sites(model, model_key)[:6])}, …")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise fail(f"site {site!r} ({path}) does not exist in this {model_key}; its sites: "
                   f"{', '.join(list_sites(model, model_key)) or 'none'}") from None
    tb = _tb(site)
    if tb is None and _is_self_attention(module):
        return module
    blocks = getattr(module, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        if tb is None and len(blocks) > 1:
            raise fail(f"site {site!r} ({path}) holds {len(blocks)} transformer blocks; name one: {site}.tb0 … "
                       f"{site}.tb{len(blocks) - 1}")
        k = tb or 0
        if k >= len(blocks):
            raise fail(f"site {site!r}: {path} has transformer blocks tb0 … tb{len(blocks) - 1} only")
        inner = getattr(blocks[k], "attn1", None)
        if inner is not None and _is_self_attention(inner):
            return inner
    elif tb is None and _is_self_attention(getattr(module, "attn1", None)):
        return module.attn1
    raise fail(f"site {site!r} ({path}) is not a self-attention module")


def module_path(model: nn.Module, model_key: str, site: str) -> str:
    """The full module path of the attention a site names (``down_blocks.2.attentions.0.transformer_blocks.3.attn1``)."""
    target = resolve(model, model_key, site)
    return next(name for name, m in model.named_modules() if m is target)


def site_channels(attn: nn.Module) -> int:
    """Channels of a site's ``attn`` reading: the output projection's width (FLUX single-stream: the attention's)."""
    out = getattr(attn, "to_out", None)
    if isinstance(out, nn.ModuleList) and len(out) and isinstance(out[0], nn.Linear):
        return out[0].out_features
    return int(getattr(attn, "inner_dim", getattr(attn, "out_dim", 0)))


def select_sites(sites: list[str], patterns, what: str) -> list[str]:
    """The sites (in their order) that one of ``patterns`` names — a canonical name or a shell pattern
    (``flux.double*``); a pattern that matches no site is one error line listing them (``what``: the model)."""
    import fnmatch
    chosen = set()
    for pat in patterns:
        hit = [s for s in sites if s == pat or fnmatch.fnmatchcase(s, pat)]
        if not hit:
            raise fail(f"site {pat!r} (capture.sites) is not a site of this {what}; sites: {', '.join(sites)}")
        chosen.update(hit)
    return [s for s in sites if s in chosen]


def list_sites(model: nn.Module, model_key: str) -> list[str]:
    """Every self-attention site of ``model`` in forward order (down → mid → up; encoder → decoder; block by block;
    FLUX: double-stream blocks, then single-stream)."""
    names: list[str] = []
    if model_key == "transformer":
        family = _family_of(model)
        for path, module in model.named_modules():
            if _is_self_attention(module):
                name = site_name("transformer", path, family)
                if ":" not in name and name not in names:
                    names.append(name)
        return names
    for path, module in model.named_modules():
        if not _is_self_attention(module):
            continue
        if model_key == "unet" and ".attn2" in path:
            continue
        name = site_name(model_key, path, module=model)      # SD: one name per stack, or per block in a deep stack
        if name not in names:
            names.append(name)
    order = {"down": 0, "mid": 1, "up": 2, "enc": 0, "dec": 1}

    def key(n: str) -> tuple:
        m = re.match(r"^(unet|vae)\.(?:(down|up)(\d+)|(mid)|(enc|dec)\.mid)\.attn(\d+)(?:\.tb(\d+))?$", n)
        if not m:
            return (9, n)
        part = m.group(2) or m.group(4) or m.group(5)
        return (order[part], int(m.group(3) or 0), int(m.group(6)), int(m.group(7) or 0))
    return sorted(names, key=key)


# ------------------------------------------------------------------------------------------- tokens ↔ latent grid
@dataclass(frozen=True)
class TokenGrid:
    """How a site's token sequence (B, T, C) lies on the latent's H×W grid.

    Token ``text_before + r·cols + c`` (row-major) covers the latent cells ``[r·cell, (r+1)·cell) × [c·cell,
    (c+1)·cell)``; the ``text_before`` tokens ahead of the image tokens are text and are never positions.
    ``cell`` is the patch size of a DiT's patch embedding, 2 for FLUX's 2×2 packing of the latent, 2^level for a
    U-Net site below the latent's resolution, 1 for the VAE's mid-attention.
    """
    height: int           # latent H
    width: int            # latent W
    cell: int             # latent cells per token side
    text_before: int = 0  # text tokens ahead of the image tokens in the site's sequence

    @property
    def rows(self) -> int:
        return self.height // self.cell

    @property
    def cols(self) -> int:
        return self.width // self.cell

    @property
    def tokens(self) -> int:
        """Length of the site's sequence: text tokens, then rows × cols image tokens."""
        return self.text_before + self.rows * self.cols

    def position(self, index: int) -> tuple[int, int] | None:
        """Token index → the latent (row, col) of the top-left cell it covers; None for a text token."""
        if not 0 <= index < self.tokens:
            raise IndexError(f"token {index} is outside 0 … {self.tokens - 1}")
        if index < self.text_before:
            return None
        r, c = divmod(index - self.text_before, self.cols)
        return r * self.cell, c * self.cell

    def index(self, row: int, col: int) -> int:
        """Latent (row, col) → the index of the token that covers it."""
        if not (0 <= row < self.height and 0 <= col < self.width):
            raise IndexError(f"latent position ({row}, {col}) is outside {self.height}x{self.width}")
        return self.text_before + (row // self.cell) * self.cols + col // self.cell

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, C, rows, cols): text tokens dropped, image tokens in their places."""
        b, t, c = tokens.shape
        if t != self.tokens:
            raise ValueError(f"{t} tokens do not fit this grid ({self.text_before} text + {self.rows}x{self.cols})")
        img = tokens[:, self.text_before:]                                       # (B, rows·cols, C)
        return img.transpose(1, 2).reshape(b, c, self.rows, self.cols)           # (B, C, rows, cols)

    def to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, C, H, W): each token repeated over the cell×cell latent cells it covers (nearest)."""
        g = self.to_grid(tokens)                                                 # (B, C, rows, cols)
        return g.repeat_interleave(self.cell, dim=2).repeat_interleave(self.cell, dim=3)  # (B, C, H, W)


def token_grid(site: str, config: dict, latent_hw: tuple[int, int], text_tokens: int = 0) -> TokenGrid:
    """Where the tokens of ``site`` lie on a latent of ``latent_hw`` = (H, W), for a denoiser of this ``config``.

    * U-Net (``unet.*``): down block b runs at 1/2^b of the latent, the mid block at 1/2^(n−1), up block b at
      1/2^(n−1−b), n = ``len(block_out_channels)`` (every block but the last halves the resolution); no text tokens.
    * VAE (``vae.*.mid.*``): the mid-attention runs at the latent's own resolution.
    * PixArt (``dit``) and SD3 (``mmdit``): ``config["patch_size"]`` (2 in the released models) latent cells per
      token side, row-major (``PatchEmbed``: a strided conv, then flatten); the ``attn`` reading is image tokens only.
    * FLUX (``flux``): the pipeline packs each 2×2 latent cells into one token (``_pack_latents``), row-major over
      H/2 × W/2; the double-stream ``attn.img`` reading is image tokens only; the single-stream ``attn`` reading is
      ``text_tokens`` text tokens (the T5 sequence: ``max_sequence_length``, 512 for FLUX.1-dev), then the image.
    """
    h, w = (int(v) for v in latent_hw)
    fam = site_family(site)
    text = 0
    if fam is None:
        key, _ = site_path(site)
        if key == "vae":
            cell = 1
        elif key == "unet":
            m = _UNET.match(site)
            if not m:
                raise fail(f"site {site!r}: a raw module path has no known grid; use a canonical name")
            n = len(config.get("block_out_channels") or ())
            if n == 0:
                raise fail("the U-Net config has no block_out_channels; pass the unet/config.json of the folder")
            b = int(m.group(2)) if m.group(2) else None
            level = n - 1 if m.group(1) is None else b if m.group(1) == "down" else n - 1 - b
            cell = 2 ** level
        else:
            raise fail(f"site {site!r}: a raw module path has no known grid; use a canonical name")
    elif fam == "flux":
        cell = 2                                         # the pipeline's 2×2 packing (the transformer's x_embedder is a Linear)
        if site.startswith("flux.single"):
            text = int(text_tokens)
    else:
        cell = int(config.get("patch_size") or 2)
    if h % cell or w % cell:
        raise fail(f"latent {h}x{w} is not divisible by the {cell}x{cell} cells of site {site}")
    return TokenGrid(h, w, cell, text)
