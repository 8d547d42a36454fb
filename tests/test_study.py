"""`sceneprobe run` end to end on the tiny preset: reproducible, skips what is done, resumes after SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sceneprobe.study import run_study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("study") / "run"
    lines: list[str] = []
    report = run_study(tiny_cfg, out, from_scratch=True, progress=False, log=lines.append)
    return out, report, lines


def test_run_writes_the_report(tiny_study):
    out, report, lines = tiny_study
    assert report == out / "report" / "report.html" and report.exists()
    for f in ("results.csv", "results.json", "summary.md"):
        assert (out / "report" / f).exists()
    text = (out / "report" / "results.csv").read_text()
    for model in ("ldm", "permuted", "fresh"):
        for protocol in ("generate", "noised"):
            assert f"{protocol},{model}," in text
    assert any(line.startswith("[probes] done") for line in lines)


def test_generate_read_out_uses_a_second_labeller_with_other_weights(tiny_study, tiny_cfg):
    """Issue 20: the generate labels are the first labeller's, the image read-out is a second one (another seed and
    architecture, trained on its own world): other weights, recorded as such in readout/*.csv|json and the report."""
    import csv
    import json

    from sceneprobe.labeller import load_labeller
    out, _, _ = tiny_study
    first, second = load_labeller(out / "labeller"), load_labeller(out / "labeller_readout")
    assert tuple(second.config.channels) == tuple(tiny_cfg.labeller_readout.channels) != tuple(first.config.channels)
    assert second.config.layers_per_block != first.config.layers_per_block
    assert json.loads((out / "labeller_readout" / "training.json").read_text())["data"]["seed"] == \
        tiny_cfg.world.seed + 2 != json.loads((out / "labeller" / "training.json").read_text())["data"]["seed"]
    info = json.loads((out / "readout" / "generate.json").read_text())
    assert info["labels_labeller"] == str(out / "labeller") and info["labeller"] == str(out / "labeller_readout")
    assert info["readout_is_labels_labeller"] is False
    with open(out / "readout" / "generate.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["labels_by"], r["readout_by"]) for r in rows} == {("labeller", "labeller_readout")}
    with open(out / "readout" / "noised.csv", newline="") as f:
        assert {(r["labels_by"], r["readout_by"]) for r in csv.DictReader(f)} == {("exact", "labeller_readout")}
    results = (out / "report" / "results.csv").read_text()
    assert "generate,readout,labeller_readout(x0)," in results and "labeller(x0)" not in results.replace(
        "labeller_readout(x0)", "")
    summary = (out / "report" / "summary.md").read_text()
    assert "Labels and image read-out" in summary and "agreement" in summary
    assert (out / "labeller_readout_eval.json").is_file()


def test_rerun_skips_every_stage_and_config_change_redoes_probes(tiny_study, tiny_cfg):
    import dataclasses
    out, _, _ = tiny_study
    before = (out / "report" / "results.csv").read_bytes()
    lines: list[str] = []
    run_study(tiny_cfg, out, from_scratch=True, progress=False, log=lines.append)
    stage_lines = [ln for ln in lines if ln.startswith("[") and not ln.startswith("[report]")]
    assert stage_lines and all("up to date" in ln for ln in stage_lines), stage_lines
    assert (out / "report" / "results.csv").read_bytes() == before
    cfg2 = dataclasses.replace(tiny_cfg, probe=dataclasses.replace(tiny_cfg.probe, lambdas=(1.0,)))
    lines = []
    run_study(cfg2, out, from_scratch=True, progress=False, log=lines.append)
    redone = [ln.split("]")[0][1:] for ln in lines if "running" in ln]
    assert redone == ["probes"], lines
    run_study(tiny_cfg, out, from_scratch=True, progress=False, log=lines.append)
    assert (out / "report" / "results.csv").read_bytes() == before


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "sceneprobe.cli", "run", "--preset", "tiny", "--from-scratch", "--no-progress",
            "--out", str(out)]


def test_same_seed_same_bytes_and_sigkill_resume(tmp_path, tiny_study):
    """Kill the run (SIGKILL) while it captures, rerun: results.csv is byte-identical to an uninterrupted run."""
    ref = (tiny_study[0] / "report" / "results.csv").read_bytes()
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / ".stages" / "capture-generate-ldm.json").exists():
            break
        time.sleep(0.05)
    time.sleep(0.5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cli(out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith("report.html")
    assert (out / "report" / "results.csv").read_bytes() == ref


def test_report_sections_for_a_copied_model_come_from_its_training_record(tmp_path):
    """With the shipped model (no train_* folders in the run) the report still says how good the VAE and samples are."""
    import json

    from sceneprobe.models.io import shipped_root
    from sceneprobe.study import _copy_model_folders, extra_sections
    _copy_model_folders(shipped_root("cpu"), tmp_path)
    titles = [t for t, _ in extra_sections(tmp_path)]
    assert "Generated image quality" in titles and "VAE reconstruction (held-out scenes)" in titles
    rec = json.loads((tmp_path / "model_training.json").read_text())
    body = dict(extra_sections(tmp_path))["VAE reconstruction (held-out scenes)"]
    # the VAE as shipped (after its decoder-only fine-tune), not its first training stage's record
    assert f"{rec['shipped_vae_check']['psnr_db']:.4g}" in body
    assert f"{rec['train_vae']['eval']['psnr_db']:.4g}" not in body
