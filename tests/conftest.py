"""Shared fixtures: tiny, seeded, offline. Torch uses one thread so tests don't fight over the 2 cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(1)
# numpy's BLAS on one thread too, as in the CLI subprocesses the tests start (OMP_NUM_THREADS=1): a float sum blocked
# for another thread count differs in its last bits, and the reproducibility tests compare bytes across the two
from threadpoolctl import threadpool_limits  # noqa: E402 (installed with scikit-learn)

threadpool_limits(1)


@pytest.fixture(scope="session")
def tiny_cfg():
    from sceneprobe.config import load_config
    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A rendered tiny dataset (48 scenes of 32×32), made once per session."""
    from sceneprobe.world.dataset import make_dataset
    out = tmp_path_factory.mktemp("data") / "scenes"
    return make_dataset(out, n=48, size=32, seed=0, supersample=2, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_data_dir):
    from sceneprobe.world.dataset import load_dataset
    return load_dataset(tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_cfg, tiny_data) -> Path:
    """A tiny trained run folder (vae/, unet/, scheduler/), a few steps each: shapes and plumbing, not quality."""
    from sceneprobe.train.ldm import train_ldm
    from sceneprobe.train.vae import train_vae
    run = tmp_path_factory.mktemp("run") / "tiny"
    train_vae(tiny_cfg, tiny_data, run, progress=False)
    train_ldm(tiny_cfg, tiny_data, run, progress=False)
    # made by sceneprobe's own functions, so it carries the marker the CLI writes (the only proof of ownership)
    from sceneprobe.owned import write_marker
    write_marker(run, "sceneprobe train-vae, train-ldm (test fixture)")
    return run
