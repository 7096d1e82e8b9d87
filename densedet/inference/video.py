"""``densedet predict CONFIG CKPT SOURCE`` for videos, webcams and network streams: decode with PyAV, detect with a
:class:`~densedet.inference.predictor.Predictor`, write an annotated video and the per-frame detections.

SOURCE is a video file (by its suffix, :data:`VIDEO_SUFFIXES`), a webcam index (``0``: ``/dev/video0`` through
v4l2 on Linux, AVFoundation device 0 on macOS) or a stream URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ...).
Every ``every``-th frame is detected; the output video holds those frames, drawn, at ``fps / every`` (so it lasts as
long as the input), and ``<name>.jsonl`` one line per detected frame: ``{"frame": index in the input, "time":
seconds, "detections": [...]}`` with the detections of ``predictions.json``. A live source runs until it ends,
``max_frames`` frames were read or Ctrl-C, and the video written so far is finalised in every case.

Decoding and encoding go through PyAV (FFmpeg), an optional extra: ``pip install 'densedet[video]'``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from densedet.errors import ConfigError, DataError
from densedet.inference.draw_predictions import detection_records
from densedet.inference.predictor import Predictor
from densedet.inference.visualize import draw_detections
from densedet.io import atomic_write

__all__ = ["STREAM_SCHEMES", "VIDEO_SUFFIXES", "VideoSource", "is_video_source", "open_source", "predict_video",
           "require_av", "video_source"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
_DEFAULT_FPS = Fraction(30)  # a source that states no frame rate (some webcams and streams)


def is_video_source(source: str) -> bool:
    """Whether ``densedet predict`` should treat ``source`` as a video: a stream URL, a webcam index (an integer
    that is not an existing file) or a file with a video suffix."""
    if re.match(rf"^({'|'.join(STREAM_SCHEMES)})://", source, re.IGNORECASE):
        return True
    if source.isdigit() and not Path(source).exists():
        return True
    return Path(source).suffix.lower() in VIDEO_SUFFIXES


class VideoSource:
    """What to hand to ``av.open``: ``file`` (a path, a device or a URL), ``format`` (``v4l2`` / ``avfoundation``
    for a webcam, else guessed by FFmpeg), ``options`` (FFmpeg input options), ``name`` of the outputs and ``live``
    (a webcam or stream: frames are detected one at a time, as they come)."""

    def __init__(self, file: str, name: str, live: bool, format: str | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.file, self.name, self.live, self.format, self.options = file, name, live, format, dict(options or {})

    def __repr__(self) -> str:
        return f"VideoSource({self.file!r}, format={self.format!r}, options={self.options})"


def video_source(source: str, platform: str = sys.platform) -> VideoSource:
    """Map a ``densedet predict`` SOURCE to what PyAV opens (see :class:`VideoSource`).

    Raises:
        ConfigError: a webcam index on a platform without a device path for it (Windows: DirectShow names devices,
            pass ``video=NAME`` through FFmpeg instead).
    """
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in STREAM_SCHEMES:
        # RTSP over TCP: no lost packets (smeared frames) on lossy networks; 10 s to connect or to get data
        options = {"rtsp_transport": "tcp"} if scheme.startswith("rtsp") else {}
        options["timeout"] = "10000000"  # microseconds
        host = re.sub(r"[^\w.-]+", "_", source.split("://", 1)[1].split("/", 1)[0].split("@")[-1]) or "stream"
        return VideoSource(source, f"stream_{host}", True, None, options)
    if source.isdigit() and not Path(source).exists():
        if platform.startswith("linux"):
            return VideoSource(f"/dev/video{int(source)}", f"webcam{int(source)}", True, "v4l2")
        if platform == "darwin":
            return VideoSource(source, f"webcam{int(source)}", True, "avfoundation")
        raise ConfigError(f"webcam index {source}: opening a webcam by its index needs v4l2 (Linux) or AVFoundation "
                          f"(macOS); on {platform} record or stream it and pass the file or URL", "input")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such video file")
    return VideoSource(str(path), path.stem, False)


def require_av() -> Any:
    """The ``av`` module (PyAV), or a :class:`~densedet.errors.ConfigError` with the install command."""
    try:
        import av  # optional extra (PyAV: FFmpeg bindings)
    except ImportError as e:
        raise ConfigError(f"predicting on a video needs PyAV, which is not installed ({e}); install it with: "
                          f"pip install 'densedet[video]'", "input") from e
    return av


def open_source(source: VideoSource) -> Any:
    """``av.open`` of the source (a :class:`~densedet.errors.DataError` naming it when FFmpeg cannot open it or it
    has no video stream)."""
    av = require_av()
    try:
        container = av.open(source.file, format=source.format, options=source.options or None, timeout=10.0)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{source.file}: cannot open this video source: {e}") from e
    if not container.streams.video:
        container.close()
        raise DataError(f"{source.file}: no video stream in this file")
    return container


def _encoder(av: Any, codec_names: tuple[str, ...]) -> str:
    for name in codec_names:
        if name in av.codecs_available:
            return name
    raise ConfigError(f"this FFmpeg (PyAV {av.__version__}) has none of the encoders {', '.join(codec_names)}",
                      "codec")


def _even(arr: np.ndarray) -> np.ndarray:
    """Pad a frame by one black row / column where its height / width is odd (4:2:0 video needs even sizes)."""
    h, w = arr.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return arr
    return np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)))


def predict_video(predictor: Predictor, source: str | VideoSource, out: str | Path, *, every: int = 1,
                  score_thr: float = 0.3, max_frames: int = 0, batch_size: int | None = None,
                  progress: bool = True, codecs: tuple[str, ...] = ("libx264", "mpeg4")) -> dict[str, Any]:
    """Detect on every ``every``-th frame of ``source`` and write ``out/<name>.mp4`` (those frames, drawn, at
    ``fps / every``; H.264 when FFmpeg has it, else MPEG-4 part 2) and ``out/<name>.jsonl`` (module docstring).

    Args:
        source: a video file, webcam index or stream URL (:func:`video_source`), or a :class:`VideoSource`.
        every: detect on frames ``0, every, 2 * every, ...`` (the others are decoded and dropped).
        score_thr: detections above it are drawn and listed.
        max_frames: stop after reading this many frames (0: until the source ends or Ctrl-C).
        batch_size: frames per forward pass (default 4 for a file, 1 for a live source).
        progress: a tqdm bar on stderr with the detection speed.

    Returns:
        ``{"video": path, "jsonl": path, "frames_read", "frames_detected", "seconds", "fps" (detected frames per
        second of wall time, decoding and encoding included), "interrupted": whether Ctrl-C stopped it}``.
    """
    if every < 1:
        raise ConfigError(f"--every must be >= 1, got {every}", "every")
    av = require_av()
    src = source if isinstance(source, VideoSource) else video_source(str(source))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video_path, jsonl_path = out / f"{src.name}.mp4", out / f"{src.name}.jsonl"
    batch_size = batch_size or (1 if src.live else 4)
    container = open_source(src)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
    rate = stream.average_rate or stream.guessed_rate or _DEFAULT_FPS
    total = int(stream.frames or 0) or None
    if total and max_frames:
        total = min(total, max_frames)
    state = {"read": 0, "detected": 0, "interrupted": False}
    t0 = time.perf_counter()

    def write_video(tmp: Path) -> None:
        sink = av.open(str(tmp), mode="w", format="mp4")
        encoder: Any = None
        bar = tqdm(total=total, unit="frame", desc=src.name, disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        pending: list[tuple[int, float, np.ndarray]] = []

        def flush(lines: Any) -> None:
            nonlocal encoder
            if not pending:
                return
            dets = predictor([arr for _, _, arr in pending], batch_size=batch_size)
            for (index, seconds, arr), det in zip(pending, dets):
                drawn = _even(np.asarray(draw_detections(arr, det["boxes"], det["scores"], det["labels"],
                                                         predictor.classes, score_thr=score_thr,
                                                         masks=det.get("masks"))))
                if encoder is None:  # the first frame fixes the output size
                    encoder = sink.add_stream(_encoder(av, codecs), rate=Fraction(rate) / every)
                    encoder.width, encoder.height = drawn.shape[1], drawn.shape[0]
                    encoder.pix_fmt = "yuv420p"
                    if encoder.codec_context.name == "libx264":  # labels are fine detail: near-lossless quality
                        encoder.options = {"crf": "18"}
                for packet in encoder.encode(av.VideoFrame.from_ndarray(drawn, format="rgb24")):
                    sink.mux(packet)
                lines.write(json.dumps({"frame": index, "time": round(seconds, 4),
                                        "detections": detection_records(det, predictor.classes, score_thr)}) + "\n")
            lines.flush()  # a live source's detections can be followed as they come (tail -f)
            state["detected"] += len(pending)
            pending.clear()
            elapsed = time.perf_counter() - t0
            bar.set_postfix(fps=f"{state['detected'] / elapsed:.1f}" if elapsed > 0 else "?", refresh=False)

        try:
            with open(jsonl_path, "w") as lines:
                try:
                    for frame in container.decode(stream):
                        index = state["read"]
                        if max_frames and index >= max_frames:
                            break
                        state["read"] += 1
                        bar.update(1)
                        if index % every:
                            continue
                        seconds = float(frame.time) if frame.time is not None else index / float(rate)
                        pending.append((index, seconds, frame.to_ndarray(format="rgb24")))
                        if len(pending) >= batch_size:
                            flush(lines)
                    flush(lines)
                except KeyboardInterrupt:  # a live source: keep what was written, finalise the video
                    state["interrupted"] = True
                    pending.clear()
                except av.error.FFmpegError as e:
                    raise DataError(f"{src.file}: cannot decode frame {state['read']}: {e}") from e
            if encoder is not None:
                for packet in encoder.encode(None):  # drain the encoder's delayed frames
                    sink.mux(packet)
        finally:
            bar.close()
            sink.close()
            container.close()
        if state["detected"] == 0:
            raise DataError(f"{src.file}: no frame was decoded")

    atomic_write(video_path, write_video)
    seconds = time.perf_counter() - t0
    return {"video": video_path, "jsonl": jsonl_path, "frames_read": state["read"],
            "frames_detected": state["detected"], "seconds": seconds,
            "fps": state["detected"] / seconds if seconds > 0 else float("nan"), "interrupted": state["interrupted"]}
