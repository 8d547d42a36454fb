"""Every user mistake is one line, exit 2, and leaves the output folder as it was (issue 13).

The table below has at least one row per class of mistake the issue lists (1 data loss, 2 two writers, 3 silently
wrong output, 4 bad values and files, 5 advice, 6 leftovers, 7 not one line) and per command. Each row runs the CLI
in-process and checks: exit status 2, stderr is exactly one ``error: …`` line naming the file or option, no
traceback, and the sandbox holding every input and output of the row hashes the same before and after.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sceneprobe.cli import main

BIG = str(2**70)


# ------------------------------------------------------------------------------------------------------ helpers
def tree_hash(path: Path) -> str:
    """Hash of a folder tree: every entry's relative path, kind and bytes (hidden files included)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        rel = os.path.relpath(root, path)
        h.update(f"D {rel}\n".encode())
        for f in sorted(files):
            p = Path(root) / f
            h.update(f"F {rel}/{f} ".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, lines[0])


def user_folder(box: Path, name: str = "mine") -> Path:
    """A folder holding the user's own files (what sceneprobe must never touch)."""
    d = box / name
    (d / "data").mkdir(parents=True)
    (d / "data" / "photo.txt").write_text("my holiday\n")
    (d / "notes.md").write_text("do not delete\n")
    return d


def write(box: Path, name: str, content: str | bytes) -> Path:
    p = box / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (as a running sceneprobe would); returns once it holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'pid {os.getpid()}, sceneprobe run'.encode()); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder / ".sceneprobe.lock")], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def fake_sd(box: Path) -> Path:
    d = box / "sd"
    d.mkdir()
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return d


def vae_as_unet(box: Path, run: Path) -> Path:
    m = box / "model"
    shutil.copytree(run, m)
    shutil.rmtree(m / "unet")
    shutil.copytree(run / "vae", m / "unet")
    return m


def with_manifest(box: Path, run: Path, text: str) -> None:
    store = run / "captures" / "noised" / "ldm"
    store.mkdir(parents=True)
    (store.parent / "labels.safetensors").write_bytes(b"x")
    (store / "manifest.json").write_text(text)


# ---------------------------------------------------------------------------------------------------- the table
# (id, class, argv, needle, setup(box, run) -> None). In argv: {box} the sandbox, {run} a copy of a tiny trained run
# inside it, {data} the tiny dataset (read only). A setup may return a Popen to stop after the row (held locks).
ROWS = [
    # 1 data loss: a folder with the user's own files is refused, even with --force
    ("run-user-folder", 1, ["run", "--preset", "tiny", "--out", "{box}/mine"], "--out {box}/mine already holds",
     lambda b, r: user_folder(b)),
    ("scenes-force-user-folder", 1, ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", "{box}/mine"],
     "sceneprobe did not make (data/, notes.md)", lambda b, r: user_folder(b)),
    ("sample-force-user-folder", 1, ["sample", "--preset", "tiny", "--model", "{run}", "--force", "--out",
                                     "{box}/mine"], "sceneprobe did not make", lambda b, r: user_folder(b)),
    ("train-vae-user-folder", 1, ["train-vae", "--preset", "tiny", "--data", "{data}", "--out", "{box}/mine"],
     "--out {box}/mine already holds", lambda b, r: user_folder(b)),
    ("train-labeller-force-user-folder", 1, ["train-labeller", "--preset", "tiny", "--data", "{data}", "--force",
                                             "--out", "{box}/mine"], "sceneprobe did not make",
     lambda b, r: user_folder(b)),
    ("capture-user-folder", 1, ["capture", "--preset", "tiny", "--run", "{box}/mine", "--protocol", "generate"],
     "--run {box}/mine already holds", lambda b, r: user_folder(b)),
    ("export-user-folder", 1, ["export", "--run", "{run}", "--out", "{box}/mine"], "sceneprobe did not make",
     lambda b, r: user_folder(b)),
    ("label-user-folder", 1, ["label", "--images", "{data}", "--labeller", "{run}/labeller", "--out", "{box}/mine",
                              "--force"], "sceneprobe did not make", lambda b, r: user_folder(b)),
    # 2 two writers: a folder locked by a running sceneprobe is refused at once, naming its pid
    ("run-locked", 2, ["run", "--preset", "tiny", "--out", "{box}/busy"], "in use by another sceneprobe process (pid",
     lambda b, r: hold_lock(b / "busy")),
    ("capture-locked", 2, ["capture", "--preset", "tiny", "--run", "{run}", "--protocol", "generate"],
     "in use by another sceneprobe process (pid", lambda b, r: hold_lock(r)),
    ("probe-locked", 2, ["probe", "--preset", "tiny", "--run", "{run}"], "(pid", lambda b, r: hold_lock(r)),
    # 3 silently wrong output: values that used to fall back to the preset or produce noise
    ("sample-steps-negative", 3, ["sample", "--preset", "tiny", "--steps", "-2", "--out", "{box}/s"], "option --steps",
     None),
    ("sample-n-zero", 3, ["sample", "--preset", "tiny", "--n", "0", "--out", "{box}/s"], "option --n", None),
    ("scenes-supersample-zero", 3, ["scenes", "--preset", "tiny", "--supersample", "0", "--out", "{box}/d"],
     "option --supersample", None),
    ("train-vae-steps-negative", 3, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                     "--out", "{box}/r"], "c.yaml: key train_vae.steps",
     lambda b, r: write(b, "c.yaml", "train_vae: {steps: -3}\n")),
    # 4 bad values and bad files
    ("checkpoint-every-zero", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                  "--out", "{box}/r"], "train_vae.checkpoint_every",
     lambda b, r: write(b, "c.yaml", "train_vae: {checkpoint_every: 0}\n")),
    ("train-ldm-batch-zero", 4, ["train-ldm", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                 "--out", "{box}/r"], "train_ldm.batch_size",
     lambda b, r: write(b, "c.yaml", "train_ldm: {batch_size: 0}\n")),
    ("lr-nan", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}", "--out",
                   "{box}/r"], "train_vae.lr must be a finite number", lambda b, r: write(b, "c.yaml",
                                                                                         "train_vae: {lr: .nan}\n")),
    ("crop-negative", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}", "--out",
                          "{box}/r"], "train_vae.crop", lambda b, r: write(b, "c.yaml", "train_vae: {crop: -4}\n")),
    ("norm-groups-not-dividing", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                     "--out", "{box}/r"], "vae.norm_num_groups",
     lambda b, r: write(b, "c.yaml", "vae: {norm_num_groups: 3}\n")),
    ("block-out-channels-empty", 4, ["train-ldm", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                     "--out", "{box}/r"], "unet.block_out_channels",
     lambda b, r: write(b, "c.yaml", "unet: {block_out_channels: []}\n")),
    ("probe-lambdas-nan", 4, ["probe", "--preset", "tiny", "--config", "{box}/c.yaml", "--run", "{run}"],
     "probe.lambdas[0]", lambda b, r: write(b, "c.yaml", "probe: {lambdas: [.nan]}\n")),
    ("probe-epochs-zero", 4, ["probe", "--preset", "tiny", "--config", "{box}/c.yaml", "--run", "{run}"],
     "probe.epochs", lambda b, r: write(b, "c.yaml", "probe: {epochs: 0}\n")),
    ("capture-steps-5000", 4, ["capture", "--preset", "tiny", "--config", "{box}/c.yaml", "--run", "{run}",
                               "--protocol", "generate"], "capture.steps",
     lambda b, r: write(b, "c.yaml", "capture: {steps: 5000}\n")),
    ("capture-checkpoint-every-zero", 4, ["capture", "--preset", "tiny", "--config", "{box}/c.yaml", "--run", "{run}",
                                          "--protocol", "generate"], "capture.checkpoint_every",
     lambda b, r: write(b, "c.yaml", "capture: {checkpoint_every: 0}\n")),
    ("intervene-lr-nan", 4, ["intervene", "--preset", "tiny", "--config", "{box}/c.yaml", "--run", "{run}"],
     "intervene.lr", lambda b, r: write(b, "c.yaml", "intervene: {lr: .nan}\n")),
    ("sample-n-negative", 4, ["sample", "--preset", "tiny", "--n", "-3", "--out", "{box}/s"], "option --n", None),
    ("sample-ddim-eta-one", 4, ["sample", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/s"],
     "sample.eta must be < 1 with sampler ddim", lambda b, r: write(b, "c.yaml", "sample: {eta: 1.0}\n")),
    ("scenes-seed-beyond-64-bits", 4, ["scenes", "--preset", "tiny", "--seed", BIG, "--out", "{box}/d"],
     "option --seed", None),
    ("prompts-seed-beyond-64-bits", 4, ["capture", "--preset", "tiny", "--run", "{box}/sdrun", "--model", "{box}/sd",
                                        "--prompts", "{box}/p.csv"], "p.csv, line 2",
     lambda b, r: (fake_sd(b), write(b, "p.csv", f"prompt,seed\na red cube,{BIG}\n"))),
    ("config-binary", 4, ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/d"], "c.yaml",
     lambda b, r: write(b, "c.yaml", bytes(range(256)))),
    ("config-utf16", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}", "--out",
                         "{box}/r"], "c.yaml is not UTF-8",
     lambda b, r: write(b, "c.yaml", "train_vae: {steps: 3}\n".encode("utf-16"))),
    ("config-is-a-folder", 4, ["run", "--preset", "tiny", "--config", "{box}/cfgdir", "--out", "{box}/r"],
     "cfgdir is a folder", lambda b, r: (b / "cfgdir").mkdir()),
    ("scheduler-config-not-json", 4, ["sample", "--preset", "tiny", "--model", "{run}", "--out", "{box}/s"],
     "scheduler_config.json", lambda b, r: write(r, "scheduler/scheduler_config.json", "{not json")),
    ("labeller-holds-another-model", 4, ["label", "--images", "{box}/x.safetensors", "--labeller", "{run}/vae"],
     "holds a AutoencoderKL model, not a Labeller", None),
    ("manifest-missing-field", 4, ["probe", "--preset", "tiny", "--run", "{run}"], "manifest.json has a missing",
     lambda b, r: with_manifest(b, r, '{"sites": {}, "steps": [0], "timesteps": [999], "dtype": "float16"}')),
    ("manifest-not-json", 4, ["probe", "--preset", "tiny", "--run", "{run}"], "manifest.json is unreadable",
     lambda b, r: with_manifest(b, r, '{"sites": {')),
    ("results-csv-mistyped", 4, ["report", "--run", "{run}"], "results.csv, line 2",
     lambda b, r: write(r, "report/results.csv", "protocol,model,site,step,timestep,task,split,metric,value\n"
                                                  "noised,ldm,unet.mid.attn0,zero,999,depth,test,rmse,0.5\n")),
    ("resume-other-architecture", 4, ["train-vae", "--preset", "tiny", "--config", "{box}/c.yaml", "--data", "{data}",
                                      "--out", "{run}", "--resume", "--force"], "checkpoint.pt does not fit",
     lambda b, r: (write(b, "c.yaml", "vae: {block_out_channels: [8, 8], norm_num_groups: 4}\n"),
                   shutil.rmtree(r / "vae"))),
    ("resume-truncated-checkpoint", 4, ["train-vae", "--preset", "tiny", "--data", "{data}", "--out", "{run}",
                                        "--resume"], "checkpoint.pt is truncated",
     lambda b, r: (shutil.rmtree(r / "vae"), write(r, "train_vae/checkpoint.pt",
                                                   (r / "train_vae" / "checkpoint.pt").read_bytes()[:999]))),
    ("train-vae-out-is-file", 4, ["train-vae", "--preset", "tiny", "--data", "{data}", "--out", "{box}/f"],
     "--out {box}/f is a file", lambda b, r: write(b, "f", "x")),
    ("capture-run-is-file", 4, ["capture", "--preset", "tiny", "--run", "{box}/f", "--protocol", "generate"],
     "--run {box}/f is a file", lambda b, r: write(b, "f", "x")),
    ("run-out-is-file", 4, ["run", "--preset", "tiny", "--out", "{box}/f"], "--out {box}/f is a file",
     lambda b, r: write(b, "f", "x")),
    ("export-out-is-file", 4, ["export", "--run", "{run}", "--out", "{box}/f"], "--out {box}/f is a file",
     lambda b, r: write(b, "f", "x")),
    ("unet-folder-holds-a-vae", 4, ["sample", "--preset", "tiny", "--model", "{box}/model", "--out", "{box}/s"],
     "holds a AutoencoderKL model, not a UNet2DModel", vae_as_unet),
    # 5 advice that works is followed in the tests below; here the advice a bad dataset gives names a real option
    ("train-vae-bad-image-advises-skip-bad", 5, ["train-vae", "--preset", "tiny", "--data", "{box}/imgs", "--out",
                                                 "{box}/r"], "--skip-bad", lambda b, r: bad_image_folder(b)),
    ("train-vae-rerun-after-kill", 5, ["train-vae", "--preset", "tiny", "--data", "{data}", "--out", "{run}"],
     "pass --resume to continue it", lambda b, r: shutil.rmtree(r / "vae")),
    # 6 leftovers: a failed command leaves no folder behind
    ("run-missing-model", 6, ["run", "--preset", "tiny", "--model", "{box}/nowhere", "--out", "{box}/new"],
     "no unet/ in the model folder", None),
    ("run-bad-preset", 6, ["run", "--preset", "huge", "--out", "{box}/new"], "unknown preset 'huge'", None),
    ("export-missing-run", 6, ["export", "--run", "{box}/nowhere", "--out", "{box}/new"], "nowhere", None),
    ("report-missing-run", 6, ["report", "--run", "{box}/nowhere"], "--run {box}/nowhere does not exist", None),
    # 7 one line from the argument parser too
    ("sample-n-not-a-number", 7, ["sample", "--n", "abc", "--out", "{box}/s"], "argument --n: invalid int value",
     None),
    ("scenes-unknown-option", 7, ["scenes", "--out", "{box}/d", "--bogus"], "unrecognized arguments: --bogus", None),
    ("check-data-missing-folder", 7, ["check-data", "{box}/nowhere"], "{box}/nowhere does not exist", None),
    ("check-data-unknown-option", 7, ["check-data", "{box}", "--fast"], "unrecognized arguments: --fast", None),
    ("latent-stats-missing-option", 7, ["latent-stats", "--vae", "{run}/vae"], "required: --data", None),
    ("intervene-bad-task", 7, ["intervene", "--preset", "tiny", "--run", "{run}", "--task", "sideways"], "--task",
     None),
    ("no-command", 7, [], "required: COMMAND", None),
    ("tune-decoder-missing-vae", 6, ["tune-decoder", "--preset", "tiny", "--vae", "{box}/nowhere", "--data", "{data}"],
     "--vae {box}/nowhere does not exist", None),
    ("tune-decoder-steps-negative", 4, ["tune-decoder", "--preset", "tiny", "--config", "{box}/c.yaml", "--vae",
                                        "{run}/vae", "--data", "{data}"], "train_vae.decoder_steps",
     lambda b, r: write(b, "c.yaml", "train_vae: {decoder_steps: -1}\n")),
]
# Commands when this table was written (issue 13); a new command should get its rows here.
COMMANDS = {"scenes", "check-data", "train-vae", "train-ldm", "latent-stats", "tune-decoder", "train-labeller", "label",
            "sample", "capture", "probe", "report", "intervene", "run", "export"}


def bad_image_folder(box: Path) -> None:
    from PIL import Image
    d = box / "imgs"
    d.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 6, 0, 0)).save(d / f"{i:03d}.png")
    (d / "999.png").write_bytes(b"not a png")


def test_the_table_covers_every_class_and_command():
    classes = {row[1] for row in ROWS}
    assert classes == {1, 2, 3, 4, 5, 6, 7}
    covered = {row[2][0] for row in ROWS if row[2]}
    assert COMMANDS <= covered, COMMANDS - covered


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory, tiny_run) -> Path:
    """The tiny trained run with a (random, tiny) labeller folder beside its models."""
    import torch

    from sceneprobe.labeller.model import Labeller
    run = tmp_path_factory.mktemp("labrun") / "run"
    shutil.copytree(tiny_run, run)
    torch.manual_seed(0)
    Labeller(channels=(8, 16), norm_num_groups=2).save_pretrained(run / "labeller", safe_serialization=True)
    return run


@pytest.fixture
def box_run(tmp_path, lab_run):
    """A sandbox with a private copy of the tiny trained run (rows may damage it)."""
    box = tmp_path / "box"
    box.mkdir()
    shutil.copytree(lab_run, box / "run")
    return box, box / "run"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, box_run, tiny_data_dir, capsys):
    _, _, argv, needle, setup = row
    box, run = box_run
    held = setup(box, run) if setup else None
    subs = {"{box}": str(box), "{run}": str(run), "{data}": str(tiny_data_dir)}

    def fill(s: str) -> str:
        for k, v in subs.items():
            s = s.replace(k, v)
        return s
    try:
        before = tree_hash(box)
        t0 = time.time()
        code, _, err = run_cli(capsys, [fill(a) for a in argv])
        assert_one_line_error(code, err, fill(needle))
        assert tree_hash(box) == before, "the command changed its folders"
        if row[1] == 2:
            assert time.time() - t0 < 5, "a second writer must fail at once"
    finally:
        if isinstance(held, subprocess.Popen):
            held.kill()
            held.wait()


# ------------------------------------------------------------------------------------ the user's own folder
@pytest.mark.parametrize("argv", [
    ["run", "--preset", "tiny", "--out", "{mine}"],
    ["scenes", "--preset", "tiny", "--n", "4", "--force", "--out", "{mine}"],
    ["train-vae", "--preset", "tiny", "--data", "{data}", "--force", "--out", "{mine}"],
    ["train-ldm", "--preset", "tiny", "--data", "{data}", "--force", "--out", "{mine}"],
    ["capture", "--preset", "tiny", "--run", "{mine}", "--protocol", "noised", "--data", "{data}", "--force"],
    ["probe", "--preset", "tiny", "--run", "{mine}"],
    ["report", "--run", "{mine}"],
    ["intervene", "--preset", "tiny", "--run", "{mine}"],
    ["export", "--run", "{run}", "--out", "{mine}", "--force"],
], ids=lambda a: a[0])
def test_a_folder_of_the_users_own_files_is_never_changed(argv, box_run, tiny_data_dir, capsys):
    box, run = box_run
    mine = user_folder(box)
    before = tree_hash(mine)
    subs = {"{mine}": str(mine), "{run}": str(run), "{data}": str(tiny_data_dir)}
    code, _, err = run_cli(capsys, [subs.get(a, a) for a in argv])
    assert_one_line_error(code, err, "sceneprobe did not make")
    assert tree_hash(mine) == before


# ------------------------------------------------------------------------------------------ two writers
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sceneprobe", *args]


def test_second_writer_fails_at_once_and_the_first_finishes(tmp_path, capsys):
    """Two `scenes` into one folder: the second fails at once naming the first's pid; the first finishes whole.

    (`scenes` is the cheapest writer to start in a subprocess; run folders use the same lock, held by a helper process
    in the table's class-2 rows.)"""
    out = tmp_path / "scenes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cli("scenes", "--preset", "tiny", "--n", "300", "--workers", "1", "--out", str(out),
                                  "--no-progress"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".scenes.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()
    t0 = time.time()
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--seed", "7", "--force", "--out", out])
    assert time.time() - t0 < 5
    assert_one_line_error(code, err, f"(pid {first.pid}, sceneprobe scenes)")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)
    from sceneprobe.world.dataset import load_dataset
    data = load_dataset(out)
    assert len(data) == 300 and (out / ".sceneprobe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]   # no lock, no temporary left beside it
    # the lock went with its holder: the next writer gets in (and is told the folder exists, not that it is busy)
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--out", out])
    assert_one_line_error(code, err, "already exists")


def test_a_killed_writer_does_not_block_the_next(tmp_path):
    from sceneprobe.owned import file_lock
    folder = tmp_path / "run"
    p = hold_lock(folder)
    p.kill()
    p.wait()
    with file_lock(folder / ".sceneprobe.lock", folder):
        assert f"pid {os.getpid()}" in (folder / ".sceneprobe.lock").read_text()
    assert not (folder / ".sceneprobe.lock").exists()


# ------------------------------------------------------------------------------------ advice that works
def test_damaged_store_advice_repairs_it(tmp_path, tiny_run, tiny_data_dir, capsys):
    """A finished store loses a shard: probe's advice (capture --force) is followed and probe then succeeds."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cap = ["capture", "--preset", "tiny", "--run", str(run), "--protocol", "noised", "--data", str(tiny_data_dir),
           "--no-progress"]
    (run / ".vae.tmp-123-abc").mkdir()                               # left by a save killed mid-way
    assert run_cli(capsys, cap)[0] == 0
    assert not (run / ".vae.tmp-123-abc").exists()
    probe = ["probe", "--preset", "tiny", "--run", str(run), "--no-progress"]
    shard = sorted((run / "captures" / "noised" / "ldm").glob("*/step_*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    code, _, err = run_cli(capsys, probe)
    assert_one_line_error(code, err, str(shard))
    advice = err.split("`")[1]
    assert advice.startswith("sceneprobe capture") and advice.endswith("--force")
    code, _, err = run_cli(capsys, [*advice.split()[1:], "--preset", "tiny", "--data", str(tiny_data_dir),
                                    "--no-progress"])
    assert code == 0, err
    assert run_cli(capsys, probe)[0] == 0
    # a damaged results.csv: report names the line and says to rerun probe, which rewrites it
    (run / "report" / "results.csv").write_text("protocol,model\nnoised\n")
    code, _, err = run_cli(capsys, ["report", "--run", str(run)])
    assert_one_line_error(code, err, "results.csv, line 2")
    assert "sceneprobe probe --run" in err
    assert run_cli(capsys, probe)[0] == 0
    assert run_cli(capsys, ["report", "--run", str(run)])[0] == 0


def test_rerun_after_a_kill_advice_resumes(tmp_path, tiny_run, tiny_data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "vae")                                       # killed before the VAE was saved
    argv = ["train-vae", "--preset", "tiny", "--data", str(tiny_data_dir), "--out", str(run), "--no-progress"]
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, "--resume")
    code, out, err = run_cli(capsys, [*argv, "--resume"])
    assert code == 0, err
    assert (run / "vae" / "config.json").is_file()


def test_bad_dataset_advice_skip_bad_is_accepted(tmp_path, capsys):
    bad_image_folder(tmp_path)
    cfg = write(tmp_path, "c.yaml", "train_vae: {steps: 2, batch_size: 4, checkpoint_every: 2}\n")
    argv = ["train-vae", "--preset", "tiny", "--config", str(cfg), "--data", str(tmp_path / "imgs"), "--out",
            str(tmp_path / "r"), "--no-progress"]
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, "--skip-bad")
    code, _, err = run_cli(capsys, [*argv, "--skip-bad"])
    assert code == 0, err


def test_interrupted_export_is_redone_without_force(tmp_path, tiny_run, capsys):
    dest = tmp_path / "exported"
    assert run_cli(capsys, ["export", "--run", tiny_run, "--out", dest])[0] == 0
    (dest / "training.json").unlink()                                # killed before its last file
    shutil.rmtree(dest / "scheduler")
    code, _, err = run_cli(capsys, ["export", "--run", tiny_run, "--out", dest])
    assert code == 0, err
    assert (dest / "training.json").is_file() and (dest / "scheduler").is_dir()
    code, _, err = run_cli(capsys, ["export", "--run", tiny_run, "--out", dest])
    assert_one_line_error(code, err, "--force")


# ----------------------------------------------------------------------------------------------- leftovers
def test_temporaries_of_a_killed_render_are_removed(tmp_path, capsys):
    stale = tmp_path / ".scenes.tmp-999999-abc"
    (stale / "rgb").mkdir(parents=True)
    (stale / "rgb" / "000000.png").write_bytes(b"half")
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--out", tmp_path / "scenes",
                                    "--no-progress"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]
    assert (tmp_path / "scenes" / ".sceneprobe.json").is_file()


def test_damaged_stage_record_is_not_trusted(tmp_path):
    from sceneprobe.study import Stages
    st = Stages(tmp_path, log=lambda s: None)
    ran = []
    st.run("a", "fp", [], lambda: ran.append(1))
    (tmp_path / ".stages" / "a.json").write_text('{"fingerpr')       # truncated
    st2 = Stages(tmp_path, log=lambda s: None)
    st2.run("a", "fp", [], lambda: ran.append(2))
    assert ran == [1, 2]
    st3 = Stages(tmp_path, log=lambda s: None)
    st3.run("a", "fp", [], lambda: ran.append(3))
    assert ran == [1, 2]


# ------------------------------------------------------------------------------------------- conversion
def test_16_bit_and_palette_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from sceneprobe.world.dataset_files import _read_image
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb, mode = _read_image(tmp_path / "g16.png")
    assert mode.startswith("I") and rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[..., 0].astype(float), ramp / 257.0, atol=0.51)
    assert (rgb == 255).mean() < 0.01                                # was 99.7 % white
    pal = Image.fromarray((np.arange(32 * 32) % 256).reshape(32, 32).astype(np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    rgb, mode = _read_image(tmp_path / "p.png")
    assert mode == "P"
    np.testing.assert_array_equal(rgb, np.asarray(pal.convert("RGB")))


def test_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import sceneprobe.world.dataset as dataset

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "d" / "rgb" / "000000.png"))
    monkeypatch.setattr(dataset, "make_dataset", full)
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--out", tmp_path / "d"])
    assert_one_line_error(code, err, "No space left on device")
    assert "000000.png" in err


def test_reading_a_users_folder_writes_nothing_into_it(tmp_path, capsys, monkeypatch):
    """check-data (and every command reading --data) keeps its cache outside a folder sceneprobe did not make."""
    from PIL import Image
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(photos / f"p{i}.png")
    before = tree_hash(photos)
    for _ in range(2):                                               # the second run reads the cache
        code, out, err = run_cli(capsys, ["check-data", photos])
        assert code == 0, err
        assert "6 images 32x32" in out
    assert tree_hash(photos) == before
    assert list((tmp_path / "xdg" / "sceneprobe" / "datasets").iterdir())
