"""COCO-layout dataset: records -> ``Sample`` -> task-aware augmentation -> tensors -> ``Batch``."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

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
from utils.ops.letterbox import Letterbox
from utils.tasks import IGNORE_INDEX, TASKS

# OpenCV's own thread pool is not fork-safe, and DataLoader workers are forked: the workers are the
# parallelism here, as in YOLOv5 (the hang actually seen had another cause: see RunLogger._background)
cv2.setNumThreads(0)


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
        for split in splits:
            for rec in load_split(split, data.category_ids, self.report, use_cache, data.semantic_ids):
                self.items.append((split, rec))
        if not self.items:
            raise ValueError(f"no usable images in {[str(s.images) for s in splits]} ({self.report.summary()})")
        self.read_failures: list[str] = []

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

    def load(self, index: int) -> Sample | None:
        """Reads image ``index`` with its labels at original size; ``None`` if the image is unreadable."""
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
                image, (h, w) = rotated, rotated.shape[:2]
        boxes, segments = rec.boxes.copy(), [[p.copy() for p in s] for s in rec.segments]
        if rec.width and (rec.width, rec.height) != (w, h):  # JSON size disagrees (e.g. EXIF rotation): rescale
            sx, sy = w / rec.width, h / rec.height
            boxes *= np.array([sx, sy, sx, sy], np.float32)
            segments = [[p * np.array([sx, sy], np.float32) for p in s] for s in segments]
        semantic = None
        if split.semantic is not None:
            semantic = self._load_semantic(split, rec, (h, w))
        present = {"det": split.instances is not None, "inst": split.instances is not None,
                   "sem": semantic is not None, "cap": bool(rec.captions)}
        return Sample(image=image, boxes=boxes, classes=rec.classes.copy(), segments=segments, semantic=semantic,
                      captions=list(rec.captions), image_id=rec.image_id, path=str(path), orig_shape=(h, w),
                      present=present)

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
        hyp, size = self.hyp, self.img_size
        index, sample = self.load_valid(index)
        if not self.augment:
            return A.letterbox(sample, size)
        rng = self.rng(index)
        if sample.present.get("cap") and rng.random() < self.caption_view:
            sample, _ = A.letterbox(A.load_resized(sample, size), size)
            A.augment_hsv(sample.image, rng, hyp.get("hsv_h", 0.015), hyp.get("hsv_s", 0.7), hyp.get("hsv_v", 0.4))
            return sample, Letterbox.identity(sample.image.shape[:2])
        persp = dict(degrees=hyp.get("degrees", 0.0), translate=hyp.get("translate", 0.1),
                     scale=hyp.get("scale", 0.5), shear=hyp.get("shear", 0.0), perspective=hyp.get("perspective", 0.0))
        # the draw is made even with mosaic off, so the rest of the item's draws match hyp mosaic: 0 exactly
        if rng.random() < (hyp.get("mosaic", 1.0) if self.mosaic else 0.0):
            others = [self.load_valid(int(j))[1] for j in rng.integers(0, len(self), 3)]
            tiles = [A.load_resized(s, size) for s in [sample] + others]
            sample = A.mosaic4(tiles, size, rng)
            sample = A.random_perspective(sample, rng, border=(-size // 2, -size // 2), **persp)
        else:
            sample, _ = A.letterbox(A.load_resized(sample, size), size)
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
        return self._load_semantic(split, rec, shape) if split.semantic is not None else None


def collate(items: list[dict]) -> Batch:
    """Stacks items into a :class:`Batch`."""
    targets, segments, sems = [], [], []
    for i, it in enumerate(items):
        s: Sample = it["sample"]
        if len(s):
            t = np.concatenate([np.full((len(s), 1), i, np.float32), s.classes[:, None].astype(np.float32),
                                s.boxes.astype(np.float32)], 1)
            targets.append(torch.from_numpy(t))
            segments.extend(s.segments if s.segments else [[] for _ in range(len(s))])
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
