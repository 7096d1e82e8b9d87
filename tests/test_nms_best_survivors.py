"""NMS over a score prefix (postprocess.nms_best_survivors) against torchvision's batched_nms over all candidates:
each image's best survivors are the same; and multiclass_nms_batched gives the same detections either way."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

import densedet.models.heads.postprocess as postprocess
from densedet.models.heads.postprocess import multiclass_nms_batched, nms_best_survivors, parse_test_cfg


def _candidates(n_per_image: list[int], classes: int, seed: int, quantize: float = 0.0):
    """Clustered boxes (many overlaps) with random classes; ``quantize`` > 0 rounds scores to make ties."""
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_image)
    centres = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([centres, centres + 20 + torch.rand(n, 2, generator=g) * 30], 1)
    scores = torch.rand(n, generator=g)
    if quantize:
        scores = (scores / quantize).round() * quantize
    image = torch.repeat_interleave(torch.arange(len(n_per_image)), torch.tensor(n_per_image))
    labels = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, labels, image


def _best_per_image(keep: torch.Tensor, image: torch.Tensor, b: int, limit: int) -> list[torch.Tensor]:
    return [keep[image[keep] == i][:limit] for i in range(b)]


@pytest.mark.parametrize("limit", [1, 7, 100])
def test_same_best_survivors_as_full_nms(limit: int) -> None:
    n_per_image = [3000, 0, 40, 900]  # an image without candidates, one with fewer survivors than the limit
    boxes, scores, labels, image = _candidates(n_per_image, classes=5, seed=limit)
    groups = image * 5 + labels
    full = batched_nms(boxes, scores, groups, 0.5)
    fast = nms_best_survivors(boxes, scores, groups, image, 4, 0.5, limit)
    assert (scores[fast][:-1] >= scores[fast][1:]).all()
    for a, b in zip(_best_per_image(fast, image, 4, limit), _best_per_image(full, image, 4, limit)):
        assert a.tolist() == b.tolist()
    assert len(_best_per_image(fast, image, 4, limit)[2]) == min(limit, int((image[full] == 2).sum()))


def test_ties_keep_the_same_scores_and_only_full_run_survivors() -> None:
    boxes, scores, labels, image = _candidates([2000, 1500], classes=3, seed=9, quantize=0.01)
    groups = image * 3 + labels
    full = batched_nms(boxes, scores, groups, 0.6)
    fast = nms_best_survivors(boxes, scores, groups, image, 2, 0.6, 50)
    assert set(fast.tolist()) <= set(full.tolist())
    for a, b in zip(_best_per_image(fast, image, 2, 50), _best_per_image(full, image, 2, 50)):
        assert sorted(scores[a].tolist()) == sorted(scores[b].tolist())


def test_multiclass_nms_batched_same_detections_with_and_without_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    b, k = 2, 4000
    boxes = torch.rand(b, k, 2, generator=g) * 300
    boxes = torch.cat([boxes, boxes + 10 + torch.rand(b, k, 2, generator=g) * 60], -1)
    scores = torch.rand(b, k, generator=g)
    labels = torch.randint(0, 80, (b, k), generator=g)
    valid = scores > 0.05
    cfg = parse_test_cfg({"score_thr": 0.05, "nms": {"type": "nms", "iou_threshold": 0.5}, "max_per_img": 100})
    fast = multiclass_nms_batched(boxes, scores, labels, valid, 80, cfg, best_only=True)
    calls = []
    monkeypatch.setattr(postprocess, "nms_best_survivors", lambda *a: calls.append(1) or batched_nms(*a[:3], a[5]))
    full = multiclass_nms_batched(boxes, scores, labels, valid, 80, cfg, best_only=True)
    assert calls  # the prefix path was the one replaced
    calls.clear()
    default = multiclass_nms_batched(boxes, scores, labels, valid, 80, cfg)  # RPN / single-stage: the full NMS
    assert not calls and all(torch.equal(d["boxes"], r["boxes"]) for d, r in zip(default, full))
    for a, r in zip(fast, full):
        assert len(a["boxes"]) == 100
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], r[key])


def test_prefix_path_is_skipped_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its loop depends on the data, so tracing / export record the plain batched NMS."""
    g = torch.Generator().manual_seed(4)
    boxes = torch.rand(1, 1000, 2, generator=g) * 300
    boxes = torch.cat([boxes, boxes + 20], -1)
    scores = torch.rand(1, 1000, generator=g)
    labels = torch.randint(0, 3, (1, 1000), generator=g)
    cfg = parse_test_cfg({"score_thr": 0.0, "nms": {"type": "nms", "iou_threshold": 0.5}, "max_per_img": 10})
    calls = []
    real = postprocess.nms_best_survivors
    monkeypatch.setattr(postprocess, "nms_best_survivors", lambda *a: calls.append(1) or real(*a))

    def run(b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return multiclass_nms_batched(b, s, labels, s > 0, 3, cfg, best_only=True)[0]["boxes"]

    eager = run(boxes, scores)
    assert calls
    calls.clear()
    traced = torch.jit.trace(run, (boxes, scores), check_trace=False)
    assert not calls
    assert torch.equal(traced(boxes, scores), eager)
