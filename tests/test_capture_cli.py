"""`sceneprobe capture` on the command line, and `accelerate launch` with two CPU processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from sceneprobe.capture.store import CaptureStore  # noqa: E402
from sceneprobe.cli import main  # noqa: E402
from sceneprobe.config import load_config  # noqa: E402
from sceneprobe.models.build import build_train_scheduler, build_unet, build_vae, latent_size  # noqa: E402
from sceneprobe.models.io import save_model  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny untrained run folder: vae/, unet/, scheduler/."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("cli") / "run"
    save_model(build_vae(cfg.vae, cfg.world.size), run / "vae")
    save_model(build_unet(cfg.unet, cfg.vae.latent_channels, latent_size(cfg.vae, cfg.world.size)), run / "unet")
    build_train_scheduler(cfg.train_ldm).save_pretrained(run / "scheduler")
    return run


def test_cli_capture_prints_the_store_and_rejects_bad_options(run_dir, capsys):
    # the fixture's folder was made by library calls, not a command: it has no marker, so it is claimed explicitly
    assert main(["capture", "--run", str(run_dir), "--protocol", "generate", "--preset", "tiny", "--no-progress",
                 "--adopt"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(run_dir / "captures" / "generate" / "ldm")
    CaptureStore(Path(out[-1])).verify()
    bad = [
        ["--protocol", "replay"],
        ["--protocol", "generate", "--control", "shuffled"],
        ["--protocol", "noised"],  # no --data and no RUN/data
        ["--protocol", "generate", "--prompts", str(run_dir / "p.csv")],  # not a Stable Diffusion folder
        ["--protocol", "generate", "--model", str(run_dir / "nope")],
    ]
    for extra in bad:
        assert main(["capture", "--run", str(run_dir), "--preset", "tiny", "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (extra, err)


def test_accelerate_two_processes_write_the_same_store_as_one(run_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI is not installed in this environment")
    one, two = tmp_path / "one", tmp_path / "two"
    for r in (one, two):
        shutil.copytree(run_dir, r, ignore=shutil.ignore_patterns("captures"))
    args = ["capture", "--protocol", "generate", "--preset", "tiny", "--no-progress", "--adopt"]   # no marker
    assert main([*args, "--run", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # two real processes (gloo) on a CPU machine: --multi_gpu starts them through torchrun, sceneprobe.processes makes
    # accelerate group them; `--cpu` would start only one
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sceneprobe", *args, "--run", str(two)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    store = two / "captures" / "generate" / "ldm"
    assert p.stdout.strip().splitlines()[-1] == str(store)
    a, b = CaptureStore(one / "captures" / "generate" / "ldm"), CaptureStore(store)
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] and a.sites == b.sites
    for site in a.sites:
        for step in a.steps:
            assert torch.equal(a.read(site, step), b.read(site, step)), (site, step)
    assert not (store / "progress").exists()
