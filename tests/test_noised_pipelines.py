"""The noised protocol on a pipeline folder (issue 21, parts 3–4): a labelled image folder encoded by each family's
VAE, forward-diffused by its own process (flow matching x_t = (1 − σ)x₀ + σε; SDXL's Euler x₀ + σε; DDIM/DPM
√ᾱ x₀ + √(1 − ᾱ) ε), the denoiser run once per step on it; `sceneprobe run --model PATH --data FOLDER` end to end."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from test_bad_inputs import assert_one_line_error, run_cli  # noqa: E402
from test_capture_sd import build_tiny_sd  # noqa: E402
from tiny_pipelines import BUILDERS  # noqa: E402

from sceneprobe.capture.noised_pipelines import encode, forward, forward_kind, noises, record_noised  # noqa: E402
from sceneprobe.capture.pipelines import capture_functions, prepare_pipeline  # noqa: E402
from sceneprobe.cli import main  # noqa: E402

ALL = {"sd": build_tiny_sd, **BUILDERS}
KIND = {"sd": "vp", "sdxl": "ve", "pixart": "vp", "sd3": "flow", "flux": "flow"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("noised")
    return {key: build(root / key) for key, build in ALL.items()}


def _prepared(folder: Path, key: str):
    fns = capture_functions(folder)
    pipe = fns.load(folder, torch.device("cpu"), None)
    return prepare_pipeline(folder, None, steps=3, guidance=3.5 if key == "flux" else 1.0, height=32, width=32,
                            pipe=pipe, prompt_rows=([""] * 2, [0, 1]))


@pytest.mark.parametrize("key", list(ALL))
def test_the_forward_process_is_the_schedulers_own_and_the_denoiser_sees_it(folders, key):
    m = _prepared(folders[key], key)
    s = m.sampler
    kind = forward_kind(s.schedule, s.scheduler)
    assert kind == KIND[key]
    rgb = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z0 = encode(s, rgb)
    eps = noises(tuple(z0.shape[1:]), [0, 1], 5)
    sched = copy.deepcopy(s.scheduler)                   # as the pipeline set it; no step position, so add_noise
    sched._step_index, sched._begin_index = None, None   # looks each timestep up
    want = []
    for i, t in enumerate(sched.timesteps):
        x = forward(z0, eps, m.sigmas[i], kind)
        ref = (sched.scale_noise(z0, t[None], eps) if kind == "flow" else sched.add_noise(z0, eps, t[None]))
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
        want.append(x)
    seen = []

    def pre(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    den = s.denoiser
    h = den.register_forward_pre_hook(pre, with_kwargs=True)
    got: dict = {}
    try:
        record_noised(s, rgb, [0, 1], 5, m.sites, "attn", lambda site, step, y: got.setdefault((site, step), y))
    finally:
        h.remove()
    assert len(seen) == m.n_steps == 3 and {k[1] for k in got} == {0, 1, 2}
    for i, x in enumerate(want):
        if key == "flux":
            x = s.pipe._pack_latents(x, *x.shape)                                      # its 2×2 packing
        elif kind == "ve":
            x = x / (m.sigmas[i] ** 2 + 1) ** 0.5                                      # Euler's scale_model_input
        torch.testing.assert_close(seen[i], x, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    from sceneprobe.world.dataset import make_dataset
    return make_dataset(tmp_path_factory.mktemp("data") / "scenes", n=16, size=32, seed=3, supersample=1,
                        progress=False)


@pytest.mark.parametrize("key", ["sd3", "sdxl"])
def test_run_model_data_is_the_noised_study_with_exact_labels_and_resumes(folders, labelled, tmp_path, capsys, key):
    from sceneprobe.capture.store import CaptureStore, load_labels
    from sceneprobe.world.dataset import load_dataset
    conf = tmp_path / "c.yaml"
    conf.write_text("capture: {steps: 2, batch_size: 8}\n")
    out = tmp_path / "run"
    cmd = ["run", "--model", str(folders[key]), "--data", str(labelled), "--out", str(out), "--config", str(conf),
           "--no-progress"]
    assert main(cmd) == 0
    root = out / "captures" / "noised"
    man = CaptureStore(root / "ldm").manifest
    assert man["protocol"] == "noised" and man["family"] == key and man["forward"].startswith(
        {"sd3": "x_t = (1 - sigma)", "sdxl": "x_t = z0 + sigma"}[key]) and len(man["sigmas"]) == 2
    assert CaptureStore(root / "permuted").manifest["model"] == "permuted"
    data, lab = load_dataset(labelled), load_labels(root)
    np.testing.assert_array_equal(lab["depth"], data.depth)                       # exact: the folder's own
    np.testing.assert_array_equal(lab["saliency"], data.saliency.astype(np.uint8))
    import csv
    with open(out / "report" / "results.csv") as f:
        assert {r["model"] for r in csv.DictReader(f) if r["protocol"] == "noised"} >= {"ldm", "permuted"}
    assert "exact" in (out / "report" / "summary.md").read_text()
    mtime = (root / "ldm" / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(cmd) == 0                                                          # rerun: stores skipped
    assert (root / "ldm" / "manifest.json").stat().st_mtime_ns == mtime


def test_noised_study_bad_input_is_one_line(folders, labelled, tmp_path, capsys):
    import shutil
    nodepth = tmp_path / "nodepth"
    shutil.copytree(labelled, nodepth, ignore=shutil.ignore_patterns(".cache", "depth"))
    base = ["run", "--model", folders["flux"], "--out", tmp_path / "o", "--no-progress"]
    for argv, needle in ((base + ["--data", nodepth], "no depth/"),
                         (base + ["--data", labelled, "--prompts", tmp_path / "p.csv"], "not both"),
                         (["run", "--data", labelled, "--out", tmp_path / "o"], "--data needs --model")):
        code, _, err = run_cli(capsys, argv)
        assert_one_line_error(code, err, needle)
    odd = tmp_path / "odd"                                                          # 30 px: not a multiple of 4
    (odd / "rgb").mkdir(parents=True)
    (odd / "depth").mkdir()
    (odd / "saliency").mkdir()
    from PIL import Image
    for i in range(6):
        Image.fromarray(np.full((30, 30, 3), 40 * i, np.uint8)).save(odd / "rgb" / f"{i}.png")
        np.save(odd / "depth" / f"{i}.npy", np.ones((30, 30), np.float32))
        Image.fromarray(np.zeros((30, 30), np.uint8)).save(odd / "saliency" / f"{i}.png")
    code, _, err = run_cli(capsys, base + ["--data", odd, "--controls", "none"])
    assert_one_line_error(code, err, "multiples of 4")
    assert json.dumps("x")


def test_captions_give_the_noised_images_their_prompts_the_prompt_only_baseline_and_the_uncond_reading(
        folders, labelled, tmp_path, capsys):
    import csv
    import shutil

    from sceneprobe.capture.store import CaptureStore
    from sceneprobe.world.dataset import load_dataset
    data = tmp_path / "captioned"
    shutil.copytree(labelled, data, ignore=shutil.ignore_patterns(".cache"))
    names = load_dataset(data).names
    (data / "captions.csv").write_text("name,caption\n" + "".join(f"{n},scene {chr(97 + i % 26)}\n"
                                                                  for i, n in enumerate(names)))
    conf = tmp_path / "c.yaml"
    conf.write_text("capture: {steps: 2, batch_size: 8}\n")
    out = tmp_path / "run"
    assert main(["run", "--model", str(folders["sd3"]), "--data", str(data), "--out", str(out), "--config", str(conf),
                 "--controls", "uncond", "--no-progress"]) == 0
    root = out / "captures" / "noised"
    ldm, unc = CaptureStore(root / "ldm").manifest, CaptureStore(root / "uncond").manifest
    assert ldm["prompts"][:2] == ["scene a", "scene b"] and ldm["cfg_half"] == "cond" and unc["cfg_half"] == "uncond"
    assert (root / "prompt_embeddings.safetensors").is_file()
    with open(out / "report" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "noised"]
    assert any(r["site"].startswith("prompt@") for r in rows) and "uncond" in {r["model"] for r in rows}
    capsys.readouterr()                                                             # the run's log and bars
    (data / "captions.csv").write_text("name,caption\n" + f"{names[0]},a scene\n")
    code, _, err = run_cli(capsys, ["run", "--model", folders["sd3"], "--data", data, "--out", tmp_path / "o2"])
    assert_one_line_error(code, err, f"has no caption for {names[1]}")
    (data / "captions.csv").unlink()
    code, _, err = run_cli(capsys, ["run", "--model", folders["sd3"], "--data", data, "--out", tmp_path / "o3",
                                    "--controls", "uncond"])
    assert_one_line_error(code, err, "uncond reading needs prompts")
