"""Where probes run: workers never change a byte, the device code path equals the CPU fast path, and run-only keys
(device, workers) are not part of what a probe is."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sceneprobe.capture.store import CaptureStore, load_labels
from sceneprobe.cli import main
from sceneprobe.config import ProbeConfig, load_config
from sceneprobe.probe import cpu_fast_path, sweep
from sceneprobe.probe.streamed import StreamedProbes
from sceneprobe.probe.synthetic import synthetic_run

torch.set_num_threads(1)
SITES = {"unet.down0.attn0": 8, "unet.mid.attn0": 4}


@pytest.fixture(scope="module")
def store_run(tmp_path_factory):
    """A tiny synthetic run (2 models × 2 sites × 2 steps = 8 probes), not yet probed."""
    return synthetic_run(tmp_path_factory.mktemp("par") / "run", n=30, channels=6, size=16, steps=2, sites=SITES,
                         noise=0.5)


def _content(path) -> bytes:
    """A safetensors file's bytes (its metadata keys are written sorted: ``atomic.stable_safetensors``)."""
    return path.read_bytes()


def _probed(store_run, tmp_path, name: str, **cfg) -> tuple:
    run = tmp_path / name
    shutil.copytree(store_run, run)
    csv = sweep.run_probes(run, ProbeConfig(device="cpu", **cfg), progress=False)
    files = {p.relative_to(run).as_posix(): _content(p) for p in sorted((run / "probes").rglob("*.safetensors"))}
    return csv.read_bytes(), _content(run / "report" / "per_image.safetensors"), files, run


def test_one_or_two_workers_give_byte_identical_results(store_run, tmp_path):
    one = _probed(store_run, tmp_path, "one", workers=1)
    two = _probed(store_run, tmp_path, "two", workers=2)
    assert len(one[2]) == 8
    assert one[0] == two[0]                                     # results.csv
    assert one[1] == two[1]                                     # per-image metrics
    assert one[2] == two[2]                                     # every probe file, byte for byte
    assert (one[3] / "report" / "results.json").read_bytes() == (two[3] / "report" / "results.json").read_bytes()


def test_worker_processes_give_byte_identical_results(store_run, tmp_path, monkeypatch):
    """The CPU sweep's process pool (from PROCESS_MIN_JOBS probes on; 1 here) writes what one thread writes."""
    one = _probed(store_run, tmp_path, "one", workers=1)
    monkeypatch.setattr(sweep, "PROCESS_MIN_JOBS", 1)
    monkeypatch.setattr(sweep, "map_ordered", lambda *a, **k: pytest.fail("threads used"))
    procs = _probed(store_run, tmp_path, "procs", workers=2)
    assert one[0] == procs[0] and one[1] == procs[1] and one[2] == procs[2]


def test_the_device_code_path_equals_the_cpu_fast_path(store_run, tmp_path, monkeypatch):
    """With numpy's CPU fast path off, the solvers run the torch code a GPU runs (on the CPU here): the same probes
    to float tolerance (the products sum in another order), the same λ."""
    fast = _probed(store_run, tmp_path, "fast", workers=1)
    monkeypatch.setattr(cpu_fast_path, "NUMPY_ON_CPU", False)
    dev = _probed(store_run, tmp_path, "dev", workers=2)
    for name, blob in fast[2].items():
        a, b = load_file(str(fast[3] / name)), load_file(str(dev[3] / name))
        assert torch.equal(a["lambda"], b["lambda"]), name
        for k in ("depth.weight", "depth.bias", "saliency.weight", "saliency.bias"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    ra, rb = (sweep.read_results(r[3] / "report" / "results.csv") for r in (fast, dev))
    assert [r["metric"] for r in ra] == [r["metric"] for r in rb]
    for x, y in zip(ra, rb):
        assert y["value"] == pytest.approx(x["value"], rel=1e-4, abs=1e-5, nan_ok=True), x


def test_device_and_workers_do_not_refit(store_run, tmp_path, monkeypatch):
    first = _probed(store_run, tmp_path, "first", workers=2)
    monkeypatch.setattr(sweep, "probe_one", lambda *a, **k: pytest.fail("refit"))
    again = sweep.run_probes(first[3], ProbeConfig(device="auto", workers=1), progress=False)
    assert again.read_bytes() == first[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: probe.device cuda is valid here")
def test_cuda_without_a_gpu_is_a_one_line_error(store_run, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(store_run, run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"probe": {"device": "cuda"}}))
    assert main(["probe", "--run", str(run), "--config", str(cfg), "--no-progress", "--adopt"]) == 2   # no marker
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "probe.device is cuda" in err[0]


# ------------------------------------------------------------------------------------------------ streamed fit
def _streamed(run, model: str, workers: int, parts=None) -> StreamedProbes:
    """The streamed fit fed from a store's activations (what sampling would hand it), batches of 4 images.
    ``parts``: split the train images between that many accumulators (ranks) and merge them."""
    root = run / "captures" / "noised"
    store = CaptureStore(root / model)
    raw = load_labels(root)
    depth, sal, split = raw["depth"].astype(np.float32), (raw["saliency"] > 0).astype(np.uint8), raw["split"]
    cfg = load_config("cpu", None, {"probe": {"device": "cpu", "workers": workers}})
    shapes = {s: store.shape(s) for s in store.sites}

    def make():
        return StreamedProbes(shapes, len(store.steps), depth.shape[1:], cfg, torch.device("cpu"))

    def acts(sp, rows):
        return {(s, t): sp.prepare(store.read(s, t, rows).float()) for s in store.sites for t in store.site_steps(s)}
    tr, va, te = (np.flatnonzero(split == c) for c in (0, 1, 2))
    shares = [tr] if not parts else [tr[k::parts] for k in range(parts)]       # disjoint, interleaved
    sps = []
    for share in shares:
        sp = make()
        for k in range(0, len(share), 4):
            ids = share[k:k + 4]
            sp.train_batch(acts(sp, ids), list(ids), depth[ids], sal[ids])
        sps.append(sp)
    sp = sps[0]
    for other in sps[1:]:
        sp.merge(other)
    sp.fit(depth[tr], sal[tr])
    for k in range(0, len(va), 4):
        sp.val_batch(acts(sp, va[k:k + 4]))
    sp.choose(sp.standardise(depth[va]), sal[va])
    for k in range(0, len(te), 4):
        sp.test_batch(acts(sp, te[k:k + 4]))
    return sp


def _probe_bytes(sp: StreamedProbes, run) -> dict:
    labels = sweep.load_protocol_labels(run / "captures" / "noised")
    out = sp.results(labels, "noised", "ldm", [999, 500])
    return {k: ({n: t.numpy().tobytes() for n, t in tensors.items()}, rows) for k, (tensors, rows) in out.items()}


def test_streamed_fit_is_byte_identical_for_one_or_two_workers(store_run):
    assert _probe_bytes(_streamed(store_run, "ldm", 1), store_run) == \
        _probe_bytes(_streamed(store_run, "ldm", 2), store_run)


def test_two_ranks_summed_equal_one_accumulator(store_run):
    """Each rank accumulates its share of the train prompts; merged, the fit is the one-process fit: depth exact to
    float64 rounding (G summed in another order), saliency the same λ and weights to the path's own precision."""
    one, two = _streamed(store_run, "ldm", 1), _streamed(store_run, "ldm", 1, parts=2)
    for key, a in one.acc.items():
        b = two.acc[key]
        assert a.pick == b.pick, key
        torch.testing.assert_close(b.theta_d, a.theta_d, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.theta_s[a.pick[1]], a.theta_s[a.pick[1]], rtol=1e-7, atol=1e-9)
        assert b.tau == pytest.approx(a.tau, rel=1e-6, abs=1e-9)
