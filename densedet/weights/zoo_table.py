"""Every released-weights row DenseDet knows: the seeds' results tables and the MMDetection baselines it ships
configs for.

Sources (copied by hand, nothing invented): the seed READMEs (hyz-xmaster/VarifocalNet: 13 VFNet rows, 8 FL/VFL
rows, 2 VFNet-X rows; libuyu/GHM_Detection: 3 rows; zimoqingfeng/UMOP: 12 rows; rayleizhu/BiFormer: 4 COCO rows)
and MMDetection 2.x ``configs/{vfnet,atss,retinanet,fcos,ghm,foveabox,reppoints}/metafile.yml`` for the weights
MMDetection hosts (its ``openmmlab.oss-cn-hangzhou.aliyuncs.com`` links are given at ``download.openmmlab.com``,
the same path on MMDetection's download host). No README publishes a file size or a full SHA-256, so ``size`` and
``sha256`` stay ``None``; MMDetection's file names end in the first 8 hex digits of the file's SHA-256
(``..._20200130-c2398f9e.pth``), which is checked as ``torch.hub`` does (``hash_prefix``).

Rows without published weights (the GHM README's baselines, BiFormer's COCO models, whose README links logs only)
are listed with ``urls == ()``; rows DenseDet has no config for (BiFormer's Mask R-CNN, UMOP's R-101 DCN MS-train
row) with ``config is None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["ZOO", "ZooEntry", "drive_url"]

MMDET = "https://download.openmmlab.com/mmdetection/v2.0"
_HASH = re.compile(r"-([a-f0-9]{8,})\.pth$")


def drive_url(file_id: str) -> str:
    """Direct-download form of a Google Drive ``/file/d/ID/view`` link."""
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def drive_page(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view?usp=sharing"


@dataclass(frozen=True)
class ZooEntry:
    """One released model. ``urls``: where the weights live, first choice first (empty: not published);
    ``page``: the link the source publishes (for a download by hand); ``box_ap`` COCO val (``box_ap_test_dev`` and
    ``mask_ap`` where published); ``hash_prefix``: leading hex digits of the file's SHA-256 (MMDetection's file
    names); ``sha256``/``size`` where published (never)."""

    name: str
    config: str | None
    source: str
    box_ap: float | None
    urls: tuple[str, ...] = ()
    page: str | None = None
    box_ap_test_dev: float | None = None
    mask_ap: float | None = None
    sha256: str | None = None
    size: int | None = None
    note: str = ""
    hash_prefix: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.hash_prefix is None and self.urls:
            m = _HASH.search(self.urls[0])
            if m:
                object.__setattr__(self, "hash_prefix", m.group(1))

    @property
    def filename(self) -> str:
        """Cache file name: the URL's own name for MMDetection files, ``<name>.pth`` otherwise."""
        if self.urls and self.urls[0].startswith(MMDET):
            return self.urls[0].rsplit("/", 1)[1]
        return f"{self.name}.pth"


def _mm(path: str) -> str:
    return f"{MMDET}/{path}"


VFNET = "VarifocalNet README (hyz-xmaster/VarifocalNet)"
VFL = "VarifocalNet README, FL/VFL table"
VFNETX = "VarifocalNet README, VFNet-X table"
GHM = "GHM_Detection README (libuyu/GHM_Detection)"
UMOP = "UMOP README (zimoqingfeng/UMOP)"
BIFORMER = "BiFormer README (rayleizhu/BiFormer, object_detection)"
MMDET_BASE = "MMDetection 2.x metafile (baseline)"


def _vfnet(name: str, drive: str, ap: float, ap_dev: float, mm: str | None = None) -> ZooEntry:
    urls = ((_mm(f"vfnet/{name}/{mm}"),) if mm else ()) + (drive_url(drive),)
    return ZooEntry(name, name, VFNET, ap, urls, drive_page(drive), ap_dev)


def _drive(name: str, config: str | None, source: str, drive: str, ap: float, ap_dev: float | None = None,
           note: str = "") -> ZooEntry:
    return ZooEntry(name, config, source, ap, (drive_url(drive),), drive_page(drive), ap_dev, note=note)


def _base(name: str, config: str, path: str, ap: float, note: str = "") -> ZooEntry:
    return ZooEntry(name, config, MMDET_BASE, ap, (_mm(path),), _mm(path), note=note)


_VF = "vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco"
ZOO: tuple[ZooEntry, ...] = (
    # ---- VarifocalNet: 13 VFNet rows (MMDetection hosts 8 of them; the authors' Google Drive has all)
    _vfnet("vfnet_r50_fpn_1x_coco", "1aF3Fi5rYeMqSC3Ndo4VEqjPXk4fcOfjt", 41.6, 41.6,
           "vfnet_r50_fpn_1x_coco/vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth"),
    _vfnet("vfnet_r50_fpn_mstrain_2x_coco", "1oAUu7zGZmPni0XZu8XJMDWR5GJi_pwYz", 44.5, 44.8,
           "vfnet_r50_fpn_mstrain_2x_coco/vfnet_r50_fpn_mstrain_2x_coco_20201027-7cc75bd2.pth"),
    _vfnet(_VF, "16rk1pCPmQOj98GkpM-y3IPBpdKcfq0I4", 47.8, 48.0, f"{_VF}/{_VF}_20201027pth-6879c318.pth"),
    _vfnet("vfnet_r101_fpn_1x_coco", "1z76RBD6fI43IQn2tGuSJ5KonuJE49Nfk", 43.0, 43.6,
           "vfnet_r101_fpn_1x_coco/vfnet_r101_fpn_1x_coco_20201027pth-c831ece7.pth"),
    _vfnet("vfnet_r101_fpn_2x_coco", "1SXYCfkOXXGBhvURcqH23DA5gIwSFYz2u", 43.5, 43.9),
    _vfnet("vfnet_r101_fpn_mstrain_2x_coco", "1ioQ2Fdbp4OS2Oi6g7no6fqU2-V8TtOTz", 46.2, 46.7,
           "vfnet_r101_fpn_mstrain_2x_coco/vfnet_r101_fpn_mstrain_2x_coco_20201027pth-4a5d53f1.pth"),
    _vfnet("vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco", "1W-Wkl3e3f64PzP8vJ0iB5svMqNlOzPyI", 49.0, 49.2,
           "vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco/"
           "vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-7729adb5.pth"),
    _vfnet("vfnet_x101_32x4d_fpn_mstrain_2x_coco", "1X-soI6dyFxv0jWOKxthPPsVeyqIRRa-F", 47.4, 47.6),
    _vfnet("vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco", "1QtMyI4tjccigDPn2A-V1sQuK-Z6eTHwq", 49.7, 50.0,
           "vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco/"
           "vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-d300a6fc.pth"),
    _vfnet("vfnet_x101_64x4d_fpn_mstrain_2x_coco", "1m0BQ6XyAlxNdJQVbg_4OuEgEctywPVx9", 48.2, 48.5),
    _vfnet("vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco", "1GkyJirn8J10TTyWiyw5C4boKWlW9epSU", 50.4, 50.8,
           "vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco/"
           "vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-b5f6da5e.pth"),
    _vfnet("vfnet_r2_101_fpn_mstrain_2x_coco", "1E4o1CxaWUQV7-HAyqbITw7JD8mOF7tNW", 49.2, 49.3),
    _vfnet("vfnet_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco", "1kCiEqAA_VQlhbiNuZ3HWGhBD1JvVpK0c", 51.1, 51.3),
    # ---- VarifocalNet: 8 FL / VFL rows (R-50, 1x, 4 GPUs x 4 images except ATSS 8 x 2)
    _drive("retinanet_r50_fpn_4x4_1x_coco", "retinanet_r50_fpn_4x4_1x_coco", VFL, "1jvz6f6_uhiFoulW3qP3aN1P142jRJgky",
           36.5),
    _drive("vfl_retinanet_r50_fpn_4x4_1x_coco", "vfl_retinanet_r50_fpn_4x4_1x_coco", VFL,
           "1FuWtTdr-NlcqVJW35lhlicCk2hmtIip8", 37.4),
    _drive("fovea_r50_fpn_4x4_1x_coco_vfnetrepo", "fovea_r50_fpn_4x4_1x_coco", VFL,
           "1NG9ovPa9qVUZ6uFeJct3I7koQGBwvQ_b", 36.3, note="the VarifocalNet authors' FoveaBox + FL training"),
    _drive("vfl_fovea_r50_fpn_4x4_1x_coco", "vfl_fovea_r50_fpn_4x4_1x_coco", VFL, "1mS9guZmgPeZj-Sgo0HLE5B881pdT2PyJ",
           37.2),
    _drive("reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco", "reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco",
           VFL, "1qpH5gGmI_x5EkT5gc0uwK3gTjPG6vzp2", 38.3),
    _drive("vfl_reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco",
           "vfl_reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco", VFL, "17-SPlxq_qmfEPiEBwDlm0aV81Sh3AF1W", 39.7),
    _drive("atss_r50_fpn_1x_coco_vfnetrepo", "atss_r50_fpn_1x_coco", VFL, "1Eik_WZ1GtABTh3QxvBhFL-L93NTB6c-c", 39.3,
           note="the VarifocalNet authors' ATSS + FL training"),
    _drive("vfl_atss_r50_fpn_1x_coco", "vfl_atss_r50_fpn_1x_coco", VFL, "1Uqkr4WMYhT22viFCpF7iUdbpvVvlQYLV", 40.2),
    # ---- VarifocalNet: 2 VFNet-X rows (one checkpoint, two test scales)
    _drive("vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco", "vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco",
           VFNETX, "1I_NLVsGb-6p8kildkFYhIVSdpS1nr8Eh", 53.4, 53.7, note="41e + SWA 18e, tested at 1333x800"),
    _drive("vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco_1800x1200",
           "vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco_1800x1200", VFNETX, "1I_NLVsGb-6p8kildkFYhIVSdpS1nr8Eh",
           54.5, 55.1, note="same checkpoint, tested at 1800x1200"),
    # ---- GHM: 3 rows (R-50-FPN, COCO minival); the README publishes no weights. MMDetection's GHM-C + GHM-R R-50
    # training (37.0, same AP) is listed as the baseline row retinanet_ghm_r50_fpn_1x_coco below.
    ZooEntry("retinanet_origin_r50_fpn_1x_coco", "retinanet_origin_r50_fpn_1x_coco", GHM, 35.6,
             note="FL + SL1; no weights published"),
    ZooEntry("retinanet_ghm-c-only_r50_fpn_1x_coco", "retinanet_ghm-c-only_r50_fpn_1x_coco", GHM, 35.8,
             note="GHM-C + SL1; no weights published"),
    ZooEntry("retinanet_ghm_r50_fpn_1x_coco_ghmrepo", "retinanet_ghm_r50_fpn_1x_coco", GHM, 37.0,
             note="GHM-C + GHM-R; no weights published by the authors (MMDetection's training: "
                  "retinanet_ghm_r50_fpn_1x_coco)"),
    # ---- UMOP: 12 rows (box AP val / test-dev; the Swin MS-test rows reuse the MS-train checkpoints)
    _drive("umop_r50_fpn_1.5x_coco", "umop_r50_fpn_1.5x_coco", UMOP, "1sP1C6BRQub_NMCZlQm1AYUt2fv_B9UMp", 40.4, 40.5),
    _drive("umop_r101_fpn_1.5x_coco", "umop_r101_fpn_1.5x_coco", UMOP, "1GtB9e25Dpu8qtkrozV8eHDB5Lxvtq2PW", 42.1,
           42.3),
    _drive("umop_r101_fpn_mdconv_c3-c5_1.5x_coco", "umop_r101_fpn_mdconv_c3-c5_1.5x_coco", UMOP,
           "1dtJTiBNGhA-Z_OgXwmfWynbHssvYC49-", 45.2, 45.4),
    _drive("umop_r101_fpn_mdconv_c3-c5_mstrain_1.5x_coco", None, UMOP, "1f2QBWs5evb5_xtOmT8B4W9aH1aWO0bkZ", 47.6,
           47.7, note="R-101 DCN MS-train: the UMOP repo releases no config for this row"),
    _drive("umop_x101_fpn_mdconv_c3-c5_1.5x_coco", "umop_x101_fpn_mdconv_c3-c5_1.5x_coco", UMOP,
           "1LLsFCzXPywhiwyhokeq9ltdgZVbVRlKN", 48.8, 49.1),
    _drive("umop_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco", "umop_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco", UMOP,
           "1AvFiwi4k-VpG3NjRY29gWz8Q9Lm0zxZb", 50.0, 50.3),
    _drive("umop_swin-S_fpn_2x_coco_mstrain", "umop_swin-S_fpn_2x_coco_mstrain", UMOP,
           "1e4SZ7K_PQUEf0bLBZWJ6BmtOJFt6Mp-V", 49.9, 50.3),
    _drive("umop_swin-S_fpn_2x_coco_mstrain_mstest", "umop_swin-S_fpn_2x_coco_mstrain", UMOP,
           "1e4SZ7K_PQUEf0bLBZWJ6BmtOJFt6Mp-V", 51.9, 52.3,
           note="MS test: same checkpoint; test with the TTA pipeline of umop_swin-L_fpn_2x_coco_mstrain_mstest"),
    _drive("umop_swin-B_fpn_2x_coco_mstrain", "umop_swin-B_fpn_2x_coco_mstrain", UMOP,
           "1mmKUNN81VSwEVmRQuIBgKxrOsl_8AadG", 51.6, 51.9),
    _drive("umop_swin-B_fpn_2x_coco_mstrain_mstest", "umop_swin-B_fpn_2x_coco_mstrain", UMOP,
           "1mmKUNN81VSwEVmRQuIBgKxrOsl_8AadG", 53.4, 53.9,
           note="MS test: same checkpoint; test with the TTA pipeline of umop_swin-L_fpn_2x_coco_mstrain_mstest"),
    _drive("umop_swin-L_fpn_2x_coco_mstrain", "umop_swin-L_fpn_2x_coco_mstrain", UMOP,
           "1xnUz4Jlz2NFgFNHLnj3Am7K6d5hfjpaG", 52.8, 53.1),
    _drive("umop_swin-L_fpn_2x_coco_mstrain_mstest", "umop_swin-L_fpn_2x_coco_mstrain_mstest", UMOP,
           "1xnUz4Jlz2NFgFNHLnj3Am7K6d5hfjpaG", 54.7, 55.1, note="same checkpoint as umop_swin-L_fpn_2x_coco_mstrain"),
    # ---- BiFormer: 4 COCO rows; the README links training logs only, no weights
    ZooEntry("maskrcnn.1x.biformer_small", None, BIFORMER, 47.8, mask_ap=43.2,
             note="Mask R-CNN: not a dense detector, no DenseDet config; no weights published"),
    ZooEntry("maskrcnn.1x.biformer_base", None, BIFORMER, 48.6, mask_ap=43.7,
             note="Mask R-CNN: not a dense detector, no DenseDet config; no weights published"),
    ZooEntry("retinanet.1x.biformer_small", "retinanet.1x.biformer_small", BIFORMER, 45.9,
             note="no weights published (the README links the log)"),
    ZooEntry("retinanet.1x.biformer_base", "retinanet.1x.biformer_base", BIFORMER, 47.1,
             note="no weights published (the README links the log)"),
    # ---- MMDetection baselines DenseDet ships configs for
    _base("atss_r50_fpn_1x_coco", "atss_r50_fpn_1x_coco",
          "atss/atss_r50_fpn_1x_coco/atss_r50_fpn_1x_coco_20200209-985f7bd0.pth", 39.4),
    _base("atss_r101_fpn_1x_coco", "atss_r101_fpn_1x_coco",
          "atss/atss_r101_fpn_1x_coco/atss_r101_fpn_1x_20200825-dfcadd6f.pth", 41.5),
    _base("retinanet_r50_fpn_1x_coco", "retinanet_r50_fpn_1x_coco",
          "retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth", 36.5),
    _base("retinanet_r50_fpn_2x_coco", "retinanet_r50_fpn_2x_coco",
          "retinanet/retinanet_r50_fpn_2x_coco/retinanet_r50_fpn_2x_coco_20200131-fdb43119.pth", 37.4),
    _base("retinanet_r101_fpn_1x_coco", "retinanet_r101_fpn_1x_coco",
          "retinanet/retinanet_r101_fpn_1x_coco/retinanet_r101_fpn_1x_coco_20200130-7a93545f.pth", 38.5),
    _base("retinanet_x101_32x4d_fpn_1x_coco", "retinanet_x101_32x4d_fpn_1x_coco",
          "retinanet/retinanet_x101_32x4d_fpn_1x_coco/retinanet_x101_32x4d_fpn_1x_coco_20200130-5c8b7ec4.pth", 39.9),
    _base("retinanet_x101_64x4d_fpn_1x_coco", "retinanet_x101_64x4d_fpn_1x_coco",
          "retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth", 41.0),
    _base("fcos_r50_caffe_fpn_gn-head_1x_coco", "fcos_r50_caffe_fpn_gn-head_1x_coco",
          "fcos/fcos_r50_caffe_fpn_gn-head_1x_coco/fcos_r50_caffe_fpn_gn-head_1x_coco-821213aa.pth", 36.6),
    _base("fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco",
          "fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco",
          "fcos/fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco/"
          "fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco-0a0d75a8.pth", 38.7),
    _base("retinanet_ghm_r50_fpn_1x_coco", "retinanet_ghm_r50_fpn_1x_coco",
          "ghm/retinanet_ghm_r50_fpn_1x_coco/retinanet_ghm_r50_fpn_1x_coco_20200130-a437fda3.pth", 37.0),
    _base("retinanet_ghm_r101_fpn_1x_coco", "retinanet_ghm_r101_fpn_1x_coco",
          "ghm/retinanet_ghm_r101_fpn_1x_coco/retinanet_ghm_r101_fpn_1x_coco_20200130-c148ee8f.pth", 39.1),
    _base("retinanet_ghm_x101_32x4d_fpn_1x_coco", "retinanet_ghm_x101_32x4d_fpn_1x_coco",
          "ghm/retinanet_ghm_x101_32x4d_fpn_1x_coco/retinanet_ghm_x101_32x4d_fpn_1x_coco_20200131-e4333bd0.pth", 40.7),
    _base("retinanet_ghm_x101_64x4d_fpn_1x_coco", "retinanet_ghm_x101_64x4d_fpn_1x_coco",
          "ghm/retinanet_ghm_x101_64x4d_fpn_1x_coco/retinanet_ghm_x101_64x4d_fpn_1x_coco_20200131-dd381cef.pth", 41.4),
    _base("fovea_r50_fpn_4x4_1x_coco", "fovea_r50_fpn_4x4_1x_coco",
          "foveabox/fovea_r50_fpn_4x4_1x_coco/fovea_r50_fpn_4x4_1x_coco_20200219-ee4d5303.pth", 36.5),
    _base("reppoints_moment_r50_fpn_gn-neck+head_1x_coco", "reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco",
          "reppoints/reppoints_moment_r50_fpn_gn-neck%2Bhead_1x_coco/"
          "reppoints_moment_r50_fpn_gn-neck%2Bhead_1x_coco_20200329-4b38409a.pth", 38.1,
          note="MMDetection's 8 x 2 training of the same model"),
)
