"""Write files and folders so that nothing is ever half-written: temporary name, then rename.

The bottom layer: no ownership here (:mod:`sceneprobe.owned` builds on it: markers, locks, checks)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator



def stable_safetensors(data: bytes) -> bytes:
    """The bytes of a safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors serialises the metadata dict from a Rust HashMap, whose order changes with every process, so two
    saves of the same tensors and metadata differ in bytes. Re-serialising the header (compact JSON, as safetensors
    writes it) with the metadata sorted keeps its length — only the order changes — so the data offsets stay valid;
    the header is padded back with spaces to its old length, as the format allows."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > n:                                           # not expected; never produce an invalid file
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:]


@contextlib.contextmanager
def temp_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out`` (if any) in one rename.

    On any exception the temporary folder is removed and ``out`` is left as it was. No ownership checks and no lock:
    callers outside a folder they own use :func:`sceneprobe.owned.atomic_folder`, which checks, locks and marks.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; outputs are for people to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
