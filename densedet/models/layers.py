"""Small building blocks shared by backbones, necks and heads.

Names follow mmcv 1.x so that MMDetection 2.x checkpoints load unchanged: a :class:`ConvModule` holds ``conv`` and a
norm named by its type abbreviation (``bn`` / ``gn`` / ``ln`` / ``in``), and :class:`Scale` holds a parameter named
``scale``. Semantics follow ``mmcv/cnn/bricks/{conv_module,norm,activation,conv,scale}.py`` (read, not copied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from densedet.registry import ConfigError

__all__ = [
    "CONV_LAYERS",
    "ConvModule",
    "FrozenBatchNorm2d",
    "Scale",
    "build_activation_layer",
    "build_conv_layer",
    "build_norm_layer",
    "constant_init",
    "freeze_batchnorms",
    "kaiming_init",
    "run_conv",
    "xavier_init",
]

# type -> (class, abbreviation used in parameter names). The abbreviation is what mmcv's ``infer_abbr`` derives.
_NORM_LAYERS: dict[str, tuple[type[nn.Module], str]] = {
    "BN": (nn.BatchNorm2d, "bn"),
    "BN1d": (nn.BatchNorm1d, "bn"),
    "BN2d": (nn.BatchNorm2d, "bn"),
    "BN3d": (nn.BatchNorm3d, "bn"),
    "SyncBN": (nn.SyncBatchNorm, "bn"),
    "GN": (nn.GroupNorm, "gn"),
    "LN": (nn.LayerNorm, "ln"),
    "IN": (nn.InstanceNorm2d, "in"),
    "IN2d": (nn.InstanceNorm2d, "in"),
}

# Conv layer constructors by config type; called as ``cls(in_channels, out_channels, kernel_size, **kwargs)``.
# A deformable-conv wrapper registers itself here (e.g. ``CONV_LAYERS["DCNv2"] = ModulatedDeformConv2dPack``) so that
# ResNet's ``dcn`` option and ConvModule's ``conv_cfg`` can build it.
CONV_LAYERS: dict[str, Callable[..., nn.Module]] = {"Conv": nn.Conv2d, "Conv2d": nn.Conv2d}

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": nn.LeakyReLU,
    "PReLU": nn.PReLU,
    "ReLU6": nn.ReLU6,
    "ELU": nn.ELU,
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "Swish": nn.SiLU,  # mmcv Swish is x * sigmoid(x) == SiLU
    "HSwish": nn.Hardswish,
    "HSigmoid": nn.Hardsigmoid,  # mmcv HSigmoid defaults (bias 3, divisor 6) == Hardsigmoid
    "Mish": nn.Mish,
}
# Activations that take no ``inplace`` argument (mmcv ConvModule skips setting it for these).
_NO_INPLACE = {"PReLU", "Sigmoid", "Tanh", "GELU", "Mish", "HSigmoid", "HSwish", "Swish", "SiLU"}


def _check_cfg(cfg: Any, what: str) -> dict[str, Any]:
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"{what} config must be a mapping with a 'type' key, got {cfg!r}")
    return dict(cfg)


def build_norm_layer(cfg: dict[str, Any], num_features: int, postfix: int | str = "") -> tuple[str, nn.Module]:
    """Build a normalisation layer from ``cfg`` (mmcv ``build_norm_layer`` semantics).

    ``cfg``: ``{'type': 'BN'|'BN1d'|'BN2d'|'BN3d'|'SyncBN'|'GN'|'LN'|'IN', 'requires_grad': bool, ...}``; the other
    keys go to the torch constructor (``num_groups`` is required for GN; ``eps`` defaults to 1e-5).
    ``requires_grad=False`` freezes the affine parameters.

    Returns ``(name, module)`` where ``name`` is the type abbreviation plus ``postfix`` (``'bn1'``, ``'gn'``...), the
    attribute name under which mmdet stores the layer.
    """
    cfg = _check_cfg(cfg, "norm")
    layer_type = cfg.pop("type")
    if layer_type not in _NORM_LAYERS:
        raise ConfigError(f"unknown norm type '{layer_type}'; known: {sorted(_NORM_LAYERS)}")
    cls, abbr = _NORM_LAYERS[layer_type]
    requires_grad = cfg.pop("requires_grad", True)
    cfg.setdefault("eps", 1e-5)
    try:
        if layer_type == "GN":
            if "num_groups" not in cfg:
                raise ConfigError(f"GN norm config needs 'num_groups', got {cfg!r}")
            layer = cls(num_channels=num_features, **cfg)
        else:
            layer = cls(num_features, **cfg)
    except TypeError as err:  # unknown keyword for the torch class
        raise ConfigError(f"bad {layer_type} norm config {cfg!r}: {err}") from err
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return f"{abbr}{postfix}", layer


def build_conv_layer(cfg: dict[str, Any] | None, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a conv layer: ``cfg`` None means ``nn.Conv2d``; otherwise ``CONV_LAYERS[cfg['type']]``.

    Positional/keyword arguments are those of ``nn.Conv2d`` (in, out, kernel_size, stride, padding, dilation, groups,
    bias); extra keys of ``cfg`` are passed on as keywords (e.g. ``deform_groups`` for a DCN layer).
    """
    if cfg is None:
        return nn.Conv2d(*args, **kwargs)
    cfg = _check_cfg(cfg, "conv")
    layer_type = cfg.pop("type")
    if layer_type not in CONV_LAYERS:
        raise ConfigError(f"unknown conv type '{layer_type}'; known: {sorted(CONV_LAYERS)}")
    return CONV_LAYERS[layer_type](*args, **kwargs, **cfg)


def build_activation_layer(cfg: dict[str, Any]) -> nn.Module:
    """Build an activation from ``{'type': 'ReLU'|'LeakyReLU'|..., **kwargs}``."""
    cfg = _check_cfg(cfg, "activation")
    layer_type = cfg.pop("type")
    if layer_type not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation type '{layer_type}'; known: {sorted(_ACTIVATIONS)}")
    try:
        return _ACTIVATIONS[layer_type](**cfg)
    except TypeError as err:
        raise ConfigError(f"bad {layer_type} activation config {cfg!r}: {err}") from err


def kaiming_init(
    module: nn.Module, a: float = 0.0, mode: str = "fan_out", nonlinearity: str = "relu", bias: float = 0.0
) -> None:
    """Kaiming-normal weight, constant bias (mmcv ``kaiming_init`` defaults: fan_out, relu, normal)."""
    nn.init.kaiming_normal_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def xavier_init(module: nn.Module, gain: float = 1.0, bias: float = 0.0, distribution: str = "uniform") -> None:
    """Xavier weight (uniform or normal), constant bias (mmcv ``xavier_init``)."""
    if distribution == "uniform":
        nn.init.xavier_uniform_(module.weight, gain=gain)
    elif distribution == "normal":
        nn.init.xavier_normal_(module.weight, gain=gain)
    else:
        raise ConfigError(f"xavier_init distribution must be 'uniform' or 'normal', got {distribution!r}")
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def constant_init(module: nn.Module, val: float, bias: float = 0.0) -> None:
    """Constant weight and bias (used for norm layers: weight 1, bias 0)."""
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


class ConvModule(nn.Module):
    """Conv -> norm -> activation, with mmcv ``ConvModule`` parameter names and defaults.

    Submodules: ``conv`` (built from ``conv_cfg``, ``nn.Conv2d`` by default), the norm under its abbreviation
    (``bn`` for BN/SyncBN, ``gn`` for GN, ...) when ``norm_cfg`` is given, and ``activate`` when ``act_cfg`` is given.
    ``bias='auto'`` gives the conv a bias iff there is no norm (a bias before a norm is redundant).

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H', W')`` with the usual conv arithmetic.
    Weights are initialised at construction like mmcv: kaiming-normal (fan_out) conv, zero bias, norm weight 1 /
    bias 0; owners (FPN, heads) re-initialise as their reference does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool | str = "auto",
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] | None = None,
        act_cfg: dict[str, Any] | None = {"type": "ReLU"},  # noqa: B006 - never mutated, mirrors the mmcv signature
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if bias != "auto" and not isinstance(bias, bool):
            raise ConfigError(f"ConvModule bias must be 'auto' or a bool, got {bias!r}")
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        self.act_cfg = dict(act_cfg) if act_cfg is not None else None
        with_bias = not self.with_norm if bias == "auto" else bias

        self.conv = build_conv_layer(
            conv_cfg,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=with_bias,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels

        self.norm_name: str | None = None
        if norm_cfg is not None:
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)

        if act_cfg is not None:
            act = dict(act_cfg)
            if act["type"] not in _NO_INPLACE:
                act.setdefault("inplace", inplace)
            self.activate = build_activation_layer(act)
        self.init_weights()

    @property
    def norm(self) -> nn.Module | None:
        """The norm layer (stored under ``self.norm_name``), or None."""
        return getattr(self, self.norm_name) if self.norm_name else None

    def init_weights(self) -> None:
        """Kaiming-normal conv (LeakyReLU slope taken into account), norm weight 1 / bias 0 (mmcv ConvModule)."""
        if not hasattr(self.conv, "init_weights"):  # custom conv layers (e.g. DCN) keep their own init
            if self.act_cfg is not None and self.act_cfg["type"] == "LeakyReLU":
                kaiming_init(self.conv, a=self.act_cfg.get("negative_slope", 0.01), nonlinearity="leaky_relu")
            else:
                kaiming_init(self.conv)
        if self.norm is not None:
            constant_init(self.norm, 1.0, bias=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_conv(self.conv, x)
        if self.norm_name:
            x = getattr(self, self.norm_name)(x)
        if self.with_activation:
            x = self.activate(x)
        return x


def run_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, but in float32 (autocast off) when autocast is on and ``x`` is smaller than the kernel.

    Why: torch 2.14's CPU bfloat16 convolution backward returns garbage (often NaN/inf) weight gradients when a
    strided 3x3 conv runs on a 1x1 map, e.g. FPN's P7 conv on a 1x1 P6 of a small image (issue 9; reproduced
    with a bare ``nn.Conv2d(C, C, 3, stride=2, padding=1)`` on a ``(N, C, 1, 1)`` input under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``). Such maps are tiny, so float32 costs nothing. The output
    is then float32; the next autocast op casts it back. ``x``: ``(N, C, H, W)``.
    """
    kernel = getattr(conv, "kernel_size", None)
    if kernel is not None and x.dim() == 4 and torch.is_autocast_enabled(x.device.type):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if x.shape[-2] < kh or x.shape[-1] < kw:
            with torch.autocast(x.device.type, enabled=False):
                return conv(x.float())
    return conv(x)


class Scale(nn.Module):
    """Multiply by a learnable scalar ``scale`` (mmcv ``Scale``; FCOS-style heads keep one per level)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with fixed statistics: ``y = x * s + t``, ``s = weight / sqrt(running_var + eps)``,
    ``t = bias - running_mean * s``, in train and eval mode alike (an eval-mode BN that cannot be switched back).

    It is a ``BatchNorm2d`` subclass so that the state dict keeps every key of an mmdet BN, ``num_batches_tracked``
    included (checkpoints load strictly both ways), and code that looks for BN layers (norm decay, ``norm_eval``,
    :func:`densedet.models.fuse.fuse_conv_bn`) still finds it. Why it exists: ``F.batch_norm`` saves its input for
    backward even when nothing of the BN is trained; with a frozen ``weight`` this affine map saves nothing but
    ``s`` (per channel), which is the training-memory saving measured in docs/benchmarks.md. With a trainable
    ``weight`` (norm_eval with ``requires_grad=True``) it still saves ``x``, like BN.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Reference semantics: torchvision ``ops.misc.FrozenBatchNorm2d``, which
    however drops ``num_batches_tracked`` (read, not copied).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
        """A frozen copy sharing ``bn``'s Parameter and buffer objects (an optimizer built before still owns the
        same ``weight`` / ``bias``)."""
        if not bn.affine or not bn.track_running_stats:
            raise ValueError("FrozenBatchNorm2d needs an affine BatchNorm2d with running statistics")
        frozen = cls.__new__(cls)
        nn.Module.__init__(frozen)
        frozen.num_features, frozen.eps, frozen.momentum = bn.num_features, bn.eps, bn.momentum
        frozen.affine, frozen.track_running_stats = True, True
        frozen.weight, frozen.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            frozen.register_buffer(name, getattr(bn, name))
        frozen.train(False)
        return frozen


def freeze_batchnorms(module: nn.Module, only_without_grad: bool = False, recurse: bool = True) -> int:
    """Replace every ``nn.BatchNorm2d`` below ``module`` (not SyncBN, not already frozen) by a
    :class:`FrozenBatchNorm2d` sharing its tensors; with ``only_without_grad`` only those whose ``weight`` does not
    require grad; ``recurse=False``: direct children only. Returns how many were replaced. Idempotent."""
    count = 0
    for parent in list(module.modules()) if recurse else [module]:
        for name, child in list(parent.named_children()):
            if (type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats
                    and not (only_without_grad and child.weight.requires_grad)):
                setattr(parent, name, FrozenBatchNorm2d.from_batchnorm(child))
                count += 1
    return count
