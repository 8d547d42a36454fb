"""Capture of SDXL, PixArt, SD3 and FLUX by their own diffusers pipelines (issue 21): tiny random-weight folders built
here (tests/tiny_pipelines.py), no downloads. Per family: the sites and the schedule, one capture (the conditional
half, placed on the latent grid), the images against the pipeline called without hooks, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from tiny_pipelines import BUILDERS  # noqa: E402

from sceneprobe.capture.pipelines import load_pipeline, prepare_pipeline, run_capture_pipeline  # noqa: E402
from sceneprobe.capture.store import CaptureStore  # noqa: E402
from sceneprobe.errors import SceneprobeError  # noqa: E402
from sceneprobe.models.sites import site_path  # noqa: E402

FAMILIES = list(BUILDERS)
SITES = {
    "sdxl": ["unet.down1.attn0.tb0", "unet.down1.attn0.tb1", "unet.mid.attn0.tb0", "unet.mid.attn0.tb1",
             "unet.up0.attn0.tb0", "unet.up0.attn0.tb1", "unet.up0.attn1.tb0", "unet.up0.attn1.tb1",
             "vae.dec.mid.attn0"],
    "pixart": ["dit.block0.attn", "dit.block1.attn", "vae.dec.mid.attn0"],
    "sd3": ["mmdit.block0.attn.img", "mmdit.block0.attn2", "mmdit.block1.attn.img", "vae.dec.mid.attn0"],
    "flux": ["flux.double0.attn.img", "flux.single0.attn", "vae.dec.mid.attn0"],
}
# the site whose raw tokens the capture test places by hand: a text+image sequence for FLUX's single stream
PROBED = {"sdxl": "unet.mid.attn0.tb1", "pixart": "dit.block1.attn", "sd3": "mmdit.block0.attn.img",
          "flux": "flux.single0.attn"}
OPTS = dict(steps=2, guidance=5.0, height=32, width=32)    # 32 px → latent 16×16 (VAE factor 2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {key: build(root / key) for key, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "p.csv"
    p.write_text("prompt,seed\na red cube,11\nblue ball on grass,12\n")
    return p


@pytest.mark.parametrize("key", FAMILIES)
def test_sites_shapes_and_the_schedule_with_sigmas(folders, prompts, key):
    m = prepare_pipeline(folders[key], prompts, **OPTS)
    assert m.sampler.family.key == key and m.sites == SITES[key]
    for s in m.sites:      # latent 16×16: DiT patches and FLUX's packing are 2×2, SDXL's attention one level down
        c, h, w = m.shapes[s]
        assert c == 16 and (h, w) == ((16, 16) if s.startswith("vae") else (8, 8)), (s, m.shapes[s])
    assert m.n_steps == 2 and len(m.timesteps) == 2 and len(m.sigmas) == 2
    assert m.sigmas[0] > m.sigmas[1] > 0                               # noisiest first
    if key in ("sd3", "flux"):                                         # flow matching: σ in (0, 1], t = 1000 σ
        assert m.sigmas[0] <= 1.0
        np.testing.assert_allclose(m.sampler.schedule["timesteps"], [1000 * s for s in m.sigmas], rtol=1e-5)


@pytest.mark.parametrize("key", FAMILIES)
def test_capture_keeps_the_conditional_half_on_the_latent_grid(folders, prompts, tmp_path, key):
    out = run_capture_pipeline(folders[key], prompts, tmp_path / "captures" / "sd" / "ldm", **OPTS, batch_size=2,
                               progress=False)
    st = CaptureStore(out)
    st.verify()
    if key != "flux":                                                  # the uncond reading: the same pass's first half
        unc = CaptureStore(run_capture_pipeline(folders[key], prompts, tmp_path / "captures" / "sd" / "uncond",
                                                **OPTS, batch_size=2, control="uncond", progress=False))
        assert unc.manifest["cfg_half"] == "uncond" and unc.manifest["site_order"] == SITES[key][:-1]  # no VAE
    man = st.manifest
    assert man["family"] == key and man["site_order"] == SITES[key] and st.n == 2
    assert len(man["timesteps"]) == len(man["sigmas"]) == 2 and man["sigma_kind"]
    assert (tmp_path / "captures" / "sd" / "samples.safetensors").is_file()
    # Reference: the same pipeline call with a plain hook on the site's reading that keeps everything it sees.
    pipe = load_pipeline(folders[key])
    m = prepare_pipeline(folders[key], prompts, **OPTS, pipe=pipe)
    site = PROBED[key]
    key_, path = site_path(site)
    from sceneprobe.models.sites import resolve
    den = getattr(pipe, m.sampler.family.denoiser)
    attn = resolve(den, key_, site)
    target = attn.to_out[0] if hasattr(attn, "to_out") else attn
    raw: list[torch.Tensor] = []
    dec: list[torch.Tensor] = []                                       # the pipeline's own final decode, mid attention
    h = target.register_forward_hook(lambda mod, i, o: raw.append((o[0] if isinstance(o, tuple) else o).detach()))
    hv = pipe.vae.decoder.mid_block.attentions[0].to_out[0].register_forward_hook(lambda mod, i, o: dec.append(o))
    try:
        pipe(**m.sampler.call_options(m.prompts, m.seeds))
    finally:
        h.remove()
        hv.remove()
    assert len(raw) == 2 and len(dec) == 1                             # one denoiser call per step
    # the VAE site at the last step reads the final latent as the pipeline decodes it (FLUX unpacked, shift, scale)
    final = dec[0].transpose(1, 2).reshape(2, -1, 16, 16)
    torch.testing.assert_close(st.read("vae.dec.mid.attn0", 1), final.half().float(), atol=2e-3, rtol=2e-3)
    for step, y in enumerate(raw):
        c = y.shape[-1]
        if key == "flux":                                              # FLUX: no CFG batch
            assert y.shape[0] == 2
            cond = y[:, -64:]                                          # the last 8×8 tokens are the image
        else:                                                          # [uncond, cond]
            assert y.shape[0] == 4
            cond = y[2:]
        want = cond.transpose(1, 2).reshape(2, c, 8, 8)
        got = st.read(site, step)
        torch.testing.assert_close(got, want.half().float(), atol=2e-3, rtol=2e-3)
        if key != "flux":
            uncond = y[:2].transpose(1, 2).reshape(2, c, 8, 8)
            assert not torch.allclose(got, uncond, atol=1e-4)
            torch.testing.assert_close(unc.read(site, step), uncond.half().float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("key", FAMILIES)
def test_capture_images_equal_the_pipeline_called_without_hooks(folders, prompts, tmp_path, key):
    """The pipeline samples, so this holds by construction; the test guards the callback and the hooks: same
    prompts, seeds, options and batch, no hooks → the same bytes."""
    neg = "" if key == "flux" else "blurry"                            # FLUX runs no CFG batch: no negative prompt
    out = run_capture_pipeline(folders[key], prompts, tmp_path / "sd" / "ldm", **OPTS, batch_size=2,
                               negative_prompt=neg, progress=False)
    got = np.stack([np.asarray(Image.open(tmp_path / "sd" / "images" / f"{i:06d}.png")) for i in range(2)])
    pipe = load_pipeline(folders[key])
    m = prepare_pipeline(folders[key], prompts, **OPTS, negative_prompt=neg, pipe=pipe)
    kw = {**m.sampler.call_options(m.prompts, m.seeds), "output_type": "pil"}
    assert kw["num_inference_steps"] == 2 and len(kw["generator"]) == 2
    want = np.stack([np.asarray(im) for im in pipe(**kw).images])
    assert got.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(got, want)
    assert CaptureStore(out).manifest["negative_prompt"] == neg


def test_a_control_swaps_the_denoiser_for_one_call_only(folders, prompts, tmp_path):
    pipe = load_pipeline(folders["pixart"])
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = run_capture_pipeline(folders["pixart"], prompts, tmp_path / "sd" / "permuted", **OPTS, batch_size=2,
                               control="permuted", progress=False, pipe=pipe)
    assert CaptureStore(out).manifest["model"] == "permuted" and (out / "images" / "000000.png").is_file()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # the pipeline's own denoiser is back


def test_pipeline_folder_errors(folders, prompts, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(SceneprobeError, match="no text_encoder_3/"):
        load_pipeline(broken)
    with pytest.raises(SceneprobeError, match="not a site"):
        prepare_pipeline(folders["pixart"], prompts, **OPTS, sites=["dit.block7.attn"])
    with pytest.raises(SceneprobeError, match="flow matching"):
        prepare_pipeline(folders["flux"], prompts, **{**OPTS, "scheduler": "ddim"})
    with pytest.raises(SceneprobeError, match="needs a CFG batch"):
        prepare_pipeline(folders["flux"], prompts, **OPTS, control="uncond")
    with pytest.raises(SceneprobeError, match="needs a CFG batch"):
        prepare_pipeline(folders["sd3"], prompts, **{**OPTS, "guidance": 1.0}, control="uncond")
    with pytest.raises(SceneprobeError, match="no CFG"):
        prepare_pipeline(folders["flux"], prompts, **OPTS, negative_prompt="blurry")
    with pytest.raises(SceneprobeError, match="multiples of 4"):
        prepare_pipeline(folders["flux"], prompts, **{**OPTS, "height": 30})
    index = json.loads((folders["sdxl"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_pixart_alpha_sd3_without_t5_and_a_non_square_flux(tmp_path, prompts):
    """The class model_index.json names (PixArt-α), a part saved as [null, null] (SD3 without its T5), and a
    non-square size (FLUX 48×32 px → latent 24×16 → 12×8 packed tokens)."""
    import shutil

    from tiny_pipelines import build_tiny_pixart
    alpha = build_tiny_pixart(tmp_path / "alpha", sigma=False)
    assert type(load_pipeline(alpha)).__name__ == "PixArtAlphaPipeline"
    sd3 = BUILDERS["sd3"](tmp_path / "sd3")
    index = json.loads((sd3 / "model_index.json").read_text())
    index["text_encoder_3"], index["tokenizer_3"] = [None, None], [None, None]
    (sd3 / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(sd3 / "text_encoder_3")
    shutil.rmtree(sd3 / "tokenizer_3")
    assert load_pipeline(sd3).text_encoder_3 is None
    out = run_capture_pipeline(sd3, prompts, tmp_path / "sd3run" / "ldm", **OPTS, batch_size=2, progress=False)
    assert CaptureStore(out).manifest["site_order"] == SITES["sd3"]
    flux = BUILDERS["flux"](tmp_path / "flux")
    m = prepare_pipeline(flux, prompts, **{**OPTS, "height": 48})
    assert m.shapes["flux.single0.attn"] == (16, 12, 8) and m.shapes["vae.dec.mid.attn0"] == (16, 24, 16)


def test_sd_v1_uncond_reading_is_the_first_half_of_the_same_pass(tmp_path, prompts):
    """SD 1.x/2.x (capture/sd.py) reads the unconditional half too: the U-Net's own pass, [uncond, cond]'s first half;
    no VAE sites; guidance 1 (no CFG batch) refused."""
    from test_capture_sd import build_tiny_sd

    from sceneprobe.capture.recorder import Recorder
    from sceneprobe.capture.sd import SDSampler, load_sd, run_capture_sd
    folder = build_tiny_sd(tmp_path / "sd")
    out = run_capture_sd(folder, prompts, tmp_path / "run" / "uncond", steps=2, guidance=7.5, batch_size=2,
                         control="uncond", progress=False)
    st = CaptureStore(out)
    assert st.manifest["cfg_half"] == "uncond" and not any(s.startswith("vae") for s in st.sites)
    assert len(st.manifest["sigmas"]) == 2 and st.manifest["sigmas"][0] > st.manifest["sigmas"][1]   # σ from ᾱ_t
    pipe = load_sd(folder)
    sampler = SDSampler(pipe, pipe.unet, pipe.scheduler, steps=2, guidance_scale=7.5)
    with torch.no_grad(), Recorder({"unet": pipe.unet}, ["unet.mid.attn0"]) as rec:
        sampler.sample(["a red cube", "blue ball on grass"], [11, 12], "cpu", torch.float32)
    for step in (0, 1):
        full = rec.outputs["unet.mid.attn0"][step]                     # (4, C, h, w): [uncond ×2, cond ×2]
        torch.testing.assert_close(st.read("unet.mid.attn0", step), full[:2].half().float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(SceneprobeError, match="needs a CFG batch"):
        run_capture_sd(folder, prompts, tmp_path / "run2" / "uncond", steps=2, guidance=1.0, control="uncond",
                       progress=False)


def test_a_variant_only_folder_is_found_and_loads(folders, tmp_path):
    from sceneprobe.capture.pipelines import find_variant
    pipe = load_pipeline(folders["pixart"])
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert find_variant(tmp_path / "fp16", "transformer") == "fp16" and find_variant(folders["pixart"],
                                                                                     "transformer") is None
    got = load_pipeline(tmp_path / "fp16")
    assert all(torch.equal(a, b) for a, b in zip(got.transformer.parameters(), pipe.transformer.parameters()))
