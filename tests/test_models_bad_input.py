"""Bad input to the model commands: one line naming the file or option, exit status 2, nothing overwritten."""
from __future__ import annotations

import shutil

import pytest

from sceneprobe.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert "Traceback" not in err


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", "--preset", "tiny", "--model", tmp_path / "nope", "--out", tmp_path / "s")
    assert_one_line_error(code, err, tmp_path / "nope")
    assert not (tmp_path / "s").exists()


def test_unet_channels_differ_from_vae_latents(capsys, tmp_path, tiny_run, tiny_cfg):
    import dataclasses

    from sceneprobe.models.build import build_unet
    from sceneprobe.models.io import save_model
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    save_model(build_unet(tiny_cfg.unet, latent_channels=3, sample_size=8), run / "unet")
    code, _, err = run_cli(capsys, "sample", "--preset", "tiny", "--model", run, "--out", tmp_path / "s")
    assert_one_line_error(code, err, run, "channels")
    unet_cfg = dataclasses.replace(tiny_cfg.unet)
    save_model(build_unet(unet_cfg, latent_channels=4, sample_size=5), run / "unet")
    code, _, err = run_cli(capsys, "sample", "--preset", "tiny", "--model", run, "--out", tmp_path / "s")
    assert_one_line_error(code, err, "sample_size")


def test_truncated_weights(capsys, tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    w = run / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, _, err = run_cli(capsys, "sample", "--preset", "tiny", "--model", run, "--out", tmp_path / "s")
    assert_one_line_error(code, err, w, "truncated")


@pytest.mark.parametrize("text,needle", [
    ("train_vae: {stepz: 3}\n", "train_vae.stepz"),
    ("train_vae: {steps: many}\n", "train_vae.steps"),
    ("vae: {block_out_channels: 8}\n", "vae.block_out_channels"),
    ("nonsense: [1\n", "not valid YAML"),
])
def test_bad_config(capsys, tmp_path, tiny_data_dir, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, "train-vae", "--preset", "tiny", "--config", cfg, "--data", tiny_data_dir,
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_unknown_preset(capsys, tmp_path, tiny_data_dir):
    code, _, err = run_cli(capsys, "train-vae", "--preset", "huge", "--data", tiny_data_dir, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "huge")


def test_too_few_images_for_batch(capsys, tmp_path, tiny_data_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_vae: {batch_size: 1000}\n")
    code, _, err = run_cli(capsys, "train-vae", "--preset", "tiny", "--config", cfg, "--data", tiny_data_dir,
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, "batch size 1000", tiny_data_dir)
    assert not (tmp_path / "run" / "vae").exists()


def test_existing_model_is_not_overwritten(capsys, tmp_path, tiny_run, tiny_data_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train-vae", "--preset", "tiny", "--data", tiny_data_dir, "--out", run)
    assert_one_line_error(code, err, run / "vae", "--resume")
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
