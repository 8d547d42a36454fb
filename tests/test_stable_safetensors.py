"""Probe files and per-image metrics are byte-identical across processes: safetensors writes its metadata from a
Rust HashMap whose order changes per process; :func:`sceneprobe.atomic.stable_safetensors` sorts it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load

SAVE = """
import sys, numpy as np
from safetensors.numpy import save
from sceneprobe.atomic import stable_safetensors
meta = {k: str(i) for i, k in enumerate("abcdefgh")} | {"é": "ünïcode \\"quoted\\"\\n"}
data = save({"w": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(1, np.float32)}, metadata=meta)
sys.stdout.buffer.write(stable_safetensors(data) if sys.argv[1] == "stable" else data)
"""


def _save(mode: str) -> bytes:
    return subprocess.run([sys.executable, "-c", SAVE, mode], check=True, capture_output=True).stdout


def test_stable_bytes_across_processes_and_the_file_reads_back(tmp_path):
    # 9 metadata keys: two processes agree on the raw order with probability 1/9!, so without sorting this fails
    a, b = _save("stable"), _save("stable")
    assert a == b
    raw = _save("raw")
    assert len(raw) == len(a)                                                   # same header length, same offsets
    got, ref = load(a), load(raw)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in got)
    p = tmp_path / "x.safetensors"
    p.write_bytes(a)
    with safe_open(str(p), "np") as f:
        meta = f.metadata()
    assert meta["é"] == 'ünïcode "quoted"\n' and meta["h"] == "7"
