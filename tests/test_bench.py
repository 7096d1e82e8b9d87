"""`densedet bench` on tiny configs: the table, its header and the torchvision peer row."""

import re

from densedet.cli import main


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("| variant") and len(cells) == 7:
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_prints_alternating_table_for_tiny_config(capsys):
    rc = main(["bench", "atss_r18_fpn_synth", "--size", "64x96", "--iters", "3", "--warmup", "1",
               "--precision", "fp32", "bf16", "--channels-last", "--against", "torchvision", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"CPU: .+; 1 threads; torch \d", out) and "load average" in out
    rows = _rows(out)
    assert list(rows) == ["densedet fp32 (default, channels_last)", "densedet fp32 + fused + channels_last",
                          "densedet bf16 + fused + channels_last"]
    for med, lo, hi, ips, _speedup, _mem in rows.values():
        assert float(lo) <= float(med) <= float(hi)
        assert abs(float(ips) - 1000.0 / float(med)) <= 0.02 * float(ips) + 0.01  # batch 1: images/s = 1/median
    assert rows["densedet fp32 (default, channels_last)"][4] == "1.00x"
    assert "torchvision has no ATSSHead detector" in out


def test_bench_train_mode_with_torchvision_peer(capsys):
    rc = main(["bench", "retinanet_r18_fpn_synth", "--size", "64x64", "--batch", "2", "--mode", "train",
               "--iters", "2", "--warmup", "1", "--against", "torchvision", "--threads", "1", "--no-baseline"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    assert list(rows) == ["densedet fp32", "torchvision retinanet fp32"]
    ips, med = float(rows["densedet fp32"][3]), float(rows["densedet fp32"][0])
    assert abs(ips - 2000.0 / med) <= 0.02 * ips + 0.01  # batch 2: images/s = 2/median (median printed rounded)


def test_bench_of_a_two_stage_config_takes_the_same_options(capsys):
    """Mask R-CNN through the same bench: fp32 and bf16 variants (BN folded), inference and training."""
    for mode in ("infer", "train"):
        rc = main(["bench", "mask_rcnn_r18_fpn_synth", "--size", "64x96", "--iters", "1", "--warmup", "1",
                   "--precision", "fp32", "bf16", "--mode", mode, "--threads", "1"])
        out = capsys.readouterr().out
        assert rc == 0, out
        fused = " + fused" if mode == "infer" else ""
        rows = _rows(out)
        assert list(rows) == ["densedet fp32 (default, channels_last)", f"densedet fp32{fused}",
                              f"densedet bf16{fused}"], out
        assert all(float(r[0]) > 0 for r in rows.values())


def test_bench_against_torchvision_mask_rcnn_shares_the_weights(capsys):
    """torchvision's Mask R-CNN as the peer of mask_rcnn_r50_fpn_1x_coco, holding the same weights."""
    rc = main(["bench", "mask_rcnn_r50_fpn_1x_coco", "--size", "64x64", "--iters", "1", "--warmup", "0",
               "--against", "torchvision", "--threads", "1", "--no-baseline"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert list(_rows(out)) == ["densedet fp32 + fused", "torchvision maskrcnn fp32"], out
    assert "holds DenseDet's weights" in out
