"""Every ```python block of README.md and docs/*.md runs, so the examples cannot rot (issue 13, item 2).

Each block is executed in a scratch folder laid out like a user's checkout after `make demo`: a small synthetic
set in ``data/synth``, an ``image.jpg``, and for every ``Predictor("CONFIG", "PATH")`` a block names, a
checkpoint of that config (initialised weights, the synthetic class names) at PATH, a work dir or a ``.pth`` file.
A block that cannot run here (COCO-sized data, downloads) is preceded by ``<!-- no-test: reason -->``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE_OPEN = re.compile(r"^\s*```\s*(python|py)\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```\s*$")
_NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(.*?)\s*-->\s*$")
_PREDICTOR = re.compile(r"""Predictor\(\s*["']([^"']+)["']\s*,\s*["']([^"']+)["']""")


class Snippet(NamedTuple):
    file: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the no-test reason, if the block is marked


def python_snippets(path: Path, text: str | None = None) -> list[Snippet]:
    """The ```python / ```py blocks of a markdown file, each with the reason of a ``<!-- no-test: ... -->``
    comment on the nearest non-blank line above it (``None`` when unmarked)."""
    lines = (path.read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        if _FENCE_OPEN.match(lines[i]):
            start = i
            j = i + 1
            while j < len(lines) and not _FENCE_CLOSE.match(lines[j]):
                j += 1
            if j == len(lines):
                raise ValueError(f"{path}:{start + 1}: python block is never closed")
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = _NO_TEST.match(lines[k]) if k >= 0 else None
            code = textwrap.dedent("\n".join(lines[start + 1:j]) + "\n")  # blocks inside list items are indented
            out.append(Snippet(path, start + 1, code, marker.group(1) if marker else None))
            i = j + 1
        else:
            i += 1
    return out


SNIPPETS = [s for doc in DOCS for s in python_snippets(doc)]


def test_extractor_finds_blocks_and_honours_no_test() -> None:
    md = ("text\n```bash\nls\n```\n<!-- no-test: needs COCO -->\n\n```python\nimport coco\n```\n"
          "```py\nx = 1\n```\n<!-- no-test: -->\nprose between\n```python\ny = 2\n```\n"
          "- a list item:\n\n  ```python\n  if True:\n      z = 3\n  ```\n")
    got = python_snippets(Path("x.md"), md)
    assert [(s.line, s.code, s.skip) for s in got] == [(7, "import coco\n", "needs COCO"), (10, "x = 1\n", None),
                                                       (15, "y = 2\n", None),
                                                       (20, "if True:\n    z = 3\n", None)]
    with pytest.raises(ValueError, match="x.md:1"):
        python_snippets(Path("x.md"), "```python\nnever closed\n")


def test_the_docs_have_snippets_and_every_no_test_says_why() -> None:
    files = {s.file.name for s in SNIPPETS}
    assert {"README.md", "getting_started.md"} <= files
    for s in SNIPPETS:
        assert s.skip is None or s.skip.strip(), f"{s.file.name}:{s.line}: <!-- no-test: --> needs a reason"


def _make_checkpoint(config: str, target: Path) -> None:
    from densedet.config import load_config
    from densedet.data import SYNTH_CLASSES
    from densedet.engine.checkpoint import mark_last_checkpoint, save_checkpoint
    from densedet.models.build import build_detector

    cfg = load_config(config, ["model.backbone.pretrained=null"])
    model = build_detector(cfg.model)
    meta = {"classes": list(SYNTH_CLASSES)} if model.num_classes == len(SYNTH_CLASSES) else {}
    if target.suffix == ".pth":
        save_checkpoint(target, model, meta=meta)
    else:
        save_checkpoint(target / "epoch_1.pth", model, meta=meta)
        mark_last_checkpoint(target, target / "epoch_1.pth")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densedet.data import make_synthetic_coco

    root = tmp_path_factory.mktemp("docs_sandbox")
    paths = make_synthetic_coco(root / "data" / "synth", num_train=4, num_val=2, size=128, seed=0)
    with Image.open(next(iter(sorted(paths["val_img_dir"].glob("*.png"))))) as im:
        im.convert("RGB").save(root / "image.jpg", quality=95)
    made: set[str] = set()
    for s in SNIPPETS:
        for config, target in _PREDICTOR.findall(s.code):
            if target not in made:
                _make_checkpoint(config, root / target)
                made.add(target)
    return root


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"{s.file.name}:{s.line}" for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if snippet.skip:
        pytest.skip(f"marked no-test: {snippet.skip}")
    monkeypatch.chdir(sandbox)
    where = f"{snippet.file.relative_to(REPO)}:{snippet.line}"
    exec(compile(snippet.code, where, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own docs
