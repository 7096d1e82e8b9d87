"""Experiment trackers (issue 19, item 1): TensorBoard's event file and MLflow's file store, read back with their own
readers, hold exactly the numbers of log.jsonl (train lines, validation metrics), the per-class AP of the last
validation (recomputed here from its results file), the drawn validation images, the config and the git commit; a
resume continues the same TensorBoard folder (purged past the checkpoint) and the same MLflow run."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_ddp import ATSS_TINY
from test_trainer import ToyDetector, make_cfg

from densedet.cli import build_parser
from densedet.config.schema import check_logger_names
from densedet.data import CocoDataset, make_synthetic_coco
from densedet.engine import Trainer, load_checkpoint
from densedet.engine.trackers import Trackers, draw_validation_images, require_tracker_packages, scalar_tags
from densedet.errors import ConfigError
from densedet.evaluation.coco_eval import EvalResult, evaluate_coco
from densedet.models.build import build_detector


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trackers") / "data"
    make_synthetic_coco(root, num_train=8, num_val=3, size=64, seed=0)
    return root


def _cfg(root: Path, loggers: list[str], **sections):
    return make_cfg(root, data={"samples_per_gpu": 4},
                    runtime={"val_interval": 1, "loggers": loggers, "log_val_images": 2, "amp": True},
                    optimizer={"grad_clip": {"max_norm": 35}}, **sections)


def _train(cfg, work: Path, resume=None) -> Trainer:
    torch.manual_seed(0)
    model = build_detector(cfg.model) if cfg.model["type"] == "ATSS" else ToyDetector()
    trainer = Trainer(cfg, work, model=model, resume=resume)
    trainer.train()
    return trainer


def _log(work: Path) -> list[dict]:
    return [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]


def _expected_scalars(work: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from log.jsonl, as the module docstring of densedet.engine.trackers defines them."""
    out: dict[str, dict[int, float]] = {}
    for rec in _log(work):
        kind = rec["type"]
        for key, value in rec.items():
            if key in ("type", "iter", "time") or (key == "epoch" and kind != "train") or not isinstance(
                    value, (int, float)):
                continue
            tag = f"{'levels' if key.startswith('lvl') else kind}/{key}"
            out.setdefault(tag, {})[rec["iter"]] = float(value)
    return out


def _per_class_of_last_validation(root: Path, work: Path) -> dict[str, float]:
    ds = CocoDataset(root / "annotations/instances_val.json", root / "val", test_mode=True)
    result = evaluate_coco(ds.coco_gt_dict, json.loads((work / "val_results.bbox.json").read_text()))
    return {f"val_per_class/bbox_{k}/{row['class']}": row[k] for row in result.per_class for k in ("AP", "AP50")
            if np.isfinite(row[k])}


def _read_tensorboard(log_dir: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _mlflow_client(work: Path):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(work / "mlruns").resolve().as_uri())


def test_tensorboard_event_file_holds_the_logged_values(synth: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    work = tmp_path / "tb"
    _train(_cfg(synth, ["tensorboard"], model=ATSS_TINY), work)  # a real dense head: per-level statistics too
    expected = _expected_scalars(work)
    # each loss term, lr, speed, memory, grad norm, skipped AMP steps every interval; COCO metrics every validation
    for tag in ("train/loss", "train/loss_cls", "train/loss_bbox", "train/loss_centerness", "train/lr",
                "train/it_per_s", "train/memory_mb", "train/grad_norm", "train/skipped_steps", "levels/lvl0_pos",
                "levels/lvl4_neg_cls_loss", "val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/bbox_mAP_s"):
        assert tag in expected, tag
    acc = _read_tensorboard(work / "tensorboard")
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)
    assert sorted(by_step for by_step in expected["train/loss"]) == [1, 2, 3, 4]
    assert sorted(expected["val/bbox_mAP"]) == [2, 4]
    # per-class AP of the last validation equals a fresh COCO evaluation of its results file
    per_class = _per_class_of_last_validation(synth, work)
    assert per_class
    for tag, value in per_class.items():
        assert {e.step: e.value for e in acc.Scalars(tag)}[4] == pytest.approx(value, rel=1e-6, abs=1e-12)
    # two validation images per validation, pixel for pixel the drawing of that validation's detections
    ds = CocoDataset(synth / "annotations/instances_val.json", synth / "val", test_mode=True)
    drawn = dict(draw_validation_images(ds, work / "val_results.bbox.json", 2))
    assert len(acc.Tags()["images"]) == 2
    for name, image in drawn.items():
        events = acc.Images(f"val_images/{name}")
        assert [e.step for e in events] == [2, 4]
        logged = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert logged.shape == (320, 320, 3)  # 64 px images drawn at the 320 px floor, labels readable
        assert np.array_equal(logged, np.asarray(image))
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "loggers:" in text and "tensorboard" in text


def test_mlflow_store_holds_the_logged_values_params_and_artifacts(synth: Path, tmp_path: Path) -> None:
    work = tmp_path / "ml"
    client = _mlflow_client(work)
    cfg = _cfg(synth, ["mlflow"])
    _train(cfg, work)
    experiment = client.get_experiment_by_name("toy")  # default experiment: the config's name
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    expected = _expected_scalars(work)
    for tag, by_step in expected.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}
        assert history == by_step, tag  # MLflow keeps float64: exactly the log.jsonl values
    for tag, value in _per_class_of_last_validation(synth, work).items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}[4] == pytest.approx(value)
    params = run.data.params
    assert params["optimizer.lr"] == str(cfg.optimizer.lr) and params["schedule.epochs"] == "2"
    assert params["runtime.loggers"] == '["mlflow"]'
    commit = run.data.tags["mlflow.source.git.commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
    local = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl")))
    assert local.read_text() == (work / "config.yaml").read_text()
    images = sorted(a.path for a in client.list_artifacts(run.info.run_id, "val_images/iter_0000004"))
    assert len(images) == 2 and all(p.endswith(".png") for p in images)
    # the checkpoint keeps the run id for a resume
    assert load_checkpoint(work / "epoch_2.pth")["meta"]["trackers"]["mlflow_run_id"] == run.info.run_id


def test_resume_continues_the_same_tensorboard_dir_and_mlflow_run(synth: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    work = tmp_path / "resume"
    client = _mlflow_client(work)
    cfg = _cfg(synth, ["tensorboard", "mlflow"])
    _train(cfg, work)
    first = _log(work)
    # As after a crash past the epoch-1 checkpoint: iterations 3-4 were logged, then training restarts from epoch 1.
    _train(cfg, work, resume=work / "epoch_1.pth")
    again = [r for r in _log(work)[len(first):] if r["type"] == "train"]
    assert [r["iter"] for r in again] == [3, 4]
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, not a second one
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    # MLflow keeps both values of the re-trained steps 3-4 (no purge in MLflow); the resume is exact, so they agree
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4]
    by_step: dict[int, set[float]] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert all(len(v) == 1 for v in by_step.values())
    # TensorBoard: one folder, two event files; the first run's steps >= 3 are purged, so each step shows once
    assert len(list((work / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = _read_tensorboard(work / "tensorboard")
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/bbox_mAP")] == [2, 4]
    last = {r["iter"]: r["loss"] for r in again}
    assert [e.value for e in acc.Scalars("train/loss")][2:] == pytest.approx([last[3], last[4]], rel=1e-6)


def test_scalar_tags_of_a_log_line() -> None:
    step, tags = scalar_tags({"type": "train", "epoch": 1, "iter": 7, "lr": 0.01, "loss": 1.5, "lvl0_pos": 3.0,
                              "grad_norm": None, "time": 1.7e9, "note": "x"})
    assert step == 7
    assert tags == {"train/epoch": 1.0, "train/lr": 0.01, "train/loss": 1.5, "levels/lvl0_pos": 3.0}
    assert scalar_tags({"type": "val", "epoch": 2, "iter": 8, "bbox_mAP": 0.5, "bbox_mAP_m": None}) == (
        8, {"val/bbox_mAP": 0.5})


class _Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def scalars(self, values, step):
        self.calls.append(("scalars", step, dict(values)))

    def images(self, images, step):
        self.calls.append(("images", step, [n for n, _ in images]))

    def state(self):
        return {"recorder": True}

    def close(self, status):
        self.calls.append(("close", status))


class _Broken(_Recorder):
    name = "broken"

    def scalars(self, values, step):
        raise ConnectionError("tracking server gone")


def test_per_class_ap_of_bbox_and_segm_and_a_failing_tracker(caplog: pytest.LogCaptureFixture) -> None:
    segm = EvalResult(metrics={}, per_class=[{"class": "a b", "AP": float("nan"), "AP50": 0.25}], precision=None,
                      iou_type="segm")
    result = EvalResult(metrics={}, per_class=[{"class": "a b", "AP": 0.5, "AP50": 0.75}], precision=None,
                        segm=segm)
    rec, broken = _Recorder(), _Broken()
    trackers = Trackers([broken, rec], val_images=0)
    trackers.log_evaluation(result, dataset=None, results_json="missing.json", step=9)
    assert rec.calls == [("scalars", 9, {"val_per_class/bbox_AP/a b": 0.5, "val_per_class/bbox_AP50/a b": 0.75,
                                         "val_per_class/segm_AP50/a b": 0.25})]  # NaN (no ground truth): not logged
    trackers.log_record({"type": "val", "epoch": 1, "iter": 9, "bbox_mAP": 0.5, "segm_mAP": 0.25})
    assert rec.calls[-1] == ("scalars", 9, {"val/bbox_mAP": 0.5, "val/segm_mAP": 0.25})
    # the broken tracker warned once, the other one kept logging; both are closed, the failures counted
    assert sum("broken: could not log" in r.message for r in caplog.records) == 1
    trackers.close("FINISHED")
    assert rec.calls[-1] == ("close", "FINISHED") and trackers.failures == {"broken": 2}
    assert trackers.state_dict() == {"recorder": True}
    assert not Trackers() and Trackers().state_dict() == {}


def test_unknown_or_missing_logger_is_a_config_error(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.loggers.*'wandb'.*tensorboard, mlflow"):
        _cfg(synth, ["wandb"])
    assert check_logger_names(["mlflow", "tensorboard", "mlflow"]) == ["mlflow", "tensorboard"]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow-skinny were not installed
    with pytest.raises(ConfigError, match=r"pip install 'densedet\[mlflow\]'"):
        require_tracker_packages(["mlflow"])
    with pytest.raises(ConfigError, match="mlflow-skinny"):
        Trainer(_cfg(synth, ["mlflow"]), synth.parent / "never", model=ToyDetector())


def test_cli_logger_flag_is_repeatable_and_checked(capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["train", "cfg", "--logger", "tensorboard", "--logger", "mlflow"])
    assert args.logger == ["tensorboard", "mlflow"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "cfg", "--logger", "wandb"])
    assert exc.value.code == 2 and "invalid choice: 'wandb'" in capsys.readouterr().err
