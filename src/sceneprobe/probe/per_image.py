"""``report/per_image.safetensors``: every probe's and baseline's metrics per test image, for the report's paired
bootstrap, keyed ``protocol/model/site/step/task/metric``; written, read, and checked against the results table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_write_bytes, stable_safetensors
from ..errors import fail


def per_image_key(protocol: str, model: str, site: str = "", step: int = -1, task: str = "", metric: str = "") -> str:
    """Key of a per-test-image array in ``report/per_image.safetensors``: ``protocol/model/site/step/task/metric``
    (``protocol/test-rows``: the label rows of the test images, in the arrays' order)."""
    return "/".join([protocol, model] + ([site, str(step), task, metric] if site else []))


def write_per_image(out: Path, arrays: dict[str, np.ndarray], positions: dict[str, str] | None = None) -> Path:
    """Per-test-image metrics of every probe and baseline (float64), for the report's paired bootstrap; metadata
    ``positions``: ``protocol/site`` → the site name of its position-only baseline (the same native size)."""
    from safetensors.numpy import save as np_save
    data = np_save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())},
                   metadata={"key": "protocol/model/site/step/task/metric",
                             "positions": json.dumps(positions or {}, sort_keys=True)})
    atomic_write_bytes(out / "per_image.safetensors", stable_safetensors(data))
    return out / "per_image.safetensors"


def read_per_image(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise fail(f"per-image results {path} are missing; rerun `sceneprobe probe --run {path.parent.parent}`")
    try:
        return load_file(str(path))
    except Exception as e:                                  # safetensors' own error type (truncated, garbage header)
        raise _damaged_per_image(path, e) from None


def read_positions(path: Path) -> dict[str, str]:
    """``protocol/site`` → position-only baseline site (metadata of ``per_image.safetensors``)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return json.loads((f.metadata() or {}).get("positions", "{}"))
    except Exception as e:
        raise _damaged_per_image(path, e) from None


def _damaged_per_image(path: Path, e: Exception) -> Exception:
    if not (type(e).__name__ == "SafetensorError" or isinstance(e, (OSError, ValueError))):
        return e
    return fail(f"per-image results {path} are damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"rerun `sceneprobe probe --run {path.parent.parent}` to rewrite them")


def check_rows_have_arrays(rows: list[dict], arrays: dict[str, np.ndarray], path: Path,
                           skip: Callable[[dict], bool] = lambda r: False) -> None:
    """Every (protocol, model, site, step) of ``results.csv`` has its per-test-image arrays (``per_image.safetensors``,
    written by the same probe run): a site, model or step edited in, or files from two runs, are one error.
    ``skip``: rows that are not the sweep's (the report's own comparison rows)."""
    have = {tuple(k.split("/")[:4]) for k in arrays}
    for line, r in enumerate(rows, start=2):
        if not skip(r) and (r["protocol"], r["model"], r["site"], str(r["step"])) not in have:
            raise fail(f"results file {path}, line {line}: site {r['site']!r} (model {r['model']}, step {r['step']}) "
                       f"has no per-image results in {path.parent / 'per_image.safetensors'}: the two files are not "
                       f"from the same probe run; rerun `sceneprobe probe --run {path.parent.parent}` to rewrite them")
