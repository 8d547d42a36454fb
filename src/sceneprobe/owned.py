"""Owned output folders: a marker proves a folder is sceneprobe's, a lock keeps a second writer out.

* **Marker** ``.sceneprobe.json`` (``{"made_by": "sceneprobe run", "version": …}``): written into every folder a
  command creates (or adopts while empty). It is the only proof of ownership: a non-empty folder without it holds the
  user's files, whatever it looks like (``captures/``, ``scenes.jsonl``, a diffusers VAE or a whole Stable Diffusion
  folder), and no command writes into it or replaces it, not even with ``--force``. A folder made by an older
  sceneprobe (before markers) is adopted only when the user says so: ``--adopt`` (:func:`set_adopted`), which the
  refusal names; the adopted folder then gets its marker (``"adopted": true``), removed again if the command fails.
* **Links**: a symbolic link given as a folder to write (``--out``, ``--run``, ``--vae``) is refused in one line;
  sceneprobe never replaces a link by a folder nor writes through one (pass the folder it points to).
* **Lock** (``fcntl.flock`` on ``.sceneprobe.lock`` inside the folder, or ``.<name>.lock`` beside a folder that is
  replaced whole), both on the folder's resolved real path, so two writers through different names of one folder
  collide: a second writer fails at once with one line naming the holder's pid. The OS releases the lock
  when its process dies (even by SIGKILL), so a killed run never blocks its own resume. The lock file is removed on
  release; an acquirer checks that the file it locked is still the one on disk (so removal is race-free).
* **Rollback**: a folder created by a command that then fails with a user error is removed again when it holds only
  scaffolding (marker, lock, ``config.yaml``, an empty ``.stages/``); a marker this command added to a folder it
  adopted is removed too.

Under ``accelerate launch`` only the main process (RANK 0) checks, claims and locks a folder; the other ranks wait for
it (a barrier) and then write into the folder the main process holds. (Checking on every rank raced: a rank could see
the folder the main process had just created, not yet marked, and call it foreign.)

Layering: this module builds on :mod:`sceneprobe.atomic` (temporary name, then rename), never the other way round.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from .atomic import atomic_write_json, temp_folder
from .errors import SceneprobeError, fail

MARKER = ".sceneprobe.json"
LOCK = ".sceneprobe.lock"
OURS = (MARKER, LOCK)
SCAFFOLDING = {MARKER, LOCK, "config.yaml", ".stages"}
ADOPT = "--adopt"

_held: dict[str, list] = {}  # realpath of a lock file → [fd, count]: re-entrant within one process
_adopted: set[str] = set()   # real paths the user adopted with --adopt (set by the CLI for one command)
command_name = ""            # "sceneprobe run": set by the CLI, written into the lock file for the next writer to read


def read_marker(folder: Path) -> dict | None:
    """The marker's content, or None when ``folder`` has no readable marker (a dict with ``made_by``)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("made_by"), str) else None


def write_marker(folder: Path, made_by: str, adopted: bool = False) -> None:
    from . import __version__
    atomic_write_json(Path(folder) / MARKER, {"made_by": made_by, "version": __version__,
                                              **({"adopted": True} if adopted else {})})


def set_adopted(paths: list[Path | str]) -> None:
    """The folders the user adopted for this command (``--adopt``): treated as sceneprobe's, and marked when written."""
    _adopted.clear()
    _adopted.update(os.path.realpath(p) for p in paths)


def is_adopted(folder: Path) -> bool:
    return os.path.realpath(folder) in _adopted


def user_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` other than sceneprobe's own marker and lock, sorted (folders with a trailing /)."""
    out = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.name in OURS or e.name.startswith(f"{LOCK}"):
            continue
        out.append(e.name + ("/" if e.is_dir() else ""))
    return out


def is_ours(folder: Path) -> bool:
    """Made by sceneprobe: the folder carries the marker a sceneprobe command wrote. Nothing else counts (no layout,
    no model class): a folder the user made can look exactly like one of ours."""
    return read_marker(Path(folder)) is not None


def _listing(entries: list[str]) -> str:
    more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
    return ", ".join(entries[:4]) + more


def check_not_link(path: Path, option: str) -> None:
    """A symbolic link is never replaced by a folder nor written through: refused (the safe choice)."""
    path = Path(path)
    if path.is_symlink():
        target = os.readlink(path)
        raise fail(f"{option} {path} is a symbolic link (to {target}); sceneprobe never replaces a link or writes "
                   f"through one: pass the folder itself or a new folder as {option}")


def check_target(path: Path, option: str) -> None:
    """``path`` may be created or written by a command: not a link, not a file, and (if it exists) writable."""
    path = Path(path)
    check_not_link(path, option)
    if path.exists() and not path.is_dir():
        raise fail(f"{option} {path} is a file, not a folder; pass a folder path as {option}")
    probe = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise fail(f"{option} {path}: {probe} is not writable; pass a folder you can write to as {option}")


def check_not_foreign(path: Path, option: str) -> None:
    """Refuse a non-empty folder without sceneprobe's marker (it holds the user's own files) unless adopted."""
    path = Path(path)
    if path.is_dir() and not is_ours(path) and not is_adopted(path):
        entries = user_entries(path)
        if entries:
            raise fail(f"{option} {path} already holds files sceneprobe did not make ({_listing(entries)}) and no "
                       f"{MARKER} marker; sceneprobe never writes into them: pass a new or empty folder as "
                       f"{option} (only if an older sceneprobe made it, before folders carried the marker, pass "
                       f"{ADOPT} to claim it)")


def check_out_folder(out: Path, force: bool = False, option: str = "--out") -> None:
    """Refuse to overwrite an existing output folder unless ``force``; never a link, a file or a folder of the user's
    own files (one without sceneprobe's marker), even with ``force``."""
    out = Path(out)
    check_target(out, option)
    check_not_foreign(out, option)                     # first: --force would not help, so it is not advised
    if out.exists() and not force:
        raise fail(f"output folder {out} already exists; choose another {option} or pass --force to replace it")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _barrier() -> None:
    """All processes of ``accelerate launch`` meet here (nothing when not launched)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from .processes import process_state
        process_state().wait_for_everyone()


# ------------------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def file_lock(lock_path: Path, what: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) or fail at once naming the holder's pid."""
    if _rank() != 0:
        yield                                                          # accelerate: rank 0 holds it for all
        return
    lock_path = Path(lock_path)
    key = os.path.realpath(lock_path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise fail(f"cannot create the lock file {lock_path} ({e.strerror}); pass a folder you can write to") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            if not holder:                                             # locked a moment ago: its pid is on its way
                import time
                time.sleep(0.1)
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "pid unknown"
            os.close(fd)
            raise fail(f"{what} is in use by another sceneprobe process ({holder}); wait for it to finish or stop "
                       f"it, then rerun") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                                                   # the holder removed it as we opened it: retry
    import sys
    cmd = command_name or " ".join(["sceneprobe", *sys.argv[1:2]])
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, {cmd}".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def sibling_lock(out: Path) -> contextlib.AbstractContextManager:
    """The lock of a folder that is replaced whole (``.<name>.lock`` beside its resolved real path)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(out))                                 # one lock per folder, whatever its name
    return file_lock(real.parent / f".{real.name}.lock", out)


def clean_stale_temps(out: Path) -> None:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings left by a killed writer (call with the lock held)."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*"):
        if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def clean_stale_inside(folder: Path) -> None:
    """Remove temporaries a killed writer left at the top of an owned folder (``.vae.tmp-*``, ``.unet.copy``,
    ``.x.old-*``, ``.checkpoint.pt.tmp-*``): with the folder's lock held, nobody else is writing them."""
    for p in Path(folder).glob(".*"):
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".copy") or p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ owned folders
@contextlib.contextmanager
def owned_folder(folder: Path, made_by: str, option: str = "--out", must_exist: bool = False) -> Iterator[Path]:
    """A folder that a command fills in place: claimed (created with a marker, or checked to be ours) and locked.

    ``must_exist``: the command reads the folder (``probe --run``), so a missing one is an error, not created.
    """
    folder = Path(folder)
    check_target(folder, option)
    if must_exist and not folder.is_dir():
        raise fail(f"{option} {folder} does not exist; pass a run folder (made by `sceneprobe run` or the training "
                   f"commands)")
    if _rank() != 0:                                                   # accelerate: rank 0 claims it for all
        _barrier()
        yield folder
        return
    check_not_foreign(folder, option)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"{option} {folder} cannot be created ({e.strerror}); pass a folder you can write to") from None
    locked = added_marker = False
    found = set(os.listdir(folder))
    try:
        with file_lock(Path(os.path.realpath(folder)) / LOCK, folder):
            locked = True
            added_marker = read_marker(folder) is None
            if added_marker:
                write_marker(folder, made_by, adopted=is_adopted(folder) and bool(user_entries(folder)))
            else:                                                      # (never in a folder claimed just now: an
                clean_stale_inside(folder)                             # adopted one's dot files are not our temps)
            _barrier()                                                 # the other ranks may write now
            yield folder
    except SceneprobeError:
        if locked:
            _rollback(folder, created, added_marker, found)
        raise


def _rollback(folder: Path, created: bool, added_marker: bool, found: set[str]) -> None:
    """After a user error: leave the folder as the command found it (``found``: its entries then) when nothing of
    value was written. A folder that now holds what this command wrote keeps its marker: it is sceneprobe's (a rerun
    resumes it; without the marker the rerun would be refused as the user's)."""
    try:
        entries = set(os.listdir(folder))
        stages = folder / ".stages"
        scaffold_only = entries <= SCAFFOLDING and not (stages.is_dir() and any(stages.iterdir()))
    except OSError:
        return
    if created and scaffold_only:
        shutil.rmtree(folder, ignore_errors=True)
    elif added_marker and entries - SCAFFOLDING <= found:              # claimed by this failed command, nothing
        (folder / MARKER).unlink(missing_ok=True)                      # of value added: undo the claim


@contextlib.contextmanager
def replaced_folder(out: Path, option: str = "--out", made_by: str | None = None) -> Iterator[Path]:
    """A folder that a command replaces whole (built in a temporary sibling, renamed at the end): locked beside it,
    never a link, a file or a folder of the user's own files; stale temporaries of a killed writer are removed first.
    ``made_by``: the marker written into ``out`` when the command has made it."""
    out = Path(out)
    check_target(out, option)
    check_not_foreign(out, option)
    with sibling_lock(out):
        clean_stale_temps(out)
        yield out
        if made_by is not None and out.is_dir() and not out.is_symlink() and read_marker(out) is None:
            write_marker(out, made_by)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool = False, made_by: str = "sceneprobe") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename (:func:`atomic.temp_folder`).

    On any exception the temporary folder is removed and ``out`` is left as it was. The folder is owned: ``out`` is
    checked (:func:`check_out_folder`), a second writer of the same ``out`` fails at once, temporaries left beside
    ``out`` by a killed writer are removed first, and the new folder carries the marker ``made_by``.
    """
    out = Path(out)
    check_out_folder(out, force)
    with sibling_lock(out):
        clean_stale_temps(out)
        with temp_folder(out) as tmp:
            yield tmp
            write_marker(tmp, made_by)
