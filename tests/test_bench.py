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


def test_bench_of_a_two_stage_config_points_to_its_benchmark(capsys):
    assert main(["bench", "mask_rcnn_r18_fpn_synth", "--size", "64x64"]) == 2
    assert "benchmarks/bench_maskrcnn.py" in capsys.readouterr().err
