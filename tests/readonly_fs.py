"""A read-only folder for tests, also when the tests run as root (who writes through ``chmod a-w``).

:func:`make_read_only` removes the write bits of a folder and its sub-folders (a real ``EACCES`` for any other
user). As root it also makes every write primitive that Python and DenseDet use (``os.open`` with a write flag,
``open`` / ``io.open`` in a writing mode, ``os.mkdir``, ``os.replace`` / ``rename`` / ``unlink`` / ``remove`` /
``rmdir`` / ``link`` / ``symlink``) fail on a path inside it with ``EROFS``, as a read-only mount would: the code
under test meets the same ``OSError`` it would meet on a read-only file system. Reading stays possible.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_read_only(root: Path, monkeypatch: Any, request: Any) -> None:
    """Make the existing folder ``root`` read-only until the test ends (``monkeypatch`` undoes the patches,
    ``request``'s finalizer gives the folders their modes back)."""
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]
    modes = {p: p.stat().st_mode for p in folders}
    for p in folders:
        p.chmod(0o555)

    def restore() -> None:
        for p, mode in modes.items():
            p.chmod(mode)

    request.addfinalizer(restore)
    if os.geteuid() != 0:
        return
    real = os.path.realpath(root)

    def inside(p: Any) -> bool:
        if isinstance(p, int):
            return False
        try:
            rp = os.path.realpath(os.fsdecode(os.fspath(p)))
        except TypeError:
            return False
        return rp == real or rp.startswith(real + os.sep)

    def deny(p: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(p)))

    real_os_open, real_io_open = os.open, io.open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if flags & _WRITE_FLAGS and inside(path):
            deny(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int) and any(c in mode for c in "wax+") and inside(file):
            deny(file)
        return real_io_open(file, mode, *args, **kwargs)

    def one(fn: Any) -> Any:
        def wrapped(path: Any, *args: Any, **kwargs: Any) -> Any:
            if inside(path):
                deny(path)
            return fn(path, *args, **kwargs)
        return wrapped

    def two(fn: Any) -> Any:
        def wrapped(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            for p in (src, dst):
                if inside(p):
                    deny(p)
            return fn(src, dst, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    for name in ("mkdir", "rmdir", "unlink", "remove"):
        monkeypatch.setattr(os, name, one(getattr(os, name)))
    for name in ("replace", "rename", "link", "symlink"):
        monkeypatch.setattr(os, name, two(getattr(os, name)))
