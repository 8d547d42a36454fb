"""Model families and their sites (issue 21, builds 1 and 2 without capture): the detector reads model_index.json;
canonical sites of SD 1.x/2.x, SDXL, PixArt, SD3 and FLUX map to the module paths of the installed diffusers, and each
site's tokens map back to the right latent position (token_grid). Tiny random-weight folders are built here; no
network, no text encoders (listing sites needs the denoiser's config only).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_bad_inputs import assert_one_line_error, run_cli, tree_hash

# ------------------------------------------------------------------------------------------- tiny denoisers
SD1_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                norm_num_groups=2)
SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=2, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + 16, use_linear_projection=True)
PIXART = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
              num_attention_heads=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=2)
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
           pos_embed_max_size=16, dual_attention_layers=(0,))
FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))

# family key → (pipeline class, denoiser part, denoiser class, its tiny config, other parts named in model_index.json)
PIPES = {
    "sd": ("StableDiffusionPipeline", "unet", "UNet2DConditionModel", SD1_UNET, ("text_encoder", "tokenizer")),
    "sdxl": ("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", SDXL_UNET,
             ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
    "pixart": ("PixArtSigmaPipeline", "transformer", "PixArtTransformer2DModel", PIXART, ("text_encoder", "tokenizer")),
    "sd3": ("StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", SD3,
            ("text_encoder", "text_encoder_2", "text_encoder_3")),
    "flux": ("FluxPipeline", "transformer", "FluxTransformer2DModel", FLUX, ("text_encoder", "text_encoder_2")),
}

# The expected sites, with the module paths of diffusers 0.42 (each checked to resolve in the loaded model).
EXPECTED = {
    "sd": [("unet.down0.attn0", "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
           ("unet.mid.attn0", "unet:mid_block.attentions.0.transformer_blocks.0.attn1"),
           ("unet.up1.attn0", "unet:up_blocks.1.attentions.0.transformer_blocks.0.attn1"),
           ("unet.up1.attn1", "unet:up_blocks.1.attentions.1.transformer_blocks.0.attn1")],
    "sdxl": [("unet.down1.attn0", "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1"),
             ("unet.down2.attn0.tb0", "unet:down_blocks.2.attentions.0.transformer_blocks.0.attn1"),
             ("unet.down2.attn0.tb1", "unet:down_blocks.2.attentions.0.transformer_blocks.1.attn1"),
             ("unet.mid.attn0.tb0", "unet:mid_block.attentions.0.transformer_blocks.0.attn1"),
             ("unet.mid.attn0.tb1", "unet:mid_block.attentions.0.transformer_blocks.1.attn1"),
             ("unet.up0.attn0.tb0", "unet:up_blocks.0.attentions.0.transformer_blocks.0.attn1"),
             ("unet.up0.attn0.tb1", "unet:up_blocks.0.attentions.0.transformer_blocks.1.attn1"),
             ("unet.up0.attn1.tb0", "unet:up_blocks.0.attentions.1.transformer_blocks.0.attn1"),
             ("unet.up0.attn1.tb1", "unet:up_blocks.0.attentions.1.transformer_blocks.1.attn1"),
             ("unet.up1.attn0", "unet:up_blocks.1.attentions.0.transformer_blocks.0.attn1"),
             ("unet.up1.attn1", "unet:up_blocks.1.attentions.1.transformer_blocks.0.attn1")],
    "pixart": [("dit.block0.attn", "transformer:transformer_blocks.0.attn1"),
               ("dit.block1.attn", "transformer:transformer_blocks.1.attn1")],
    "sd3": [("mmdit.block0.attn.img", "transformer:transformer_blocks.0.attn"),
            ("mmdit.block0.attn2", "transformer:transformer_blocks.0.attn2"),
            ("mmdit.block1.attn.img", "transformer:transformer_blocks.1.attn")],
    "flux": [("flux.double0.attn.img", "transformer:transformer_blocks.0.attn"),
             ("flux.single0.attn", "transformer:single_transformer_blocks.0.attn")],
}
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=2,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def make_model(key: str, **over):
    import diffusers
    torch.manual_seed(0)
    _, _, cls, cfg, _ = PIPES[key]
    return getattr(diffusers, cls)(**{**cfg, **over}).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny pipeline folder per family: model_index.json + the denoiser's config.json and weights (SD: a VAE
    config too, so its sites are listed)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for key, (pipe, part, cls, _, others) in PIPES.items():
        d = root / key
        d.mkdir()
        index = {"_class_name": pipe, "_diffusers_version": "0.42.1", part: ["diffusers", cls],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                 **{o: ["transformers", "CLIPTextModel"] for o in others}}
        (d / "model_index.json").write_text(json.dumps(index))
        make_model(key).save_pretrained(d / part)
        if key == "sd":
            (d / "vae").mkdir()
            (d / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE}))
        out[key] = d
    return out


# ------------------------------------------------------------------------------------------------ the detector
@pytest.mark.parametrize("key", list(PIPES))
def test_the_family_of_each_folder(folders, key):
    from sceneprobe.models.families import pipeline_family
    fam = pipeline_family(folders[key])
    assert fam.key == key and fam.denoiser == PIPES[key][1] and fam.denoiser_class == PIPES[key][2]
    assert fam.capture                                   # every known family is captured (issue 21, build 1)


@pytest.mark.parametrize("index, expected", [
    ({"_class_name": "MyOwnPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": [1, 2]}, "sd"),
    ({"_class_name": "MyOwnPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": [1, 2]}, "sdxl"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "sdxl"),
    ({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}, "pixart"),
    ({"_class_name": "X", "transformer": ["diffusers", "SD3Transformer2DModel"]}, "sd3"),
    ({"_class_name": "FluxKontextPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, "flux"),
    ({"_class_name": "X", "transformer": None, "text_encoder_2": [1, 2]}, "flux"),
    ({"_class_name": "Flux2Pipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}, "FLUX.2"),
    ({"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}, "Sana"),
    ({"_class_name": "X", "transformer": ["diffusers", "WanTransformer3DModel"]}, "WanTransformer3DModel transformer"),
    ({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "Kandinsky"),
    ({"_class_name": "FluxPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "FluxPipeline with a unet"),
    ({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}, "unknown (no unet or transformer in model_index.json)"),
])
def test_detector_reads_the_denoiser_class_then_the_name_then_the_parts(index, expected):
    from sceneprobe.models.families import Family, detect_family
    fam = detect_family(index)
    assert (fam.key if isinstance(fam, Family) else fam) == expected


# --------------------------------------------------------------------------------------------------- the sites
@pytest.mark.parametrize("key", list(PIPES))
def test_sites_command_lists_each_site_with_its_module_and_writes_nothing(folders, key, capsys):
    before = tree_hash(folders[key])
    code, out, err = run_cli(capsys, ["sites", "--model", folders[key]])
    assert code == 0 and err == "", err
    lines = out.splitlines()
    from sceneprobe.models.families import FAMILIES
    assert lines[0].startswith(f"family {FAMILIES[key].title} ({PIPES[key][0]}")
    rows = [ln.split() for ln in lines[1:]]
    expected = EXPECTED[key] + ([("vae.enc.mid.attn0", "vae:encoder.mid_block.attentions.0"),
                                 ("vae.dec.mid.attn0", "vae:decoder.mid_block.attentions.0")] if key == "sd" else [])
    assert [(r[0], r[1]) for r in rows] == expected
    assert all(r[2] == "channels" and r[4] == "grid" for r in rows)
    assert tree_hash(folders[key]) == before                  # nothing written


@pytest.mark.parametrize("key", list(PIPES))
def test_every_listed_site_resolves_in_the_loaded_model_and_names_round_trip(folders, key):
    import diffusers
    from sceneprobe.models.sites import list_sites, module_path, resolve, site_channels, site_name, site_path
    _, part, cls, _, _ = PIPES[key]
    model = getattr(diffusers, cls).from_pretrained(folders[key] / part, local_files_only=True)
    sites = list_sites(model, part)
    assert [s for s, _ in EXPECTED[key]] == sites
    fam = None if part == "unet" else key
    for site, raw in EXPECTED[key]:
        attn = resolve(model, part, site)
        path = raw.split(":", 1)[1]
        assert attn is model.get_submodule(path) and module_path(model, part, site) == path
        assert site_name(part, path, module=model) == site              # module path → canonical name
        alias = site_name(part, path, fam)                              # without the model: .tb{k} on every stack
        assert alias == (site + ".tb0" if part == "unet" and ".tb" not in site else site)
        assert resolve(model, part, alias) is attn
        assert resolve(model, part, raw) is attn                       # raw paths are accepted too
        assert site_path(site)[0] == part
        assert site_channels(attn) > 0


def test_sd_v1_names_stay_as_they_were(folders):
    """The U-Net names of SD 1.x/2.x are unchanged; .tb0 on a one-block stack names the same module."""
    from sceneprobe.models.sites import resolve, site_path
    unet = make_model("sd")
    assert site_path("unet.down0.attn0") == ("unet", "down_blocks.0.attentions.0")
    assert site_path("unet.mid.attn0") == ("unet", "mid_block.attentions.0")
    assert resolve(unet, "unet", "unet.down0.attn0.tb0") is resolve(unet, "unet", "unet.down0.attn0")


def test_a_deep_stack_needs_its_block_and_a_site_of_another_family_is_refused():
    from sceneprobe.errors import SceneprobeError
    from sceneprobe.models.sites import resolve
    sdxl = make_model("sdxl")
    with pytest.raises(SceneprobeError, match=r"holds 2 transformer blocks; name one: unet.down2.attn0.tb0"):
        resolve(sdxl, "unet", "unet.down2.attn0")
    with pytest.raises(SceneprobeError, match="tb0 … tb1 only"):
        resolve(sdxl, "unet", "unet.down2.attn0.tb5")
    flux = make_model("flux")
    with pytest.raises(SceneprobeError, match="site 'mmdit.block0.attn.img' is a site of a sd3 transformer"):
        resolve(flux, "transformer", "mmdit.block0.attn.img")        # the same module path in SD3 and FLUX
    with pytest.raises(SceneprobeError, match="unknown site"):
        resolve(flux, "transformer", "flux.triple0.attn")


# ---------------------------------------------------------------------------------------- tokens ↔ latent grid
class _Stop(Exception):
    pass


def _attn_input(model, path: str, run) -> torch.Tensor:
    """The hidden states fed to the attention at ``path`` (the forward stops there)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _Stop
    handle = model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]                                                   # (B, T, C)


def _forward(key: str, model, latent: torch.Tensor, text: int = 3):
    """One forward of a tiny denoiser on ``latent`` (B, 4, H, W), as its pipeline calls it."""
    g = torch.Generator().manual_seed(1)
    b, c, h, w = latent.shape
    ctx = torch.randn(b, text, 16, generator=g)
    if key == "pixart":
        return lambda: model(latent, encoder_hidden_states=ctx, timestep=torch.tensor([500]),
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if key == "sd3":
        return lambda: model(latent, encoder_hidden_states=ctx, pooled_projections=torch.randn(b, 16, generator=g),
                             timestep=torch.tensor([500.0]))
    from diffusers import FluxPipeline                                 # the pipeline's own packing and ids
    packed = FluxPipeline._pack_latents(latent, b, c, h, w)              # (B, H/2·W/2, 4C)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    return lambda: model(packed, encoder_hidden_states=ctx, pooled_projections=torch.randn(b, 16, generator=g),
                         timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(text, 3))


@pytest.mark.parametrize("key, site, over", [
    ("pixart", "dit.block0.attn", {}),
    ("sd3", "mmdit.block0.attn.img", {}),
    ("flux", "flux.double0.attn.img", {}),
    ("flux", "flux.single0.attn", {"num_layers": 0}),                # its first token-mixing layer
])
def test_a_token_maps_to_the_latent_position_it_sees(key, site, over):
    """Nudge one latent position: before the first attention only per-token maps have run, so exactly one token of
    the attention's input changes — the one token_grid says covers that position (FLUX: after the text tokens)."""
    from sceneprobe.models.sites import site_path, token_grid
    model = make_model(key, **over)
    text, (h, w) = 3, (8, 12)
    grid = token_grid(site, dict(model.config), (h, w), text_tokens=text)
    path = site_path(site)[1]
    latent = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    base = _attn_input(model, path, _forward(key, model, latent, text))
    assert base.shape[1] == grid.tokens
    for r, c in [(0, 0), (3, 5), (7, 11), (6, 1)]:
        moved = latent.clone()
        moved[0, :, r, c] += 1.0
        diff = (_attn_input(model, path, _forward(key, model, moved, text)) - base).abs().sum(-1)[0]  # (T,)
        changed = torch.nonzero(diff > 1e-6).flatten().tolist()
        assert changed == [grid.index(r, c)], (r, c, changed)
        cell = grid.cell
        assert grid.position(changed[0]) == (r // cell * cell, c // cell * cell)
        lat = grid.to_latent(diff[None, :, None])[0, 0]                 # (H, W)
        assert lat[r, c] > 0 and int((lat > 0).sum()) == cell * cell
    assert all(grid.position(i) is None for i in range(grid.text_before))
    assert grid.text_before == (text if site.startswith("flux.single") else 0)


def test_unet_sites_lie_at_their_blocks_resolution():
    """U-Net tokens: down b at 1/2^b of the latent, mid at the lowest, up b mirrored — the token count each site's
    attn reading really has in a forward of the tiny SD U-Net."""
    from sceneprobe.models.sites import list_sites, resolve, token_grid
    unet = make_model("sd")
    counts, handles = {}, []
    for site in list_sites(unet, "unet"):
        handles.append(resolve(unet, "unet", site).to_out[0].register_forward_hook(
            lambda m, a, y, s=site: counts.__setitem__(s, y.shape[1])))
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 12), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 3, 16))
    finally:
        for h in handles:
            h.remove()
    grids = {s: token_grid(s, dict(unet.config), (8, 12)) for s in counts}
    assert {s: (g.rows, g.cols) for s, g in grids.items()} == {
        "unet.down0.attn0": (8, 12), "unet.mid.attn0": (4, 6), "unet.up1.attn0": (8, 12), "unet.up1.attn1": (8, 12)}
    assert counts == {s: g.tokens for s, g in grids.items()}


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name, setup, needle", [
    ("not-a-folder", lambda b: (b / "file.txt").write_text("x"), "is not a folder"),
    ("missing", lambda b: None, "is not a folder"),
    ("no-index", lambda b: (b / "empty").mkdir(), "no model_index.json"),
    ("bad-json", lambda b: ((b / "bad").mkdir(), (b / "bad" / "model_index.json").write_text("{nope")),
     "model_index.json is not a JSON object"),
    ("unsupported", lambda b: ((b / "kand").mkdir(), (b / "kand" / "model_index.json").write_text(json.dumps(
        {"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))),
     "holds a pipeline of the Kandinsky family (KandinskyV22Pipeline in model_index.json); sceneprobe knows "
     "Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL"),
    ("no-denoiser-config", lambda b: ((b / "flux").mkdir(), (b / "flux" / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))),
     "has no transformer/config.json"),
])
def test_sites_bad_input_is_one_line(tmp_path, capsys, name, setup, needle):
    setup(tmp_path)
    target = {"not-a-folder": "file.txt", "missing": "nothing", "no-index": "empty", "bad-json": "bad",
              "unsupported": "kand", "no-denoiser-config": "flux"}[name]
    before = tree_hash(tmp_path)
    code, out, err = run_cli(capsys, ["sites", "--model", tmp_path / target])
    assert_one_line_error(code, err, needle)
    assert out == "" and tree_hash(tmp_path) == before


def test_sites_help(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, ["sites", "--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out
