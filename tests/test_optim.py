"""build_optimizer: MMDetection paramwise rules, frozen params, custom keys, linear lr scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densedet.config.schema import OptimizerConfig, ParamwiseConfig
from densedet.engine.optim import build_optimizer


class _Dcn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(4, 18, 3, padding=1)  # bias keeps base lr/decay (mmcv dcn rule)
        self.weight = nn.Parameter(torch.zeros(4, 4, 3, 3))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = nn.Conv2d(3, 4, 3, bias=True)
        self.backbone.bn = nn.BatchNorm2d(4)
        self.backbone.layer1 = nn.Conv2d(4, 4, 1, bias=True)
        self.backbone.frozen = nn.Conv2d(4, 4, 1)
        for p in self.backbone.frozen.parameters():
            p.requires_grad_(False)
        self.neck = nn.Conv2d(4, 4, 1, bias=True)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.dcn = _Dcn()
        self.head = nn.Linear(4, 2)
        self.head_alias = self.head  # shared module: its params must be listed once


def _lr_wd(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def test_bias_norm_and_frozen_rules() -> None:
    model = _Net()
    cfg = OptimizerConfig(type="SGD", lr=0.01, weight_decay=1e-4, auto_scale_lr=False,
                          paramwise=ParamwiseConfig(bias_lr_mult=2.0, bias_decay_mult=0.0, norm_decay_mult=0.0))
    opt = build_optimizer(model, cfg, total_batch_size=16)
    got = _lr_wd(opt, model)
    lr, wd = 0.01, 1e-4
    expected = {
        "backbone.stem.weight": (lr, wd), "backbone.stem.bias": (2 * lr, 0.0),
        "backbone.bn.weight": (lr, 0.0), "backbone.bn.bias": (lr, 0.0),  # norm bias: no bias_lr_mult
        "backbone.layer1.weight": (lr, wd), "backbone.layer1.bias": (2 * lr, 0.0),
        "neck.weight": (lr, wd), "neck.bias": (2 * lr, 0.0),
        "gn.weight": (lr, 0.0), "gn.bias": (lr, 0.0),
        "ln.weight": (lr, 0.0), "ln.bias": (lr, 0.0),
        "dcn.weight": (lr, wd),
        "dcn.conv_offset.weight": (lr, wd), "dcn.conv_offset.bias": (lr, wd),
        "head.weight": (lr, wd), "head.bias": (2 * lr, 0.0),
    }
    assert got.keys() == expected.keys()  # frozen params excluded, shared head listed once
    for name, (elr, ewd) in expected.items():
        assert got[name] == pytest.approx((elr, ewd)), name
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(expected)
    # (lr, wd) combinations: (lr, wd), (2lr, 0), (lr, 0) -> three groups, each with initial_lr == lr.
    assert len(opt.param_groups) == 3
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert opt.defaults["momentum"] == 0.9


def test_custom_keys_longest_match_wins_and_override_bias_rule() -> None:
    model = _Net()
    custom = {"backbone": {"lr_mult": 0.1}, "backbone.layer1": {"lr_mult": 0.5, "decay_mult": 0.0},
              "head": {"decay_mult": 3.0}}
    cfg = OptimizerConfig(type="SGD", lr=0.02, weight_decay=1e-4, auto_scale_lr=False,
                          paramwise=ParamwiseConfig(bias_lr_mult=2.0, bias_decay_mult=0.0, custom_keys=custom))
    got = _lr_wd(build_optimizer(model, cfg, 8), model)
    assert got["backbone.stem.weight"] == pytest.approx((0.002, 1e-4))
    assert got["backbone.stem.bias"] == pytest.approx((0.002, 1e-4))  # custom key beats the bias rule
    assert got["backbone.bn.weight"] == pytest.approx((0.002, 1e-4))  # ... and the norm rule
    assert got["backbone.layer1.weight"] == pytest.approx((0.01, 0.0))  # longer key wins over "backbone"
    assert got["head.bias"] == pytest.approx((0.02, 3e-4))
    assert got["neck.bias"] == pytest.approx((0.04, 0.0))  # no custom key: bias rule


@pytest.mark.parametrize("total, expected", [(16, 0.01), (4, 0.0025), (32, 0.02)])
def test_linear_lr_scaling(total: int, expected: float) -> None:
    model = nn.Linear(2, 2)
    cfg = OptimizerConfig(lr=0.01, base_batch_size=16, auto_scale_lr=True)
    opt = build_optimizer(model, cfg, total)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert opt.defaults["lr"] == pytest.approx(expected)
    off = build_optimizer(model, OptimizerConfig(lr=0.01, base_batch_size=16, auto_scale_lr=False), total)
    assert off.param_groups[0]["lr"] == pytest.approx(0.01)


def test_adamw_options_and_bad_custom_key() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    cfg = OptimizerConfig(type="AdamW", lr=1e-3, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-6, auto_scale_lr=False,
                          paramwise=ParamwiseConfig(norm_decay_mult=0.0))
    opt = build_optimizer(model, cfg, 2)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-6
    got = _lr_wd(opt, model)
    assert got["0.weight"] == pytest.approx((1e-3, 0.05)) and got["1.weight"] == pytest.approx((1e-3, 0.0))

    bad = OptimizerConfig(paramwise=ParamwiseConfig(custom_keys={"head": {"lr_mul": 0.1}}))
    with pytest.raises(ValueError, match="custom_keys.head"):
        build_optimizer(model, bad, 2)


def test_step_applies_group_lrs() -> None:
    """A real SGD step moves each parameter by its own group's lr (bias twice as far)."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    cfg = OptimizerConfig(lr=0.1, momentum=0.0, weight_decay=0.0, auto_scale_lr=False,
                          paramwise=ParamwiseConfig(bias_lr_mult=2.0))
    opt = build_optimizer(model, cfg, 1)
    model(torch.ones(1, 1)).sum().backward()  # d/dw = 1, d/db = 1
    opt.step()
    assert model.weight.item() == pytest.approx(-0.1)
    assert model.bias.item() == pytest.approx(-0.2)
