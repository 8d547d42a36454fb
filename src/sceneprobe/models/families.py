"""Which model family a local diffusers pipeline folder holds, read from its ``model_index.json`` (no weights).

The one detector (issue 21): Stable Diffusion 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5 and FLUX.1 are known; anything else
is one error line naming the family and the known ones. Every known family is captured: SD 1.x/2.x by
``capture/sd.py``, the others by their own diffusers pipeline (``capture/pipelines.py``); the sites of every known
family are listed by ``sceneprobe sites`` (:mod:`.sites`).

Evidence, strongest first: the denoiser's class in ``model_index.json`` (``transformer``: ``PixArtTransformer2DModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel`` decide; any other transformer is unsupported), then the pipeline's
``_class_name`` (``StableDiffusionXL…`` is SDXL; Kandinsky, IF, … are unsupported), then the parts (``text_encoder_2``
beside a ``unet`` is SDXL; a ``unet`` alone is SD 1.x/2.x).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import fail


@dataclass(frozen=True)
class Family:
    """A known family: its key, its short name (error lines), its title (listings) and its denoiser."""
    key: str              # "sd", "sdxl", "pixart", "sd3", "flux"
    name: str             # short name: "SD v1/v2", "SDXL", "PixArt", "SD3", "FLUX"
    title: str            # "SD3/3.5", …
    pipelines: tuple[str, ...]  # the diffusers pipeline classes of the family (the first is the plain text-to-image one)
    denoiser: str         # the pipeline part that denoises: "unet" or "transformer"
    denoiser_class: str   # its diffusers class
    prefix: str           # the canonical sites' prefix (sites.py): unet, dit, mmdit, flux
    capture: bool = True   # capture supports it (every known family; SD v1/v2 by capture/sd.py)


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("sd", "SD v1/v2", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), "unet", "UNet2DConditionModel",
           "unet"),
    Family("sdxl", "SDXL", "SDXL", ("StableDiffusionXLPipeline",), "unet", "UNet2DConditionModel", "unet"),
    Family("pixart", "PixArt", "PixArt-α/Σ", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer",
           "PixArtTransformer2DModel", "dit"),
    Family("sd3", "SD3", "SD3/3.5", ("StableDiffusion3Pipeline",), "transformer", "SD3Transformer2DModel", "mmdit"),
    Family("flux", "FLUX", "FLUX.1", ("FluxPipeline",), "transformer", "FluxTransformer2DModel", "flux"),
)}
KNOWN = ", ".join(f"{f.title} ({'/'.join(f.pipelines)})" for f in FAMILIES.values())
CAPTURE_SUPPORTED = KNOWN

_BY_TRANSFORMER = {f.denoiser_class: f for f in FAMILIES.values() if f.denoiser == "transformer"}
# Pipeline class prefixes, most specific first: a known family's key, or the name of an unsupported family.
_BY_PIPELINE = (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux2", "FLUX.2"), ("Flux", "flux"),
                ("PixArt", "pixart"), ("Sana", "Sana"), ("Kandinsky", "Kandinsky"), ("IF", "DeepFloyd IF"),
                ("Wuerstchen", "Würstchen"), ("StableCascade", "Stable Cascade"), ("Lumina", "Lumina"),
                ("HunyuanDiT", "Hunyuan-DiT"), ("AuraFlow", "AuraFlow"), ("CogView", "CogView"), ("Latte", "Latte"),
                ("DiT", "DiT"), ("QwenImage", "Qwen-Image"), ("Chroma", "Chroma"), ("HiDream", "HiDream"))
_PARTS = (("text_encoder_3", "sd3"), ("text_encoder_2", "sdxl"), ("prior", "prior-based"), ("decoder", "two-stage"))


def _part_class(index: dict, part: str) -> str | None:
    """The class a ``model_index.json`` entry names (``["diffusers", "UNet2DConditionModel"]``), if any."""
    entry = index.get(part)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def detect_family(index: dict) -> Family | str:
    """The family of a pipeline from its ``model_index.json``: a known :class:`Family`, or the name (str) of an
    unsupported one."""
    name = str(index.get("_class_name", ""))
    by_name = next((fam for prefix, fam in _BY_PIPELINE if name.startswith(prefix)), None)
    if "transformer" in index:
        cls = _part_class(index, "transformer")
        if cls in _BY_TRANSFORMER:
            return _BY_TRANSFORMER[cls]
        if cls is not None:                                         # a transformer of another kind
            label = by_name if by_name and by_name not in FAMILIES else f"{cls} transformer"
            return label
        if by_name in FAMILIES and FAMILIES[by_name].denoiser == "transformer":
            return FAMILIES[by_name]                                 # class left out: trust the pipeline's name
        if by_name is None and "text_encoder_2" in index and "text_encoder_3" not in index:
            return FAMILIES["flux"]                                  # CLIP + T5 around a transformer
        if by_name is None and "text_encoder_3" in index:
            return FAMILIES["sd3"]
        return by_name if by_name and by_name not in FAMILIES else "transformer (DiT)"
    if by_name is not None:
        fam = FAMILIES.get(by_name, by_name)
        if isinstance(fam, Family) and fam.denoiser == "transformer" and "unet" in index:
            return f"{name} with a unet"                             # a DiT family's name over a U-Net
        return fam
    for part, fam in _PARTS:
        if part in index:
            return FAMILIES.get(fam, fam)
    if "unet" in index:
        cls = _part_class(index, "unet")
        if cls not in (None, "UNet2DConditionModel"):
            return f"{cls} U-Net"
        return FAMILIES["sd"]
    return "unknown (no unet or transformer in model_index.json)"


def read_model_index(folder: Path, option: str = "--model",
                     what: str = "a local diffusers pipeline folder") -> dict:
    """``folder/model_index.json`` as a dict; a missing folder or file, or bad JSON, is one error line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise fail(f"{option} {folder} is not a folder; pass {what} (with model_index.json)")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise fail(f"{option} {folder} is not {what} (no model_index.json)")
    try:
        index = json.loads(index_file.read_bytes()[:1 << 20].decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        index = None
    if not isinstance(index, dict):
        raise fail(f"{option} {folder}: model_index.json is not a JSON object; pass {what} as saved by "
                   f"save_pretrained")
    return index


def pipeline_family(folder: Path, option: str = "--model") -> Family:
    """The known family of a pipeline folder; an unsupported one is one line naming it and the known ones."""
    index = read_model_index(folder, option)
    fam = detect_family(index)
    if not isinstance(fam, Family):
        raise fail(f"{option} {folder} holds a pipeline of the {fam} family ({index.get('_class_name', '?')} in "
                   f"model_index.json); sceneprobe knows {KNOWN}; pass one of those")
    return fam


def read_denoiser_config(folder: Path, family: Family, option: str = "--model") -> dict:
    """The denoiser's ``config.json`` (``unet/`` or ``transformer/``); its class must be the family's."""
    path = Path(folder) / family.denoiser / "config.json"
    if not path.is_file():
        raise fail(f"{option} {folder} ({family.title}) has no {family.denoiser}/config.json; pass the whole "
                   f"pipeline folder as saved by save_pretrained")
    try:
        config = json.loads(path.read_bytes()[:1 << 22].decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(f"{path} is not valid JSON ({type(e).__name__}); re-save the pipeline") from None
    if not isinstance(config, dict):
        raise fail(f"{path} must hold a JSON object; re-save the pipeline")
    made = config.get("_class_name")
    if made not in (None, family.denoiser_class):
        raise fail(f"{path} describes a {made}, not the {family.denoiser_class} of a {family.title} pipeline; "
                   f"pass a folder whose {family.denoiser}/ matches its model_index.json")
    return config


def build_denoiser(config: dict, family: Family, device: str = "meta"):
    """The family's denoiser built from its config alone (on the meta device by default: no memory, no weights) —
    enough to list and resolve its sites."""
    import torch
    import diffusers
    cls = getattr(diffusers, family.denoiser_class)
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device(device):
            return cls.from_config(clean).eval()
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise fail(f"the {family.denoiser}/config.json of this {family.title} pipeline does not build a "
                   f"{family.denoiser_class} ({type(e).__name__}: {first[:160]}); re-save the pipeline") from None


def latent_size(folder: Path, family: Family, config: dict) -> tuple[int, int, str]:
    """(H, W) of the latent the denoiser sees by default, and where that came from.

    The denoiser's ``sample_size`` where it has one (U-Nets, PixArt, SD3: in latent cells); FLUX has none: its
    pipeline's default 1024 px over the VAE's factor (``vae/config.json``, else 8).
    """
    size = config.get("sample_size")
    if isinstance(size, int) and size > 0:
        return size, size, f"{family.denoiser}/config.json sample_size"
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1]), f"{family.denoiser}/config.json sample_size"
    factor, source = 8, "VAE factor 8"
    vae_cfg = Path(folder) / "vae" / "config.json"
    try:
        blocks = json.loads(vae_cfg.read_bytes()[:1 << 20].decode("utf-8")).get("block_out_channels")
        if isinstance(blocks, list) and blocks:
            factor, source = 2 ** (len(blocks) - 1), f"VAE factor {2 ** (len(blocks) - 1)} (vae/config.json)"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        pass
    side = 1024 // factor
    return side, side, f"1024 px default, {source}"


@dataclass(frozen=True)
class SiteRow:
    """One line of ``sceneprobe sites``."""
    site: str          # canonical name
    path: str          # model key : full module path of the attention
    channels: int      # channels of the site's attn reading
    grid: str          # rows x cols of its tokens on the latent, and the cells per token


def pipeline_sites(folder: Path, option: str = "--model") -> tuple[Family, str, list[SiteRow]]:
    """The family of a pipeline folder, a header line and its canonical sites (denoiser first, then the VAE's when
    the folder has ``vae/config.json``), from configs alone: the models are built on the meta device, no weights
    are read, nothing is written."""
    from .sites import list_sites, module_path, resolve, site_channels, token_grid
    folder = Path(folder)
    family = pipeline_family(folder, option)
    config = read_denoiser_config(folder, family, option)
    model = build_denoiser(config, family)
    h, w, source = latent_size(folder, family, config)
    models = [(family.denoiser, model, config)]
    vae_cfg = folder / "vae" / "config.json"
    if vae_cfg.is_file():
        vae = _build_vae(vae_cfg)
        if vae is not None:
            models.append(("vae", vae, {}))
    rows = []
    for key, m, cfg in models:
        for site in list_sites(m, key):
            g = token_grid(site, cfg, (h, w))
            text = ", after the text tokens" if site.startswith("flux.single") else ""
            rows.append(SiteRow(site, f"{key}:{module_path(m, key, site)}", site_channels(resolve(m, key, site)),
                                f"{g.rows}x{g.cols} ({g.cell}x{g.cell} latent cells per token{text})"))
    header = (f"family {family.title} ({index_class(folder)}, {family.denoiser} {family.denoiser_class}); latent "
              f"{h}x{w} ({source}); {len(rows)} sites; capture: "
              f"{'supported' if family.capture else 'not yet'}")
    return family, header, rows


def check_site_selection(folder: Path, patterns, option: str = "--model") -> None:
    """``capture.sites`` against the folder's capture sites (denoiser and VAE decoder), read from its configs alone:
    a pattern that names none is one error line before any weight is loaded (the capture applies the selection)."""
    if not patterns:
        return
    from .sites import select_sites
    family, _, rows = pipeline_sites(folder, option)
    select_sites([r.site for r in rows if not r.site.startswith("vae.enc")], patterns, f"{family.title} model")


def index_class(folder: Path) -> str:
    return str(read_model_index(folder).get("_class_name", "?"))


def _build_vae(path: Path):
    """The folder's ``AutoencoderKL`` on the meta device (its mid-attention sites), or None for another VAE class or
    an unreadable config (the denoiser's sites are still listed)."""
    import torch
    from diffusers import AutoencoderKL
    try:
        cfg = json.loads(path.read_bytes()[:1 << 20].decode("utf-8"))
        if not isinstance(cfg, dict) or cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            return None
        with torch.device("meta"):
            return AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, RuntimeError):
        return None
