"""Atomic file writes: the one way DenseDet writes a file that someone may read while it is written, or that a
crash must not leave half-written (checkpoints, results json, converted datasets, plots, exported models).

:func:`atomic_write` calls ``write(tmp)`` on a hidden temp file beside the target (``.NAME.PID.HEX8.tmp``, created by
the writer itself so it gets normal umask permissions), flushes it to disk, then ``os.replace``-s it onto the
target and syncs the folder: a reader sees the old file or the whole new one, never a part. The temp name carries
the writer's pid, so :func:`remove_stale_temp_files` can delete what a killed writer left behind without touching
a live writer's file.

A write that the file system refuses (permission denied, read-only, a full disk, a file where a folder should be)
raises :class:`~densedet.errors.PathError` naming the target and the reason, one line for the CLI (exit 2);
:func:`ensure_writable_dir` checks a folder that way *before* long work writes into it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from densedet.errors import DenseDetError, PathError, os_error_reason

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "ensure_writable_dir", "remove_stale_temp_files", "temp_name"]

_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def temp_name(path: Path) -> Path:
    """``.NAME.PID.HEX8.tmp`` next to ``path``: hidden, unique, and tells who wrote it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (after a rename), to disk; best effort: a system that cannot
    open or sync it (Windows cannot open folders) leaves it to the OS."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_writable_dir(folder: str | Path, what: str = "the output folder", hint: str = "") -> Path:
    """Create ``folder`` (and its parents) if needed and check that a file can be created in it, by creating and
    removing a hidden probe file; returns it. A :class:`~densedet.errors.PathError` names ``what``, the folder and
    the reason (read-only, permission denied, a file in the way ...), followed by ``hint``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".densedet-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PathError(f"{what} {folder} cannot be written: {os_error_reason(e)}" + (f". {hint}" if hint else "")
                        ) from e
    return folder


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # a read-only folder where the temp file never came to be
        pass


def _is_about(err: OSError, *paths: Path) -> bool:
    """The error names none of the files (a failed write() names none) or one of ``paths``."""
    names = {str(p) for p in paths}
    return all(f is None or str(f) in names for f in (err.filename, err.filename2))


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Call ``write(tmp_path)``, then move the temp file onto ``path`` (creating its folder); returns ``path``.

    ``fsync``: flush the file and the folder to disk (off only for scratch output where speed matters more than
    surviving a power cut). On any error the temp file is removed and ``path`` keeps its previous content; an
    ``OSError`` of the write itself (permission, read-only, full disk, not a folder) becomes a
    :class:`~densedet.errors.PathError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"cannot write {path}: its folder {path.parent} cannot be created: {os_error_reason(e)}"
                        ) from e
    tmp = temp_name(path)
    try:
        write(tmp)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if isinstance(e, DenseDetError) or not _is_about(e, tmp, path, path.parent):
            raise
        raise PathError(f"cannot write {path}: {os_error_reason(e)}") from e
    except BaseException:
        _discard(tmp)
        raise
    if fsync:
        _fsync(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj)`` into ``path`` atomically (``dump_kwargs`` as ``json.dump``'s, e.g. ``indent``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_kwargs)

    return atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path`` atomically: a crash at any point leaves the old file or the new one."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (PermissionError), or no signals on this platform
        return True
    return True


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files of :func:`atomic_write` (``.NAME.PID.HEX8.tmp``) whose writing process no longer runs
    (a live process may still be writing its own). Returns the removed paths."""
    removed: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
