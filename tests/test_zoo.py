"""Released weights by name: download, resume, checksum, conversion and the offline message against a loopback
HTTP server (127.0.0.1 only, files the test creates), the zoo table, and fine-tuning to another class count."""

from __future__ import annotations

import hashlib
import io
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from readonly_fs import make_read_only

from densedet.cli import main
from densedet.config import list_configs, load_config
from densedet.engine.checkpoint import load_checkpoint, load_for_finetune, load_model_weights
from densedet.models.build import build_detector
from densedet.models.heads.dense_head import bias_init_with_prob
from densedet.weights import ZOO, ZooEntry, ZooError, download, fetch_zoo_weights, format_zoo_table
from densedet.weights import zoo as zoo_registry
from densedet.weights.download import read_stamp


class _Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; honours ``Range: bytes=N-`` when ``ranges`` is set."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, bytes sent)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng and outer.ranges else 0
                if start >= len(body) and rng and outer.ranges:
                    self.send_response(416)
                    self.end_headers()
                    return
                # recorded before the body goes out: the client may return as soon as it has read it
                outer.requests.append((self.path, rng, len(body) - start))
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "home"))


def _release_bytes(num_classes: int = 3) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A fake MMDetection release of atss_r18_fpn_synth: {'state_dict', 'meta': {'CLASSES'}} with random weights."""
    torch.manual_seed(0)
    model = build_detector(load_config("atss_r18_fpn_synth", [f"model.bbox_head.num_classes={num_classes}"]).model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "meta": {"CLASSES": ["circle", "square", "triangle"][:num_classes]}}, buf)
    return buf.getvalue(), sd


def _entry(server: _Server, body: bytes, name: str = "tiny_atss", prefix: str | None = None) -> ZooEntry:
    prefix = prefix or hashlib.sha256(body).hexdigest()[:8]
    path = f"/mmdet/{name}_20200101-{prefix}.pth"
    server.files[path] = body
    return ZooEntry(name, "atss_r18_fpn_synth", "test", 1.0, (server.url(path),))


def test_zoo_lists_every_seed_row_and_known_configs(capsys) -> None:
    by_source: dict[str, int] = {}
    for e in ZOO:
        by_source[e.source] = by_source.get(e.source, 0) + 1
    assert by_source["VarifocalNet README (hyz-xmaster/VarifocalNet)"] == 13
    assert by_source["VarifocalNet README, FL/VFL table"] == 8
    assert by_source["VarifocalNet README, VFNet-X table"] == 2
    assert by_source["GHM_Detection README (libuyu/GHM_Detection)"] == 3
    assert by_source["UMOP README (zimoqingfeng/UMOP)"] == 12
    assert by_source["BiFormer README (rayleizhu/BiFormer, object_detection)"] == 4
    configs = set(list_configs())
    assert all(e.config is None or e.config in configs for e in ZOO)
    assert len({e.name for e in ZOO}) == len(ZOO)
    for e in ZOO:  # MMDetection files carry an 8-hex SHA-256 prefix; no full hash is published anywhere
        assert e.sha256 is None
        assert (e.hash_prefix is not None) == bool(e.urls and "openmmlab" in e.urls[0])
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "vfnet_r50_fpn_1x_coco" in out and "c2398f9e..." in out and "not published" in out
    assert format_zoo_table().count("\n") >= len(ZOO)


def test_download_convert_and_strict_load(server, monkeypatch, tmp_path) -> None:
    body, sd = _release_bytes()
    entry = _entry(server, body)
    monkeypatch.setattr(zoo_registry, "ZOO", (entry,))
    path = fetch_zoo_weights("tiny_atss", progress=False)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["classes"] == ["circle", "square", "triangle"]
    model = build_detector(load_config("atss_r18_fpn_synth").model, init=False)
    load_model_weights(model, ckpt, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    raw = Path(path).parents[1] / entry.filename
    assert raw.read_bytes() == body and not raw.with_name(raw.name + ".part").exists()
    # a second fetch uses the cache: no new request
    n = len(server.requests)
    assert fetch_zoo_weights("atss_r18_fpn_synth", progress=False) == path  # looked up by config name
    assert len(server.requests) == n
    # load_from: zoo:NAME into a 5-class model: everything but the classifier comes from the release
    five = build_detector(load_config("atss_r18_fpn_synth", ["model.bbox_head.num_classes=5"]).model)
    assert load_for_finetune(five, "zoo:tiny_atss")["reinitialised"] == ["bbox_head.atss_cls.weight",
                                                                        "bbox_head.atss_cls.bias"]
    assert torch.equal(five.state_dict()["backbone.conv1.weight"], sd["backbone.conv1.weight"])
    # the CLI: predict CONFIG zoo IMAGE
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 150)).save(tmp_path / "img.png")
    assert main(["predict", "atss_r18_fpn_synth", "zoo", str(tmp_path / "img.png"), "--out",
                 str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "predictions.json").is_file()
    # a row whose name is not a config (the seed repos' own trainings): predict ROW zoo uses the row's config
    monkeypatch.setattr(zoo_registry, "ZOO", (entry, ZooEntry("tiny_atss_seedrepo", "atss_r18_fpn_synth", "test",
                                                              1.0, entry.urls)))
    assert main(["predict", "tiny_atss_seedrepo", "zoo", str(tmp_path / "img.png"), "--out",
                 str(tmp_path / "pred2")]) == 0
    assert (tmp_path / "pred2" / "img.png").is_file()


@pytest.mark.parametrize("server_ranges", [True, False])
def test_resume_from_partial_file(server, tmp_path, server_ranges) -> None:
    body = bytes(range(256)) * 400  # 102400 bytes
    prefix = hashlib.sha256(body).hexdigest()[:8]
    server.files[f"/w-{prefix}.pth"] = body
    server.ranges = server_ranges
    dest = tmp_path / f"w-{prefix}.pth"
    (tmp_path / f"w-{prefix}.pth.part").write_bytes(body[:40000])
    download(server.url(f"/w-{prefix}.pth"), dest, hash_prefix=prefix, progress=False)
    assert dest.read_bytes() == body
    _, rng, sent = server.requests[-1]
    assert rng == "bytes=40000-"
    assert sent == (len(body) - 40000 if server_ranges else len(body))  # without Range support: whole file again


def test_checksum_mismatch_names_url_and_manual_path(server, monkeypatch) -> None:
    body, _ = _release_bytes()
    entry = _entry(server, body, prefix="deadbeef")
    monkeypatch.setattr(zoo_registry, "ZOO", (entry,))
    with pytest.raises(ZooError, match=r"checksum mismatch: expected SHA-256 prefix .*deadbeef") as err:
        fetch_zoo_weights("tiny_atss", progress=False)
    msg = str(err.value)
    assert entry.urls[0] in msg and f"checkpoints/{entry.filename}" in msg
    dest = Path(msg.split("put it at ")[1].split(" (or")[0])
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    # a full SHA-256, when known, is checked instead of the prefix
    good = hashlib.sha256(body).hexdigest()
    monkeypatch.setattr(zoo_registry, "ZOO", (ZooEntry("tiny_atss", "atss_r18_fpn_synth", "test", 1.0,
                                                       entry.urls, sha256=good),))
    assert fetch_zoo_weights("tiny_atss", progress=False).is_file()


def test_offline_message(monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x/tiny-0123abcd.pth"
    monkeypatch.setattr(zoo_registry, "ZOO", (ZooEntry("tiny", "atss_r18_fpn_synth", "test", 1.0, (url,)),
                                              ZooEntry("nothing", "atss_r18_fpn_synth", "test", 1.0)))
    with pytest.raises(ZooError, match=r"could not download .*are you offline\? Download it by hand from "
                                       rf"{url} and put it at .*checkpoints/tiny.pth"):
        fetch_zoo_weights("tiny", progress=False)
    with pytest.raises(ZooError, match="no weights were published"):
        fetch_zoo_weights("nothing")
    with pytest.raises(ZooError, match=r"Did you mean \['tiny'\]"):
        fetch_zoo_weights("tinx")


def test_backbone_url_goes_through_the_cache(server, tmp_path) -> None:
    from densedet.weights.sources import read_state_dict as read_checkpoint

    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.ones(2, 3, 1, 1)}, buf)
    prefix = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    server.files[f"/pretrain/r-{prefix}.pth"] = buf.getvalue()
    sd = read_checkpoint(server.url(f"/pretrain/r-{prefix}.pth"))
    assert torch.equal(sd["conv1.weight"], torch.ones(2, 3, 1, 1))
    assert (tmp_path / "home" / "checkpoints" / f"r-{prefix}.pth").is_file()


def test_finetune_reinitialises_only_the_classifier(tmp_path, caplog) -> None:
    body, sd = _release_bytes(num_classes=3)
    (tmp_path / "three.pth").write_bytes(body)
    torch.manual_seed(1)
    model = build_detector(load_config("atss_r18_fpn_synth", ["model.bbox_head.num_classes=5"]).model)
    with caplog.at_level("INFO", logger="densedet"):
        report = load_for_finetune(model, str(tmp_path / "three.pth"))
    assert report["reinitialised"] == ["bbox_head.atss_cls.weight", "bbox_head.atss_cls.bias"]
    assert "re-initialised bbox_head.atss_cls.weight, bbox_head.atss_cls.bias" in caplog.text
    own = model.state_dict()
    for k, v in sd.items():
        if not k.startswith("bbox_head.atss_cls."):
            assert torch.equal(own[k], v), k
    bias = own["bbox_head.atss_cls.bias"]
    assert bias.shape == (5 * 1,) and torch.allclose(bias, torch.full_like(bias, bias_init_with_prob(0.01)))
    w = own["bbox_head.atss_cls.weight"]
    assert w.shape[0] == 5 and 0.005 < float(w.std()) < 0.02


def test_timm_weights_go_through_the_cache(server, monkeypatch, tmp_path) -> None:
    import safetensors.torch
    import timm

    from densedet.weights import sources as resnet

    torch.manual_seed(0)
    want = timm.create_model("test_resnet.r160_in1k", pretrained=False).state_dict()
    blob = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in want.items()}, str(blob))
    server.files["/timm/test_resnet/model.safetensors"] = blob.read_bytes()
    url, fname = resnet._timm_weight_url("test_resnet.r160_in1k")
    assert url == "https://huggingface.co/timm/test_resnet.r160_in1k/resolve/main/model.safetensors"
    monkeypatch.setattr(resnet, "_timm_weight_url", lambda name: (server.url("/timm/test_resnet/model.safetensors"),
                                                                  fname))
    got = resnet.read_state_dict("timm:test_resnet.r160_in1k")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "home" / "checkpoints" / fname).is_file()


def test_cached_file_changed_since_its_stamp_is_hashed_again(server, monkeypatch, tmp_path) -> None:
    """Issue 18 item 4: the stamp records size and mtime; a cached file replaced after its verification is hashed
    again (and refused when it no longer matches), one only touched is re-verified and re-stamped."""
    body, _ = _release_bytes()
    entry = _entry(server, body)
    monkeypatch.setattr(zoo_registry, "ZOO", (entry,))
    fetch_zoo_weights("tiny_atss", progress=False)
    raw = tmp_path / "home" / "checkpoints" / entry.filename
    sha, size, mtime = read_stamp(raw)
    st = raw.stat()
    assert sha == hashlib.sha256(body).hexdigest() and (size, mtime) == (st.st_size, st.st_mtime_ns)
    other, _ = _release_bytes(num_classes=2)  # another valid release put in its place
    raw.write_bytes(other)
    with pytest.raises(ZooError, match=rf"{entry.filename}: checksum mismatch: expected SHA-256 prefix "
                                       rf"{entry.hash_prefix}"):
        fetch_zoo_weights("tiny_atss", progress=False)
    raw.write_bytes(body)  # the right bytes again, newer mtime: verified again, stamp renewed, reconverted
    n = len(server.requests)
    path = fetch_zoo_weights("tiny_atss", progress=False)
    assert read_stamp(raw)[1:] == (raw.stat().st_size, raw.stat().st_mtime_ns) and len(server.requests) == n
    assert load_checkpoint(path)["meta"]["classes"] == ["circle", "square", "triangle"]


def test_read_only_cache_holding_the_download_still_works(server, monkeypatch, request, tmp_path, caplog) -> None:
    """A read-only $DENSEDET_HOME that holds the downloaded file: the conversion goes to a private temp folder (no
    download, a log line says where); one that lacks the file is a one-line path error saying what to do."""
    body, sd = _release_bytes()
    entry = _entry(server, body)
    monkeypatch.setattr(zoo_registry, "ZOO", (entry,))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    first = fetch_zoo_weights("tiny_atss", progress=False)
    first.unlink()  # the converted file is gone (e.g. a cache shared read-only after the download only)
    make_read_only(tmp_path / "home", monkeypatch, request)
    n = len(server.requests)
    with caplog.at_level("WARNING", logger="densedet"):
        path = fetch_zoo_weights("tiny_atss", progress=False)
    assert len(server.requests) == n and path.is_relative_to(tmp_path / "tmp") and path.name == "tiny_atss.pth"
    assert "using the converted weights" in caplog.text and "set DENSEDET_HOME to a writable folder" in caplog.text
    assert all(torch.equal(load_checkpoint(path)["state_dict"][k], v) for k, v in sd.items())
    assert fetch_zoo_weights("tiny_atss", progress=False) == path  # reused, not converted again
    monkeypatch.setattr(zoo_registry, "ZOO", (_entry(server, body, name="other"),))
    assert main(["zoo", "--fetch", "other"]) == 2
    assert len(server.requests) == n  # no download attempted into a cache that cannot take it
    assert main(["predict", "atss_r18_fpn_synth", "zoo:other", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
