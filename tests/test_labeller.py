"""The labeller: save/load, training, labelling, the DPT path (offline) and one-line errors for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sceneprobe.cli import main
from sceneprobe.errors import SceneprobeError
from sceneprobe.labeller import (DepthModelLabeller, Labeller, evaluate_labeller, label_images, load_labeller,
                                 train_labeller)
from sceneprobe.models.io import save_model

torch.set_num_threads(1)
TINY = dict(channels=(8, 16), norm_num_groups=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from sceneprobe.world.dataset import make_dataset
    return make_dataset(tmp_path_factory.mktemp("lab") / "scenes", n=32, size=32, seed=3, supersample=1, progress=False)


@pytest.fixture(scope="module")
def data(data_dir):
    from sceneprobe.world.dataset import load_dataset
    return load_dataset(data_dir)


@pytest.fixture(scope="module")
def cfg():
    from sceneprobe.config import load_config
    return load_config("tiny", overrides={"labeller": {"steps": 40, "batch_size": 8, "lr": 0.003}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cfg, data):
    out = tmp_path_factory.mktemp("lab") / "labeller"
    return train_labeller(cfg, data, out, progress=False)


def _random_labeller(seed: int = 0) -> Labeller:
    torch.manual_seed(seed)
    m = Labeller(**TINY)
    torch.nn.init.normal_(m.conv_out.weight, std=0.1)    # the head starts at zero: make outputs vary
    return m.eval()


def _tiny_dpt(folder, with_processor: bool = False):
    from transformers import DPTConfig, DPTForDepthEstimation
    torch.manual_seed(0)
    cfg = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, head_in_index=-1)
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    if with_processor:
        from transformers import DPTImageProcessorPil
        DPTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- model, I/O
def test_save_load_round_trip_gives_equal_outputs(tmp_path):
    m = _random_labeller()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    save_model(m, tmp_path / "lab")
    back = load_labeller(tmp_path / "lab")
    assert back.config.channels == [8, 16] or tuple(back.config.channels) == (8, 16)
    with torch.no_grad():
        a, b = m(x), back(x)
    assert torch.equal(a.depth, b.depth) and torch.equal(a.saliency_logits, b.saliency_logits)
    save_model(m, tmp_path / "half", fp16=True)                         # shipped format: fp16 on disk, fp32 loaded
    half = load_labeller(tmp_path / "half")
    assert next(half.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(half(x).depth, a.depth, rtol=1e-2, atol=1e-2)


def test_outputs_depth_in_range_for_any_image_size():
    m = _random_labeller()
    with torch.no_grad():
        out = m(torch.rand(3, 3, 30, 34) * 2 - 1)                       # not multiples of 2: padded and cropped
    assert out.depth.shape == out.saliency_logits.shape == (3, 30, 34)
    assert float(out.depth.min()) >= 0 and float(out.depth.max()) <= m.config.far_depth


def test_label_images_shapes_and_dtypes():
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    lab = label_images(_random_labeller(), images, batch=2)
    assert lab["depth"].shape == (5, 32, 32) and lab["depth"].dtype == np.float32
    assert lab["saliency"].shape == (5, 32, 32) and lab["saliency"].dtype == np.uint8
    assert set(np.unique(lab["saliency"])) <= {0, 1}
    with pytest.raises(SceneprobeError, match="uint8"):
        label_images(_random_labeller(), images.astype(np.float32))


# ---------------------------------------------------------------------------------------------------- training
def _full_loss(model, data) -> float:
    from sceneprobe.labeller.train import MIN_DEPTH
    train = data.subset("train")
    with torch.no_grad():
        out = model(torch.from_numpy(train.rgb).permute(0, 3, 1, 2).float() / 127.5 - 1)
    c = model.config
    z = (torch.from_numpy(train.depth).clamp(MIN_DEPTH, c.far_depth).log() - c.log_depth_mean) / c.log_depth_std
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.saliency_logits,
                                                               torch.from_numpy(train.saliency).float())
    return float((out.log_depth_z - z).abs().mean() + bce)


def test_training_reduces_loss_and_writes_folders(trained, data, cfg):
    model = load_labeller(trained)
    untrained = Labeller(channels=tuple(cfg.labeller.channels), norm_num_groups=8,
                         log_depth_mean=model.config.log_depth_mean, log_depth_std=model.config.log_depth_std)
    assert _full_loss(model, data) < 0.8 * _full_loss(untrained, data)
    record = json.loads((trained / "training.json").read_text())
    assert record["seed"] == cfg.labeller.seed and record["labeller_config"]["steps"] == 40
    assert {"depth_rmse", "depth_spearman", "saliency_dice", "saliency_iou"} <= set(record["eval"])
    tdir = trained.parent / "train_labeller"
    assert (tdir / "metrics.jsonl").is_file() and json.loads((tdir / "eval.json").read_text()) == record["eval"]


def test_evaluate_labeller_scores_truth_perfectly_and_saliency_sensibly(trained, data):
    res = evaluate_labeller(load_labeller(trained), data)
    assert res["split"] == "test" and res["n_images"] == len(data.subset("test"))
    assert 0 <= res["saliency_dice"] <= 1 and -1 <= res["depth_spearman"] <= 1 and res["depth_rmse"] >= 0


def test_training_refuses_bad_datasets(tmp_path, cfg, data):
    unlabelled = type(data)(data.root, data.names, data.rgb, None, data.saliency, data.split)
    with pytest.raises(SceneprobeError, match="no depth labels"):
        train_labeller(cfg, unlabelled, tmp_path / "a", progress=False)
    from sceneprobe.config import load_config
    big = load_config("tiny", overrides={"labeller": {"batch_size": 1000}})
    with pytest.raises(SceneprobeError, match="fewer than the batch size"):
        train_labeller(big, data, tmp_path / "b", progress=False)


# ---------------------------------------------------------------------------------------------------- DPT
@pytest.mark.parametrize("with_processor", [False, True])
def test_dpt_depth_model_offline(tmp_path, with_processor, data):
    folder = _tiny_dpt(tmp_path / "dpt", with_processor)
    images = data.rgb[:3]
    lab = DepthModelLabeller(folder).label(images, batch=2)
    assert lab["depth"].shape == (3, 32, 32) and lab["depth"].dtype == np.float32 and lab["saliency"] is None
    both = label_images(DepthModelLabeller(folder, saliency_labeller=_random_labeller()), images)
    assert both["saliency"].shape == (3, 32, 32) and both["saliency"].dtype == np.uint8
    if not with_processor:
        res = evaluate_labeller(DepthModelLabeller(folder), data)
        assert res["depth_kind"] == "inverse_depth" and "saliency_dice" not in res


# ---------------------------------------------------------------------------------------------------- CLI
def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_train_and_label(tmp_path, data_dir, capsys):
    out = tmp_path / "lab"
    assert main(["train-labeller", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--fp16",
                 "--no-progress"]) == 0
    assert "--fp16" in json.loads((out / "training.json").read_text())["command"]
    assert main(["train-labeller", "--preset", "tiny", "--data", str(data_dir), "--out", str(out)]) == 2
    assert "already exists" in _err(capsys)
    assert main(["label", "--images", str(data_dir), "--labeller", str(out), "--out", str(tmp_path / "labelled")]) == 0
    from sceneprobe.world.dataset import load_dataset
    labelled = load_dataset(tmp_path / "labelled")
    assert labelled.depth.shape == (32, 32, 32) and labelled.saliency is not None
    from safetensors.numpy import load_file, save_file
    samples = str(tmp_path / "samples.safetensors")
    save_file({"images": labelled.rgb[:4], "split": np.array([0, 0, 1, 2], np.int8)}, samples)
    assert main(["label", "--images", samples, "--labeller", str(out)]) == 0
    labels = load_file(str(tmp_path / "labels.safetensors"))
    assert labels["depth"].shape == (4, 32, 32) and labels["split"].tolist() == [0, 0, 1, 2]


def test_cli_bad_inputs_are_one_line_errors(tmp_path, data_dir, capsys):
    args = ["--preset", "tiny", "--out", str(tmp_path / "o")]
    assert main(["train-labeller", "--data", str(tmp_path / "missing"), *args]) == 2
    assert "does not exist" in _err(capsys)
    photos = tmp_path / "photos"                                         # images only: no depth/ or saliency/
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    assert main(["train-labeller", "--data", str(photos), *args]) == 2
    assert "no depth labels" in _err(capsys)
    x = ["--out", str(tmp_path / "x")]
    assert main(["label", "--images", str(photos), "--labeller", str(tmp_path / "nolab"), *x]) == 2
    assert "does not exist" in _err(capsys)
    assert main(["label", "--images", str(photos), "--depth-model", str(tmp_path / "nodpt"), *x]) == 2
    assert "--depth-model" in _err(capsys)
    broken = tmp_path / "broken"
    save_model(_random_labeller(), broken)
    w = broken / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main(["label", "--images", str(photos), "--labeller", str(broken), *x]) == 2
    assert "truncated" in _err(capsys)


def test_shipped_labeller_loads_and_records_its_training():
    from sceneprobe.labeller import shipped_labeller_path
    path = shipped_labeller_path("cpu")
    if not path.is_dir():
        pytest.skip("no shipped labeller in this checkout")
    record = json.loads((path / "training.json").read_text())
    assert record["dtype"] == "float16" and record["data"]["seed"] != 0        # scenes unlike the LDM's (seed 0)
    assert record["eval"]["saliency_dice"] > 0.9 and record["eval"]["depth_spearman"] > 0.9
    lab = label_images(load_labeller(path), np.zeros((1, 64, 64, 3), np.uint8))
    assert lab["depth"].shape == (1, 64, 64)


def test_shipped_readout_labeller_is_independent_of_the_labels_labeller():
    """Issue 20: the read-out labeller differs from the labels' labeller in weights, init seed, architecture and
    training world (neither is the study's world, seed 0), and its record holds its held-out eval and agreement."""
    from sceneprobe.config import load_config
    from sceneprobe.labeller import shipped_labeller_path, shipped_readout_labeller_path
    a_path, b_path = shipped_labeller_path("cpu"), shipped_readout_labeller_path("cpu")
    if not (a_path.is_dir() and b_path.is_dir()):
        pytest.skip("no shipped labellers in this checkout")
    ra, rb = (json.loads((p / "training.json").read_text()) for p in (a_path, b_path))
    a, b = load_labeller(a_path), load_labeller(b_path)
    arch = ("channels", "layers_per_block", "norm_num_groups")
    assert [tuple(np.atleast_1d(a.config[k])) for k in arch] != [tuple(np.atleast_1d(b.config[k])) for k in arch]
    assert rb["seed"] != ra["seed"] and len({0, ra["data"]["seed"], rb["data"]["seed"]}) == 3
    assert rb["dtype"] == "float16" and (b_path / "diffusion_pytorch_model.safetensors").stat().st_size < 1.5e6
    assert rb["eval"]["saliency_dice"] > 0.85 and rb["eval"]["depth_spearman"] > 0.85
    assert rb["vs_first_labeller"]["study_world_heldout"]["agreement"]["clean"]["saliency_dice"] < 0.999
    c = load_config("cpu").labeller_readout                                  # the preset trains the same recipe
    assert [tuple(np.atleast_1d(getattr(c, k))) for k in arch] == [tuple(np.atleast_1d(b.config[k])) for k in arch]
    assert c.seed == rb["seed"]
