"""COCO-scale annotations: load time, parent memory and DataLoader-worker memory of ``CocoDataset`` (issue 20).

Generates (seeded, once, into a scratch folder given on the command line; never into the repository) an
annotation file shaped like COCO train2017 -- 118,287 images, 860,001 instances in 80 categories with COCO's
non-contiguous ids, 1% crowd regions as uncompressed RLE, the rest one polygon of 6-40 points (3% with a second
part), coordinates with two decimals, COCO's image fields -- over one real JPEG (every image a hard link to it, or
to a byte-identical copy per 50k links, so file names are unique and no symlink has to be resolved).
``--scale 0.05`` makes 5% of it.

Then, each in a fresh child process so that one measurement's memory cannot leak into another:

* ``json.load`` of the file alone (the reference time);
* ``CocoDataset(..., with_mask=True)`` and ``with_mask=False``: wall time (ratio to ``json.load``), the parent's
  resident memory for the annotations (RSS after construction and ``gc.collect()``, minus RSS before; peak too);
* a ``torch.utils.data.DataLoader`` of ``--workers`` workers over that dataset (RandomFlip pipeline, random
  order): each worker's private memory (USS = ``Private_Clean + Private_Dirty`` of ``/proc/PID/smaps_rollup``)
  after its first sample and after it has served ``--samples`` samples.

It prints the table of issue 20 for the code that ``import densedet`` finds; to measure another revision (the
"before" column), run it with ``PYTHONPATH`` pointing at a checkout of that revision (the script only uses
``CocoDataset(ann_file, img_dir, pipeline, with_mask=...)``, which every revision has). Not a test, not in CI.

    python benchmarks/bench_annotations.py /scratch/coco_like --scale 0.05      # a few minutes on 2 cores
    python benchmarks/bench_annotations.py /scratch/coco_like                   # train2017 size (422 MiB json)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TRAIN2017_IMAGES = 118_287
TRAIN2017_INSTANCES = 860_001
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # 80 ids
IMG_W, IMG_H = 640, 480


# ------------------------------------------------------------------------------------------------------ generation
def _jpeg(path: Path) -> None:
    """One real 640x480 JPEG: smooth colour field with noise (photo-like compressibility)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((IMG_W, IMG_H), Image.Resampling.BICUBIC), np.float32)
    field += rng.normal(0, 12, field.shape)
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _polygon(rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    """A star-shaped polygon of ``n`` vertices inside the image, coordinates rounded to 2 decimals; its area."""
    r = float(np.exp(rng.uniform(np.log(4), np.log(180))))
    cx, cy = rng.uniform(r, IMG_W - r), rng.uniform(min(r, IMG_H / 2), max(IMG_H - r, IMG_H / 2))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.5, 1.0, n)
    pts = np.stack([(cx + rad * np.cos(ang)).clip(0, IMG_W), (cy + rad * np.sin(ang)).clip(0, IMG_H)], 1).round(2)
    x, y = pts[:, 0], pts[:, 1]
    return pts, float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def _crowd_rle(rng: np.random.Generator) -> tuple[list[int], list[float], int]:
    """An uncompressed RLE of a ragged blob (column-major runs), its box, its area."""
    x0, y0 = int(rng.integers(0, IMG_W - 40)), int(rng.integers(0, IMG_H - 40))
    x1, y1 = x0 + int(rng.integers(20, min(300, IMG_W - x0))), y0 + int(rng.integers(20, min(200, IMG_H - y0)))
    counts, pos, area = [], 0, 0
    for x in range(x0, x1):
        top = y0 + int(rng.integers(0, 4))
        bottom = y1 - int(rng.integers(0, 4))
        start = x * IMG_H + top
        counts += [start - pos, bottom - top]
        pos = start + bottom - top
        area += bottom - top
    counts.append(IMG_W * IMG_H - pos)
    return counts, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area


def _fmt(values: np.ndarray) -> str:
    return ",".join(f"{v:.2f}".rstrip("0").rstrip(".") for v in values.tolist())


def generate(root: Path, scale: float, seed: int) -> Path:
    """Write ``root/instances.json`` and ``root/images/`` (hard links to one JPEG) unless they exist."""
    ann_file = root / "instances.json"
    done = root / ".complete"
    if done.is_file() and json.loads(done.read_text()) == {"scale": scale, "seed": seed}:
        return ann_file
    root.mkdir(parents=True, exist_ok=True)
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    source = root / "source.jpg"
    _jpeg(source)
    num_images = max(1, round(TRAIN2017_IMAGES * scale))
    num_anns = max(1, round(TRAIN2017_INSTANCES * scale))
    rng = np.random.default_rng(seed)
    image_ids = np.sort(rng.choice(600_000, num_images, replace=False)) + 9
    owner = np.sort(rng.integers(0, num_images, num_anns))
    t0 = time.perf_counter()
    tmp = ann_file.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "COCO train2017-shaped, generated by benchmarks/bench_annotations.py"},'
                '"licenses": [{"url": "", "id": 1, "name": "none"}],\n"images": [\n')
        for k, img_id in enumerate(image_ids.tolist()):
            name = f"{img_id:012d}.jpg"
            target = img_dir / name
            if not target.exists():  # a file system allows ~65k links per inode: a byte-identical copy per 50k
                src = source if k < 50_000 else source.with_name(f"source{k // 50_000}.jpg")
                if not src.exists():
                    shutil.copyfile(source, src)
                os.link(src, target)
            sep = ",\n" if k + 1 < num_images else "\n"
            f.write(f'{{"license": 1, "file_name": "{name}", "coco_url": "http://images.cocodataset.org/train2017/'
                    f'{name}", "height": {IMG_H}, "width": {IMG_W}, "date_captured": "2013-11-14 11:18:45", '
                    f'"flickr_url": "http://farm4.staticflickr.com/1/{name}", "id": {img_id}}}{sep}')
        f.write('],\n"annotations": [\n')
        for k in range(num_anns):
            cat = COCO_CAT_IDS[int(rng.integers(0, 80))]
            if rng.random() < 0.01:
                counts, bbox, area = _crowd_rle(rng)
                segm = '{"counts": [' + ",".join(map(str, counts)) + f'], "size": [{IMG_H}, {IMG_W}]}}'
                crowd = 1
            else:
                parts, area = [], 0.0
                for _ in range(2 if rng.random() < 0.03 else 1):
                    pts, a = _polygon(rng, int(rng.integers(6, 41)))
                    parts.append(pts)
                    area += a
                allpts = np.concatenate(parts)
                lo, hi = allpts.min(0), allpts.max(0)
                bbox = [round(float(lo[0]), 2), round(float(lo[1]), 2), round(float(hi[0] - lo[0]), 2),
                        round(float(hi[1] - lo[1]), 2)]
                segm = "[" + ",".join("[" + _fmt(p.reshape(-1)) + "]" for p in parts) + "]"
                crowd = 0
            sep = ",\n" if k + 1 < num_anns else "\n"
            f.write(f'{{"segmentation": {segm}, "area": {area:.4f}, "iscrowd": {crowd}, '
                    f'"image_id": {int(image_ids[owner[k]])}, "bbox": {json.dumps(bbox)}, "category_id": {cat}, '
                    f'"id": {k + 1}}}{sep}')
            if (k + 1) % 100_000 == 0:
                print(f"  generated {k + 1}/{num_anns} annotations ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
        f.write('],\n"categories": [' + ",".join(
            f'{{"supercategory": "thing", "id": {c}, "name": "class_{c}"}}' for c in COCO_CAT_IDS) + "]}\n")
    os.replace(tmp, ann_file)
    done.write_text(json.dumps({"scale": scale, "seed": seed}))
    print(f"wrote {ann_file} ({ann_file.stat().st_size / 2**20:.0f} MiB, {num_images} images, {num_anns} "
          f"annotations) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return ann_file


# ------------------------------------------------------------------------------------------------------ measuring
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def uss_kib(pid: int | str = "self") -> int:
    """Private memory (USS) of a process: Private_Clean + Private_Dirty (+ Private_Hugetlb) of smaps_rollup."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
            total += int(line.split()[1])
    return total


_served = {"n": 0, "first": None}


class _Probe:
    """Serves the dataset's items in a worker and reports that worker's USS after its first and its n-th sample
    (the items themselves stay in the worker: only the memory they leave behind is measured)."""

    def __init__(self, dataset: Any, report_at: int) -> None:
        self.dataset = dataset
        self.report_at = report_at

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.dataset[key]
        del item
        _served["n"] += 1
        n = _served["n"]
        out: dict[str, Any] = {"pid": os.getpid(), "n": n}
        if n == 1 or n == self.report_at:
            out["uss_kib"] = uss_kib()
        return out


def child_json_load(ann_file: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with open(ann_file) as f:
        data = json.load(f)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": len(data["images"]), "annotations": len(data["annotations"])}


def child_dataset(ann_file: str, img_dir: str, with_mask: bool, samples: int, workers: int,
                  parser: str) -> dict[str, Any]:
    import torch

    from densedet.data import CocoDataset

    if parser == "json":  # measure the fallback parser even where orjson is installed
        try:
            import densedet.data.annotation_store as store_module

            store_module._fast_json = lambda: None
        except ImportError:  # a revision without the store always uses json
            pass

    torch.set_num_threads(1)
    gc.collect()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    ds = CocoDataset(ann_file, img_dir, [{"type": "RandomFlip", "flip_ratio": 0.5}], with_mask=with_mask)
    seconds = time.perf_counter() - t0
    gc.collect()
    out: dict[str, Any] = {"seconds": seconds, "rss_kib": _status_kib("VmRSS") - rss0,
                           "peak_kib": _status_kib("VmHWM") - rss0, "items": len(ds)}
    store = getattr(ds, "store", None)
    if store is not None:
        out["store_bytes"] = int(store.nbytes())
    if samples and workers:
        probe = _Probe(ds, samples)
        gen = torch.Generator().manual_seed(0)
        sampler = torch.utils.data.RandomSampler(probe, replacement=True, num_samples=samples * workers, generator=gen)
        loader = torch.utils.data.DataLoader(probe, batch_size=1, sampler=sampler, num_workers=workers,
                                             collate_fn=lambda batch: batch[0], prefetch_factor=2)
        first: dict[int, int] = {}
        last: dict[int, tuple[int, int]] = {}
        t1 = time.perf_counter()
        for k, r in enumerate(loader):
            if r["n"] == 1:
                first[r["pid"]] = r["uss_kib"]
            if "uss_kib" in r and r["n"] > 1:
                last[r["pid"]] = (r["n"], r["uss_kib"])
            if (k + 1) % 1000 == 0:
                print(f"    {k + 1}/{samples * workers} samples served", file=sys.stderr, flush=True)
        out["loader_seconds"] = time.perf_counter() - t1
        out["workers"] = [{"pid": pid, "uss_first_kib": first[pid], "served": last.get(pid, (0, 0))[0],
                           "uss_last_kib": last.get(pid, (0, first[pid]))[1]} for pid in sorted(first)]
    return out


def _run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(kib: float) -> str:
    return f"{kib / 2**20:+.2f} GiB" if abs(kib) >= 2**19 else f"{kib / 1024:+.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scratch", nargs="?", help="folder for the generated dataset (created; reused if complete)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of train2017's size (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=3000, help="samples each worker serves (default 3000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each load this many times, in fresh processes, and report the fastest (default 1)")
    p.add_argument("--parser", choices=("auto", "json"), default="auto",
                   help="auto: orjson when installed (DenseDet's default); json: force the fallback parser")
    p.add_argument("--out", help="also write the raw numbers as JSON here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "json":
            result = child_json_load(rest[0])
        else:
            result = child_dataset(rest[0], rest[1], kind == "masks", int(rest[2]), int(rest[3]), rest[4])
        print(json.dumps(result))
        return
    if not args.scratch:
        p.error("give a scratch folder for the generated dataset")
    root = Path(args.scratch)
    ann_file = generate(root, args.scale, args.seed)
    img_dir = root / "images"
    try:
        import orjson

        parser = f"orjson {orjson.__version__}" if args.parser == "auto" else "json (--parser json)"
    except ImportError:
        parser = "json (orjson not installed)"
    import densedet

    print(f"file: {ann_file} ({ann_file.stat().st_size / 2**20:.0f} MiB); densedet from "
          f"{Path(densedet.__file__).parent}; parser available: {parser}", file=sys.stderr)
    results: dict[str, Any] = {"runs": []}
    for r in range(args.repeat):  # alternating fresh processes; the fastest of each is reported
        run: dict[str, Any] = {}
        print(f"[{r + 1}/{args.repeat}] json.load ...", file=sys.stderr, flush=True)
        run["json_load"] = _run_child("json", str(ann_file))
        for kind in ("masks", "boxes"):
            samples = args.samples if r == 0 else 0
            print(f"[{r + 1}/{args.repeat}] CocoDataset ({kind})" + (" + DataLoader" if samples else "") + " ...",
                  file=sys.stderr, flush=True)
            run[kind] = _run_child(kind, str(ann_file), str(img_dir), str(samples), str(args.workers), args.parser)
        results["runs"].append(run)
    first = results["runs"][0]
    ref = dict(first["json_load"], seconds=min(run["json_load"]["seconds"] for run in results["runs"]))
    m = dict(first["masks"], seconds=min(run["masks"]["seconds"] for run in results["runs"]))
    b = dict(first["boxes"], seconds=min(run["boxes"]["seconds"] for run in results["runs"]))

    def workers_text(r: dict[str, Any], detail: bool) -> str:
        ws = r.get("workers") or []
        if not ws:
            return "not measured"
        growth = max(w["uss_last_kib"] - w["uss_first_kib"] for w in ws)
        if detail:
            lo = min(w["uss_first_kib"] for w in ws) / 1024
            hi = max(w["uss_last_kib"] for w in ws) / 1024
            return f"{lo:.0f} -> {hi:.0f} MiB ({growth / 1024:+.0f})"
        return f"{growth / 1024:+.0f} MiB"

    js = ref["seconds"]
    print(f"\n{ref['images']} images, {ref['annotations']} annotations, {ann_file.stat().st_size / 2**20:.0f} MiB "
          f"json (scale {args.scale:g}); {args.workers} workers x {args.samples} samples; {parser}; fastest of "
          f"{args.repeat} run(s)\n")
    print("| | with masks | boxes only |\n|---|---|---|")
    print(f"| `json.load` of the file alone | {js:.1f} s | same file |")
    print(f"| `CocoDataset(...)` | {m['seconds']:.1f} s ({m['seconds'] / js:.2f}x json.load) | "
          f"{b['seconds']:.1f} s ({b['seconds'] / js:.2f}x json.load) |")
    print(f"| parent process memory for the annotations | {_gib(m['rss_kib'])} | {_gib(b['rss_kib'])} |")
    print(f"| parent peak while loading (VmHWM - RSS before) | {_gib(m['peak_kib'])} | {_gib(b['peak_kib'])} |")
    if "store_bytes" in m:
        print(f"| annotation store arrays | {m['store_bytes'] / 2**20:.0f} MiB | {b['store_bytes'] / 2**20:.0f} MiB |")
    print(f"| private memory (USS) of each worker, after it served {args.samples} samples | "
          f"{workers_text(m, True)} | {workers_text(b, False)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"scale": args.scale, "parser": parser, **results}, indent=2))


if __name__ == "__main__":
    main()
