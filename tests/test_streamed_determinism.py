"""Streamed SD mode (issue 19): the same inputs give the same bytes, and checkpoints prove their content.

A tiny random-weight pipeline, 12 prompts, one model (no control: half the time). Every run writes results.csv,
per-image metrics, labels and probe files; an uninterrupted run is the reference for reruns, for a killed-and-resumed
run and for every damaged checkpoint (after the advice its one-line error gives, when it gives one).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from test_capture_sd import build_tiny_sd  # noqa: E402

from sceneprobe.cli import main  # noqa: E402

# batches of 2: train 7 images → 4 chunks (checkpoint_every 1), val 2 → 1, test 3 → 2 (sampling calls 1–4, 5, 6–7)
CONFIG = ("capture: {steps: 2, batch_size: 2, height: 32, width: 32, store: streamed, subsample: 24, "
          "checkpoint_every: 1}\nprobe: {layout: none, plain: false}\n")


def _outputs(run: Path) -> dict:
    files = [run / "report" / "results.csv", run / "report" / "per_image.safetensors",
             run / "captures" / "sd" / "labels.safetensors", *sorted((run / "probes").rglob("*.safetensors"))]
    return {str(f.relative_to(run)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    folder = build_tiny_sd(root / "tiny-sd")
    (root / "p.csv").write_text("prompt,seed\n" + "".join(f"scene {chr(97 + i)} {i},{300 + i}\n" for i in range(12)))
    (root / "c.yaml").write_text(CONFIG)

    def cmd(out: Path) -> list[str]:
        return ["run", "--sd", str(folder), "--prompts", str(root / "p.csv"), "--config", str(root / "c.yaml"),
                "--controls", "none", "--out", str(out), "--no-progress"]
    ref = root / "ref"
    assert main(cmd(ref)) == 0
    return root, cmd, _outputs(ref)


def _same(run: Path, want: dict) -> None:
    got = _outputs(run)
    assert set(got) == set(want) and len(want) > 6
    for name in want:
        assert got[name] == want[name], name


def test_uninterrupted_reruns_give_the_same_bytes(setup, tmp_path):
    root, cmd, want = setup
    for k in range(2):                                   # with the fixture's: three uninterrupted runs
        assert main(cmd(tmp_path / f"r{k}")) == 0
        _same(tmp_path / f"r{k}", want)


def _killed(monkeypatch, cmd, out: Path, at: int) -> Path:
    """Run until sampling call ``at`` raises (a kill); returns the checkpoint folder left behind."""
    import sceneprobe.capture.sd as sd
    real, calls = sd.sample_and_record_sd, {"n": 0}

    def counted(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(sd, "sample_and_record_sd", counted)
        assert main(cmd(out)) == 130
    return out / "captures" / "sd" / "ldm" / "streamed"


def test_killed_and_resumed_gives_the_same_bytes(setup, tmp_path, monkeypatch):
    root, cmd, want = setup
    ck = _killed(monkeypatch, cmd, tmp_path / "run", 7)           # in the second test batch
    assert {p.name for p in ck.glob("*.pt")} == {"train.c00000.pt", "train.c00001.pt", "train.c00002.pt",
                                                 "train.c00003.pt", "train.r0.pt", "test.c00000.pt"}
    assert main(cmd(tmp_path / "run")) == 0
    _same(tmp_path / "run", want)


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:                                                          # garbage of the same length
        path.write_bytes(b"\x07" * path.stat().st_size)


@pytest.mark.parametrize("name,how", [("train.c00001.pt", "delete"), ("train.c00002.pt", "garbage"),
                                      ("train.r0.pt", "truncate"), ("train.r0.pt", "delete"),
                                      ("test.c00000.pt", "garbage"), ("identity.json", "garbage")])
def test_a_damaged_checkpoint_is_redone_or_named_with_advice_that_works(setup, tmp_path, monkeypatch, capsys, name,
                                                                        how):
    """Either the rerun writes the uninterrupted bytes (nothing counted twice, nothing lost), or it stops with one
    line naming the file; following that line's advice (delete it, rerun) then writes the uninterrupted bytes."""
    root, cmd, want = setup
    out = tmp_path / "run"
    ck = _killed(monkeypatch, cmd, out, 7)
    _damage(ck / name, how)
    capsys.readouterr()
    rc = main(cmd(out))
    if rc == 2:
        text = capsys.readouterr().err
        err = [ln for ln in text.splitlines() if ln.startswith("error")]   # (diffusers' loading bars aside)
        assert len(err) == 1 and "Traceback" not in text and str(ck / name) in err[0], err
        assert "delete that file and rerun" in err[0]
        (ck / name).unlink()                                      # the advice
        assert main(cmd(out)) == 0
    else:
        assert rc == 0
    _same(out, want)


def test_a_stale_chunk_not_counted_by_the_statistics_is_sampled_again(setup, tmp_path, monkeypatch):
    """Killed between a chunk's file and the statistics that count it: the chunk is redone, not skipped."""
    root, cmd, want = setup
    ck = _killed(monkeypatch, cmd, tmp_path / "run", 7)
    shutil.copy(ck / "train.r0.pt", tmp_path / "r0")
    # the statistics as they were after chunk 2: re-create by running chunks 0–2 only
    out2 = tmp_path / "run2"
    ck2 = _killed(monkeypatch, cmd, out2, 4)                       # killed in train chunk 3: r0 counts 0, 1, 2
    shutil.copy(ck / "train.c00003.pt", ck2 / "train.c00003.pt")  # chunk 3's file, its statistics never saved
    assert main(cmd(out2)) == 0
    _same(out2, want)
