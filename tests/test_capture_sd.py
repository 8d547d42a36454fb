"""Capture on a Stable Diffusion pipeline folder: a tiny random-weight pipeline built here, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from sceneprobe.capture.recorder import Recorder  # noqa: E402
from sceneprobe.capture.sd import _embed, load_sd, read_prompts, run_capture_sd  # noqa: E402
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
    out = run_capture_sd(sd_folder, csv, tmp_path / "store", steps=2, guidance=7.5, batch_size=2, progress=False)
    st = CaptureStore(out)
    st.verify()
    m = st.manifest
    assert m["site_order"] == ["unet.down0.attn0", "unet.mid.attn0", "unet.up1.attn0", "unet.up1.attn1",
                               "vae.dec.mid.attn0"]
    assert st.n == 2 and m["prompts"] == ["a red cube", "blue ball on grass"] and m["seeds"] == [11, 12]
    assert st.shape("unet.down0.attn0") == (8, 8, 8) and st.shape("unet.mid.attn0") == (16, 4, 4)
    assert (out / "samples.safetensors").is_file() and (out / "images" / "000001.png").is_file()
    # Reference: prompt 1 alone, the CFG loop by hand, hooks keep the whole [uncond, cond] batch.
    pipe = load_sd(sd_folder)
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(2)
    emb = torch.cat([_embed(pipe, [""], "cpu"), _embed(pipe, ["blue ball on grass"], "cpu")])
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
