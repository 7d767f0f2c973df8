"""Training-loader throughput of each task vs torchvision's reference pipeline, and COCO evaluation time.

Data: a generated COCO-2017-shaped set (``--images`` JPEGs of 640x480 with smooth
backgrounds and filled shapes, boxes with COCO's 80 category ids and their gaps in
``annotations/instances_train2017.json``; a VOC view of the same JPEGs with 21-class
masks; an ImageFolder view in 10 classes). Every loader runs with the same ``--workers``
and batch size. Two rows for ours: ``loader`` counts a batch when the DataLoader hands it
over (``uint8``: what a GPU run copies to the device), ``+ host normalisation`` also runs the
DataModule's ``on_after_batch_transfer`` (detection: ``DetectionModule``'s ``uint8 -> 0..1``)
in this (CPU-only) main process, which a GPU run does on the device. The references hand over model-ready float batches.

References (torchvision ``references/``, v2 transforms):
  * classification: ImageFolder, RandomResizedCrop(224) + flip + PILToTensor + ToDtype + Normalize;
  * detection: CocoDetection wrapped for v2, flip + ToImage + ToDtype + SanitizeBoundingBoxes;
  * segmentation: RandomResize(260..1040) + flip + RandomCrop(480, padded) + ToDtype + Normalize,
    masks int64.

Pipelines are timed round-robin (``--repeats`` rounds, the order reversing every round), each
timing with a fresh loader after ``--warmup`` batches that absorb worker start-up (its workers stop
before the next pipeline runs); the table shows the median images/s.

COCO evaluation (``--eval-images``): ground truth with 1-14 boxes per image, 100
detections per image; pycocotools' evaluate + accumulate + summarize vs
:func:`tasks.detection.cocoeval.evaluate` with 1 and ``--eval-workers`` processes (same
numbers, checked), and the bytes each rank would send to rank 0 (pickled).

Usage:
    python benchmarks/data_throughput.py --images 2000 --workers 2 --out benchmarks/results/data_throughput.json
    python benchmarks/data_throughput.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
WIDTH, HEIGHT = 640, 480


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/gdrq_throughput", help="folder for the generated set (reused if complete)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches per pipeline per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["classification", "detection", "segmentation"])
    p.add_argument("--eval-images", type=int, default=5000, help="0 skips the evaluation timing")
    p.add_argument("--eval-workers", type=int, default=2)
    p.add_argument("--out", help="write the results as json")
    p.add_argument("--quick", action="store_true", help="smoke run: 24 images, 2 batches, 60 eval images")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batches, args.warmup, args.repeats, args.eval_images = 24, 2, 1, 1, 60
        args.data = os.path.join(args.data, "quick")
    return args


# ---------------------------------------------------------------------------------------------- data
def _scene(rng: np.random.Generator) -> tuple[Image.Image, Image.Image, list[tuple[list[float], int]]]:
    """One 640x480 picture (gradient + noise + filled shapes), its 21-class mask and the shapes' boxes."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] / WIDTH
    base = rng.uniform(40, 215, 3) + 60 * (xx[..., None] * rng.uniform(-1, 1, 3) + yy[..., None] * rng.uniform(-1, 1, 3))
    image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    draw, draw_mask, boxes = ImageDraw.Draw(image), ImageDraw.Draw(mask), []
    for _ in range(int(rng.integers(1, 15))):
        w, h = rng.uniform(16, 300), rng.uniform(16, 240)
        x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        shape = (x, y, x + w, y + h)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(shape, fill=color)
        draw_mask.rectangle(shape, fill=int(rng.integers(1, 21)))
        boxes.append(([x, y, w, h], int(rng.choice(COCO_IDS))))
    return image, mask, boxes


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """COCO-2017 layout + VOC and ImageFolder views of the same JPEGs under ``root``."""
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("images") == n:
        return root
    rng = np.random.default_rng(seed)
    for sub in ("train2017", "val2017", "annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        image, mask, boxes = _scene(rng)
        name = f"{i:012d}"
        image.save(root / "train2017" / f"{name}.jpg", quality=90)
        mask.save(root / "SegmentationClass" / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.jpg", "width": WIDTH, "height": HEIGHT})
        for box, cat in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
        cls = root / "folder" / "train" / f"class{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{name}.jpg").symlink_to(root / "train2017" / f"{name}.jpg")
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_IDS]
    for split, subset in (("train2017", images), ("val2017", images[:8])):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": subset, "annotations": [a for a in anns if a["image_id"] <= subset[-1]["id"]],
             "categories": categories}))
    for i in images[:8]:
        (root / "val2017" / i["file_name"]).symlink_to(root / "train2017" / i["file_name"])
    os.symlink(root / "train2017", root / "JPEGImages")
    (root / "folder" / "val").symlink_to(root / "folder" / "train")
    ids = [im["file_name"][:-4] for im in images]
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:8]) + "\n")
    done.write_text(json.dumps({"images": n}))
    return root


# ---------------------------------------------------------------------------------------------- loaders
Pipeline = Callable[[], Iterator]


def _ours(dm, prepare: Callable | None = None) -> dict[str, Pipeline]:
    """Our loader as it hands over batches, and with what runs on the device after the copy
    (``prepare``; default: the DataModule's ``on_after_batch_transfer``)."""
    dm.setup("fit")
    prepare = prepare or (lambda batch: dm.on_after_batch_transfer(batch, 0))

    def normalised() -> Iterator:
        for batch in dm.train_dataloader():
            yield prepare(batch)

    return {"ours (loader)": lambda: iter(dm.train_dataloader()), "ours + host normalisation": normalised}


def classification(root: Path, workers: int, batch: int) -> dict[str, Pipeline]:
    from torchvision import datasets
    from torchvision.transforms import v2 as T
    from torch.utils.data import DataLoader

    from tasks.classification import ImageFolderDataModule
    from tasks.loaders import IMAGENET_MEAN, IMAGENET_STD

    ours = ImageFolderDataModule(root=str(root / "folder"), image_size=224, batch_size=batch, num_workers=workers)
    reference = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ref_set = datasets.ImageFolder(str(root / "folder" / "train"), transform=reference)
    return {**_ours(ours), "torchvision reference": lambda: iter(DataLoader(
        ref_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0))}


def _tuple_collate(batch: list) -> tuple:
    return tuple(zip(*batch))


def detection(root: Path, workers: int, batch: int) -> dict[str, Pipeline]:
    from torchvision import datasets, tv_tensors
    from torchvision.transforms import v2 as T
    from torch.utils.data import DataLoader

    from tasks.detection import COCODataModule
    from tasks.detection.dataset import to_unit_float

    ours = COCODataModule(root=str(root), batch_size=batch, num_workers=workers, annotation_cache=None)
    transforms = T.Compose([T.RandomHorizontalFlip(0.5), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                            T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), T.SanitizeBoundingBoxes()])
    with contextlib.redirect_stdout(io.StringIO()):
        ref_set = datasets.wrap_dataset_for_transforms_v2(
            datasets.CocoDetection(str(root / "train2017"), str(root / "annotations" / "instances_train2017.json"),
                                   transforms=transforms), target_keys={"boxes", "labels", "image_id"})
    scale = lambda batch: (to_unit_float(batch[0]), batch[1])  # noqa: E731  DetectionModule does this on the device
    return {**_ours(ours, scale), "torchvision reference": lambda: iter(DataLoader(
        ref_set, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=_tuple_collate,
        persistent_workers=workers > 0))}


class _ReferenceSegmentation(torch.utils.data.Dataset):
    """torchvision ``references/segmentation``: PIL image + mask through ``SegmentationPresetTrain`` (v2)."""

    def __init__(self, root: Path) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import v2 as T

        from tasks.loaders import IMAGENET_MEAN, IMAGENET_STD

        self.ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
        self.root, self.mask_type = root, tv_tensors.Mask
        self.transforms = T.Compose([
            T.RandomResize(min_size=260, max_size=1040), T.RandomHorizontalFlip(0.5),
            T.RandomCrop(480, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            T.ToImage(), T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                                   scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD), T.ToPureTensor(),
        ])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as F

        image = Image.open(self.root / "JPEGImages" / f"{self.ids[i]}.jpg").convert("RGB")
        mask = self.mask_type(F.pil_to_tensor(Image.open(self.root / "SegmentationClass" / f"{self.ids[i]}.png")))
        image, mask = self.transforms(image, mask)
        return image, mask[0]


def segmentation(root: Path, workers: int, batch: int) -> dict[str, Pipeline]:
    from torch.utils.data import DataLoader

    from tasks.segmentation import VOCSegmentationDataModule

    ours = VOCSegmentationDataModule(root=str(root), num_classes=21, batch_size=batch, num_workers=workers,
                                     crop_size=480, scale_range=(0.5, 2.0))
    ref_set = _ReferenceSegmentation(root)
    return {**_ours(ours), "torchvision reference": lambda: iter(DataLoader(
        ref_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0))}


TASKS = {"classification": (classification, 32), "detection": (detection, 8), "segmentation": (segmentation, 8)}


def time_pipelines(pipelines: dict[str, Pipeline], batch: int, batches: int, warmup: int,
                   repeats: int) -> dict[str, float]:
    """Median images/s per pipeline over ``repeats`` rounds (the order reverses every round).

    Each timing gets a fresh loader whose workers start during ``warmup`` batches and stop
    afterwards, so no other loader's workers refill their queues in the background.
    """
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(repeats):
        for name in (list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]):
            iterator = pipelines[name]()
            for _ in range(warmup):
                next(iterator)
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            rates[name].append(batches * batch / (time.perf_counter() - start))
            del iterator
            gc.collect()  # the DataLoader and its workers go now, not at some later collection
    return {name: statistics.median(v) for name, v in rates.items()}


# ---------------------------------------------------------------------------------------------- evaluation
def synthetic_detections(n_images: int, per_image: int = 100, seed: int = 0):
    """COCO ground truth (1-14 boxes per image, 80 ids) and ``per_image`` detections per image (rows)."""
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    images, anns, rows = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": WIDTH, "height": HEIGHT})
        k = int(rng.integers(1, 15))
        w, h = rng.uniform(8, 300, (2, k))
        x, y, cats = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), rng.choice(COCO_IDS, k)
        for j in range(k):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(cats[j]),
                         "bbox": [x[j], y[j], w[j], h[j]], "area": w[j] * h[j], "iscrowd": 0})
        hits = np.stack([np.full(k, i), x + rng.normal(0, 3, k), y + rng.normal(0, 3, k), w * rng.uniform(0.9, 1.1, k),
                         h * rng.uniform(0.9, 1.1, k), rng.uniform(0.5, 1, k), cats], 1)
        m = per_image - k
        w2, h2 = rng.uniform(8, 300, (2, m))
        misses = np.stack([np.full(m, i), rng.uniform(0, WIDTH - w2), rng.uniform(0, HEIGHT - h2), w2, h2,
                           rng.uniform(0.05, 0.6, m), rng.choice(COCO_IDS, m)], 1)
        rows.append(np.concatenate([hits, misses]))
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in COCO_IDS]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, np.concatenate(rows)


def time_evaluation(n_images: int, workers: int) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    from tasks.detection.cocoeval import evaluate

    gt, rows = synthetic_detections(n_images)
    ids = sorted(gt.getImgIds())
    per_image = {i: rows[rows[:, 0] == i, 1:].astype(np.float32) for i in ids}  # what COCOEvaluator keeps
    as_dicts = {i: [{"image_id": i, "category_id": int(r[5]), "bbox": [float(v) for v in r[:4]], "score": float(r[4])}
                    for r in per_image[i]] for i in ids}
    result = {"images": n_images, "detections": len(rows),
              "payload_MB_dicts": len(pickle.dumps(as_dicts)) / 1e6, "payload_MB_arrays": len(pickle.dumps(per_image)) / 1e6}
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(rows), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    result["pycocotools_s"] = time.perf_counter() - start
    for w in sorted({1, workers}):
        start = time.perf_counter()
        stats, _ = evaluate(gt, rows, ids, workers=w)
        result[f"ours_{w}_process_s"] = time.perf_counter() - start
        np.testing.assert_array_equal(stats, ev.stats)  # same numbers as pycocotools
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    root = make_dataset(Path(args.data), args.images)
    results: dict = {"images": args.images, "workers": args.workers, "cpus": os.cpu_count(), "loaders": {}}
    print(f"# data throughput: {args.images} JPEGs {WIDTH}x{HEIGHT}, workers={args.workers}, "
          f"{args.repeats} rounds x {args.batches} batches, {os.cpu_count()} CPUs\n")
    print("| task | batch | pipeline | images/s | / reference |")
    print("|---|---|---|---|---|")
    for task in args.tasks:
        build, batch = TASKS[task]
        if args.quick:
            batch = 2
        rates = time_pipelines(build(root, args.workers, batch), batch, args.batches, args.warmup, args.repeats)
        results["loaders"][task] = {"batch": batch, **rates}
        for name, rate in rates.items():
            print(f"| {task} | {batch} | {name} | {rate:.1f} | {rate / rates['torchvision reference']:.2f}x |", flush=True)
    if args.eval_images:
        ev = time_evaluation(args.eval_images, args.eval_workers)
        results["evaluation"] = ev
        print(f"\n# COCO evaluation: {ev['images']} images x 100 detections ({ev['detections']} rows)\n")
        print("| evaluation | seconds |\n|---|---|")
        print(f"| pycocotools (evaluate + accumulate + summarize) | {ev['pycocotools_s']:.1f} |")
        for key in sorted(k for k in ev if k.startswith("ours_")):
            print(f"| ours, {key.split('_')[1]} process(es) | {ev[key]:.1f} |")
        print(f"\npayload to rank 0: {ev['payload_MB_dicts']:.1f} MB as dicts, {ev['payload_MB_arrays']:.1f} MB as arrays")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
