"""The Stable Diffusion study end to end on a tiny random-weight pipeline: capture → labels → probes → report."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from test_capture_sd import build_tiny_sd  # noqa: E402

from sceneprobe.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def sd_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sdstudy")
    folder = build_tiny_sd(root / "tiny-sd")
    (root / "p.csv").write_text("prompt,seed\n" + "".join(f"prompt number {i},{100 + i}\n" for i in range(8)))
    (root / "c.yaml").write_text("capture: {steps: 2, batch_size: 4, height: 32, width: 32}\n")
    return folder, root / "p.csv", root / "c.yaml"


def test_sd_study_captures_labels_probes_reports_and_resumes(sd_inputs, tmp_path, capsys):
    folder, prompts, config = sd_inputs
    out = tmp_path / "run"
    cmd = ["run", "--sd", str(folder), "--prompts", str(prompts), "--out", str(out), "--config", str(config),
           "--no-progress"]
    assert main(cmd) == 0
    proot = out / "captures" / "sd"
    for p in ("ldm/manifest.json", "permuted/manifest.json", "samples.safetensors", "labels.safetensors",
              "labels.json"):
        assert (proot / p).is_file(), p
    with open(out / "report" / "results.csv") as f:
        models = {r["model"] for r in csv.DictReader(f) if r["protocol"] == "sd"}
    assert {"ldm", "permuted"} <= models
    summary = (out / "report" / "summary.md").read_text()
    assert "not exact" in summary and "our labels are exact" not in summary
    capsys.readouterr()
    assert main(cmd) == 0                                  # rerun: everything up to date
    assert "[labels] up to date, skipped" in capsys.readouterr().out


def test_sd_study_bad_input(sd_inputs, tmp_path):
    folder, prompts, config = sd_inputs
    base = ["run", "--out", str(tmp_path / "r"), "--no-progress"]
    assert main([*base, "--sd", str(folder)]) == 2                              # no --prompts
    assert main([*base, "--sd", str(tmp_path), "--prompts", str(prompts)]) == 2  # not an SD folder
    assert main([*base, "--sd", str(folder), "--prompts", str(prompts), "--controls", "shuffled"]) == 2
    assert main([*base, "--sd", str(folder), "--prompts", str(prompts), "--store", "tiny"]) == 2
