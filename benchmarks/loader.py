"""Data loader figures: training throughput with mosaic, and the memory parsed labels take.

    python -m benchmarks.loader            # 20 batches of 16 at 640 px, 2 workers; labels of 10k images
    python -m benchmarks.loader --quick    # 4 batches of 8: a smoke run of the same figures

Throughput: the embedded dataset (``data/shapes.yaml``, generated on first use) through ``CocoDataset``
with the training augmentation of ``hyp.scratch.yaml`` and every image a mosaic (``caption_view`` 0, the
costlier path), via the training DataLoader. The first batch (worker start-up) is timed apart.

Label memory: a synthetic COCO-like instances + captions JSON pair with ``--images`` images (no image
files: only the labels are measured), parsed by ``parse_split`` into the records a dataset holds, in a
fresh child process so that its figures start from a small baseline (peak RSS never goes down): the peak
RSS growth while parsing (JSON + pycocotools index + records; VmHWM or ``resource.getrusage``), the RSS still held
after the JSON is freed, and the bytes the records themselves hold (a deep ``sys.getsizeof`` walk; RSS
overstates it because CPython's allocator keeps freed arenas), per image.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# torch and the dataset are imported where used: the label-memory child must start small
from utils.data.coco import LabelReport, parse_split
from utils.data.config import SplitSpec, load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.engine.hyp import load_hyp

ROOT = Path(__file__).resolve().parents[1]
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]  # COCO's 80 thing ids
WORDS = "a man woman dog cat red blue sitting standing on the in of with next to large small table street".split()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux's VmHWM where available: ``ru_maxrss`` of a child started by fork + exec keeps the parent's
    peak at the fork, which would hide the child's own growth. Otherwise ``ru_maxrss`` (KiB on Linux,
    bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def current_rss() -> int | None:
    """Resident set size now (Linux /proc), ``None`` where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def write_synthetic_labels(folder: Path, n_images: int, anns_per_image: float, points: int, captions: int,
                           seed: int = 0, size: tuple[int, int] = (640, 480), vocab: int = 0,
                           words_per_caption: int = 10) -> SplitSpec:
    """COCO-like instances and captions JSONs for ``n_images`` images of ``size`` (w, h; COCO's typical 640x480);
    returns their split. Captions draw from :data:`WORDS`, or with ``vocab > 0`` from that many made-up words
    (``w0`` ...) dealt in turn, so that ``vocab / words_per_caption / captions`` images use every one of them
    (a COCO-sized vocabulary, ~10k words, gives the caption head COCO's output width)."""
    rng = np.random.default_rng(seed)
    w, h = size
    ids = 100_000 + 3 * np.arange(n_images)  # COCO ids are sparse, never list indices
    images = [{"id": int(i), "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i in ids]
    owner = np.repeat(ids, rng.poisson(anns_per_image, n_images))  # vectorized: 73k polygons in a second
    n = len(owner)
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    scale = min(w, h) / 480  # the 640x480 layout, shrunk for small images
    centre = rng.uniform([60 * scale, 60 * scale], [w - 60 * scale, h - 60 * scale], (n, 1, 2))
    radius = rng.uniform(8, 60, (n, 1)) * scale * rng.uniform(0.6, 1.0, (n, points))  # star-shaped: simple polygon
    polys = (centre + radius[..., None] * np.stack([np.cos(angles), np.sin(angles)], 1)).round(2)
    lo, hi = polys.min(1), polys.max(1)
    boxes = np.concatenate([lo, hi - lo], 1).round(2).tolist()
    cats = rng.choice(COCO_IDS, n).tolist()
    anns = [{"id": k + 1, "image_id": int(owner[k]), "category_id": cats[k], "segmentation": [seg],
             "area": boxes[k][2] * boxes[k][3], "bbox": boxes[k], "iscrowd": 0}
            for k, seg in enumerate(polys.reshape(n, -1).tolist())]
    n_caps, k = n_images * captions, words_per_caption
    if vocab > 0:
        words = np.asarray([f"w{i}" for i in range(vocab)])
        drawn = np.arange(n_caps * k).reshape(n_caps, k) % vocab  # dealt in turn: every word used
    else:
        words = np.asarray(WORDS)
        drawn = rng.integers(0, len(WORDS), (n_caps, k))
    caps = [{"id": j + 1, "image_id": int(iid), "caption": " ".join(words[drawn[j]])}
            for j, iid in enumerate(np.repeat(ids, captions))]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_IDS]
    inst, cap = folder / "instances.json", folder / "captions.json"
    inst.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    cap.write_text(json.dumps({"images": images, "annotations": caps}))
    return SplitSpec(images=folder / "images", instances=inst, captions=cap)


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and everything it references (ndarrays with their data), each object once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)  # an ndarray that owns its data includes it here
    if isinstance(obj, np.ndarray):
        return size + (deep_size(obj.base, seen) if obj.base is not None else 0)
    if isinstance(obj, dict):
        return size + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return size + sum(deep_size(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return size + deep_size(vars(obj), seen)
    return size


def _labels_child(spec: str) -> None:
    """In the child process: parse the split in ``spec`` (a JSON of its paths), print the figures as JSON."""
    import pycocotools.coco  # noqa: F401 - imported before the baseline: not part of the labels

    paths = json.loads(spec)
    split = SplitSpec(images=Path(paths["images"]), instances=Path(paths["instances"]), captions=Path(paths["captions"]))
    gc.collect()
    rss0, peak0 = current_rss(), peak_rss()
    t0 = time.perf_counter()
    records = parse_split(split, COCO_IDS, LabelReport())
    parse_s = time.perf_counter() - t0
    gc.collect()
    rss1, peak1 = current_rss(), peak_rss()
    print(json.dumps({
        "images": len(records), "annotations": sum(len(r.boxes) for r in records), "parse_s": parse_s,
        "peak_rss_growth": peak1 - peak0, "rss_held": (rss1 - rss0) if rss0 is not None else float("nan"),
        "records_bytes": deep_size(records),
        "pickled": len(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)),  # what the label cache holds
    }))


def label_memory(n_images: int, anns_per_image: float, points: int, captions: int) -> dict[str, float]:
    """Memory of parsing and holding the labels of ``n_images`` synthetic images (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        split = write_synthetic_labels(Path(tmp), n_images, anns_per_image, points, captions)
        write_s = time.perf_counter() - t0
        spec = json.dumps({k: str(getattr(split, k)) for k in ("images", "instances", "captions")})
        child = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--labels-child", spec],
                               cwd=ROOT, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"label memory child failed:\n{child.stderr[-2000:]}")
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        figures |= {"json_bytes": split.instances.stat().st_size + split.captions.stat().st_size, "write_s": write_s}
    return figures


def loader_throughput(data: str, img: int, batch_size: int, workers: int, batches: int, seed: int = 0,
                      caption_view: float = 0.0) -> dict[str, float]:
    """Images per second of the training DataLoader over ``batches`` batches: mosaic on every image, or with
    ``caption_view`` > 0 that share of the captioned images given the weak caption view instead (training's mix)."""

    cfg = load_data_config(data)  # generates the embedded dataset on first use
    hyp = load_hyp(ROOT / "data/hyps/hyp.scratch.yaml")
    t0 = time.perf_counter()
    ds = CocoDataset(cfg, cfg.train, img, augment=True, hyp=hyp, seed=seed, caption_view=caption_view)
    setup_s = time.perf_counter() - t0
    loader = create_dataloader(ds, batch_size, shuffle=True, workers=workers, seed=seed)
    it = iter(loader)
    t0 = time.perf_counter()
    first = next(it)  # includes starting the workers
    first_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += len(next(it))
        except StopIteration:
            break
    steady_s = time.perf_counter() - t0
    del it
    return {"dataset_images": len(ds), "setup_s": setup_s, "first_batch_s": first_s, "first_batch": len(first),
            "images": n, "seconds": steady_s, "img_per_s": n / max(steady_s, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 batches of 8 (a smoke run)")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches after the first")
    p.add_argument("--images", type=int, default=10_000, help="synthetic images for the label memory figure")
    p.add_argument("--anns-per-image", type=float, default=7.3, help="mean instances per image (COCO: 7.3)")
    p.add_argument("--points", type=int, default=24, help="polygon vertices per instance")
    p.add_argument("--captions", type=int, default=5, help="captions per image (COCO: 5)")
    p.add_argument("--labels-child", default=None, help=argparse.SUPPRESS)  # internal: the measuring process
    opt = p.parse_args(argv)
    if opt.labels_child is not None:
        _labels_child(opt.labels_child)
        return
    if opt.quick:
        opt.batches, opt.batch_size = 4, 8
    import torch

    torch.set_num_threads(1)  # the workers do the work; as in the tests, no intra-op threads to contend
    print(f"{os.cpu_count()} CPU cores, python {sys.version.split()[0]}, torch {torch.__version__}")

    m = label_memory(opt.images, opt.anns_per_image, opt.points, opt.captions)
    n = m["images"]
    mib = 1 << 20
    print(f"labels: {n} images, {m['annotations']} instances ({opt.points}-point polygons), {opt.captions} captions "
          f"each; JSON {m['json_bytes'] / mib:.1f} MiB, parsed in {m['parse_s']:.2f}s")
    print(f"labels: peak RSS +{m['peak_rss_growth'] / mib:.1f} MiB while parsing "
          f"({m['peak_rss_growth'] / n / 1024:.1f} KiB/image); held after: RSS +{m['rss_held'] / mib:.1f} MiB, "
          f"records {m['records_bytes'] / mib:.1f} MiB = {m['records_bytes'] / n:.0f} B/image "
          f"(label cache pickle {m['pickled'] / n:.0f} B/image)")

    r = loader_throughput(opt.data, opt.img, opt.batch_size, opt.workers, opt.batches)
    print(f"loader: {opt.data} train ({r['dataset_images']} images, labels read in {r['setup_s']:.2f}s), "
          f"{opt.img} px, mosaic on every image, batch {opt.batch_size}, {opt.workers} workers")
    print(f"loader: first batch {r['first_batch_s']:.2f}s (worker start); then {r['images']} images in "
          f"{r['seconds']:.2f}s = {r['img_per_s']:.1f} img/s")


if __name__ == "__main__":
    main()
