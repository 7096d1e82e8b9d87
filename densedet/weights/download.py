"""Downloads into the DenseDet cache with a progress bar, resume and checksum; clear messages when offline.

A download goes to ``<dest>.part`` first; an interrupted one is resumed with an HTTP ``Range`` request (a server
that ignores it sends the whole file, which then replaces the partial one). The finished file is checked against
the full SHA-256 when one is known, else against the leading hex digits MMDetection / torchvision put in their
file names (``-c2398f9e.pth``, the check ``torch.hub`` does), and only then renamed into place. A mismatch deletes
the bad file and says which URL gave it and where to put a good copy by hand; so does a network failure (the partial
file is kept for the next try).

A verified file is remembered in ``<file>.sha256``: its SHA-256, size and modification time. A file whose size or
mtime no longer match the stamp (replaced or modified since) is hashed again before it is used. A cache that cannot
be written (``$DENSEDET_HOME`` read-only) still serves the files it holds: the stamp is then not written and the
file is hashed each time; a file that must be downloaded into it is a :class:`~densedet.errors.PathError` saying
what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from densedet.errors import CheckpointError
from densedet.home import densedet_home
from densedet.io import atomic_write_text, ensure_writable_dir

__all__ = ["ZooError", "cached_download", "checkpoint_dir", "download", "file_sha256", "hash_prefix_of", "home_hint",
           "read_stamp", "write_stamp"]

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.[a-z]+$")
_CHUNK = 1 << 20
logger = logging.getLogger("densedet")


class ZooError(CheckpointError):
    """Released weights could not be fetched or verified; the message names the URL and the manual route."""


def checkpoint_dir() -> Path:
    """``$DENSEDET_HOME/checkpoints``."""
    return densedet_home() / "checkpoints"


def hash_prefix_of(url_or_name: str) -> str | None:
    """The SHA-256 prefix a file name carries (``name-<hex>.pth``), or None."""
    m = _HASH_IN_NAME.search(url_or_name.split("?")[0])
    return m.group(1) if m else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _manual(url: str, dest: Path, page: str | None) -> str:
    return (f"Download it by hand from {page or url} and put it at {dest} (or give the local path of the file "
            f"instead).")


def _verify(path: Path, url: str, dest: Path, sha256: str | None, prefix: str | None, page: str | None) -> None:
    if not (sha256 or prefix):
        return
    got = file_sha256(path)
    want = (sha256 or prefix or "").lower()
    if not got.startswith(want):
        path.unlink(missing_ok=True)
        kind = "SHA-256" if sha256 else "SHA-256 prefix (from the file name)"
        raise ZooError(f"{url}: checksum mismatch: expected {kind} {want}, got {got}; the file was deleted. "
                       + _manual(url, dest, page))


class _Progress:
    """tqdm bar on a terminal, else nothing (logs stay clean)."""

    def __init__(self, total: int | None, initial: int, name: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                            file=sys.stderr, disable=not sys.stderr.isatty())

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def download(url: str, dest: str | Path, sha256: str | None = None, hash_prefix: str | None = None,
             page: str | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``), verify, and return ``dest``.

    Raises :class:`ZooError` (offline, HTTP error, an HTML page instead of a file, checksum mismatch) with the URL
    and where to put the file by hand.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "densedet", **({"Range": f"bytes={have}-"} if have
                                                                             else {})})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete (or longer than the file)
            os.replace(part, dest)
            _verify(dest, url, dest, sha256, hash_prefix, page)
            return dest
        raise ZooError(f"could not download {url}: HTTP {e.code} {e.reason}. " + _manual(url, dest, page)) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ZooError(f"could not download {url} ({reason}); are you offline? " + _manual(url, dest, page)) from None
    with resp:
        if "text/html" in (resp.headers.get("Content-Type") or ""):
            raise ZooError(f"{url} answered with a web page instead of the file (Google Drive asks to confirm "
                           f"large files in a browser). " + _manual(url, dest, page))
        resumed = have > 0 and resp.status == 206
        length = resp.headers.get("Content-Length")
        total = int(length) + (have if resumed else 0) if length is not None else None
        bar = _Progress(total, have if resumed else 0, dest.name, progress)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            got = part.stat().st_size if part.exists() else 0
            raise ZooError(f"download of {url} interrupted ({e}); run again to resume from {got} bytes. "
                           + _manual(url, dest, page)) from None
        finally:
            bar.close()
    if total is not None and part.stat().st_size != total:
        raise ZooError(f"download of {url} ended at {part.stat().st_size} of {total} bytes; run again to resume. "
                       + _manual(url, dest, page))
    _verify(part, url, dest, sha256, hash_prefix, page)
    os.replace(part, dest)
    return dest


def home_hint() -> str:
    """What to do when ``$DENSEDET_HOME`` cannot be written."""
    env = os.environ.get("DENSEDET_HOME")
    where = f"DENSEDET_HOME={env}" if env else f"the default cache {densedet_home()} (DENSEDET_HOME is not set)"
    return (f"DenseDet keeps downloads and converted files under {where}: set DENSEDET_HOME to a writable folder, "
            f"e.g. `export DENSEDET_HOME=$HOME/densedet-cache`")


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def read_stamp(dest: Path) -> tuple[str, int | None, int | None]:
    """``(sha256, size, mtime_ns)`` from ``<dest>.sha256`` (``("", None, None)`` when absent or unreadable; a stamp
    written before sizes were recorded gives ``(sha, None, None)``)."""
    try:
        words = _stamp_path(dest).read_text().split()
    except OSError:
        return "", None, None
    if len(words) >= 3 and words[1].isdigit() and words[2].isdigit():
        return words[0], int(words[1]), int(words[2])
    return (words[0] if words else ""), None, None


def write_stamp(dest: Path, sha: str) -> None:
    """Remember that ``dest`` hashed to ``sha`` at its current size and mtime (skipped, with a log line, when the
    cache is read-only: the file is hashed again next time)."""
    st = dest.stat()
    try:
        atomic_write_text(_stamp_path(dest), f"{sha} {st.st_size} {st.st_mtime_ns}\n")
    except OSError as e:
        logger.info("%s: not remembered as verified (%s); it is hashed again next time", dest, e)


def _check_cached(dest: Path, want: str, sha256: str | None, page: str | None, url: str) -> None:
    """Verify a file already in the cache, unless its stamp says it was verified at its current size and mtime."""
    known, size, mtime = read_stamp(dest)
    st = dest.stat()
    unchanged = size == st.st_size and mtime == st.st_mtime_ns
    if unchanged and known and (not want or known.startswith(want)):
        return
    if not want and not known:
        return  # nothing to check against (no published hash, never downloaded by DenseDet): used as torch.hub does
    got = file_sha256(dest)
    if want and not got.startswith(want):
        raise ZooError(f"{dest}: checksum mismatch: expected {'SHA-256' if sha256 else 'SHA-256 prefix'} {want}, "
                       f"got {got}. Delete it, or replace it with the file from {page or url}.")
    if not want and got != known:
        raise ZooError(f"{dest}: changed since it was downloaded and verified (SHA-256 {known}, now {got}). Delete "
                       f"it to download it again, or delete {_stamp_path(dest).name} to use the new file.")
    write_stamp(dest, got)


def cached_download(urls: str | Sequence[str], filename: str | None = None, sha256: str | None = None,
                    hash_prefix: str | None = None, page: str | None = None,
                    legacy_dirs: Sequence[Path] = (), progress: bool = True) -> Path:
    """``$DENSEDET_HOME/checkpoints/<filename>``, downloaded from the first of ``urls`` that works when missing.

    A file already there (e.g. put there by hand) is verified once (remembered in ``<file>.sha256`` with its size
    and mtime, and verified again when either changed); one in ``legacy_dirs`` (torch.hub's cache) is used as it
    is, as torch.hub does. ``hash_prefix`` defaults to the one in the first URL's name.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("cached_download needs at least one URL")
    filename = filename or urls[0].split("?")[0].rsplit("/", 1)[-1]
    hash_prefix = hash_prefix or hash_prefix_of(filename)
    dest = checkpoint_dir() / filename
    for legacy in (Path(d) / filename for d in legacy_dirs):
        if legacy.is_file() and not dest.is_file():
            return legacy  # torch.hub's cache: used as torch.hub does (it checks hashes only when downloading)
    if dest.is_file():
        _check_cached(dest, (sha256 or hash_prefix or "").lower(), sha256, page, urls[0])
        return dest
    ensure_writable_dir(dest.parent, "the weights cache", f"{home_hint()}; or download {urls[0]} by hand and give "
                                                          f"its local path instead")
    errors = []
    for url in urls:
        try:
            out = download(url, dest, sha256=sha256, hash_prefix=hash_prefix, page=page, progress=progress)
        except ZooError as e:
            errors.append(str(e))
            continue
        write_stamp(out, file_sha256(out))
        return out
    if len(errors) == 1:
        raise ZooError(errors[0])
    raise ZooError("no download worked:\n  " + "\n  ".join(errors))
