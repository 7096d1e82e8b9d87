"""Where pretrained weights come from: ``torchvision://NAME``, ``open-mmlab://NAME``, ``timm:NAME``, http(s) URLs,
``zoo:NAME`` (a released DenseDet-zoo model) and local paths, all read into a plain state dict; and the non-strict
loading of such a state dict into a backbone (mmcv's ``Pretrained`` init: a ``prefix`` selects a sub-module's keys).

Downloads go through the DenseDet cache (:mod:`densedet.weights.download`: progress bar, resume, checksum); files
are read with ``torch.load(weights_only=True)`` only (:mod:`densedet.weights.files`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from densedet.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from densedet.weights.download import ZooError, cached_download
from densedet.weights.files import load_checkpoint_file
from densedet.weights.state_dict import load_matching, select_prefix
from densedet.weights.zoo import fetch_zoo_weights

__all__ = ["OPEN_MMLAB_URLS", "load_pretrained", "pretrained_source", "read_state_dict"]

# Checkpoints mmcv resolves for ``open-mmlab://NAME`` that DenseDet's backbones load (mmcv/model_zoo/open_mmlab.json).
OPEN_MMLAB_URLS = {
    "detectron/resnet50_caffe": "https://download.openmmlab.com/pretrain/third_party/resnet50_caffe-788b5fa3.pth",
    "detectron2/resnet50_caffe": "https://download.openmmlab.com/pretrain/third_party/resnet50_msra-5891d200.pth",
    "detectron/resnet101_caffe": "https://download.openmmlab.com/pretrain/third_party/resnet101_caffe-3ad79236.pth",
    "detectron2/resnet101_caffe": "https://download.openmmlab.com/pretrain/third_party/resnet101_msra-6cc46731.pth",
    "contrib/resnet50_gn": "https://download.openmmlab.com/pretrain/third_party/resnet50_gn_thangvubk-ad1730dd.pth",
    "detectron/resnet50_gn": "https://download.openmmlab.com/pretrain/third_party/resnet50_gn-9186a21c.pth",
    "detectron/resnet101_gn": "https://download.openmmlab.com/pretrain/third_party/resnet101_gn-cac0ab98.pth",
    "resnet18_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
    "resnext50_32x4d": "https://download.openmmlab.com/pretrain/third_party/resnext50-32x4d-0ab1a123.pth",
    "resnext101_32x4d": "https://download.openmmlab.com/pretrain/third_party/resnext101_32x4d-a5af3160.pth",
    "resnext101_64x4d": "https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth",
    # the R2-101 ImageNet checkpoint in mmdet layout
    "res2net101_v1d_26w_4s":
        "https://download.openmmlab.com/pretrain/third_party/res2net101_v1d_26w_4s_mmdetv2-f0a600f9.pth",
}




def pretrained_source(pretrained: str | None, init_cfg: dict[str, Any] | None,
                      owner: str = "ResNet") -> tuple[str, str | None] | None:
    """Normalise ``pretrained`` / ``init_cfg`` (mmdet 2.x accepts either, not both) to ``(source, prefix)``.

    Shared by every backbone; ``owner`` names the backbone in error messages.
    """
    if pretrained is not None and init_cfg is not None:
        raise ConfigError(f"{owner}: give 'pretrained' or 'init_cfg', not both (mmdet 2.x raises the same)")
    if pretrained is not None:
        if not isinstance(pretrained, str):
            raise ConfigError(f"{owner}: pretrained must be a path or URL string, got {pretrained!r}")
        return pretrained, None
    if init_cfg is None:
        return None
    if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg:
        raise ConfigError(
            f"{owner}: init_cfg must be {{'type': 'Pretrained', 'checkpoint': PATH_OR_URL[, 'prefix': ...]}}, "
            f"got {init_cfg!r} (the default initialisation needs no init_cfg)"
        )
    extra = set(init_cfg) - {"type", "checkpoint", "prefix", "map_location"}
    if extra:
        raise ConfigError(f"{owner}: unknown init_cfg keys {sorted(extra)}")
    return str(init_cfg["checkpoint"]), init_cfg.get("prefix")


def _download(url: str, what: str) -> Any:
    """Weights at ``url`` through the DenseDet cache (``$DENSEDET_HOME/checkpoints``: progress bar, resume, the
    SHA-256 prefix of the file name checked); a file already in torch.hub's cache is used as it is."""
    try:
        path = cached_download(url, legacy_dirs=[Path(torch.hub.get_dir()) / "checkpoints"])
    except ZooError as err:
        raise CheckpointError(f"pretrained weights for '{what}': {err} Or set pretrained / init_cfg.checkpoint to a "
                              f"local path of the .pth file.") from err
    return _read_file(path, what)


def _read_file(path: Path, source: str) -> Any:
    """A weight file through the one safe reader (:func:`densedet.weights.files.load_checkpoint_file`)."""
    try:
        return load_checkpoint_file(path)[0]
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"pretrained checkpoint '{source}' does not exist (expected a .pth file)") \
            from None
    except CheckpointError as err:
        raise CheckpointError(
            f"pretrained checkpoint '{source}' cannot be read with torch.load(weights_only=True), so it is "
            f"corrupt or not a torch file ({str(err).splitlines()[0]}). Save just the state dict "
            "(torch.save(model.state_dict(), path)) and try again.") from err


def _timm_weight_url(name: str) -> tuple[str, str]:
    """``(url, cache file name)`` of timm's pretrained weights for ``name``: its release URL when it has one, else
    the Hugging Face Hub file timm would fetch."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.url:
        return cfg.url, cfg.url.split("?")[0].rsplit("/", 1)[-1]
    if cfg is not None and cfg.hf_hub_id:
        fname = cfg.hf_hub_filename or "model.safetensors"
        return (f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{fname}",
                f"{cfg.hf_hub_id.replace('/', '--')}--{fname}")
    raise ConfigError(f"pretrained 'timm:{name}': timm knows no download location for its weights")


def _timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of timm model ``name``, downloaded through the DenseDet cache and loaded by timm (its
    checkpoint filters applied); offline: a clear error."""
    import timm  # a dependency of DenseDet, imported here because it is slow to import

    if not timm.list_models(name, pretrained=True):
        raise ConfigError(f"pretrained 'timm:{name}': timm has no pretrained model of that name "
                          f"(see timm.list_models(pretrained=True))")
    hint = (f"Without internet access, save them elsewhere with torch.save(timm.create_model('{name}', "
            f"pretrained=True).state_dict(), '{name}.pth') and set pretrained to that local file.")
    url, fname = _timm_weight_url(name)
    try:
        path = cached_download(url, fname)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}).state_dict()
    except ZooError as err:
        raise CheckpointError(f"could not get timm's pretrained weights for '{name}': {err} {hint}") from err
    except Exception as err:  # timm / safetensors errors come in many types
        raise CheckpointError(f"could not get timm's pretrained weights for '{name}' ({type(err).__name__}: {err}). "
                           f"{hint}") from err


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path, ``torchvision://NAME``, ``open-mmlab://NAME``, ``timm:NAME``, an
    http(s) URL or ``zoo:NAME`` (the converted checkpoint of a DenseDet zoo row, downloaded once).

    Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` and strips a leading ``module.`` (DataParallel/DDP). Files are
    read with ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
    """
    if source.startswith("torchvision://"):
        name = source.removeprefix("torchvision://")
        try:
            url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
        except (ValueError, KeyError, AttributeError) as err:
            raise ConfigError(f"pretrained '{source}': torchvision has no IMAGENET1K_V1 weights for '{name}'") from err
        ckpt = _download(url, source)
    elif source.startswith("open-mmlab://"):
        name = source.removeprefix("open-mmlab://")
        if name not in OPEN_MMLAB_URLS:
            raise ConfigError(
                f"pretrained '{source}': unknown open-mmlab name; known: {sorted(OPEN_MMLAB_URLS)}. "
                "Download the file and give its local path instead."
            )
        ckpt = _download(OPEN_MMLAB_URLS[name], source)
    elif source.startswith(("http://", "https://")):
        ckpt = _download(source, source)
    elif source.startswith("timm:"):
        ckpt = _timm_state_dict(source.removeprefix("timm:"))
    elif source.startswith("zoo:"):
        ckpt = _read_file(fetch_zoo_weights(source.removeprefix("zoo:")), source)
    else:
        ckpt = _read_file(Path(source).expanduser(), source)

    for key in ("state_dict", "model"):
        if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"pretrained checkpoint '{source}' does not hold a state dict (got "
                              f"{type(ckpt).__name__})")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_pretrained(
    module: nn.Module, source: str, prefix: str | None = None, ignore_unexpected: Sequence[str] = ("fc.",)
) -> dict[str, list[str]]:
    """Load a checkpoint into ``module`` non-strictly, warning about what did not match.

    ``prefix`` (mmcv ``Pretrained.prefix``) keeps only keys under it and strips it; without a prefix, a checkpoint
    holding ``backbone.*`` keys (a whole detector) contributes only those, stripped. Keys whose shapes differ are
    skipped. Missing ``num_batches_tracked`` buffers (old/caffe checkpoints lack them) and unexpected keys starting
    with one of ``ignore_unexpected`` (the classifier ``fc.*``) are not reported.

    Returns ``{'missing': [...], 'unexpected': [...], 'mismatched': [...]}`` (the reported lists).
    """
    state = select_prefix(read_state_dict(source), source, prefix)
    return load_matching(module, state, source, ignore_unexpected=ignore_unexpected,
                         ignore_missing=("num_batches_tracked",))
