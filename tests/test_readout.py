"""Image read-out per step (issue #10): the labeller on each step's decoded x̂₀, scored per test image like the probes."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from sceneprobe.labeller.readout import DEPTH_METRICS, SALIENCY_METRICS, load_readout, readout_path, run_readout, \
    score_readout  # noqa: E402


def test_scores_of_a_perfect_and_of_a_wrong_read_out():
    rng = np.random.default_rng(0)
    d = rng.uniform(1, 20, (3, 8, 8))
    d[:, :2] = 50.0                                                            # sky rows at the far depth
    m = np.zeros((3, 8, 8), bool)
    m[:, 3:6, 2:5] = True
    logits = np.where(m, 2.0, -2.0)
    v = score_readout(d, logits, m, d, m, mean=10.0, std=5.0, far_depth=50.0)
    assert set(v) == {("saliency", k) for k in SALIENCY_METRICS} | {("depth", k) for k in DEPTH_METRICS}
    for key in (("saliency", "dice"), ("saliency", "auroc"), ("saliency", "ap"), ("depth", "spearman"),
                ("depth", "delta1"), ("depth", "spearman_nonsky"), ("depth", "delta1_nonsky")):
        np.testing.assert_allclose(v[key], 1.0, err_msg=str(key))
    for key in (("depth", "mse"), ("depth", "mse_nonsky"), ("depth", "absrel"), ("depth", "absrel_nonsky")):
        np.testing.assert_allclose(v[key], 0.0, atol=1e-12, err_msg=str(key))
    # a read-out that inverts depth and misses the object scores accordingly; MSE is on standardised depth
    w = score_readout(70 - d, -logits, ~m, d, m, mean=10.0, std=5.0, far_depth=50.0)
    assert (w[("depth", "spearman")] < 0).all() and (w[("saliency", "auroc")] == 0).all()
    assert (w[("saliency", "dice")] < 1e-6).all()
    np.testing.assert_allclose(w[("depth", "mse")], (((70 - 2 * d) / 5.0) ** 2).reshape(3, -1).mean(1))
    # non-sky metrics leave the sky out; a one-class mask has no AUROC
    nonsky = d < 0.99 * 50
    np.testing.assert_allclose(w[("depth", "mse_nonsky")],
                               [(((70 - 2 * d[i]) / 5.0)[nonsky[i]] ** 2).mean() for i in range(3)])
    e = score_readout(d, logits, m, d, np.zeros_like(m), 10.0, 5.0, 50.0)
    assert np.isnan(e[("saliency", "auroc")]).all()


@pytest.fixture(scope="module")
def noised_run(tmp_path_factory, tiny_cfg, tiny_data, tiny_run):
    from sceneprobe.capture.run import run_capture
    from sceneprobe.models.io import load_ldm
    run = tmp_path_factory.mktemp("readout") / "run"
    run_capture(tiny_cfg, run, "noised", load_ldm(tiny_run), data=tiny_data, progress=False)
    return run


def test_readout_file_aligns_with_the_test_rows_and_matches_the_labeller_on_the_png(noised_run, tiny_cfg):
    from PIL import Image

    from sceneprobe.capture.images import x0_image_path
    from sceneprobe.capture.store import CaptureStore, load_labels
    from sceneprobe.labeller import Labeller
    torch.manual_seed(0)
    lab = Labeller(channels=(8, 16), norm_num_groups=4).eval()
    torch.nn.init.normal_(lab.conv_out.weight, std=0.1)                        # not a constant labeller
    path = run_readout(noised_run, "noised", lab)
    assert path == readout_path(noised_run, "noised") and path.with_suffix(".json").is_file()
    with open(path, newline="") as f:
        head = next(csv.reader(f))
    assert head == ["protocol", "step", "timestep", "row", "sample_id", "task", "metric", "value", "labels_by",
                    "readout_by"]
    store = CaptureStore(noised_run / "captures/noised/ldm")
    labels = load_labels(noised_run / "captures/noised")
    test = np.flatnonzero(labels["split"] == 2)
    r = load_readout(noised_run, "noised")
    assert r.steps == store.steps and r.timesteps == store.timesteps and list(r.rows) == list(test)
    assert r.values[("saliency", "dice")].shape == (len(store.steps), len(test))
    # step 1, recomputed from the PNGs with the labeller's forward pass
    ids = [store.manifest["sample_ids"][k] for k in test]
    imgs = np.stack([np.asarray(Image.open(x0_image_path(store.root, 1, i))) for i in ids])
    with torch.no_grad():
        out = lab(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1)
    train = labels["depth"][labels["split"] == 0].astype(np.float64)
    ref = score_readout(out.depth.numpy(), out.saliency_logits.numpy(), out.saliency_logits.numpy() > 0,
                        labels["depth"][test], labels["saliency"][test].astype(bool), train.mean(), train.std(),
                        lab.config.far_depth)
    for key in (("saliency", "dice"), ("depth", "spearman"), ("depth", "mse")):
        np.testing.assert_allclose(r.values[key][1], ref[key][:], rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert r.curve("depth", "mse").shape == (len(store.steps),)
    assert load_readout(noised_run, "generate") is None


def test_readout_without_x0_images_is_a_one_line_error(tmp_path, tiny_cfg, tiny_data, tiny_run):
    from sceneprobe.capture.run import run_capture
    from sceneprobe.errors import SceneprobeError
    from sceneprobe.labeller import Labeller
    from sceneprobe.models.io import load_ldm
    run_capture(tiny_cfg, tmp_path, "noised", load_ldm(tiny_run), data=tiny_data, progress=False, readout=False,
                sites=["unet.mid.attn0"])
    with pytest.raises(SceneprobeError, match="no x̂₀ read-out images"):
        run_readout(tmp_path, "noised", Labeller(channels=(8, 16), norm_num_groups=4))


def test_inverse_depth_target_standardises_inverse_depth():
    rng = np.random.default_rng(1)
    d = rng.uniform(1, 20, (2, 6, 6))
    p = d * 1.1
    inv = 1 / d
    v = score_readout(p, None, np.zeros_like(d, bool), d, np.zeros_like(d, bool), inv.mean(), inv.std(), 50.0,
                      target="inverse")
    np.testing.assert_allclose(v[("depth", "mse")], (((1 / p - 1 / d) / inv.std()) ** 2).reshape(2, -1).mean(1))
    np.testing.assert_allclose(v[("depth", "absrel")], 0.1)                   # raw-depth metrics stay raw


def test_labeller_provenance_scores_clean_renders_and_vae_reconstructions(tiny_data, tiny_run):
    from sceneprobe.labeller import Labeller, evaluate_labeller, labeller_provenance, vae_reconstructions
    from sceneprobe.models.io import load_ldm
    from sceneprobe.labeller.train import heldout
    torch.manual_seed(0)
    lab = Labeller(channels=(8, 16), norm_num_groups=4).eval()
    torch.nn.init.normal_(lab.conv_out.weight, std=0.1)
    vae = load_ldm(tiny_run).vae
    p = labeller_provenance(lab, tiny_data, vae)
    test = heldout(tiny_data)
    recon = vae_reconstructions(vae, test.rgb)
    assert recon.shape == test.rgb.shape and recon.dtype == np.uint8 and not np.array_equal(recon, test.rgb)
    assert p["clean"] == evaluate_labeller(lab, tiny_data)
    assert p["vae_reconstruction"] == evaluate_labeller(lab, tiny_data, images=recon)
    assert p["vae_reconstruction"]["saliency_dice"] != p["clean"]["saliency_dice"]


def test_both_provenance_checks_give_the_same_scores_from_shared_views(tiny_data, tiny_run):
    """The study makes the held-out reconstructions and the labels' labeller's labels once for both checks: the
    scores must be what each check gets on its own, to the bit."""
    from sceneprobe.labeller import Labeller, heldout_views, labeller_provenance, readout_labeller_provenance
    from sceneprobe.models.io import load_ldm
    torch.manual_seed(0)
    lab = Labeller(channels=(8, 16), norm_num_groups=4).eval()
    reader = Labeller(channels=(8, 16), norm_num_groups=4).eval()
    for m in (lab, reader):
        torch.nn.init.normal_(m.conv_out.weight, std=0.1)
    vae = load_ldm(tiny_run).vae
    views = heldout_views(lab, tiny_data, vae)
    assert labeller_provenance(lab, tiny_data, vae, views=views) == labeller_provenance(lab, tiny_data, vae)
    shared = readout_labeller_provenance(lab, reader, tiny_data, vae, views=views)
    assert shared == readout_labeller_provenance(lab, reader, tiny_data, vae)
    assert shared["agreement"]["clean"]["saliency_dice"] < 1.0             # two different labellers: a real check


def test_the_report_section_shows_clean_and_reconstruction_scores_side_by_side(tmp_path):
    import json

    from sceneprobe.study import extra_sections
    clean = {"n_images": 5, "depth_spearman": 0.97, "saliency_dice": 0.968}
    recon = {"n_images": 5, "depth_spearman": 0.957, "saliency_dice": 0.791}
    (tmp_path / "labeller_eval.json").write_text(json.dumps({"clean": clean, "vae_reconstruction": recon}))
    body = dict(extra_sections(tmp_path))["Labeller quality (held-out rendered scenes and their VAE reconstructions)"]
    assert "| saliency_dice | 0.968 | 0.791 |" in body and "5 held-out scenes" in body


# ------------------------------------------------------------------------ generate: a read-out that does not score itself
def _tiny_labeller(folder, seed: int, **arch):
    """A random tiny labeller with a non-constant head, saved (so it has a path and a weights file)."""
    from sceneprobe.labeller import Labeller, load_labeller
    from sceneprobe.models.io import save_model
    torch.manual_seed(seed)
    lab = Labeller(**arch).eval()
    torch.nn.init.normal_(lab.conv_out.weight, std=0.3)
    torch.nn.init.normal_(lab.conv_out.bias, std=0.3)
    save_model(lab, folder)
    return load_labeller(folder)


@pytest.fixture(scope="module")
def generate_run(tmp_path_factory, tiny_cfg, tiny_run):
    """A tiny generate capture labelled by labeller A (channels (8, 16), seed 0); labeller B differs in seed and
    architecture (channels (8, 8), two ResBlocks per level, 2 norm groups), like the study's read-out labeller."""
    from sceneprobe.capture.run import run_capture
    from sceneprobe.labeller import label_samples
    from sceneprobe.models.io import load_ldm
    root = tmp_path_factory.mktemp("readout_generate")
    run = root / "run"
    run_capture(tiny_cfg, run, "generate", load_ldm(tiny_run), progress=False)
    a = _tiny_labeller(root / "labeller", 0, channels=(8, 16), norm_num_groups=4)
    b = _tiny_labeller(root / "labeller_readout", 1, channels=(8, 8), layers_per_block=2, norm_num_groups=2)
    label_samples(a, run / "captures" / "generate" / "samples.safetensors")
    return run, a, b


def test_generate_read_out_by_the_labels_labeller_scores_itself_at_the_last_step(generate_run):
    """Planted: with the labels' own labeller the last step's x̂₀ (the final image) scores Dice ≈ 1 and depth MSE ≈ 0;
    the second labeller does not — its last-step value is the two labellers' agreement."""
    import json
    run, a, b = generate_run
    run_readout(run, "generate", a)
    same, info_same = load_readout(run, "generate"), json.loads(readout_path(run, "generate").with_suffix(".json")
                                                                .read_text())
    run_readout(run, "generate", b)
    other, info = load_readout(run, "generate"), json.loads(readout_path(run, "generate").with_suffix(".json")
                                                            .read_text())
    assert same.curve("saliency", "dice")[-1] > 0.99 and same.curve("depth", "mse")[-1] < 1e-3
    assert info_same["readout_is_labels_labeller"] and info_same["final_image"]["saliency_dice"] > 0.999
    assert other.curve("saliency", "dice")[-1] < 0.9 and other.curve("depth", "mse")[-1] > 0.01
    assert not info["readout_is_labels_labeller"] and info["final_image"]["saliency_dice"] < 0.9
    # who made what is on every row and in the .json
    assert (same.labels_by, same.readout_by, same.site) == ("labeller", "labeller", "labeller(x0)")
    assert (other.labels_by, other.readout_by, other.site) == ("labeller", "labeller_readout", "labeller_readout(x0)")
    assert info["labels_labeller"] == str(a.path) and info["labeller"] == str(b.path)


def test_labeller_agreement_is_one_with_itself_and_lower_with_another(generate_run):
    from safetensors.numpy import load_file

    from sceneprobe.labeller import labeller_agreement
    run, a, b = generate_run
    images = load_file(str(run / "captures" / "generate" / "samples.safetensors"))["images"]
    self_ag, ag = labeller_agreement(a, a, images), labeller_agreement(a, b, images)
    assert self_ag["saliency_dice"] == pytest.approx(1.0) and self_ag["depth_rmse"] == pytest.approx(0.0, abs=1e-9)
    assert ag["n_images"] == len(images) and ag["saliency_dice"] < 0.9 and ag["depth_rmse"] > 0.01


def test_the_report_says_who_made_the_labels_and_who_read_x0(tmp_path):
    import json

    from sceneprobe.study import extra_sections
    title = "Labels and image read-out: which labeller made which"
    (tmp_path / "readout").mkdir()
    for name, ch, seed, world in (("labeller", [16, 32], 0, 1), ("labeller_readout", [8, 16], 1, 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"channels": ch, "layers_per_block": 1 + seed,
                                                                 "norm_num_groups": 4}))
        (tmp_path / name / "training.json").write_text(json.dumps({
            "seed": seed, "data": {"seed": world, "n_train": 10},
            "eval": {"split": "test", "n_images": 5, "saliency_dice": 0.9 + seed / 100, "depth_spearman": 0.8}}))
    info = {"labels_by": "labeller", "readout_by": "labeller_readout", "readout_is_labels_labeller": False,
            "final_image": {"saliency_dice": 0.913, "depth_spearman": 0.871}}
    (tmp_path / "readout" / "generate.json").write_text(json.dumps(info))
    ag = {"n_images": 5, "saliency_dice": 0.93, "saliency_iou": 0.88, "depth_spearman": 0.95, "depth_pearson": 0.96,
          "depth_rmse": 0.2}
    (tmp_path / "labeller_readout_eval.json").write_text(json.dumps({"agreement": {"clean": ag,
                                                                                   "vae_reconstruction": ag}}))
    body = dict(extra_sections(tmp_path))[title]
    assert "`labeller/` on each *final* generated image (channels [16, 32], 1 ResBlock(s) per level" in body
    assert "read-out** (each step's decoded x̂₀, both protocols): `labeller_readout/` (channels [8, 16], 2 ResBlock(s)" \
        in body and "world seed 1" in body and "world seed 2" in body
    assert "different labellers" in body and "Dice 0.913" in body and "| saliency_dice | 0.93 | 0.93 |" in body
    (tmp_path / "readout" / "generate.json").write_text(json.dumps({**info, "readout_by": "labeller",
                                                                    "readout_is_labels_labeller": True}))
    assert "scores itself" in dict(extra_sections(tmp_path))[title]
