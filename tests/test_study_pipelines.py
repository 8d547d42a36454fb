"""``sceneprobe run --model PATH`` on every family (issue 21): the streamed study and its resume (byte for byte), the
full-store study through the ``--sd`` alias, and the one-line refusal of a family sceneprobe does not know. Tiny
random-weight folders built here (tests/tiny_pipelines.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from test_bad_inputs import assert_one_line_error, run_cli  # noqa: E402
from test_capture_sd import build_tiny_sd  # noqa: E402
from tiny_pipelines import BUILDERS  # noqa: E402

from sceneprobe.cli import main  # noqa: E402

# batches of 2: train 7 images → 4 chunks (checkpoint_every 1), val 2 → 1, test 3 → 2 (sampling calls 1–4, 5, 6–7)
STREAMED = ("capture: {steps: 2, batch_size: 2, height: 32, width: 32, store: streamed, subsample: 24, "
            "checkpoint_every: 1}\nprobe: {plain: false}\n")        # layout-fair probes, as every study's


def _outputs(run: Path) -> dict:
    files = [run / "report" / "results.csv", run / "report" / "per_image.safetensors",
             run / "captures" / "sd" / "labels.safetensors", *sorted((run / "probes").rglob("*.safetensors"))]
    return {str(f.relative_to(run)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    (root / "p.csv").write_text("prompt,seed\n" + "".join(f"scene {chr(97 + i)} {i},{300 + i}\n" for i in range(12)))
    (root / "streamed.yaml").write_text(STREAMED)
    (root / "full.yaml").write_text("capture: {steps: 2, batch_size: 4, height: 32, width: 32}\n")
    return root


def _cmd(root: Path, folder: Path, out: Path, config: str = "streamed.yaml", flag: str = "--model",
         controls: str = "none") -> list[str]:
    return ["run", flag, str(folder), "--prompts", str(root / "p.csv"), "--config", str(root / config),
            "--controls", controls, "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("key", ["sd", *BUILDERS])
def test_streamed_study_runs_and_a_killed_run_resumes_to_the_same_bytes(root, tmp_path, monkeypatch, key):
    folder = {"sd": build_tiny_sd, **BUILDERS}[key](tmp_path / key)
    ref = tmp_path / "ref"
    assert main(_cmd(root, folder, ref)) == 0
    want = _outputs(ref)
    record = json.loads((ref / "captures" / "sd" / "ldm" / "streamed.json").read_text())
    assert record["family"] == key and len(record["sigmas"]) == record["steps"] == 2
    with open(ref / "report" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "sd"]
    sites = {r["site"] for r in rows if r["model"] == "ldm"}
    prefix = {"sd": "unet.", "sdxl": "unet.", "pixart": "dit.", "sd3": "mmdit.", "flux": "flux."}[key]
    assert any(s.startswith(prefix) for s in sites) and "vae.dec.mid.attn0" in sites
    # the prompt-only control: a baseline on the pooled text embedding of this family's own encoders
    assert (ref / "captures" / "sd" / "prompt_embeddings.safetensors").is_file()
    assert {"prompt@8x8", "prompt@16x16"} <= {r["site"] for r in rows if r["model"] == "baseline"}

    import sceneprobe.capture.sd as sd
    from sceneprobe.capture.pipelines import PipelineModel
    calls = {"n": 0}

    def killing(real):
        def counted(*a, **k):
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt("killed")                  # in the second test batch
            return real(*a, **k)
        return counted
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        if key == "sd":                                            # SD 1.x/2.x: capture/sd.py's own loop
            m.setattr(sd, "sample_and_record_sd", killing(sd.sample_and_record_sd))
        else:
            m.setattr(PipelineModel, "sample_and_record", killing(PipelineModel.sample_and_record))
        assert main(_cmd(root, folder, out)) == 130
    assert (out / "captures" / "sd" / "ldm" / "streamed" / "train.r0.pt").is_file()
    assert main(_cmd(root, folder, out)) == 0
    got = _outputs(out)
    assert set(got) == set(want) and len(want) > 6
    for name in want:
        assert got[name] == want[name], name


def test_full_store_study_through_the_sd_alias_with_a_control(root, tmp_path, capsys):
    folder = BUILDERS["pixart"](tmp_path / "pixart")
    out = tmp_path / "run"
    cmd = _cmd(root, folder, out, "full.yaml", flag="--sd", controls="permuted,uncond")
    assert main(cmd) == 0
    proot = out / "captures" / "sd"
    for p in ("ldm/manifest.json", "permuted/manifest.json", "uncond/manifest.json", "samples.safetensors",
              "labels.safetensors"):
        assert (proot / p).is_file(), p
    assert json.loads((proot / "ldm" / "manifest.json").read_text())["family"] == "pixart"
    with open(out / "report" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "sd"]
    assert {"ldm", "permuted", "uncond"} <= {r["model"] for r in rows}
    assert any(r["site"] == "dit.block1.attn" for r in rows)
    summary = (out / "report" / "summary.md").read_text()
    assert "no transformer probes" not in summary                     # the transformer is the report's denoiser group
    assert "PixArt transformer" in summary and "not exact" in summary
    assert "transformer on its unconditional CFG half" in summary      # the text as a control, with its diff
    capsys.readouterr()
    assert main(cmd) == 0                                              # rerun: everything up to date
    assert "[labels] up to date, skipped" in capsys.readouterr().out


def test_an_unsupported_family_is_one_line_naming_it_and_the_known_ones(root, tmp_path, capsys):
    kand = tmp_path / "kand"
    kand.mkdir()
    (kand / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    for argv in (_cmd(root, kand, tmp_path / "out"), _cmd(root, kand, tmp_path / "out2", flag="--sd"),
                 ["capture", "--run", tmp_path / "r", "--model", kand, "--prompts", root / "p.csv"]):
        code, _, err = run_cli(capsys, argv)
        assert_one_line_error(code, err, "Kandinsky family")
        for known in ("SDXL", "PixArt", "SD3", "FLUX"):
            assert known in err
    assert not (tmp_path / "out").exists()                            # refused before the run folder is written


def test_run_model_bad_input_is_one_line(root, tmp_path, capsys):
    folder = BUILDERS["flux"](tmp_path / "flux")
    capsys.readouterr()                                                # the builder's progress bars
    code, _, err = run_cli(capsys, ["run", "--model", folder, "--out", tmp_path / "o", "--no-progress"])
    assert_one_line_error(code, err, "--prompts")
    code, _, err = run_cli(capsys, ["run", "--model", folder, "--sd", folder, "--prompts", root / "p.csv",
                                    "--out", tmp_path / "o"])
    assert_one_line_error(code, err, "once")


def test_capture_sites_selects_by_name_or_pattern_and_refuses_a_pattern_matching_none(tmp_path, capsys):
    """``capture.sites``: canonical names or shell patterns, in the model's site order; a pattern that names no
    site is one line listing the sites."""
    from sceneprobe.capture.pipelines import prepare_pipeline
    folder = BUILDERS["flux"](tmp_path / "flux")
    csv_ = tmp_path / "p.csv"
    csv_.write_text("prompt,seed\na red ball,1\n")
    m = prepare_pipeline(folder, csv_, steps=1, height=32, width=32, sites=["vae.*", "flux.double*"])
    assert m.denoiser_sites == ["flux.double0.attn.img"] and m.vae_sites == ["vae.dec.mid.attn0"]
    assert m.identity["sites"] == ["flux.double0.attn.img", "vae.dec.mid.attn0"]    # another selection, another store
    (tmp_path / "bad.yaml").write_text("capture: {steps: 1, height: 32, width: 32, sites: [flux.triple*]}\n")
    capsys.readouterr()
    code, _, err = run_cli(capsys, ["run", "--model", folder, "--prompts", csv_, "--config", tmp_path / "bad.yaml",
                                    "--controls", "none", "--out", tmp_path / "o", "--no-progress"])
    assert_one_line_error(code, err, "flux.triple*")
    assert "flux.single0.attn" in err
