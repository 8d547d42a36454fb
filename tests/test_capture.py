"""Capture (issue #4): recorder hooks, controls, the generate and noised protocols, streaming, resume, integrity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sceneprobe.sample import to_latent
import torch.nn.functional as F

torch.set_num_threads(1)

from sceneprobe.capture import run as caprun  # noqa: E402  (run_capture looks up save_images, sample_and_record here)
from sceneprobe.capture.images import x0_image_path  # noqa: E402
from sceneprobe.capture.input_site import INPUT_SITE, input_rows  # noqa: E402
from sceneprobe.capture.noised_pass import NOISE_STREAM  # noqa: E402
from sceneprobe.capture.recorder import Recorder, hook_count  # noqa: E402
from sceneprobe.capture.run import run_capture  # noqa: E402
from sceneprobe.capture.site_shapes import derived_shapes, traced_shapes  # noqa: E402
from sceneprobe.capture.split_codes import probe_split  # noqa: E402
from sceneprobe.capture.store import CaptureStore, load_labels, shard_path  # noqa: E402
from sceneprobe.capture.vae_decodes import decode_to_mid  # noqa: E402
from sceneprobe.config import load_config  # noqa: E402
from sceneprobe.errors import SceneprobeError  # noqa: E402
from sceneprobe.models.build import build_train_scheduler, build_unet, build_vae, latent_size  # noqa: E402
from sceneprobe.models.controls import fresh_copy, permuted_copy  # noqa: E402
from sceneprobe.models.io import LDM  # noqa: E402
from sceneprobe.sample import decode, generate  # noqa: E402

UNET_SITES = ["unet.down0.attn0", "unet.mid.attn0", "unet.up1.attn0", "unet.up1.attn1"]


def tiny_cfg(**capture):
    base = {"n_generate": 6, "n_noised": 6, "steps": 2, "batch_size": 4}
    return load_config("tiny", overrides={"capture": {**base, **capture}})


@pytest.fixture(scope="module")
def ldm() -> LDM:
    cfg = load_config("tiny")
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.world.size).eval()
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, latent_size(cfg.vae, cfg.world.size)).eval()
    return LDM(vae, unet, dict(build_train_scheduler(cfg.train_ldm).config))


@pytest.fixture(scope="module")
def data():
    from sceneprobe.world.dataset import SceneData
    rng = np.random.default_rng(0)
    n = 10
    split = np.array(["train", "test"] * 5)
    return SceneData(Path("fake"), [f"{i:06d}" for i in range(n)], rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                     rng.random((n, 32, 32), np.float32) * 10, rng.random((n, 32, 32)) > 0.5, split)


def _stores_equal(a: Path, b: Path) -> None:
    sa, sb = CaptureStore(a), CaptureStore(b)
    assert sa.sites == sb.sites and sa.steps == sb.steps
    for s in sa.sites:
        for t in sa.steps:
            assert torch.equal(sa.read(s, t), sb.read(s, t)), (s, t)


# ------------------------------------------------------------------------------------------------------ recorder
def test_recorder_attn_site_is_the_branch_before_the_residual(ldm):
    x = torch.randn(2, 4, 16, 16)
    inputs = {}
    pre = [ldm.unet.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: inputs.__setitem__(p, a[0]))
           for p in ("down_blocks.0.attentions.0", "mid_block.attentions.0")]
    try:
        with torch.no_grad(), Recorder({"unet": ldm.unet}, kind="attn") as a, \
                Recorder({"unet": ldm.unet}, kind="block") as b:
            ldm.unet(x, 10)
            ldm.unet(x, 500)
    finally:
        for h in pre:
            h.remove()
    assert a.sites == UNET_SITES
    assert all(len(v) == 2 for v in a.outputs.values())  # one entry per call
    assert a.outputs["unet.down0.attn0"][0].shape == (2, 16, 16, 16)  # (B, C, H, W)
    assert a.outputs["unet.mid.attn0"][0].shape == (2, 32, 8, 8)
    # block output = attention branch + residual (UNet2DModel: residual_connection, rescale 1)
    pairs = (("unet.down0.attn0", "down_blocks.0.attentions.0"), ("unet.mid.attn0", "mid_block.attentions.0"))
    for site, path in pairs:
        torch.testing.assert_close(b.outputs[site][1], a.outputs[site][1] + inputs[path], atol=1e-5, rtol=1e-5)


def test_recorder_removes_exactly_its_hooks_also_on_errors(ldm):
    unet, vae = ldm.unet, ldm.vae
    own = unet.mid_block.register_forward_hook(lambda *a: None)  # somebody else's hook stays
    before = hook_count(unet) + hook_count(vae)
    with Recorder({"unet": unet, "vae": vae}) as rec:
        assert hook_count(unet) + hook_count(vae) == before + 2 * (4 + 2)  # pre-hook + hook per site
        assert rec.sites[-2:] == ["vae.enc.mid.attn0", "vae.dec.mid.attn0"]
    assert hook_count(unet) + hook_count(vae) == before
    with pytest.raises(ZeroDivisionError):
        with Recorder({"unet": unet, "vae": vae}):
            1 / 0
    assert hook_count(unet) + hook_count(vae) == before
    with pytest.raises(SceneprobeError, match="unet.down7.attn0"):
        Recorder({"unet": unet}, sites=["unet.down0.attn0", "unet.down7.attn0"])
    with pytest.raises(SceneprobeError, match="vae"):
        Recorder({"unet": unet}, sites=["vae.dec.mid.attn0"])
    with pytest.raises(SceneprobeError, match="kind"):
        Recorder({"unet": unet}, kind="residual")
    assert hook_count(unet) + hook_count(vae) == before
    own.remove()


def test_recorder_streams_and_keeps_the_conditional_half(ldm):
    got = []
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad(), Recorder({"unet": ldm.unet}, ["unet.up1.attn1"], on_output=lambda s, y: got.append((s, y)),
                                   keep_half="cond") as rec, Recorder({"unet": ldm.unet}, ["unet.up1.attn1"]) as full:
        ldm.unet(x, 3)
    assert rec.outputs["unet.up1.attn1"] == []  # streamed: nothing kept
    (site, y), = got
    assert site == "unet.up1.attn1" and y.shape == (1, 16, 16, 16)
    assert torch.equal(y, full.outputs[site][0][1:])


# ------------------------------------------------------------------------------------------------------ controls
def test_controls_permute_weights_keep_biases_and_are_seeded(ldm):
    unet = ldm.unet
    orig = {k: v.clone() for k, v in unet.state_dict().items()}
    p1, p2, p3 = permuted_copy(unet, 1), permuted_copy(unet, 1), permuted_copy(unet, 2)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, orig[k])  # the original is untouched
    s1, s3 = p1.state_dict(), p3.state_dict()
    changed = 0
    for k, v in orig.items():
        assert torch.equal(s1[k], p2.state_dict()[k])  # seeded
        if k.endswith(".weight"):
            assert torch.equal(s1[k].flatten().sort().values, v.flatten().sort().values)  # a permutation
            changed += (not torch.equal(s1[k], v)) and v.unique().numel() > 1
        else:
            assert torch.equal(s1[k], v)  # biases untouched
    assert changed > 10 and not torch.equal(s1["conv_in.weight"], s3["conv_in.weight"])
    state = torch.random.get_rng_state()
    f1, f2, f3 = fresh_copy(unet, 5), fresh_copy(unet, 5), fresh_copy(unet, 6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(f1.conv_in.weight, f2.conv_in.weight) and not torch.equal(f1.conv_in.weight, f3.conv_in.weight)
    assert not torch.equal(f1.conv_in.weight, unet.conv_in.weight) and f1.config == unet.config


# ------------------------------------------------------------------------------------------------------ protocols
def test_probe_split_is_60_15_25_and_fixed_by_id():
    s = probe_split(range(100))
    assert np.bincount(s).tolist() == [60, 15, 25]
    assert np.array_equal(probe_split(range(100)), s) and s.dtype == np.int8
    assert np.bincount(probe_split(range(12)), minlength=3).tolist() == [7, 2, 3]


def test_generate_store_matches_an_in_memory_sampling_pass(ldm, tmp_path):
    cfg = tiny_cfg()
    root = run_capture(cfg, tmp_path, "generate", ldm, progress=False)
    assert root == tmp_path / "captures" / "generate" / "ldm"
    st = CaptureStore(root)
    st.verify()
    m = st.manifest
    # the encoder is not run while sampling; the input control (x_t with its 5×5 neighbourhood) is the last site
    assert m["site_order"] == UNET_SITES + ["vae.dec.mid.attn0", INPUT_SITE]
    assert m["sites"][INPUT_SITE]["shape"] == [4 * 25, 16, 16] and m["input_window"] == 5
    assert sorted(st.sites) == sorted(m["site_order"])  # (manifest keys are sorted on disk)
    assert m["n"] == 6 and m["sample_ids"] == list(range(6)) and m["steps"] == [0, 1] and len(m["timesteps"]) == 2
    assert m["timesteps"][0] > m["timesteps"][1]  # step 0 is the noisiest
    for key in ("protocol", "model", "seeds", "dtype", "pool", "site_kind", "vae_input", "model_hash", "vae_hash",
                "fingerprint"):
        assert key in m
    assert m["sites"]["unet.mid.attn0"]["shape"] == [32, 8, 8] and m["dtype"] == "float16"
    assert not (root / "progress").exists()
    # Reference: the plain sampler, hooks in memory, batch of two ids from the middle (batch independence).
    ids = [4, 5]
    steps_seen, x_in = [], []
    hook = ldm.unet.register_forward_pre_hook(lambda mod, args: x_in.append(args[0].clone()))
    try:
        with torch.no_grad(), Recorder({"unet": ldm.unet, "vae": ldm.vae},
                                       [s for s in st.sites if s != INPUT_SITE]) as rec:
            imgs, _ = generate(ldm, ids, cfg.capture.seed, steps=2,
                               callback=lambda i, t, x, x0: (steps_seen.append(t), decode(ldm.vae, x)))
    finally:
        hook.remove()
    assert steps_seen == m["timesteps"]
    for step in (0, 1):                       # the input site: the U-Net's own input at that step, unfolded
        ref = torch.nn.functional.unfold(x_in[step], 5, padding=2).reshape(2, 100, 16, 16)
        torch.testing.assert_close(st.read(INPUT_SITE, step, ids), ref.half().float(), atol=2e-3, rtol=2e-3)
        assert torch.equal(ref[:, 12], x_in[step][:, 0]) and torch.equal(ref[:, 25 + 12], x_in[step][:, 1])
    for site in (s for s in st.sites if s != INPUT_SITE):
        for step in (0, 1):
            torch.testing.assert_close(st.read(site, step, ids), rec.outputs[site][step].half().float(),
                                       atol=2e-3, rtol=2e-3)
    from safetensors.numpy import load_file
    samples = load_file(str(root.parent / "samples.safetensors"))
    assert samples["images"].shape == (6, 32, 32, 3) and samples["images"].dtype == np.uint8
    assert np.array_equal(samples["images"][ids], imgs)  # the final images are the sampler's images
    assert np.array_equal(samples["split"], probe_split(range(6))) and m["split"] == samples["split"].tolist()
    assert (root.parent / "images" / "000005.png").is_file()
    # image read-out: the decoded x̂₀ (scheduler.step's pred_original_sample) of every test row at every step
    test_ids = [i for i, k in enumerate(probe_split(range(6))) if k == 2]
    assert test_ids and m["readout"]["sample_ids"] == test_ids
    from PIL import Image
    from sceneprobe.sample import to_uint8
    x0s = []
    with torch.no_grad():
        generate(ldm, test_ids, cfg.capture.seed, steps=2, callback=lambda i, t, x, x0: x0s.append(decode(ldm.vae, x0)))
    for step in (0, 1):
        png = np.asarray(Image.open(x0_image_path(root, step, test_ids[0])))
        assert np.abs(png.astype(int) - to_uint8(x0s[step])[0].astype(int)).max() <= 1
    assert not (root / "x0" / "step_00" / f"{[i for i in range(6) if i not in test_ids][0]:06d}.png").exists()


def test_vae_sees_predicted_x0_and_pooling_and_float32(ldm, tmp_path):
    a = run_capture(tiny_cfg(dtype="float32"), tmp_path / "a", "generate", ldm, progress=False)
    b = run_capture(tiny_cfg(dtype="float32", pool=2), tmp_path / "b", "generate", ldm, progress=False)
    c = run_capture(tiny_cfg(vae_input="x0"), tmp_path / "c", "generate", ldm, progress=False)
    sa, sb, sc = CaptureStore(a), CaptureStore(b), CaptureStore(c)
    assert sb.shape("unet.down0.attn0") == (16, 8, 8) and sb.manifest["pool"] == 2
    for site in sa.sites:
        torch.testing.assert_close(sb.read(site, 0), F.avg_pool2d(sa.read(site, 0), 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc.read("unet.mid.attn0", 1), sa.read("unet.mid.attn0", 1), atol=2e-3, rtol=2e-3)
    with torch.no_grad(), Recorder({"vae": ldm.vae}, ["vae.dec.mid.attn0"]) as rec:
        generate(ldm, [0, 1], 1000, steps=2, callback=lambda i, t, x, x0: decode(ldm.vae, x0))
    ref = rec.outputs["vae.dec.mid.attn0"][0].half().float()  # step 0, decoded from x̂0
    torch.testing.assert_close(sc.read("vae.dec.mid.attn0", 0, [0, 1]), ref, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(sa.read("vae.dec.mid.attn0", 0, [0, 1]), ref, atol=1e-4, rtol=0)


def test_noised_protocol_records_test_scenes_and_writes_exact_labels(ldm, data, tmp_path):
    cfg = tiny_cfg(n_noised=4)
    root = run_capture(cfg, tmp_path, "noised", ldm, data=data, progress=False)
    st = CaptureStore(root)
    assert st.manifest["site_order"] == UNET_SITES + ["vae.enc.mid.attn0", "vae.dec.mid.attn0", INPUT_SITE]
    test = data.subset("test")
    assert st.n == 4 and st.manifest["names"] == test.names[:4]
    enc0 = st.read("vae.enc.mid.attn0", 0)
    # the encoder sees the clean image: stored once, marked step-independent; every other site at every step
    assert st.manifest["step_independent_sites"] == ["vae.enc.mid.attn0"] and st.step_independent("vae.enc.mid.attn0")
    assert st.site_steps("vae.enc.mid.attn0") == [0] and st.site_steps("vae.dec.mid.attn0") == [0, 1]
    assert not shard_path(root, "vae.enc.mid.attn0", 1).exists()
    assert "prev_sample" in st.manifest["vae_dec_input"] and "noised" in st.manifest["vae_dec_input"]
    # Reference for row 2 at step 1: x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε with the sample's one fixed ε.
    from sceneprobe.models.build import sampling_scheduler
    from sceneprobe.sample import generators
    sched = sampling_scheduler(ldm.scheduler_config)
    sched.set_timesteps(2)
    t = sched.timesteps[1]
    x = torch.from_numpy(test.rgb[2:3]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad(), Recorder({"unet": ldm.unet, "vae": ldm.vae}, ["unet.mid.attn0", "vae.dec.mid.attn0"]) as rec:
        z0 = to_latent(ldm.vae, ldm.vae.encode(x).latent_dist.mode())
        eps = torch.randn(z0.shape[1:], generator=generators([2], cfg.capture.seed, NOISE_STREAM)[0])
        ab = sched.alphas_cumprod[t]
        xt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        pred = ldm.unet(xt, t).sample
        decode(ldm.vae, sched.step(pred, t, xt).prev_sample)   # the decoder reads this U-Net's update of x_t
    torch.testing.assert_close(st.read("unet.mid.attn0", 1, [2]), rec.outputs["unet.mid.attn0"][0].half().float(),
                               atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(st.read("vae.dec.mid.attn0", 1, [2]),
                               rec.outputs["vae.dec.mid.attn0"][0].half().float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(st.read(INPUT_SITE, 1, [2]),     # the input control: this x_t, unfolded
                               input_rows(xt, 5).half().float(), atol=2e-3, rtol=2e-3)
    labels = load_labels(root.parent)
    assert np.array_equal(labels["depth"], test.depth[:4]) and labels["depth"].dtype == np.float32
    assert np.array_equal(labels["saliency"], test.saliency[:4].astype(np.uint8))
    assert np.array_equal(labels["split"], probe_split(range(4)))
    # the permuted control: same rows, same VAE, same labels, another U-Net
    ctl = run_capture(cfg, tmp_path, "noised", ldm, data=data, control="permuted", progress=False)
    sc = CaptureStore(ctl)
    assert ctl.name == "permuted" and sc.n == 4 and sc.manifest["model_hash"] != st.manifest["model_hash"]
    assert sc.manifest["vae_hash"] == st.manifest["vae_hash"] and torch.equal(sc.read("vae.enc.mid.attn0", 0), enc0)
    # ... and its decoder rows are a real control: the decoder sees the permuted U-Net's update, not the trained one's
    for step in (0, 1):
        diff = (sc.read("vae.dec.mid.attn0", step) - st.read("vae.dec.mid.attn0", step)).abs().max()
        assert diff > 1e-2, step
    assert np.array_equal(load_labels(root.parent)["depth"], test.depth[:4])
    # fewer test scenes than asked: all of them
    assert CaptureStore(run_capture(tiny_cfg(n_noised=99), tmp_path / "all", "noised", ldm, data=data,
                                    progress=False)).n == 5


def test_bad_capture_inputs_are_one_line_errors(ldm, data, tmp_path):
    from sceneprobe.world.dataset import SceneData
    cases = [
        (lambda: run_capture(tiny_cfg(), tmp_path, "replay", ldm), "protocol"),
        (lambda: run_capture(tiny_cfg(), tmp_path, "noised", ldm), "--data"),
        (lambda: run_capture(tiny_cfg(), tmp_path, "generate", ldm, control="shuffled"), "control"),
        (lambda: run_capture(tiny_cfg(site_kind="residual"), tmp_path, "generate", ldm), "site_kind"),
        (lambda: run_capture(tiny_cfg(vae_input="noise"), tmp_path, "generate", ldm), "vae_input"),
        (lambda: run_capture(tiny_cfg(dtype="int8"), tmp_path, "generate", ldm), "dtype"),
        (lambda: run_capture(tiny_cfg(pool=64), tmp_path, "generate", ldm), "pool"),
        (lambda: run_capture(tiny_cfg(), tmp_path, "noised", ldm, data=SceneData(
            Path("x"), data.names, data.rgb, None, None, data.split)), "depth"),
        (lambda: run_capture(tiny_cfg(), tmp_path, "noised", ldm, data=SceneData(
            Path("x"), data.names, data.rgb, data.depth, data.saliency, np.array(["train"] * 10))), "test split"),
    ]
    for fn, word in cases:
        with pytest.raises(SceneprobeError, match=word) as e:
            fn()
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ resume and integrity
class _Crash(Exception):
    pass


def _crash_after_first_batch(monkeypatch):
    calls = {"n": 0}
    real = caprun.save_images

    def save_images(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash()
        return real(*a, **k)
    monkeypatch.setattr(caprun, "save_images", save_images)


def _count_batches(monkeypatch) -> dict:
    count = {"n": 0}
    real = caprun.sample_and_record

    def counted(*a, **k):
        count["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(caprun, "sample_and_record", counted)
    return count


def test_resume_skips_finished_batches_and_finished_stores(ldm, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    full = run_capture(cfg, tmp_path / "full", "generate", ldm, progress=False)
    with monkeypatch.context() as mp:
        _crash_after_first_batch(mp)
        with pytest.raises(_Crash):
            run_capture(cfg, tmp_path / "r", "generate", ldm, progress=False)
    root = tmp_path / "r" / "captures" / "generate" / "ldm"
    assert not (root / "manifest.json").exists()
    prog = json.loads((root / "progress" / "rank0.json").read_text())
    assert prog["done"] == [[0, 4]]
    count = _count_batches(monkeypatch)
    assert run_capture(cfg, tmp_path / "r", "generate", ldm, progress=False) == root
    assert count["n"] == 1  # only the unfinished batch [4, 6)
    _stores_equal(root, full)
    # the final images: rows 0–3 from the first run's PNGs, 4–5 from memory — the same file as in one run
    samples = "captures/generate/samples.safetensors"
    assert (tmp_path / "r" / samples).read_bytes() == (tmp_path / "full" / samples).read_bytes()
    run_capture(cfg, tmp_path / "r", "generate", ldm, progress=False)
    assert count["n"] == 1  # finished and matching: skipped entirely
    run_capture(cfg, tmp_path / "r", "generate", ldm, force=True, progress=False)
    assert count["n"] == 3  # force redoes both batches
    _stores_equal(root, full)


def test_manifest_mismatch_and_truncated_shards_are_named(ldm, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    root = run_capture(cfg, tmp_path, "generate", ldm, progress=False)
    with pytest.raises(SceneprobeError, match="other options.*--force"):
        run_capture(tiny_cfg(steps=3), tmp_path, "generate", ldm, progress=False)
    # a finished store with a damaged shard is not silently skipped
    shard = shard_path(root, "unet.mid.attn0", 1)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(SceneprobeError, match=f"{shard}.*truncated"):
        run_capture(cfg, tmp_path, "generate", ldm, progress=False)
    # resume of an unfinished store checks every shard first
    with monkeypatch.context() as mp:
        _crash_after_first_batch(mp)
        with pytest.raises(_Crash):
            run_capture(cfg, tmp_path, "generate", ldm, force=True, progress=False)
    shard = shard_path(root, "vae.dec.mid.attn0", 0)
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SceneprobeError, match=f"{shard}.*truncated"):
        run_capture(cfg, tmp_path, "generate", ldm, progress=False)
    with pytest.raises(SceneprobeError, match="started with other options"):
        run_capture(tiny_cfg(pool=2), tmp_path, "generate", ldm, progress=False)
    shard.unlink()  # what the error says to do: the rows of a lost shard are redone
    count = _count_batches(monkeypatch)
    run_capture(cfg, tmp_path, "generate", ldm, progress=False)
    assert count["n"] == 2
    CaptureStore(root).verify()


def test_store_steps_keeps_only_those_shards_with_the_same_values(ldm, tmp_path):
    full = CaptureStore(run_capture(tiny_cfg(), tmp_path / "a", "generate", ldm, progress=False,
                                    sites=["unet.mid.attn0"], readout=False))
    part = CaptureStore(run_capture(tiny_cfg(), tmp_path / "b", "generate", ldm, progress=False,
                                    sites=["unet.mid.attn0"], readout=False, store_steps=[1]))
    assert part.site_steps("unet.mid.attn0") == [1] and not shard_path(part.root, "unet.mid.attn0", 0).exists()
    part.verify()
    assert torch.equal(part.read("unet.mid.attn0", 1), full.read("unet.mid.attn0", 1))
    with pytest.raises(SceneprobeError, match="store_steps"):
        run_capture(tiny_cfg(), tmp_path / "c", "generate", ldm, progress=False, store_steps=[5])
    # stopping after the last kept step records the same rows and writes no final images
    early = CaptureStore(run_capture(tiny_cfg(), tmp_path / "d", "generate", ldm, progress=False,
                                     sites=["unet.mid.attn0"], readout=False, store_steps=[0], stop_early=True))
    assert early.manifest["stop_after"] == 0 and not (early.root.parent / "samples.safetensors").exists()
    assert torch.equal(early.read("unet.mid.attn0", 0), full.read("unet.mid.attn0", 0))


# ------------------------------------------------------------------------------------ fixed costs (issue 23)
def _traced(models: dict, sites: list, kind: str, latent_hw, image_hw, cond_dim: int | None = None) -> dict:
    def run_once():
        z = torch.zeros(1, 4, *latent_hw)
        if cond_dim is None:
            models["unet"](z, 10)
        else:
            models["unet"](z, 10, encoder_hidden_states=torch.zeros(1, 77, cond_dim))
        models["vae"].decode(z)
        models["vae"].encode(torch.zeros(1, 3, *image_hw))
    return traced_shapes(models, sites, kind, run_once)


@pytest.mark.parametrize("kind", ["attn", "block"])
def test_derived_site_shapes_equal_the_traced_ones(ldm, tmp_path, kind):
    from test_capture_sd import build_tiny_sd
    from sceneprobe.capture.sd import load_sd
    from sceneprobe.models.io import load_ldm, shipped_root
    from sceneprobe.models.sites import list_sites
    shipped = load_ldm(shipped_root("cpu"))
    for m in (ldm, shipped):                                     # the tiny preset and the shipped model
        models = {"unet": m.unet, "vae": m.vae}
        sites = list_sites(m.unet, "unet") + list_sites(m.vae, "vae")
        s, size = m.unet.config.sample_size, m.vae.config.sample_size
        got = derived_shapes(models, sites, (s, s), (size, size))
        assert got == _traced(models, sites, kind, (s, s), (size, size)) and len(got) == len(sites)
    pipe = load_sd(build_tiny_sd(tmp_path / "tiny-sd"))          # SD: square and non-square latents
    models = {"unet": pipe.unet, "vae": pipe.vae}
    sites = list_sites(pipe.unet, "unet") + list_sites(pipe.vae, "vae")
    for hw in ((8, 8), (4, 12)):
        image = (hw[0] * 2, hw[1] * 2)
        got = derived_shapes(models, sites, hw, image)
        assert got == _traced(models, sites, kind, hw, image, cond_dim=16)
    # an odd grid (Downsample2D rounds up) is not derived: the caller traces it
    assert derived_shapes(models, sites, (5, 8), (10, 16)) is None
    assert derived_shapes(models, ["unet:down_blocks.0.attentions.0"], (8, 8)) is None   # raw paths too


def test_capture_runs_no_shape_pass(ldm, tmp_path):
    """Every U-Net call of a capture is a sampling step of a batch (the shapes come from the modules)."""
    calls: list[int] = []
    h = ldm.unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        run_capture(tiny_cfg(), tmp_path, "generate", ldm, progress=False)
    finally:
        h.remove()
    assert calls == [4, 4, 2, 2]                                 # 6 images in batches of 4 + 2, 2 steps each


@pytest.mark.parametrize("kind", ["attn", "block"])
def test_decoder_stopped_after_its_mid_block_records_the_same_as_a_whole_decode(ldm, kind):
    torch.manual_seed(3)
    z = torch.randn(3, 4, 8, 8)
    up: list[int] = []
    h = ldm.vae.decoder.up_blocks[0].register_forward_pre_hook(lambda mod, args: up.append(1))
    try:
        with torch.no_grad(), Recorder({"vae": ldm.vae}, ["vae.dec.mid.attn0"], kind) as whole:
            decode(ldm.vae, z)
        assert up == [1]
        with torch.no_grad(), Recorder({"vae": ldm.vae}, ["vae.dec.mid.attn0"], kind) as mid:
            assert decode_to_mid(ldm.vae, z) is None
    finally:
        h.remove()
    assert up == [1]                                             # the up blocks did not run the second time
    assert torch.equal(mid.outputs["vae.dec.mid.attn0"][0], whole.outputs["vae.dec.mid.attn0"][0])
    assert hook_count(ldm.vae) == 0                              # its stop hook is gone, also after the stop


def test_sd_capture_stops_the_decoder_but_keeps_the_final_image(tmp_path):
    """The SD store's VAE rows and images equal a pass with a whole decode at every step."""
    from test_capture_sd import build_tiny_sd
    from sceneprobe.capture import sd as sdmod
    folder = build_tiny_sd(tmp_path / "tiny-sd")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,seed\na red cube,11\nblue ball,12\n")
    a = sdmod.run_capture_sd(folder, csv, tmp_path / "a" / "captures" / "sd" / "ldm", steps=3, batch_size=2,
                             progress=False)
    whole = sdmod.decode_to_mid
    sdmod.decode_to_mid = lambda vae, z, fn: fn(vae, z)          # as before: a whole decode at every step
    try:
        b = sdmod.run_capture_sd(folder, csv, tmp_path / "b" / "captures" / "sd" / "ldm", steps=3, batch_size=2,
                                 progress=False)
    finally:
        sdmod.decode_to_mid = whole
    _stores_equal(a, b)
    assert (a.parent / "samples.safetensors").read_bytes() == (b.parent / "samples.safetensors").read_bytes()


def test_model_hash_is_cached_in_the_run_and_follows_the_weights(ldm, tmp_path, monkeypatch):
    from sceneprobe.models import io as mio
    folder = mio.save_model(ldm.unet, tmp_path / "model" / "unet")
    before = sorted(p.name for p in folder.iterdir())
    cache = tmp_path / "run" / "captures" / mio.HASH_CACHE
    first = mio.load_unet(folder)
    h = mio.model_hash(first, cache)
    assert h == mio.model_hash(ldm.unet) == mio._digest(first) and h in cache.read_text()
    assert sorted(p.name for p in folder.iterdir()) == before    # nothing is written into the model folder
    with monkeypatch.context() as mp:                            # a new process, the same folder: read, not hashed
        mp.setattr(mio, "_digest", lambda model: pytest.fail("hashed again"))
        assert mio.model_hash(mio.load_unet(folder), cache) == h
        assert mio.model_hash(first) == h                        # and kept on the module
    changed = mio.load_unet(folder)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)                     # changed in memory: hashed again
    assert mio.model_hash(changed, cache) == mio._digest(changed) != h
    assert mio.model_hash(first, cache) == h
    changed.save_pretrained(folder)                              # the weight file changed: hashed again
    again = mio.load_unet(folder)
    assert mio.model_hash(again, cache) == mio._digest(again) != h
    cache.write_text("{not json")                                # a damaged cache is only a miss
    assert mio.model_hash(mio.load_unet(folder), cache) == mio._digest(again)
    perm = permuted_copy(first, 0)                               # a copy is never taken for its original
    assert mio.model_hash(perm, cache) == mio._digest(perm) != h
