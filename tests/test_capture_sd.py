"""Capture on a Stable Diffusion pipeline folder: a tiny random-weight pipeline built here, no downloads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from sceneprobe.capture.recorder import Recorder  # noqa: E402
from sceneprobe.capture.sd import (SDSampler, find_variant, load_sd, make_scheduler, read_prompts,  # noqa: E402
                                   run_capture_sd, to_uint8)
from sceneprobe.capture.store import CaptureStore  # noqa: E402
from sceneprobe.errors import SceneprobeError  # noqa: E402


def build_tiny_sd(folder: Path) -> Path:
    """UNet2DConditionModel (8, 16), AutoencoderKL (8, 16), 1-layer CLIP text model, a character-level tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_sd_capture_records_attn1_and_the_conditional_half(sd_folder, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,seed\na red cube,11\nblue ball on grass,12\n")
    out = run_capture_sd(sd_folder, csv, tmp_path / "captures" / "sd" / "ldm", steps=2, guidance=7.5, batch_size=2,
                         progress=False)
    st = CaptureStore(out)
    st.verify()
    m = st.manifest
    assert m["site_order"] == ["unet.down0.attn0", "unet.mid.attn0", "unet.up1.attn0", "unet.up1.attn1",
                               "vae.dec.mid.attn0"]
    assert st.n == 2 and m["prompts"] == ["a red cube", "blue ball on grass"] and m["seeds"] == [11, 12]
    assert st.shape("unet.down0.attn0") == (8, 8, 8) and st.shape("unet.mid.attn0") == (16, 4, 4)
    # the model's images sit beside its store, where `sceneprobe label` writes the labels `sceneprobe probe` reads
    proot = tmp_path / "captures" / "sd"
    assert (proot / "samples.safetensors").is_file() and (proot / "images" / "000001.png").is_file()
    # Reference: prompt 1 alone, the CFG loop by hand, hooks keep the whole [uncond, cond] batch.
    pipe = load_sd(sd_folder)
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(2)
    emb = torch.cat([_embed(pipe, [""]), _embed(pipe, ["blue ball on grass"])])
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), Recorder({"unet": pipe.unet}, ["unet.up1.attn1"]) as rec:
        for t in sched.timesteps:
            e_u, e_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
            x = sched.step(e_u + 7.5 * (e_c - e_u), t, x).prev_sample
    for step in (0, 1):
        full = rec.outputs["unet.up1.attn1"][step]  # (2, C, H, W): [uncond, cond]
        got = st.read("unet.up1.attn1", step, [1])[0]
        torch.testing.assert_close(got, full[1].half().float(), atol=2e-3, rtol=2e-3)
        assert not torch.allclose(got, full[0], atol=1e-4)


def _embed(pipe, prompts):
    return SDSampler(pipe, pipe.unet, pipe.scheduler).embed(prompts, "cpu")


@pytest.mark.parametrize("name", ["folder", "lms", "pndm", "euler", "euler_a", "vpred"])
def test_our_sampling_equals_the_diffusers_pipeline(sd_folder, name):
    """Same prompt and seed → the same latents and images as ``StableDiffusionPipeline(...)(prompt, generator=…)``."""
    pipe = load_sd(sd_folder)
    if name == "vpred":  # an SD 2.x-style folder: v-prediction
        from diffusers import DDIMScheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    elif name != "folder":
        pipe.scheduler = make_scheduler(pipe, name)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry", height=24, width=16)
    ref_lat = pipe("a red cube", generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
    ref_img = np.asarray(pipe("a red cube", generator=torch.Generator().manual_seed(7), output_type="pil",
                              **kw).images[0])
    sampler = SDSampler(pipe, pipe.unet, make_scheduler(pipe, "folder"), steps=3, guidance_scale=5.0,
                        negative_prompt="blurry", height=24, width=16)
    lat = sampler.sample(["a red cube"], [7], "cpu", torch.float32)
    assert lat.shape == (1, 4, 12, 8)
    torch.testing.assert_close(lat, ref_lat, atol=0, rtol=0)
    np.testing.assert_array_equal(to_uint8(sampler.decode(lat))[0], ref_img)


def test_capture_images_equal_the_pipeline_and_guidance_one_runs_one_batch(sd_folder, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed\na red cube,11\n")
    pipe = load_sd(sd_folder)
    calls = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0]), with_kwargs=True)
    out = run_capture_sd(sd_folder, csv, tmp_path / "sd" / "ldm", steps=2, guidance=1.0, batch_size=1,
                         progress=False, pipe=pipe, scheduler="lms")
    h.remove()
    assert calls[-2:] == [1, 1]  # guidance 1: no doubled batch (the shape pass is the first call)
    img = np.asarray(Image.open(tmp_path / "sd" / "images" / "000000.png"))
    ref = load_sd(sd_folder)
    ref.scheduler = make_scheduler(ref, "lms")
    want = ref("a red cube", generator=torch.Generator().manual_seed(11), num_inference_steps=2, guidance_scale=1.0)
    np.testing.assert_array_equal(img, np.asarray(want.images[0]))
    assert CaptureStore(out).manifest["cfg_half"] is None and CaptureStore(out).manifest["sampler"] == \
        "LMSDiscreteScheduler"


def test_variant_folders_without_feature_extractor_load(sd_folder, tmp_path):
    import json
    import shutil
    pipe = load_sd(sd_folder)
    folder = tmp_path / "fp16-only"
    pipe.save_pretrained(folder, variant="fp16")
    assert list((folder / "unet").glob("*.fp16.safetensors"))
    assert not list((folder / "unet").glob("diffusion_pytorch_model.safetensors"))
    index = json.loads((folder / "model_index.json").read_text())  # as on the hub: listed, but not in the folder
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "feature_extractor", ignore_errors=True)
    assert find_variant(folder) == "fp16" and find_variant(sd_folder) is None
    got = load_sd(folder)
    for a, b in zip(got.unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)


def test_prompt_csv_and_folder_errors(sd_folder, tmp_path):
    bad = {"nocol.csv": "text,seed\nx,1\n", "noseed.csv": "prompt\nx\n", "badseed.csv": "prompt,seed\nx,one\n",
           "empty.csv": "prompt,seed\n"}
    words = {"nocol.csv": "'prompt' column", "noseed.csv": "'seed' column", "badseed.csv": "line 2",
             "empty.csv": "no rows"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SceneprobeError, match=words[name]):
            read_prompts(tmp_path / name)
    with pytest.raises(SceneprobeError, match="does not exist"):
        read_prompts(tmp_path / "missing.csv")
    (tmp_path / "ok.csv").write_text("prompt,seed\nx,1\n")
    with pytest.raises(SceneprobeError, match="model_index.json"):
        run_capture_sd(tmp_path, tmp_path / "ok.csv", tmp_path / "out", steps=1, progress=False)
    from sceneprobe.cli import main
    run = ["capture", "--run", str(tmp_path / "run"), "--no-progress", "--model", str(sd_folder)]
    assert main(run) == 2  # a Stable Diffusion folder needs --prompts
    assert main([*run, "--prompts", str(tmp_path / "ok.csv"), "--protocol", "noised"]) == 2
    with pytest.raises(SceneprobeError, match="not a site"):
        run_capture_sd(sd_folder, tmp_path / "ok.csv", tmp_path / "out", steps=1, sites=["unet.down5.attn0"],
                       progress=False)


def test_identity_is_canonical():
    from sceneprobe.capture.identity import canonical_json, store_fingerprint
    a = {"b": {"z", "a", "m"}, "a": (1, 2.5), "cfg": {"_use_default_values": ["x", "y"], "beta": 1}}
    b = {"cfg": {"beta": 1, "_use_default_values": ["y", "x"]}, "a": [1, 2.5], "b": {"m", "a", "z"}}
    assert canonical_json(a) == canonical_json(b) and store_fingerprint(a) == store_fingerprint(b)
    assert store_fingerprint({**a, "a": (1, 2.6)}) != store_fingerprint(a)


def test_resume_across_processes_with_other_hash_seeds(sd_folder, tmp_path):
    """A v1.4-like folder (scheduler config lacking keys: diffusers lists the defaults in hash-seed order) resumes in
    a process with another PYTHONHASHSEED, keeps the rows already done, and a finished store is skipped."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from sceneprobe.capture.store import shard_path, write_rows
    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("timestep_spacing", "rescale_betas_zero_snr", "thresholding", "dynamic_thresholding_ratio",
                "sample_max_value", "clip_sample_range"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg))
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed\na red cube,1\nblue ball,2\ngreen cone,3\n")
    out = tmp_path / "run" / "captures" / "sd" / "ldm"
    code = (f"import torch; torch.set_num_threads(1)\nfrom sceneprobe.capture.sd import run_capture_sd\n"
            f"run_capture_sd({str(folder)!r}, {str(csv)!r}, {str(out)!r}, steps=2, batch_size=1, progress=False, "
            f"sites=['unet.mid.attn0'])\n")

    def run(seed: int) -> None:
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-2000:]

    run(1)
    manifest = json.loads((out / "manifest.json").read_text())
    fp = manifest["fingerprint"]
    original = CaptureStore(out).read("unet.mid.attn0", 1)
    # make it an interrupted store: batch 0 done (its rows marked), batches 1 and 2 lost
    (out / "manifest.json").unlink()
    (out / "progress").mkdir()
    (out / "progress" / "rank0.json").write_text(json.dumps({"fingerprint": fp, "batch_size": 1, "done": [[0, 1]]}))
    shard = shard_path(out, "unet.mid.attn0", 1)
    write_rows(shard, 0, torch.full((1, *original.shape[1:]), 7.0))
    write_rows(shard, 1, torch.zeros((2, *original.shape[1:])))
    run(2)
    st = CaptureStore(out)
    assert st.manifest["fingerprint"] == fp
    got = st.read("unet.mid.attn0", 1)
    assert torch.all(got[0] == 7.0)                       # batch 0 was not redone: a resume, not a restart
    torch.testing.assert_close(got[1:], original[1:])
    mtime = shard.stat().st_mtime_ns
    run(3)                                                # finished and identical: skipped
    assert shard.stat().st_mtime_ns == mtime
