"""Specifications of dataset folders: make_dataset ↔ load_dataset, users' own folders, and every bad input."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sceneprobe.errors import SceneprobeError
from sceneprobe.world.dataset import load_dataset, make_dataset
from sceneprobe.world.render import FAR_DEPTH, render_scenes
from sceneprobe.world.scenes import SceneSpec


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "ds"
    return make_dataset(out, n=12, size=32, seed=4, supersample=2, progress=False)


def test_make_dataset_writes_the_documented_layout(made: Path):
    for sub, ext in (("rgb", ".png"), ("depth", ".npy"), ("saliency", ".png"), ("instances", ".png")):
        assert sorted(p.name for p in (made / sub).iterdir()) == [f"{i:06d}{ext}" for i in range(12)]
    for f in ("scenes.jsonl", "split.json", "meta.json", "contact_sheet.png"):
        assert (made / f).is_file()
    meta = json.loads((made / "meta.json").read_text())
    assert (meta["seed"], meta["n"], meta["size"], meta["far_depth"]) == (4, 12, 32, FAR_DEPTH)
    assert "saliency" in meta["saliency_rule"] and meta["version"] == 1
    split = json.loads((made / "split.json").read_text())
    assert sorted(n for names in split.values() for n in names) == [f"{i:06d}" for i in range(12)]
    assert all(len(split[s]) >= 1 for s in ("train", "val", "test"))
    lines = [json.loads(line) for line in (made / "scenes.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(12)) and lines[3]["name"] == "000003"
    mask = np.asarray(Image.open(made / "saliency" / "000000.png"))
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(made / "contact_sheet.png").size[0] > 3 * 32


def test_round_trip_matches_the_renderer(made: Path):
    data = load_dataset(made)
    ref = render_scenes(4, range(12), size=32, supersample=2)
    assert len(data) == 12 and data.names == [f"{i:06d}" for i in range(12)]
    np.testing.assert_array_equal(data.rgb, ref["rgb"])
    np.testing.assert_array_equal(data.depth, ref["depth"])
    np.testing.assert_array_equal(data.saliency, ref["saliency"])
    assert data.depth.dtype == np.float32 and data.saliency.dtype == bool
    split = json.loads((made / "split.json").read_text())
    assert data.subset("test").names == sorted(split["test"])
    assert len(data.subset("train")) + len(data.subset("val")) + len(data.subset("test")) == 12
    specs = [SceneSpec.from_dict(json.loads(line)["spec"]) for line in (made / "scenes.jsonl").read_text().splitlines()]
    assert specs == ref["specs"]


def test_the_world_is_the_same_bytes_on_any_number_of_workers(made: Path, tmp_path: Path):
    """``made`` used the default workers (0: every core); one worker writes the same files, byte for byte, so the
    stages' fingerprints leave ``world.workers`` out."""
    import dataclasses

    from sceneprobe.config import config_from_dict, fingerprint, load_config, to_dict
    from sceneprobe.study import world_id
    one = make_dataset(tmp_path / "one", n=12, size=32, seed=4, supersample=2, workers=1, progress=False)
    def written(root: Path) -> list[Path]:                  # not the cache load_dataset adds beside them
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    files = written(made)
    assert files == written(one) and len(files) > 4 * 12
    differ = [f for f in files if (made / f).read_bytes() != (one / f).read_bytes()]
    assert differ == []
    cfg = load_config("tiny")
    d = to_dict(cfg)
    d["world"]["workers"] = 7
    assert fingerprint(world_id(config_from_dict(d))) == fingerprint(world_id(cfg))
    assert fingerprint(world_id(cfg)) == fingerprint(dataclasses.replace(cfg.world, workers=1))   # the old default's
    with pytest.raises(SceneprobeError, match="workers must be a whole number >= 0"):
        make_dataset(tmp_path / "bad", n=2, size=32, workers=-1, progress=False)


def test_output_folder_is_not_overwritten_without_force(made: Path):
    with pytest.raises(SceneprobeError, match="already exists"):
        make_dataset(made, n=2, size=32, progress=False)


def test_force_replaces_and_cache_follows_changes(tmp_path: Path):
    out = make_dataset(tmp_path / "ds", n=3, size=32, supersample=1, progress=False)
    out = make_dataset(out, n=4, size=32, supersample=1, force=True, progress=False)
    assert len(load_dataset(out)) == 4 and (out / ".cache").is_dir()
    # Change a file: the cache must not be used any more.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / "rgb" / "000001.png")
    os.utime(out / "rgb" / "000001.png", ns=(1, 1))
    assert load_dataset(out).rgb[1].max() == 0


# ----------------------------------------------------------------------------------------- users' own folders
def write_folder(root: Path, n: int = 4, size: int = 32, depth: bool = True, saliency: bool = True,
                 sub: str = "rgb") -> Path:
    """A user's folder: n random RGB images (in ``sub``, "" = the root), with depth .npy and 0/255 masks."""
    rng = np.random.default_rng(0)
    img_dir = root / sub if sub else root
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(img_dir / f"im{i}.png")
        if depth:
            (root / "depth").mkdir(exist_ok=True)
            np.save(root / "depth" / f"im{i}.npy", rng.uniform(1, 10, (size, size)).astype(np.float32))
        if saliency:
            (root / "saliency").mkdir(exist_ok=True)
            Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).save(
                root / "saliency" / f"im{i}.png")
    return root


def test_user_folder_images_in_root_without_labels_split_by_hash(tmp_path: Path):
    root = write_folder(tmp_path / "mine", n=6, depth=False, saliency=False, sub="")
    data = load_dataset(root)
    assert len(data) == 6 and data.depth is None and data.saliency is None
    assert set(data.split) <= {"train", "val", "test"}
    np.testing.assert_array_equal(load_dataset(write_folder(tmp_path / "again", n=6, depth=False,
                                                            saliency=False, sub="")).split, data.split)


def test_user_folder_with_labels_and_split_json(tmp_path: Path):
    root = write_folder(tmp_path / "mine", n=4)
    (root / "split.json").write_text(json.dumps({"train": ["im0", "im1"], "val": ["im2"], "test": ["im3"]}))
    data = load_dataset(root)
    assert data.depth.shape == (4, 32, 32) and data.saliency.shape == (4, 32, 32)
    assert data.split.tolist() == ["train", "train", "val", "test"]
    (root / "split.json").write_text(json.dumps({"train": ["im0", "im1"], "val": ["im2"]}))
    with pytest.raises(SceneprobeError, match="split.json.*im3"):
        load_dataset(root)


def expect_bad(root: Path, filename: str, match: str) -> None:
    """Loading fails naming ``filename``; with skip_bad the file is skipped and reported."""
    with pytest.raises(SceneprobeError, match=match) as err:
        load_dataset(root)
    assert filename in str(err.value) and "\n" not in str(err.value)
    data = load_dataset(root, skip_bad=True)
    assert len(data) == 3 and len(data.skipped) == 1 and filename in data.skipped[0]


def test_corrupt_image(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    (root / "rgb" / "im2.png").write_bytes(b"this is not a png at all")
    expect_bad(root, "im2.png", "cannot read")


def test_truncated_image(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    blob = (root / "rgb" / "im1.png").read_bytes()
    (root / "rgb" / "im1.png").write_bytes(blob[: len(blob) // 2])
    expect_bad(root, "im1.png", "cannot read")


def test_grayscale_and_rgba_images_are_converted_with_a_warning(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    Image.fromarray(np.full((32, 32), 77, np.uint8)).save(root / "rgb" / "im0.png")
    Image.fromarray(np.full((32, 32, 4), 200, np.uint8), mode="RGBA").save(root / "rgb" / "im3.png")
    with pytest.warns(UserWarning, match=r"converted 2 image.*im0\.png \(L\).*im3\.png \(RGBA\)"):
        data = load_dataset(root)
    assert data.rgb.shape == (4, 32, 32, 3) and (data.rgb[0] == 77).all()
    assert len(data.converted) == 2
    with pytest.warns(UserWarning, match="converted 2"):                 # the same from the cache
        load_dataset(root)


def test_depth_of_another_size(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    np.save(root / "depth" / "im1.npy", np.ones((16, 32), np.float32))
    expect_bad(root, "im1.npy", "image's size")


@pytest.mark.parametrize("value, match", [(np.nan, "NaN"), (np.inf, "NaN or infinite"), (-1.0, "negative")])
def test_nan_inf_or_negative_depth(tmp_path: Path, value, match):
    root = write_folder(tmp_path / "u")
    d = np.ones((32, 32), np.float32)
    d[5, 7] = value
    np.save(root / "depth" / "im3.npy", d)
    expect_bad(root, "im3.npy", match)


def test_mask_not_binary(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    m = np.zeros((32, 32), np.uint8)
    m[:4] = 128
    Image.fromarray(m).save(root / "saliency" / "im0.png")
    expect_bad(root, "im0.png", "not binary")


def test_mask_with_values_0_and_1_is_binary(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    m = np.zeros((32, 32), np.uint8)
    m[:4] = 1
    Image.fromarray(m).save(root / "saliency" / "im0.png")
    assert load_dataset(root).saliency[0].sum() == 4 * 32


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SceneprobeError, match="no images") as err:
        load_dataset(tmp_path / "empty")
    assert "empty" in str(err.value)
    with pytest.raises(SceneprobeError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_labels_missing_for_some_images(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    (root / "depth" / "im2.npy").unlink()
    expect_bad(root, "im2", "no depth for 1 of 4")


def test_images_of_differing_sizes(tmp_path: Path):
    root = write_folder(tmp_path / "u", depth=False, saliency=False)
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(root / "rgb" / "im1.png")
    expect_bad(root, "im1.png", "32x40 but the others are 32x32")


def test_skipped_files_recorded_in_the_cache_still_fail_without_skip_bad(tmp_path: Path):
    root = write_folder(tmp_path / "u")
    (root / "rgb" / "im0.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset(root, skip_bad=True)) == 3          # builds the cache with one skip
    with pytest.raises(SceneprobeError, match="im0.png"):
        load_dataset(root)
