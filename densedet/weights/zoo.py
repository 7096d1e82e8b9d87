"""Look up, fetch and convert released weights by name (``densedet zoo``, ``load_from: zoo``, ``predict NAME zoo``).

``fetch_zoo_weights(NAME)`` downloads the row's file once into ``$DENSEDET_HOME/checkpoints`` (see
:mod:`densedet.weights.download`) and converts it once into ``$DENSEDET_HOME/checkpoints/densedet/NAME.pth`` with
:func:`densedet.weights.mmdet.convert_mmdet_checkpoint` (unwraps ``state_dict`` / ``model`` / ``module.``, keeps
the class names, reads the file with safe loading only). Every seed release uses MMDetection 2.x parameter names,
which are DenseDet's, so the conversion needs no renaming; the caller loads the result with ``strict=True``.

A read-only cache that already holds the downloaded file still works: the conversion then goes to a per-user
folder in the system's temp dir (``<tmp>/densedet-<user>/checkpoints/NAME.pth``, reused while it is newer than the
download), and a log line says where and how to make it permanent.
"""

from __future__ import annotations

import difflib
import getpass
import logging
import os
import tempfile
from pathlib import Path

from densedet.errors import PathError
from densedet.io import ensure_writable_dir
from densedet.weights.download import ZooError, cached_download, checkpoint_dir, home_hint
from densedet.weights.mmdet import convert_mmdet_checkpoint
from densedet.weights.zoo_table import MMDET, ZOO, ZooEntry

__all__ = ["fetch_zoo_weights", "format_zoo_table", "get_entry", "resolve_weights"]

logger = logging.getLogger("densedet")


def get_entry(name: str) -> ZooEntry:
    """The zoo row called ``name``, else the row with weights whose config is ``name``; a :class:`ZooError`
    with the closest names otherwise."""
    for e in ZOO:
        if e.name == name:
            return e
    for e in ZOO:
        if e.config == name and e.urls:
            return e
    close = difflib.get_close_matches(name, [e.name for e in ZOO], n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ZooError(f"no released weights called '{name}'.{hint} Run `densedet zoo` to list them.")


def fetch_zoo_weights(name: str, progress: bool = True) -> Path:
    """Path of the converted DenseDet checkpoint of zoo row (or config) ``name``, downloading it if needed."""
    entry = get_entry(name)
    if not entry.urls:
        raise ZooError(f"'{entry.name}' ({entry.source}, box AP {entry.box_ap}): no weights were published for this "
                       f"row ({entry.note or 'the source links none'}). Train it with `densedet train "
                       f"{entry.config or entry.name}` instead.")
    raw = cached_download(entry.urls, entry.filename, sha256=entry.sha256, hash_prefix=entry.hash_prefix,
                          page=entry.page, progress=progress)
    out = checkpoint_dir() / "densedet" / f"{entry.name}.pth"
    if _fresh(out, raw):
        return out
    try:
        ensure_writable_dir(out.parent, "the converted-weights cache")
    except PathError as e:  # a read-only cache holding the download: convert into a writable place
        out = _scratch_dir() / f"{entry.name}.pth"
        if not _fresh(out, raw):
            ensure_writable_dir(out.parent, "the temp folder for converted weights", home_hint())
            convert_mmdet_checkpoint(raw, out)
        logger.warning("%s; using the converted weights %s in the temp folder instead. %s", e, out, home_hint())
        return out
    convert_mmdet_checkpoint(raw, out)
    return out


def _fresh(converted: Path, raw: Path) -> bool:
    """``converted`` exists and is not older than the download it was converted from."""
    return converted.is_file() and converted.stat().st_mtime_ns >= raw.stat().st_mtime_ns


def _scratch_dir() -> Path:
    """``<system temp>/densedet-<user>/checkpoints``: where weights are converted when the cache is read-only.

    The user's folder is created private (0700); one that another user owns, or that others may write, is refused
    (the temp dir is shared: nobody else may plant the weights this process loads)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        user = "user"
    base = Path(tempfile.gettempdir()) / f"densedet-{user}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.stat()
    except OSError as e:
        raise PathError(f"the temp folder for converted weights {base} cannot be used: {e}. {home_hint()}") from e
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise PathError(f"the temp folder for converted weights {base} is owned by another user or writable by "
                        f"others: not used. {home_hint()}")
    return base / "checkpoints"


def resolve_weights(source: str, config_name: str | None = None) -> str:
    """``zoo`` -> the released weights of ``config_name``; ``zoo:NAME`` -> those of row ``NAME``; anything else is
    returned unchanged (a path)."""
    if source == "zoo":
        if not config_name:
            raise ZooError("'zoo' needs a config name to look the weights up by (or use zoo:NAME)")
        return str(fetch_zoo_weights(config_name))
    if source.startswith("zoo:"):
        return str(fetch_zoo_weights(source.removeprefix("zoo:")))
    return source


def _host(e: ZooEntry) -> str:
    if not e.urls:
        return "not published"
    return "download.openmmlab.com" if e.urls[0].startswith(MMDET) else "Google Drive"


def format_zoo_table(show_urls: bool = False) -> str:
    """Every row: name, config, published box AP (val / test-dev), mask AP, host, size, SHA-256 (or its prefix)."""
    def ap(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    header = ["name", "config", "box AP", "test-dev", "mask AP", "weights", "size", "sha256", "source"]
    rows = []
    for e in ZOO:
        sha = e.sha256 or (f"{e.hash_prefix}..." if e.hash_prefix else "-")
        config = "(same)" if e.config == e.name else (e.config or "-")
        rows.append([e.name, config, ap(e.box_ap), ap(e.box_ap_test_dev), ap(e.mask_ap), _host(e),
                     str(e.size) if e.size else "-", sha, e.source.split(" (")[0]])
        if show_urls:
            rows.append(["  " + (e.urls[0] if e.urls else (e.note or "-"))] + [""] * (len(header) - 1))
    widths = [max(len(r[i]) for r in [header] + rows if not (show_urls and r[0].startswith("  ") and i == 0))
              for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append(r[0] if r[0].startswith("  ") else "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(f"\n{len(ZOO)} rows, {sum(1 for e in ZOO if e.urls)} with weights. `densedet predict NAME zoo IMAGE` "
                 f"or load_from: zoo:NAME downloads into {checkpoint_dir()}.")
    return "\n".join(lines)
