"""Config loading: _base_ inheritance, overrides, and errors that name the file and key."""

from __future__ import annotations

import pytest

from densedet.config import ConfigError, list_configs, load_config
from densedet.registry import DETECTORS


def _write(path, text):
    path.write_text(text)
    return path


def test_builtin_configs_load_and_validate() -> None:
    names = list_configs()
    for required in ("retinanet_r50_fpn_1x_coco", "fcos_r50_caffe_fpn_gn-head_1x_coco", "atss_r50_fpn_1x_coco",
                     "atss_r18_fpn_synth"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg.model["type"] in DETECTORS


def test_reference_defaults_of_the_coco_configs() -> None:
    retina = load_config("retinanet_r50_fpn_1x_coco")
    assert retina.schedule.epochs == 12 and retina.schedule.steps == [8, 11]
    assert retina.schedule.warmup_iters == 500 and retina.schedule.warmup_ratio == 0.001
    assert retina.optimizer.lr == 0.01 and retina.optimizer.momentum == 0.9 and retina.optimizer.weight_decay == 1e-4
    assert retina.model["train_cfg"]["assigner"]["pos_iou_thr"] == 0.5
    fcos = load_config("fcos_r50_caffe_fpn_gn-head_1x_coco")
    assert fcos.optimizer.paramwise.bias_lr_mult == 2.0 and fcos.optimizer.paramwise.bias_decay_mult == 0.0
    assert fcos.optimizer.grad_clip == {"max_norm": 35, "norm_type": 2}
    assert fcos.schedule.warmup == "constant"
    assert fcos.model["data_preprocessor"]["to_rgb"] is False  # caffe-style input: BGR, the model normalises
    assert fcos.model["data_preprocessor"]["mean"] == [102.9801, 115.9465, 122.7717]
    atss = load_config("atss_r50_fpn_1x_coco")
    assert atss.model["bbox_head"]["loss_bbox"] == {"type": "GIoULoss", "loss_weight": 2.0}
    assert atss.model["test_cfg"]["nms"]["iou_threshold"] == 0.6
    two = load_config("retinanet_r50_fpn_2x_coco")
    assert two.schedule.epochs == 24 and two.schedule.steps == [16, 22]


def test_base_inheritance_override_and_delete(tmp_path) -> None:
    _write(tmp_path / "base.yaml", "model: {type: ATSS, backbone: {type: ResNet, depth: 18, pretrained: null},"
                  " neck: {type: FPN, in_channels: [128, 256, 512], out_channels: 32, num_outs: 5, add_extra_convs: "
                  "on_output}, bbox_head: {type: ATSSHead, num_classes: 2, in_channels: 32, feat_channels: 32, "
                  "stacked_convs: 1, norm_cfg: {type: GN, num_groups: 8}}}\noptimizer: {lr: 0.02, paramwise: "
                  "{bias_lr_mult: 2.0}}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {backbone: {out_indices: [1, 2, 3]}}\n"
                   "optimizer: {paramwise: {_delete_: true, norm_decay_mult: 0.0}}\n")
    cfg = load_config(child, ["optimizer.lr=0.04", "schedule.epochs=3"])
    assert cfg.model["backbone"] == {"type": "ResNet", "depth": 18, "pretrained": None, "out_indices": [1, 2, 3]}
    assert cfg.optimizer.lr == 0.04 and cfg.schedule.epochs == 3
    # _delete_ replaced the paramwise block: bias_lr_mult is back to its default
    assert cfg.optimizer.paramwise.bias_lr_mult == 1.0 and cfg.optimizer.paramwise.norm_decay_mult == 0.0


def test_unknown_key_names_key_and_file(tmp_path) -> None:
    bad = _write(tmp_path / "bad.yaml", "_base_: " + str(_builtin("atss_r18_fpn_synth")) +
                 "\noptimizer: {momentun: 0.9}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "momentun" in str(e.value) and "bad.yaml" in str(e.value) and "momentum" in str(e.value)


def test_mistyped_model_key_names_file_and_path(tmp_path) -> None:
    bad = _write(tmp_path / "bad_model.yaml", "_base_: " + str(_builtin("atss_r18_fpn_synth")) +
                 "\nmodel: {bbox_head: {loss_cls: {gama: 2.0}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "bad_model.yaml" in msg and "model.bbox_head.loss_cls.gama" in msg and "gamma" in msg


def test_unknown_component_type_and_assigner_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown head type 'ATSHead'"):
        load_config("atss_r18_fpn_synth", ["model.bbox_head.type=ATSHead"])
    with pytest.raises(ConfigError, match="model.train_cfg.assigner.top_k"):
        load_config("atss_r18_fpn_synth", ["model.train_cfg.assigner.top_k=9"])


def test_unknown_config_name_suggests() -> None:
    with pytest.raises(ConfigError, match="atss_r50_fpn_1x_coco"):
        load_config("atss_r50_fpn_1x_cocoo")


def _builtin(name):
    from densedet.config import resolve_config_path

    return resolve_config_path(name)
