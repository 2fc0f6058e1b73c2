"""COCO-layout and YOLO-format dataset: records -> ``Sample`` -> task-aware augmentation -> tensors -> ``Batch``."""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from tqdm import tqdm

from utils.data import augment as A
from utils.data.coco import (
    ImageRecord,
    LabelReport,
    load_split,
    read_semantic_map,
    semantic_path,
)
from utils.data.config import DataConfig, SplitSpec
from utils.data.sample import Sample
from utils.data.yolo import load_yolo_split
from utils.ops.letterbox import Letterbox
from utils.tasks import IGNORE_INDEX, TASKS

# OpenCV's own thread pool is not fork-safe, and DataLoader workers are forked: the workers are the
# parallelism here, as in YOLOv5 (the hang actually seen had another cause: see RunLogger._background)
cv2.setNumThreads(0)

CACHE_MODES = ("ram", "disk")  # train.py --cache
RAM_CACHE_FRACTION = 0.5  # --cache ram caches only when the images take at most this share of the available RAM


def available_memory() -> int:
    """Bytes of RAM available to new allocations: psutil's figure when installed, else Linux's MemAvailable,
    else the free pages (``os.sysconf``, which leaves out the reclaimable page cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class Batch:
    """A collated batch. Boxes are in pixels of ``images``; ``letterboxes`` map them back to originals.

    Attributes:
        images: ``(B, 3, H, W)`` uint8 RGB (converted to float on the device, which is cheaper to move).
        targets: ``(M, 6)`` float ``[image index, class, x1, y1, x2, y2]``.
        segments: per target, its polygons in pixels of ``images`` (for instance masks).
        semantic: ``(B, H, W)`` uint8 semantic indices (``IGNORE_INDEX`` = none), or ``None``.
        captions: per image, its reference captions.
        present: ``(B, 4)`` bool, per image and task (``TASKS`` order) whether labels exist.
        letterboxes: per image, how its original became the input (identity for augmented training images).
    """

    images: torch.Tensor
    targets: torch.Tensor
    segments: list[list[np.ndarray]]
    semantic: torch.Tensor | None
    captions: list[list[str]]
    present: torch.Tensor
    image_ids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    letterboxes: list[Letterbox] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def orig_shapes(self) -> list[tuple[int, int]]:
        """Per image, the ``(h, w)`` of its original (from its :class:`Letterbox`)."""
        return [lb.orig_shape for lb in self.letterboxes]

    def task_present(self, task: str) -> torch.Tensor:
        return self.present[:, TASKS.index(task)]


class CocoDataset(Dataset):
    """Images and labels of one or more COCO-layout splits.

    Args:
        data: the parsed data yaml.
        splits: which splits (``data.train`` or ``data.val``).
        img_size: square network input size.
        augment: training augmentation (mosaic, perspective, HSV, flips) from ``hyp``.
        hyp: hyperparameters (augmentation gains).
        seed: base seed; each item's augmentation draws from ``(seed, epoch, index)`` so runs and resumed
            runs see the same augmentation regardless of worker count.
        caption_view: fraction of captioned training images given the weak, caption-safe view.

    Attributes set per epoch by the trainer, before it iterates the loader (its workers are forked at each
    epoch, ``persistent_workers=False``, so they see the values of that epoch): ``epoch``, and ``mosaic``
    (False: no item is a mosaic, as with ``hyp mosaic: 0``; train.py's ``--close-mosaic N``).

    :meth:`cache_images` (train.py's ``--cache ram|disk``) keeps the decoded images from being read again.
    """

    def __init__(self, data: DataConfig, splits: list[SplitSpec], img_size: int = 640, augment: bool = False,
                 hyp: dict | None = None, seed: int = 0, use_cache: bool = True, caption_view: float = 0.0):
        self.img_size, self.augment, self.hyp, self.seed = img_size, augment, hyp or {}, seed
        self.caption_view = caption_view
        self.epoch = 0
        self.mosaic = True
        self.report = LabelReport()
        self.lut = data.semantic_lut()
        self.semantic_ids, self.semantic_names = list(data.semantic_ids), list(data.semantic_names)
        self.items: list[tuple[SplitSpec, ImageRecord]] = []
        # --single-cls: the ground truth's one category id (evaluation collapses its classes too)
        self.single_class_id = data.category_ids[0] if data.single_cls else None
        for split in splits:
            read = load_yolo_split if split.yolo else load_split
            for rec in read(split, data.label_ids, self.report, use_cache, data.semantic_ids):
                if data.single_cls:
                    rec.classes = np.zeros_like(rec.classes)
                self.items.append((split, rec))
        if not self.items:
            raise ValueError(f"no usable images in {[str(s.images) for s in splits]} ({self.report.summary()})")
        self.read_failures: list[str] = []
        # --rect (rect()): per run of `rect_batch` items, the (h, w) input shape their batch is letterboxed to
        self.batch_shapes: np.ndarray | None = None
        self.rect_batch = 0
        self.cache: str | None = None  # "ram" or "disk" once cache_images() has run
        # --cache ram: per item, (image, semantic map) as load() reads them (None: unreadable / no map)
        self._ram: list[tuple[np.ndarray | None, np.ndarray | None]] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def labels_summary(self) -> str:
        return self.report.summary()

    def absent_semantic_classes(self) -> list[str]:
        """Names of the semantic classes with no pixel in any of this dataset's maps (from the label cache).

        Empty when no split has semantic maps: then no class is expected anywhere.
        """
        present = np.zeros(256, bool)
        scanned = False
        for split, rec in self.items:
            if split.semantic is not None:
                scanned = True
                if rec.semantic_values is not None:
                    present[rec.semantic_values] = True
        if not scanned:
            return []
        return [name for cid, name in zip(self.semantic_ids, self.semantic_names)
                if not (0 <= cid - 1 < IGNORE_INDEX and present[cid - 1])]

    def warn_absent_semantic_classes(self) -> list[str]:
        """Warns once, naming them, about training classes no map has a pixel of; returns their names.

        Such a class can only learn to be absent (a category listed in the JSON but never drawn, or a map
        convention that writes it as 255); the run goes on, as the class may be wanted for other data.
        """
        absent = self.absent_semantic_classes()
        if absent:
            shown = ", ".join(absent[:10]) + (f", ... (+{len(absent) - 10})" if len(absent) > 10 else "")
            warnings.warn(f"{len(absent)} of {len(self.semantic_ids)} semantic classes have no pixel in any "
                          f"training map: {shown}", stacklevel=2)
        return absent

    def rect(self, batch_size: int, stride: int, pad: float) -> None:
        """YOLOv5's rectangular batches (``--rect``): the items sorted by aspect ratio (h / w, from the labels'
        image sizes), and each run of ``batch_size`` of them letterboxed to one shape, the smallest that holds
        the run's ratios: ``ceil(shape * img_size / stride + pad) * stride`` (YOLOv5 pads 0.5 for validation,
        0 for training). The loader must then draw items in order (no shuffle), in batches of ``batch_size``
        or a divisor of it. Masks, maps and boxes map back through each image's ``Letterbox`` as before.
        """
        hw = np.array([(rec.height or 1, rec.width or 1) for _, rec in self.items], np.float64)
        order = np.argsort(hw[:, 0] / hw[:, 1], kind="stable")
        self.items = [self.items[i] for i in order]
        if self._ram is not None:
            self._ram = [self._ram[i] for i in order]
        ratios = (hw[:, 0] / hw[:, 1])[order]
        shapes = []
        for start in range(0, len(ratios), batch_size):
            lo, hi = ratios[start:start + batch_size].min(), ratios[start:start + batch_size].max()
            shapes.append([hi, 1.0] if hi < 1 else [1.0, 1.0 / lo] if lo > 1 else [1.0, 1.0])
        self.batch_shapes = np.ceil(np.array(shapes) * self.img_size / stride + pad).astype(int) * stride
        self.rect_batch = batch_size

    def input_shape(self, index: int) -> int | tuple[int, int]:
        """The network input item ``index`` is letterboxed to: ``img_size`` square, or its ``--rect`` batch's."""
        if self.batch_shapes is None:
            return self.img_size
        h, w = self.batch_shapes[index // self.rect_batch]
        return int(h), int(w)

    def load(self, index: int) -> Sample | None:
        """Reads image ``index`` with its labels at original size; ``None`` if the image is unreadable."""
        split, rec = self.items[index]
        path = split.images / rec.file
        semantic = None
        if self._ram is not None:  # copies: augmentation may edit its input in place (augment_hsv)
            image, semantic = (None if a is None else a.copy() for a in self._ram[index])
        else:
            image = self._read_image(index)
        if image is None:
            return None
        h, w = image.shape[:2]
        boxes, segments = rec.boxes.copy(), [[p.copy() for p in s] for s in rec.segments]
        if rec.width and (rec.width, rec.height) != (w, h):  # JSON size disagrees (e.g. EXIF rotation): rescale
            sx, sy = w / rec.width, h / rec.height
            boxes *= np.array([sx, sy, sx, sy], np.float32)
            segments = [[p * np.array([sx, sy], np.float32) for p in s] for s in segments]
        if split.semantic is not None and self._ram is None:
            semantic = self._load_semantic(split, rec, (h, w))
        tasks = split.tasks
        present = {"det": "det" in tasks, "inst": "inst" in tasks, "sem": semantic is not None, "cap": bool(rec.captions)}
        return Sample(image=image, boxes=boxes, classes=rec.classes.copy(), segments=segments, semantic=semantic,
                      captions=list(rec.captions), image_id=rec.image_id, path=str(path), orig_shape=(h, w),
                      present=present)

    def decode(self, index: int) -> np.ndarray | None:
        """Image ``index`` decoded from its file, as 8-bit BGR; ``None`` if it cannot be read."""
        split, rec = self.items[index]
        path = split.images / rec.file
        # grey/RGBA/16-bit all become 8-bit BGR. The EXIF orientation is ignored: COCO's width/height and
        # boxes describe the stored pixels (OpenCV would rotate them away from their labels).
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            return None
        h, w = image.shape[:2]
        if rec.width and (w, h) != (rec.width, rec.height) and (h, w) == (rec.width, rec.height):
            rotated = cv2.imread(str(path), cv2.IMREAD_COLOR)  # the JSON describes the EXIF-rotated image
            if rotated is not None and rotated.shape[:2] == (rec.height, rec.width):
                image = rotated
        return image

    def _read_image(self, index: int) -> np.ndarray | None:
        """Image ``index``: its ``--cache disk`` .npy when there is one, else decoded from its file."""
        if self.cache == "disk":
            npy = self.npy_path(index)
            if npy.is_file():
                try:
                    return np.load(npy)
                except (OSError, ValueError):  # a damaged cache file: the image itself is still there
                    pass
        return self.decode(index)

    def npy_path(self, index: int) -> Path:
        """Where ``--cache disk`` keeps image ``index``: ``<images dir>_npy/<file>.npy``, beside the images
        folder (``images/train2017`` -> ``images/train2017_npy``)."""
        split, rec = self.items[index]
        return split.images.with_name(split.images.name + "_npy") / Path(rec.file).with_suffix(".npy")

    def cache_bytes(self) -> int:
        """RAM that ``--cache ram`` would take: every image (3 bytes a pixel) and semantic map (1), at the
        sizes the labels give."""
        return sum(rec.width * rec.height * (3 + (split.semantic is not None)) for split, rec in self.items)

    def cache_images(self, mode: str | None, prefix: str = "", progress: bool = False) -> str:
        """YOLOv5's ``--cache``: ``"ram"`` decodes every image (and semantic map) once, now, and keeps it in
        memory; ``"disk"`` writes each decoded image once as a .npy (:meth:`npy_path`; rewritten when the image
        is newer) that later reads ``np.load``. ``None``/``""``: nothing. Returns the line to log.

        Called in the main process before the DataLoader is built: its forked workers then share the RAM
        cache (a cache filled inside non-persistent workers would be lost at every epoch). ``"ram"`` falls
        back to no cache, with a warning, when the images would take over ``RAM_CACHE_FRACTION`` of the
        available memory. An unreadable image is cached as unreadable: loading still skips and counts it.
        """
        if not mode:
            return ""
        if mode not in CACHE_MODES:
            raise ValueError(f"--cache {mode!r}: expected one of {CACHE_MODES}")
        n = len(self)
        threads = min(8, max(1, (os.cpu_count() or 1) - 1))
        if mode == "ram":
            need, avail = self.cache_bytes(), available_memory()
            if need > RAM_CACHE_FRACTION * avail:
                msg = (f"{prefix}--cache ram needs {need / 1e9:.1f}GB, over {RAM_CACHE_FRACTION:.0%} of the "
                       f"{avail / 1e9:.1f}GB available: images not cached")
                warnings.warn(msg, stacklevel=2)
                return msg
            with ThreadPool(threads) as pool:  # imap keeps the order
                entries = list(tqdm(pool.imap(self._read_entry, range(n)), total=n, disable=not progress,
                                    desc=f"{prefix}caching images"))
            self._ram, self.cache = entries, "ram"
            size = sum(a.nbytes for e in entries for a in e if a is not None)
            return f"{prefix}cached {n} images in RAM ({size / 1e9:.2f}GB)"
        with ThreadPool(threads) as pool:
            bar = tqdm(pool.imap(self._write_npy, range(n)), total=n, disable=not progress,
                       desc=f"{prefix}caching images to disk")
            written = sum(bar)
        self.cache = "disk"
        size = sum(f.stat().st_size for f in (self.npy_path(i) for i in range(n)) if f.is_file())
        return (f"{prefix}cached {n} images on disk ({size / 1e9:.2f}GB, {written} written now) in "
                f"{self.npy_path(0).parent}")

    def _read_entry(self, index: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What ``--cache ram`` keeps of item ``index``: its image and semantic map, as :meth:`load` reads them."""
        image = self.decode(index)
        split, rec = self.items[index]
        if image is None or split.semantic is None:
            return image, None
        return image, self._load_semantic(split, rec, image.shape[:2])

    def _write_npy(self, index: int) -> bool:
        """Writes item ``index``'s .npy unless an up-to-date one exists; whether it wrote one."""
        split, rec = self.items[index]
        npy, src = self.npy_path(index), split.images / rec.file
        try:
            if npy.is_file() and npy.stat().st_mtime >= src.stat().st_mtime:
                return False
        except OSError:  # the image is gone: nothing to cache (loading counts it)
            return False
        image = self.decode(index)
        if image is None:
            return False
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f"{npy.stem}.{os.getpid()}.tmp.npy")  # atomic: a reader never sees half a file
        np.save(tmp, image)
        tmp.replace(npy)
        return True

    def _load_semantic(self, split: SplitSpec, rec: ImageRecord, shape: tuple[int, int]) -> np.ndarray | None:
        m = read_semantic_map(semantic_path(split, rec))
        if m is None:
            return None  # no map for this image: semantic labels absent, not an error
        if m.shape != shape:  # repaired, never silently misaligned: nearest keeps ids valid
            m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return self.lut[m]

    def load_valid(self, index: int) -> tuple[int, Sample]:
        """Like :meth:`load`, but an unreadable image is counted and the next readable one used."""
        for k in range(len(self)):
            j = (index + k) % len(self)
            sample = self.load(j)
            if sample is not None:
                return j, sample
            name = str(self.items[j][0].images / self.items[j][1].file)
            if name not in self.read_failures:
                self.read_failures.append(name)
                warnings.warn(f"unreadable image skipped: {name}", stacklevel=2)
        raise RuntimeError("no readable image in the dataset")

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def transform(self, index: int) -> tuple[Sample, Letterbox]:
        """The network-input version of item ``index``: augmented in training, letterboxed always.

        Task-aware augmentation: with probability ``caption_view`` a training image with captions gets the
        weak view (letterbox + colour, every task's labels kept); otherwise the strong view (mosaic,
        perspective, flips) with its captions dropped, because a caption says "left"/"right" and describes
        one whole image, so it is false after a flip or inside a mosaic. With ``mosaic`` False the strong
        view is never a mosaic (letterbox, perspective, flips).
        """
        hyp, size, shape = self.hyp, self.img_size, self.input_shape(index)
        index, sample = self.load_valid(index)
        if not self.augment:
            # --rect: padding only, the image at its square-validation scale (see letterbox_image's long_side)
            return A.letterbox(sample, shape, long_side=None if self.batch_shapes is None else size)
        rng = self.rng(index)
        if sample.present.get("cap") and rng.random() < self.caption_view:
            sample, _ = A.letterbox(A.load_resized(sample, size), shape)
            A.augment_hsv(sample.image, rng, hyp.get("hsv_h", 0.015), hyp.get("hsv_s", 0.7), hyp.get("hsv_v", 0.4))
            return sample, Letterbox.identity(sample.image.shape[:2])
        persp = dict(degrees=hyp.get("degrees", 0.0), translate=hyp.get("translate", 0.1),
                     scale=hyp.get("scale", 0.5), shear=hyp.get("shear", 0.0), perspective=hyp.get("perspective", 0.0))
        # the draw is made even with mosaic off, so the rest of the item's draws match hyp mosaic: 0 exactly
        # no mosaic in --rect batches (a mosaic is square), as YOLOv5
        if rng.random() < (hyp.get("mosaic", 1.0) if self.mosaic and self.batch_shapes is None else 0.0):
            others = [self.load_valid(int(j))[1] for j in rng.integers(0, len(self), 3)]
            tiles = [A.load_resized(s, size) for s in [sample] + others]
            sample = A.mosaic4(tiles, size, rng)
            sample = A.random_perspective(sample, rng, border=(-size // 2, -size // 2), **persp)
        else:
            sample, _ = A.letterbox(A.load_resized(sample, size), shape)
            sample = A.random_perspective(sample, rng, **persp)
        A.augment_hsv(sample.image, rng, hyp.get("hsv_h", 0.015), hyp.get("hsv_s", 0.7), hyp.get("hsv_v", 0.4))
        if rng.random() < hyp.get("flipud", 0.0):
            sample = A.vflip(sample)
        if rng.random() < hyp.get("fliplr", 0.5):
            sample = A.hflip(sample)
        sample.captions, sample.present = [], sample.present | {"cap": False}
        return sample, Letterbox.identity(sample.image.shape[:2])

    def __getitem__(self, index: int) -> dict:
        sample, lb = self.transform(index)
        image = torch.from_numpy(np.ascontiguousarray(sample.image[..., ::-1].transpose(2, 0, 1)))
        return {"image": image, "sample": sample, "letterbox": lb}

    def semantic_target(self, index: int, shape: tuple[int, int]) -> np.ndarray | None:
        """Item ``index``'s semantic map in semantic indices at the original image size ``shape`` (h, w),
        as :meth:`load` reads it; ``None`` without one. For scoring at original resolution."""
        split, rec = self.items[index]
        if split.semantic is None:
            return None
        if self._ram is not None:  # --cache ram: the cached map when it has that size
            image, semantic = self._ram[index]
            if image is not None and image.shape[:2] == tuple(shape):
                return None if semantic is None else semantic.copy()
        return self._load_semantic(split, rec, shape)


def collate(items: list[dict]) -> Batch:
    """Stacks items into a :class:`Batch`."""
    targets, segments, sems = [], [], []
    for i, it in enumerate(items):
        s: Sample = it["sample"]
        if len(s):
            t = np.concatenate([np.full((len(s), 1), i, np.float32), s.classes[:, None].astype(np.float32),
                                s.boxes.astype(np.float32)], 1)
            targets.append(torch.from_numpy(t))
            segments.extend(s.segments or [[] for _ in range(len(s))])
        sems.append(s.semantic)
    images = torch.stack([it["image"] for it in items])
    h, w = images.shape[2:]
    semantic = None
    if any(m is not None for m in sems):
        semantic = torch.stack([torch.from_numpy(m) if m is not None else torch.full((h, w), IGNORE_INDEX, dtype=torch.uint8)
                                for m in sems])
    samples = [it["sample"] for it in items]
    return Batch(
        images=images,
        targets=torch.cat(targets) if targets else torch.zeros((0, 6)),
        segments=segments,
        semantic=semantic,
        captions=[s.captions for s in samples],
        present=torch.tensor([[s.present.get(t, False) for t in TASKS] for s in samples], dtype=torch.bool),
        image_ids=[s.image_id for s in samples],
        paths=[s.path for s in samples],
        letterboxes=[it["letterbox"] for it in items],
    )


def multi_scale_shape(img_size: int, stride: int, shape: tuple[int, int], rng: np.random.Generator
                      ) -> tuple[int, int]:
    """YOLOv5's ``--multi-scale`` draw: a size in ``[0.5, 1.5] * img_size``, a multiple of ``stride`` (at least
    one stride), drawn uniformly from those multiples; ``shape`` (h, w) scaled so its long side is that size,
    each side rounded up to a multiple of ``stride`` (a square training batch simply becomes that size)."""
    lo = max(1, math.ceil(0.5 * img_size / stride))
    hi = max(lo, math.floor(1.5 * img_size / stride))
    size = int(rng.integers(lo, hi + 1)) * stride
    f = size / max(shape)
    return math.ceil(shape[0] * f / stride) * stride, math.ceil(shape[1] * f / stride) * stride


def rescale_batch(batch: Batch, shape: tuple[int, int]) -> Batch:
    """A training batch resized to ``shape`` (h, w): images bilinearly (uint8; ``align_corners=False``, the
    pixel-area convention of ``utils.data.augment``, in which the resize is exactly ``x -> x * W'/W``), the
    semantic maps by centre-aligned nearest neighbour (no new class value), boxes and polygons (pixels)
    scaled per axis, so their coordinates relative to the image are unchanged. The letterboxes become the
    identity of the new size, as every augmented training image's is. ``batch`` itself is not modified."""
    h, w = batch.images.shape[2:]
    nh, nw = int(shape[0]), int(shape[1])
    if (nh, nw) == (h, w):
        return batch
    sx, sy = nw / w, nh / h
    targets = batch.targets.clone()
    targets[:, 2:] *= torch.tensor([sx, sy, sx, sy], dtype=targets.dtype)
    scale = np.array([sx, sy], np.float32)
    semantic = batch.semantic
    if semantic is not None:
        semantic = F.interpolate(semantic[:, None], size=(nh, nw), mode="nearest-exact")[:, 0]
    return dataclasses.replace(
        batch, images=F.interpolate(batch.images, size=(nh, nw), mode="bilinear", align_corners=False),
        targets=targets, segments=[[p * scale for p in polys] for polys in batch.segments], semantic=semantic,
        letterboxes=[Letterbox.identity((nh, nw)) for _ in batch.letterboxes])


class SkipSampler(Sampler[int]):
    """Another sampler's indices minus the first ``skip`` of each pass.

    A run resumed mid-epoch sets ``skip`` to the images its checkpoint had already trained on: the wrapped
    sampler still draws the epoch's whole seeded permutation (indices only, no image is loaded), so the rest
    of the epoch comes in the uninterrupted order. Under a ``DistributedSampler`` each rank skips its own
    first ``skip`` indices, which together are the first ``skip * world`` of the shared permutation.
    """

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def set_epoch(self, epoch: int) -> None:
        """Forwards to a ``DistributedSampler`` (its permutation is seeded by ``seed + epoch``)."""
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


# Seconds a worker may take for one batch before the loader gives up: a hung worker (a deadlock inherited
# through fork, a dead network mount) then stops the run with a clear error instead of holding a GPU idle.
WORKER_TIMEOUT_S = 600.0


class LoaderStalledError(RuntimeError):
    """No batch arrived from the DataLoader workers within their timeout."""


def stall_guard(batches: Iterable) -> Iterator:
    """Yields from ``batches`` (a DataLoader); torch's ``DataLoader timed out`` becomes a
    :class:`LoaderStalledError` that says what to do."""
    try:
        yield from batches
    except RuntimeError as e:
        if "DataLoader timed out" not in str(e):
            raise
        timeout = getattr(batches, "timeout", 0)
        raise LoaderStalledError(f"no batch from the data loader workers for {timeout:.0f} s (a hung worker or "
                                 "unreachable storage); check the data, then continue with --resume "
                                 "(--save-period N keeps mid-epoch checkpoints)") from None


def create_dataloader(dataset: CocoDataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                      distributed: bool = False, timeout: float = WORKER_TIMEOUT_S) -> DataLoader:
    """A DataLoader with a seeded shuffle (a DistributedSampler under torchrun), through a ``SkipSampler``;
    with workers, a batch that takes over ``timeout`` seconds raises (see :func:`stall_guard`)."""
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        base: Sampler[int] = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    else:  # what DataLoader(shuffle=...) would build, with the same generator: the same order as before
        base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=SkipSampler(base),
                      num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      generator=generator, persistent_workers=False, drop_last=False,
                      timeout=timeout if workers > 0 else 0)


def dataset_wh(data: DataConfig, splits: str = "train") -> np.ndarray:
    """``(N, 2)`` sizes of every labelled box of a data yaml's splits, relative to its image's longer side
    (what ``utils.ops.anchors`` fits anchors to).

    Reads the label files only (no image is decoded), as the training dataset lists them.
    """
    ds = CocoDataset(data, getattr(data, splits), img_size=640, augment=False)
    out = [(rec.boxes[:, 2:4] - rec.boxes[:, :2]) / max(rec.width, rec.height)
           for _, rec in ds.items if len(rec.boxes) and max(rec.width, rec.height) > 0]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 2))
