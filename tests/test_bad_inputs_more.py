"""The long tail of bad inputs (issue 19, points 4 and 5): each is one ``error:`` line, exit 2, nothing changed.

Rows run the CLI in-process like the table of ``test_bad_inputs.py`` (same checks: exit status 2, exactly one
``error: …`` line naming the file or option, no traceback, the sandbox hashes the same before and after). Inputs
that must *work* rather than fail (a prompts CSV with a BOM or in UTF-16, ``check-data | head -c 1``) and the
order of checks (prompts before any model is loaded) have their own tests below the table.
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from test_bad_inputs import assert_one_line_error, run_cli, tree_hash, write

HEADER = "protocol,model,site,step,timestep,task,split,metric,value\n"


# ------------------------------------------------------------------------------------------------------ helpers
def sd_folder(box: Path, name: str = "sd", index: dict | None = None) -> Path:
    """A local diffusers pipeline folder: its model_index.json and the sub-folders it names (no weights)."""
    d = box / name
    index = index or {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}
    d.mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps(index))
    for k in index:
        if not k.startswith("_"):
            (d / k).mkdir()
            (d / k / "config.json").write_text("{}")
    return d


SDXL = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
SD3 = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
       "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
       "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": ["transformers", "T5EncoderModel"],
       "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
FLUX = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
PIXART = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
          "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
          "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
# an unnamed pipeline class whose parts give it away (SDXL's second text encoder)
SDXL_UNNAMED = {**SDXL, "_class_name": "MyOwnPipeline"}


def prompts(box: Path, text: str | bytes, name: str = "p.csv") -> Path:
    return write(box, name, text)


def damage_first_shard(run: Path, how: str) -> None:
    shard = sorted((run / "captures" / "noised" / "ldm").glob("*/step_*.safetensors"))[0]
    raw = shard.read_bytes()
    if how == "header-length":                                       # 8 bytes of garbage where the length goes
        shard.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\x7f" + raw[8:])
    elif how == "header-length-huge-but-fits":                       # 2 GB: a plausible number, not the file's
        shard.write_bytes((2**31).to_bytes(8, "little") + raw[8:])


def truncate_labels(run: Path) -> None:
    p = run / "captures" / "noised" / "labels.safetensors"
    p.write_bytes(p.read_bytes()[:200])


def results_with_a_site_edited_in(run: Path) -> None:
    """results.csv with a row for a site the probe run never had (its per-image arrays name only the real one)."""
    import numpy as np
    from safetensors.numpy import save_file
    write(run, "report/results.csv", HEADER + "noised,ldm,unet.mid.attn0,0,999,depth,test,rmse,0.5\n"
                                              "noised,ldm,unet.bogus7.attn0,0,999,depth,test,rmse,0.4\n")
    save_file({"noised/test-rows": np.arange(4), "noised/ldm/unet.mid.attn0/0/depth/rmse": np.ones(4)},
              str(run / "report" / "per_image.safetensors"))


def truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def deep_yaml(n: int) -> str:
    return "train_vae: " + "[" * n + "]" * n + "\n"


def big_image_folder(box: Path) -> None:
    from PIL import Image
    d = box / "imgs"
    d.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(d / f"{i:03d}.png")
    Image.new("L", (10_000, 10_000), 7).save(d / "big.png", compress_level=1)   # 100 M pixels: PIL warns (> 89 M)


# ---------------------------------------------------------------------------------------------------- the table
# (id, argv, needle, setup(box, run)). {box} the sandbox, {run} a copy of a tiny run with a finished noised capture.
ROWS = [
    # captures and labels
    ("shard-header-length-garbage", ["probe", "--preset", "tiny", "--run", "{run}", "--no-progress"], "has a damaged header",
     lambda b, r: damage_first_shard(r, "header-length")),
    ("shard-header-length-beyond-file", ["probe", "--preset", "tiny", "--run", "{run}", "--no-progress"], "has a damaged header",
     lambda b, r: damage_first_shard(r, "header-length-huge-but-fits")),
    ("labels-truncated", ["probe", "--preset", "tiny", "--run", "{run}", "--no-progress"], "labels.safetensors is damaged",
     lambda b, r: truncate_labels(r)),
    ("results-csv-unknown-site", ["report", "--run", "{run}"], "results.csv, line 3: site 'unet.bogus7.attn0'",
     lambda b, r: results_with_a_site_edited_in(r)),
    ("per-image-results-truncated", ["report", "--run", "{run}"], "per_image.safetensors are damaged",
     lambda b, r: (results_with_a_site_edited_in(r), truncate(r / "report" / "per_image.safetensors", 50))),
    # config files
    ("config-5000-digit-int", ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/d"],
     "c.yaml", lambda b, r: write(b, "c.yaml", "world: {n_scenes: " + "9" * 5000 + "}\n")),
    ("config-mixed-key-types", ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/d"],
     "c.yaml: key 1 is not a name", lambda b, r: write(b, "c.yaml", "{1: 2, bogus: 3}\n")),
    ("config-mixed-key-types-in-section", ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out",
                                           "{box}/d"], "c.yaml: key world.1 is not a name",
     lambda b, r: write(b, "c.yaml", "world: {1: 2, bogus: 3}\n")),
    ("config-100000-deep", ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/d"],
     "c.yaml is nested deeper than", lambda b, r: write(b, "c.yaml", deep_yaml(100_000))),
    ("config-dev-zero", ["scenes", "--preset", "tiny", "--config", "/dev/zero", "--out", "{box}/d"],
     "/dev/zero is larger than", None),
    ("config-huge-file", ["scenes", "--preset", "tiny", "--config", "{box}/c.yaml", "--out", "{box}/d"],
     "c.yaml is larger than", lambda b, r: write(b, "c.yaml", "# " + "x" * (2 << 20) + "\n")),
    # prompts
    ("prompt-beyond-csv-field-limit", ["capture", "--preset", "tiny", "--run", "{box}/sdrun", "--model", "{box}/sd",
                                       "--prompts", "{box}/p.csv"], "p.csv, line 2",
     lambda b, r: (sd_folder(b), prompts(b, "prompt,seed\n\"" + "a" * 200_000 + "\",1\n"))),
    ("prompts-negative-seed", ["capture", "--preset", "tiny", "--run", "{box}/sdrun", "--model", "{box}/sd",
                               "--prompts", "{box}/p.csv"], "seed -1 is negative; use a seed from 0 to",
     lambda b, r: (sd_folder(b), prompts(b, "prompt,seed\na red cube,-1\n"))),
    ("prompts-utf16-without-bom", ["capture", "--preset", "tiny", "--run", "{box}/sdrun", "--model", "{box}/sd",
                                   "--prompts", "{box}/p.csv"], "save it as UTF-8",
     lambda b, r: (sd_folder(b), prompts(b, "prompt,seed\na red cube,1\n".encode("utf-16-le")))),
    ("run-sd-bad-prompts-before-anything", ["run", "--preset", "tiny", "--sd", "{box}/sd", "--prompts", "{box}/p.csv",
                                            "--out", "{box}/r"], "p.csv, line 3",
     lambda b, r: (sd_folder(b), prompts(b, "prompt,seed\na red cube,1\na blue ball,x\n"))),
    # pipelines of other families (captured since issue 21): a folder without weights is one line before loading
    *[(f"{flag}-{fam}", argv, f"is a {name}", lambda b, r, ix=ix: (sd_folder(b, index=ix),
                                                                           prompts(b, "prompt,seed\na cube,1\n")))
      for fam, name, ix in (("sdxl", "SDXL", SDXL), ("sd3", "SD3", SD3), ("flux", "FLUX", FLUX),
                            ("pixart", "PixArt", PIXART), ("sdxl-unnamed", "SDXL", SDXL_UNNAMED))
      for flag, argv in (("run-sd", ["run", "--preset", "tiny", "--sd", "{box}/sd", "--prompts", "{box}/p.csv",
                                     "--out", "{box}/r"]),
                         ("capture-model", ["capture", "--preset", "tiny", "--run", "{box}/sdrun", "--model",
                                            "{box}/sd", "--prompts", "{box}/p.csv"]))],
    # images
    ("check-data-10000-squared-image", ["check-data", "{box}/imgs"], "big.png: image is 10000x10000",
     lambda b, r: big_image_folder(b)),
]


@pytest.fixture(scope="module")
def cap_run(tmp_path_factory, tiny_run, tiny_data_dir) -> Path:
    """The tiny trained run with a finished noised capture (its labels and shards are damaged by rows)."""
    from sceneprobe.cli import main
    run = tmp_path_factory.mktemp("caprun") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["capture", "--preset", "tiny", "--run", str(run), "--protocol", "noised", "--data",
                 str(tiny_data_dir), "--no-progress"]) == 0
    return run


@pytest.fixture
def box_run(tmp_path, cap_run):
    box = tmp_path / "box"
    box.mkdir()
    shutil.copytree(cap_run, box / "run")
    return box, box / "run"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, box_run, capsys, monkeypatch):
    _, argv, needle, setup = row
    box, run = box_run
    if setup:
        setup(box, run)
    from diffusers import StableDiffusionPipeline

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the cheap inputs were checked")
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_loading)
    subs = {"{box}": str(box), "{run}": str(run)}

    def fill(s: str) -> str:
        for k, v in subs.items():
            s = s.replace(k, v)
        return s
    before = tree_hash(box)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, [fill(a) for a in argv])
    assert_one_line_error(code, err, fill(needle))
    assert not [w for w in caught if "DecompressionBomb" in w.category.__name__], "PIL's warning reached the user"
    assert tree_hash(box) == before, "the command changed its folders"


def test_the_family_of_a_pipeline_is_named_with_the_supported_one(tmp_path, capsys):
    """Since issue 21 every known family is captured; one sceneprobe does not know is named with the known ones."""
    sd_folder(tmp_path, index={"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                               "scheduler": ["diffusers", "DDPMScheduler"]})
    prompts(tmp_path, "prompt,seed\na cube,1\n")
    code, _, err = run_cli(capsys, ["run", "--preset", "tiny", "--sd", tmp_path / "sd", "--prompts",
                                    tmp_path / "p.csv", "--out", tmp_path / "r"])
    assert_one_line_error(code, err, "KandinskyV22Pipeline")
    assert "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)" in err and "SDXL (StableDiffusionXLPipeline)" in err


# ------------------------------------------------------------------------------------------- prompts read right
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "latin-1"])
def test_prompts_csv_in_common_encodings_is_read(tmp_path, encoding):
    from sceneprobe.capture.sd import read_prompts
    text = "prompt,seed\r\na café at night,7\r\n\"a red cube, on grass\",0\r\n"
    if encoding.endswith("-bom"):
        raw = ("\ufeff" + text).encode(encoding[:-4])
    else:
        raw = text.encode(encoding)
    p = write(tmp_path, "p.csv", raw)
    assert read_prompts(p) == (["a café at night", "a red cube, on grass"], [7, 0])


def test_a_big_seed_is_told_the_range(tmp_path, capsys):
    from sceneprobe.capture.sd import read_prompts
    from sceneprobe.errors import SceneprobeError
    p = write(tmp_path, "p.csv", f"prompt,seed\na cube,{2**64}\n")
    with pytest.raises(SceneprobeError, match="above the largest seed"):
        read_prompts(p)


# ------------------------------------------------------------------------------------------------ the OS says no
def test_einval_from_the_os_is_one_line(tmp_path, capsys, monkeypatch):
    import sceneprobe.world.dataset as dataset

    def invalid(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument", str(tmp_path / "d" / "rgb" / "a:b.png"))
    monkeypatch.setattr(dataset, "make_dataset", invalid)
    code, _, err = run_cli(capsys, ["scenes", "--preset", "tiny", "--n", "4", "--out", tmp_path / "d"])
    assert_one_line_error(code, err, "Invalid argument")
    assert "a:b.png" in err


def test_broken_pipe_exits_quietly(tmp_path, tiny_data_dir):
    """`sceneprobe check-data DIR | head -c 1`: the reader is gone when it writes; like Unix tools it exits with no
    message and the status of a SIGPIPE death (141). (`true` stands for a reader that left before the first write.)"""
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    sh = f"{sys.executable} -m sceneprobe check-data {tiny_data_dir} 2>{tmp_path / 'err'} | true; " \
         "echo \" ${PIPESTATUS[0]}\""
    out = subprocess.run(["bash", "-c", sh], env=env, capture_output=True, text=True, timeout=300).stdout
    assert (tmp_path / "err").read_text() == ""
    assert out.split()[-1] == "141", out


class _ClosedPipe:
    def write(self, s):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_broken_pipe_in_process_is_quiet(tiny_data_dir, capsys, monkeypatch):
    from sceneprobe.cli import main
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = main(["check-data", str(tiny_data_dir)])
    monkeypatch.undo()
    _, err = capsys.readouterr()
    assert code == 141 and err == ""
