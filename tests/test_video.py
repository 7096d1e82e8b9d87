"""`densedet predict CONFIG CKPT video.mp4` (issue 19, item 6): a short clip the test writes itself with PyAV
becomes an annotated video (the detected frames, drawn, at fps / every) and per-frame JSON lines whose detections
equal the Predictor's on the same decoded frames; sources are classified (file, webcam index, stream URL); an
unreachable stream is a data error and a missing PyAV a config error with the install command."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import main
from densedet.config import load_config
from densedet.data import SYNTH_CLASSES
from densedet.engine.checkpoint import save_checkpoint
from densedet.errors import ConfigError
from densedet.inference import Predictor
from densedet.inference.video import is_video_source, video_source
from densedet.inference.visualize import draw_detections
from densedet.models.build import build_detector

CFG = "atss_r18_fpn_synth"
TINY = [*TINY_ATSS, "model.test_cfg.score_thr=0.0", val_resize(64)]
FPS, FRAMES, SIZE = 5, 7, (64, 96)  # a 1.4 s clip of 96x64 frames


def _write_clip(path: Path) -> None:
    """A red square moving right over a grey background, H.264 (or MPEG-4) at 5 fps."""
    av = pytest.importorskip("av")
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=Fraction(FPS))
    stream.width, stream.height, stream.pix_fmt = SIZE[1], SIZE[0], "yuv420p"
    for i in range(FRAMES):
        frame = np.full((*SIZE, 3), 90, np.uint8)
        frame[12:44, 8 + 8 * i:40 + 8 * i] = (220, 40, 40)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()


def _decode(path: Path) -> tuple[list[np.ndarray], Fraction]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], stream.average_rate


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # BT.601


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("video")
    torch.manual_seed(0)
    ckpt = root / "model.pth"
    save_checkpoint(ckpt, build_detector(load_config(CFG, TINY).model), meta={"classes": list(SYNTH_CLASSES)})
    clip = root / "clip.mp4"
    _write_clip(clip)
    return ckpt, clip


def test_video_in_annotated_video_and_jsonl_out(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, clip = setup
    out = tmp_path / "out"
    assert main(["predict", CFG, str(ckpt), str(clip), "--out", str(out), "--every", "2", "--score-thr", "0.0",
                 *TINY]) == 0
    assert "detected 4 of 7 frames" in capsys.readouterr().out
    lines = [json.loads(s) for s in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 2, 4, 6]
    assert [r["time"] for r in lines] == pytest.approx([0.0, 0.4, 0.8, 1.2])

    # the detections are the Predictor's on the same decoded frames
    frames, rate = _decode(clip)
    assert len(frames) == FRAMES and rate == FPS
    predictor = Predictor(CFG, ckpt, device="cpu", overrides=TINY)
    expected = predictor([frames[i] for i in (0, 2, 4, 6)])
    for line, det in zip(lines, expected):
        got = line["detections"]
        assert len(got) == len(det["scores"]) > 0
        assert np.allclose([d["box_xyxy"] for d in got], det["boxes"].numpy(), atol=0.01)
        assert np.allclose([d["score"] for d in got], det["scores"].numpy(), atol=1e-4)
        assert [d["class"] for d in got] == det["class_names"]

    # the video: those 4 frames at 5/2 fps (the clip's duration), each the drawing of its detections
    drawn_frames, out_rate = _decode(out / "clip.mp4")
    assert len(drawn_frames) == 4 and out_rate == Fraction(FPS, 2)
    for k, (i, det) in enumerate(zip((0, 2, 4, 6), expected)):
        want = draw_detections(frames[i], det["boxes"], det["scores"], det["labels"], predictor.classes,
                               score_thr=0.0)
        assert drawn_frames[k].shape == (*SIZE, 3)
        # 4:2:0 video keeps luma at full resolution (colour at half): compare luma, lossy codec
        got = _luma(drawn_frames[k])
        err_drawn = np.abs(got - _luma(np.asarray(want))).mean()  # close to the drawing ...
        err_plain = np.abs(got - _luma(frames[i])).mean()  # ... and far from the undrawn frame
        assert err_drawn < 5 and err_plain > 5 * err_drawn, (k, err_drawn, err_plain)


def test_limit_stops_reading(setup, tmp_path: Path) -> None:
    ckpt, clip = setup
    assert main(["predict", CFG, str(ckpt), str(clip), "--out", str(tmp_path), "--every", "2", "--limit", "3",
                 *TINY]) == 0
    assert [json.loads(s)["frame"] for s in (tmp_path / "clip.jsonl").read_text().splitlines()] == [0, 2]
    assert len(_decode(tmp_path / "clip.mp4")[0]) == 2


def test_sources_are_classified(tmp_path: Path) -> None:
    assert is_video_source("clip.MP4") and is_video_source("a/b.mkv") and is_video_source("0")
    assert is_video_source("rtsp://user:pw@cam.local:554/stream1") and is_video_source("https://x/live.m3u8")
    assert not is_video_source("img.png") and not is_video_source(str(tmp_path))
    (tmp_path / "3").write_text("a file named 3 is a file, not webcam 3")
    assert not is_video_source(str(tmp_path / "3"))
    cam = video_source("0", platform="linux")
    assert (cam.file, cam.format, cam.name, cam.live) == ("/dev/video0", "v4l2", "webcam0", True)
    assert video_source("1", platform="darwin").format == "avfoundation"
    with pytest.raises(ConfigError, match="webcam index 0"):
        video_source("0", platform="win32")
    rtsp = video_source("rtsp://user:pw@cam.local:554/stream1")
    assert rtsp.options["rtsp_transport"] == "tcp" and rtsp.name == "stream_cam.local_554" and rtsp.live
    with pytest.raises(FileNotFoundError):
        video_source(str(tmp_path / "missing.mp4"))


def test_unreachable_stream_is_a_data_error(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = setup
    assert main(["predict", CFG, str(ckpt), "rtsp://127.0.0.1:9/stream?channel=1", "--out", str(tmp_path),
                 *TINY]) == 3
    err = capsys.readouterr().err
    assert "data error" in err and "rtsp://127.0.0.1:9/stream?channel=1" in err


def test_missing_pyav_is_a_config_error_with_the_install_command(setup, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    ckpt, clip = setup
    monkeypatch.setitem(sys.modules, "av", None)
    assert main(["predict", CFG, str(ckpt), str(clip), "--out", str(tmp_path), *TINY]) == 2
    assert "pip install 'densedet[video]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_every_needs_a_video(setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = setup
    assert main(["predict", CFG, str(ckpt), str(tmp_path), "--out", str(tmp_path / "o"), "--every", "2"]) == 2
    assert "--every applies to a video" in capsys.readouterr().err


def test_ctrl_c_keeps_a_playable_video(setup, tmp_path: Path) -> None:
    """A live source ends with Ctrl-C: the frames detected so far stay, in a finalised video and the JSON lines."""
    from densedet.inference.video import predict_video

    ckpt, clip = setup
    predictor = Predictor(CFG, ckpt, device="cpu", overrides=TINY)
    calls = []

    class Interrupted:
        classes = predictor.classes

        def __call__(self, images, batch_size=1):
            calls.append(len(images))
            if len(calls) == 4:
                raise KeyboardInterrupt
            return predictor(images, batch_size=batch_size)

    done = predict_video(Interrupted(), str(clip), tmp_path, batch_size=1, progress=False)
    assert done["interrupted"] and done["frames_detected"] == 3
    assert [json.loads(s)["frame"] for s in (tmp_path / "clip.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert len(_decode(tmp_path / "clip.mp4")[0]) == 3
