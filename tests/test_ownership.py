"""A user's files are sacred: a folder is sceneprobe's only if it carries the marker a sceneprobe command wrote (issue 19).

The table: folders a user made — plain files, a folder that merely holds ``captures/``, ``probes/`` or a
``scenes.jsonl``, a diffusers VAE, a whole Stable Diffusion pipeline folder, the layout of an older sceneprobe run
(no marker) — each as itself and through a symbolic link, against every command that writes a folder (``--out``,
``--force``, ``--vae``, ``--run``, ``--train-dir``). Each is refused with one line ``error: …`` (exit 2, no
traceback) and the sandbox — every file's bytes, every link's target, the listing — hashes the same afterwards.
Then: ``--adopt`` claims an older run folder only when passed (and the refusal names it), and two writers through
two names of one folder collide on its lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sceneprobe.cli import main


# ------------------------------------------------------------------------------------------------------ helpers
def sandbox_hash(path: Path) -> str:
    """Every entry under ``path``: relative name, kind, mode; a link's target (not followed); a file's bytes."""
    h = hashlib.sha256()

    def walk(d: Path, rel: str) -> None:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            name = f"{rel}/{e.name}"
            st = os.lstat(e.path)
            if e.is_symlink():
                h.update(f"L {name} -> {os.readlink(e.path)}\n".encode())
            elif e.is_dir(follow_symlinks=False):
                h.update(f"D {name} {st.st_mode:o}\n".encode())
                walk(Path(e.path), name)
            else:
                h.update(f"F {name} {st.st_mode:o} {st.st_size}\n".encode())
                h.update(Path(e.path).read_bytes())
    walk(Path(path), ".")
    return h.hexdigest()


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, needle: str | None = None) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if needle is not None:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------- the user's folders
def _files(d: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A downloaded-looking diffusers AutoencoderKL folder (config.json + safetensors), tiny."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=2, latent_channels=4,
                  sample_size=32).save_pretrained(d, safe_serialization=True)
    return d


def _vae(d: Path, vae: Path) -> Path:
    shutil.copytree(vae, d)
    return d


def _sd(d: Path, vae: Path) -> Path:
    """A whole Stable Diffusion pipeline folder: model_index.json, vae/ (weights), unet/, scheduler/, text parts."""
    _files(d, {"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                               "_diffusers_version": "0.30.0", "vae": ["diffusers", "AutoencoderKL"],
                                               "unet": ["diffusers", "UNet2DConditionModel"]}),
               "unet/config.json": json.dumps({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0",
                                               "sample_size": 64}),
               "unet/diffusion_pytorch_model.safetensors": b"\0" * 64,
               "scheduler/scheduler_config.json": json.dumps({"_class_name": "PNDMScheduler"}),
               "text_encoder/config.json": "{}", "tokenizer/vocab.json": "{}"})
    shutil.copytree(vae, d / "vae")
    return d


FOLDERS = {
    "plain-files": lambda d, v: _files(d, {"notes.txt": "do not delete\n", "IMG_0001.png": b"\x89PNG fake",
                                           "sub/draft.md": "# draft\n", ".draft.tmp": "unsaved\n"}),
    "captures": lambda d, v: _files(d, {"captures/IMG_0001.png": b"\x89PNG fake", "notes.txt": "shoot 1\n"}),
    "probes": lambda d, v: _files(d, {"probes/dental_probe.csv": "a,b\n1,2\n", "notes.txt": "clinic\n"}),
    "scenes-jsonl": lambda d, v: _files(d, {"scenes.jsonl": '{"scene": 1}\n',
                                            "meta.json": '{"format": "sceneprobe-scenes"}'}),
    "diffusers-vae": _vae,
    "sd-pipeline": _sd,
    "older-sceneprobe-run": lambda d, v: _files(d, {".stages/world.json": '{"fingerprint": "0123456789abcdef"}',
                                                    "config.yaml": "preset: tiny\n", "vae/config.json": "{}",
                                                    "train_vae/metrics.jsonl": "", "report/results.csv": "x\n"}),
}

# Every command that writes a folder, with T the folder under test. {data}, {run}: sceneprobe's own (read only).
COMMANDS = {
    "scenes --out": ["scenes", "--preset", "tiny", "--n", "4", "--out", "T"],
    "scenes --force --out": ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", "T"],
    "sample --force --out": ["sample", "--preset", "tiny", "--model", "{run}", "--n", "2", "--force", "--out", "T"],
    "label --force --out": ["label", "--images", "{data}", "--force", "--out", "T"],
    "train-vae --force --out": ["train-vae", "--preset", "tiny", "--data", "{data}", "--force", "--out", "T"],
    "train-ldm --force --out": ["train-ldm", "--preset", "tiny", "--data", "{data}", "--force", "--out", "T"],
    "train-labeller --force --out": ["train-labeller", "--preset", "tiny", "--data", "{data}", "--force", "--out",
                                     "T"],
    "train-labeller --train-dir": ["train-labeller", "--preset", "tiny", "--data", "{data}", "--out", "{box}/lab",
                                   "--train-dir", "T"],
    "latent-stats --vae": ["latent-stats", "--vae", "T", "--data", "{data}"],
    "latent-stats --vae T/vae": ["latent-stats", "--vae", "T/vae", "--data", "{data}"],
    "tune-decoder --vae": ["tune-decoder", "--preset", "tiny", "--vae", "T", "--data", "{data}"],
    "tune-decoder --vae T/vae": ["tune-decoder", "--preset", "tiny", "--vae", "T/vae", "--data", "{data}"],
    "capture --force --run": ["capture", "--preset", "tiny", "--run", "T", "--protocol", "generate", "--force"],
    "probe --run": ["probe", "--preset", "tiny", "--run", "T"],
    "report --run": ["report", "--run", "T"],
    "intervene --run": ["intervene", "--preset", "tiny", "--run", "T"],
    "run --out": ["run", "--preset", "tiny", "--out", "T"],
    "export --force --out": ["export", "--run", "{run}", "--force", "--out", "T"],
}


@pytest.fixture
def box(tmp_path) -> Path:
    b = tmp_path / "box"
    b.mkdir()
    return b


@pytest.mark.parametrize("linked", [False, True], ids=["folder", "symlink"])
@pytest.mark.parametrize("kind", list(FOLDERS))
def test_a_users_folder_is_refused_by_every_writer_and_left_identical(kind, linked, box, tiny_vae_dir, tiny_run,
                                                                      tiny_data_dir, capsys):
    folder = FOLDERS[kind](box / "theirs", tiny_vae_dir)
    target = folder
    if linked:
        target = box / "alias"
        target.symlink_to(folder, target_is_directory=True)
    before = sandbox_hash(box)
    for name, argv in COMMANDS.items():
        if "T/vae" in argv and not (folder / "vae").is_dir():
            continue
        subs = {"T": str(target), "T/vae": str(target / "vae"), "{run}": str(tiny_run), "{data}": str(tiny_data_dir),
                "{box}/lab": str(box / "lab")}
        code, _, err = run_cli(capsys, [subs.get(a, a) for a in argv])
        line = assert_refused(code, err)
        assert "did not make" in line or "symbolic link" in line, (name, line)
        assert sandbox_hash(box) == before, f"{name} changed the user's folder {kind}"
    if linked:
        assert target.is_symlink()                                   # never replaced by a real folder


def test_the_table_covers_every_command_that_writes():
    from sceneprobe.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    writers = {n for n, sp in sub.choices.items() if "adopt" in {a.dest for a in sp._actions}}
    assert writers == {argv[0] for argv in COMMANDS.values()}


def test_refusal_names_the_marker_and_adopt(box, capsys):
    old = FOLDERS["older-sceneprobe-run"](box / "old", None)
    line = assert_refused(*run_cli(capsys, ["report", "--run", old])[::2])
    assert ".sceneprobe.json" in line and "--adopt" in line


# ------------------------------------------------------------------------------------- adoption is explicit
def test_an_older_run_is_adopted_only_with_adopt(box, tiny_run, capsys):
    """Refused without --adopt; with it the export writes and the folder gets a marker saying it was adopted. A
    command that fails with --adopt leaves the folder as it was (no marker)."""
    old = box / "old"
    shutil.copytree(tiny_run, old)
    (old / ".sceneprobe.json").unlink()                              # made before markers
    shutil.rmtree(old / "report", ignore_errors=True)                # (report fails: no results.csv)
    (old / ".draft.tmp").write_text("unsaved\n")                      # not a temporary of ours: kept when adopted
    before = sandbox_hash(box)
    argv = ["export", "--run", tiny_run, "--force", "--out", old]
    assert_refused(*run_cli(capsys, argv)[::2], "--adopt")
    assert sandbox_hash(box) == before
    code, _, err = run_cli(capsys, ["report", "--run", old, "--adopt"])   # no results.csv: a user error
    assert_refused(code, err, "results.csv")
    assert sandbox_hash(box) == before, sorted(p.name for p in old.iterdir())   # adoption undone with the failure
    code, _, err = run_cli(capsys, [*argv, "--adopt"])
    assert code == 0, err
    marker = json.loads((old / ".sceneprobe.json").read_text())
    assert marker["made_by"] == "sceneprobe export" and marker["adopted"] is True
    assert (old / "training.json").is_file() and (old / ".draft.tmp").read_text() == "unsaved\n"
    assert run_cli(capsys, argv)[0] == 0                             # ours now: no flag needed


def test_adopt_claims_only_the_folder_named(box, tiny_run, capsys):
    """--adopt on one command does not leak into the next one (the adopted set is per command)."""
    old = FOLDERS["older-sceneprobe-run"](box / "old", None)
    mine = FOLDERS["plain-files"](box / "mine", None)
    before = sandbox_hash(mine)
    code, _, err = run_cli(capsys, ["report", "--run", old, "--adopt"])
    assert code == 2
    assert_refused(*run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", mine])[::2],
                   "did not make")
    assert sandbox_hash(mine) == before


# ---------------------------------------------------------------------------------- model folders in place
def test_latent_stats_writes_only_into_a_run_folder_it_owns(tmp_path, tiny_run, tiny_data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = run_cli(capsys, ["latent-stats", "--vae", run / "vae", "--data", tiny_data_dir])
    assert code == 0, err
    assert "latents_mean" in json.loads((run / "vae" / "config.json").read_text())
    # the same VAE through a link, or in a folder without the marker: refused, nothing changed
    (tmp_path / "vlink").symlink_to(run / "vae", target_is_directory=True)
    (run / ".sceneprobe.json").unlink()
    before = sandbox_hash(tmp_path)
    assert_refused(*run_cli(capsys, ["latent-stats", "--vae", tmp_path / "vlink", "--data", tiny_data_dir])[::2],
                   "symbolic link")
    assert_refused(*run_cli(capsys, ["latent-stats", "--vae", run / "vae", "--data", tiny_data_dir])[::2],
                   "did not make")
    assert sandbox_hash(tmp_path) == before


# ------------------------------------------------------------------------------------------ locks on real paths
_HOLD = ("import sys, time; from pathlib import Path; from sceneprobe.owned import {fn}; "
         "cm = {fn}(Path(sys.argv[1]){extra}); cm.__enter__(); print('held', flush=True); time.sleep(120)")


def _holder(fn: str, path: Path, extra: str = "") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD.format(fn=fn, extra=extra), str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = p.stdout.readline().strip()
    assert line == "held", p.stderr.read()
    return p


@pytest.mark.parametrize("alias_kind", ["link-to-folder", "link-to-parent"])
def test_two_writers_through_an_alias_collide_on_the_lock(tmp_path, alias_kind):
    """The lock is keyed by the folder's real path: a writer holding ``lk`` keeps out one writing ``lkalias`` (a link
    to it, or the same folder reached through a linked parent), for both kinds of lock."""
    from sceneprobe.errors import SceneprobeError
    from sceneprobe.owned import owned_folder, sibling_lock
    real = tmp_path / "real"
    real.mkdir()
    lk = real / "lk"
    if alias_kind == "link-to-folder":
        alias = tmp_path / "lkalias"
        alias.symlink_to(lk, target_is_directory=True)
    else:
        (tmp_path / "realalias").symlink_to(real, target_is_directory=True)
        alias = tmp_path / "realalias" / "lk"
    # a folder replaced whole: the lock beside it
    p = _holder("sibling_lock", lk)
    try:
        with pytest.raises(SceneprobeError, match=f"in use by another sceneprobe process \\(pid {p.pid}"):
            with sibling_lock(alias):
                pass
    finally:
        p.kill()
        p.wait()
    # a run folder filled in place: the lock inside it
    p = _holder("owned_folder", lk, extra=", 'sceneprobe run'")
    try:
        if alias_kind == "link-to-parent":
            with pytest.raises(SceneprobeError, match=f"in use by another sceneprobe process \\(pid {p.pid}"):
                with owned_folder(alias, "sceneprobe run", "--out"):
                    pass
        else:                                                        # a link as --out is refused before any lock
            with pytest.raises(SceneprobeError, match="symbolic link"):
                with owned_folder(alias, "sceneprobe run", "--out"):
                    pass
    finally:
        p.kill()
        p.wait()
    assert alias.is_symlink() or alias.parent.is_symlink()


def test_a_symlink_out_is_refused_and_stays_a_link(tmp_path, capsys):
    """The safe choice: a link given as --out is refused in one line (never replaced, never written through), even
    when it points to a folder sceneprobe made; the advice (pass the folder itself) works."""
    real = tmp_path / "scenes"
    assert run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--out", real, "--no-progress"])[0] == 0
    lk = tmp_path / "lk"
    lk.symlink_to(real, target_is_directory=True)
    before = sandbox_hash(tmp_path)
    line = assert_refused(*run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", lk])[::2],
                          "symbolic link")
    assert "pass the folder itself" in line
    assert sandbox_hash(tmp_path) == before and lk.is_symlink()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_refused(*run_cli(capsys, ["run", "--preset", "tiny", "--out", dangling])[::2], "symbolic link")
    assert not (tmp_path / "nowhere").exists()
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", real,
                                    "--no-progress"])
    assert code == 0, err


def test_a_model_is_never_saved_over_a_link(tmp_path, tiny_vae_dir):
    """A link inside a run folder (``run/vae -> the user's VAE``) is refused when a model would replace it; the link
    and its target stay as they were."""
    from diffusers import AutoencoderKL

    from sceneprobe.errors import SceneprobeError
    from sceneprobe.models.io import save_model
    theirs = tmp_path / "theirs"
    shutil.copytree(tiny_vae_dir, theirs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "vae").symlink_to(theirs, target_is_directory=True)
    before = sandbox_hash(tmp_path)
    with pytest.raises(SceneprobeError, match="symbolic link"):
        save_model(AutoencoderKL.from_pretrained(theirs), run / "vae")
    assert sandbox_hash(tmp_path) == before


def test_a_run_that_fails_after_writing_keeps_its_marker(tmp_path):
    """A command that fails late (after writing outputs) leaves a folder that is still sceneprobe's, so the rerun
    resumes it; one that fails before writing anything leaves the folder as it found it (no marker, or no folder)."""
    from sceneprobe.errors import SceneprobeError, fail
    from sceneprobe.owned import is_ours, owned_folder
    late, early, empty = tmp_path / "late", tmp_path / "early", tmp_path / "empty"
    empty.mkdir()
    for folder, writes in ((late, True), (early, False), (empty, False)):
        with pytest.raises(SceneprobeError, match="late"):
            with owned_folder(folder, "sceneprobe run"):
                if writes:
                    (folder / "captures").mkdir()
                raise fail("late error")
    assert is_ours(late) and (late / "captures").is_dir()
    assert not early.exists()
    assert empty.is_dir() and not any(empty.iterdir())
    with owned_folder(late, "sceneprobe run"):                      # the rerun is let in
        pass
