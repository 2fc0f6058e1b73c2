"""The data yaml convention, identical for the embedded dataset and real COCO.

```yaml
path: ../datasets/coco                  # root; relative paths below are under it
train:                                  # one split, or a list of splits
  images: images/train2017
  instances: annotations/instances_train2017.json
  semantic: stuffthingmaps_trainval2017/train2017
  captions: annotations/captions_train2017.json
  panoptic: annotations/panoptic_train2017.json  # its PNGs in annotations/panoptic_train2017/, as COCO ships
val: {images: images/val2017, instances: ..., semantic: ..., captions: ..., panoptic: ...}
semantic_categories: annotations/stuff_val2017.json   # stuff categories, merged by id with the things
```
COCO-Stuff's category 183 'other' is dropped from the semantic classes: its maps never hold it (value 182).
A missing task key means the split has no labels of that task (panoptic ground truth without ``panoptic`` is
derived from ``instances`` + ``semantic`` when the split has both: :mod:`utils.data.panoptic`). Class names come from the JSON categories;
contiguous indices are used inside the model, original category ids in everything written out.

A data yaml with ``names`` is Ultralytics' (YOLO format): its ``train`` / ``val`` / ``test`` strings are image
folders or ``.txt`` lists of images (or lists of those), each image's labels in the ``.txt`` the ``/images/`` ->
``/labels/`` rule names (:func:`yolo_label_path`), read by :mod:`utils.data.yolo`; class ``i`` is category
id ``i + 1``. Mappings in the same list are COCO splits as above, so one run can mix both.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from utils.data.synthetic import generate
from utils.tasks import IGNORE_INDEX, TASKS

ROOT = Path(__file__).resolve().parents[2]
DATA_KEYS = {"path", "train", "val", "test", "semantic_categories", "synthetic", "download", "names", "nc"}
SPLIT_KEYS = {"images", "instances", "semantic", "captions", "panoptic"}
# COCO-Stuff lists category 183 'other' in stuff_*.json, where it marks the thing pixels of the stuff-only
# annotations; its stuffthingmaps never hold 'other' (value 182): those pixels carry their thing's id, or
# 255 (unlabeled). As a class it would never see a pixel, so COCO's semantic head has 80 + 91 = 171 classes.
COCO_STUFF_OTHER = (183, "other")


class DataError(ValueError):
    """A data yaml or annotation file that cannot be used; the message names the file."""


@dataclass
class SplitSpec:
    """The files of one split; ``None`` for a task this split has no labels for."""

    images: Path
    instances: Path | None = None
    semantic: Path | None = None
    captions: Path | None = None
    panoptic: Path | None = None  # COCO panoptic JSON; the PNG folder is beside it, named as the JSON's stem
    # a YOLO-format split (``images`` a folder or a .txt list of images): the tasks its label files supply
    # (det, and inst when a line is a polygon); None for a COCO split
    yolo: tuple[str, ...] | None = None

    @property
    def panoptic_pngs(self) -> Path | None:
        """The folder of the panoptic PNGs: ``annotations/panoptic_val2017.json`` -> ``annotations/panoptic_val2017/``."""
        return self.panoptic.with_suffix("") if self.panoptic else None

    @property
    def has_panoptic(self) -> bool:
        """Panoptic ground truth exists: its own files, or instances + semantic maps to derive it from."""
        return bool(self.panoptic or (self.instances and self.semantic))

    @property
    def tasks(self) -> set[str]:
        t = set(self.yolo or ())
        if self.instances:
            t |= {"det", "inst"}
        if self.semantic:
            t.add("sem")
        if self.captions:
            t.add("cap")
        return t


@dataclass
class DataConfig:
    """A parsed data yaml: splits, thing classes and semantic classes with their original ids."""

    file: Path
    root: Path
    train: list[SplitSpec]
    val: list[SplitSpec]
    names: list[str]                   # thing class names, contiguous index order
    category_ids: list[int]            # contiguous index -> original COCO category id
    semantic_names: list[str] = field(default_factory=list)
    semantic_ids: list[int] = field(default_factory=list)   # semantic index -> original category id
    synthetic: dict | None = None
    test: list[SplitSpec] = field(default_factory=list)
    # the category ids the label files are read with (``category_ids`` unless ``single_cls`` collapsed them)
    label_ids: list[int] = field(default_factory=list)
    single_cls: bool = False

    def __post_init__(self) -> None:
        self.label_ids = self.label_ids or list(self.category_ids)

    @property
    def nc(self) -> int:
        return len(self.names)

    def single_class(self) -> DataConfig:
        """train.py's ``--single-cls`` (YOLOv5's): every object class becomes one class named 'item' with
        category id 1 (a one-class dataset keeps its name and id). Labels are still read with the original
        ids (``label_ids``); the datasets collapse their classes to 0 and the evaluation its ground truth."""
        if self.nc == 0 or self.single_cls:
            return self
        one = self.nc == 1
        return dataclasses.replace(self, names=self.names if one else ["item"],
                                   category_ids=self.category_ids if one else [1], single_cls=True)

    @property
    def tasks(self) -> list[str]:
        """Tasks every training split can supply labels for at least partly, canonical order."""
        have = set().union(*(s.tasks for s in self.train))
        return [t for t in TASKS if t in have]

    def semantic_lut(self) -> np.ndarray:
        """256-entry table: PNG value (category_id - 1) -> semantic index, IGNORE_INDEX if unknown."""
        return semantic_lut(self.semantic_ids)

    def to_meta(self) -> dict:
        """Plain metadata stored in checkpoints (so test/detect need not re-read the JSON)."""
        return {"names": self.names, "category_ids": self.category_ids,
                "semantic_names": self.semantic_names, "semantic_ids": self.semantic_ids}


def semantic_lut(semantic_ids: list[int]) -> np.ndarray:
    """256-entry table: PNG value (category_id - 1) -> index in ``semantic_ids``, IGNORE_INDEX if unknown."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for idx, cid in enumerate(semantic_ids):
        if 0 <= cid - 1 < 255:
            lut[cid - 1] = idx
    return lut


def resolve_root(path_value: str | None, yaml_file: Path) -> Path:
    """A relative ``path`` is tried against the cwd, the yaml's folder and the repo root, first that exists.

    If none exists yet (a dataset still to be generated), it is placed relative to the repo root, as in
    YOLOv5, so ``../datasets/x`` lands beside the repository.
    """
    p = Path(path_value or ".").expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), yaml_file.parent, ROOT):
        if (base / p).exists():
            return (base / p).resolve()
    return (ROOT / p).resolve()


def find_data_yaml(data: str | Path) -> Path:
    p = Path(data)
    for cand in (p, ROOT / "data" / p.name, ROOT / p):
        if cand.is_file():
            return cand
    raise DataError(f"data yaml not found: {data}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def yolo_images(source: Path) -> list[Path]:
    """The images of a YOLO-format source, sorted: a folder's (recursively), or the lines of a ``.txt`` list
    (a relative line, ``./images/x.jpg`` as Ultralytics writes them, is under the list's folder)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    try:
        lines = source.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{source}: not a readable list of images: {e}") from None
    return [p if p.is_absolute() else source.parent / p for p in (Path(x.strip()) for x in lines if x.strip())]


def yolo_label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` of the image's path becomes ``/labels/``, the suffix ``.txt``."""
    head, sep, tail = str(image).rpartition("/images/")
    return Path(head + "/labels/" + tail if sep else str(image)).with_suffix(".txt")


def yolo_tasks(source: Path) -> tuple[str, ...]:
    """The tasks a YOLO source's label files supply: det, and inst as soon as one line is a polygon (more
    than 5 values; read only until the first is found)."""
    for image in yolo_images(source):
        try:
            text = yolo_label_path(image).read_text(errors="replace")
        except OSError:
            continue
        if any(len(line.split()) > 5 for line in text.splitlines()):
            return ("det", "inst")
    return ("det",)


def _split(value, root: Path, where: str, yolo: bool = False) -> list[SplitSpec]:
    items = value if isinstance(value, list) else [value]
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str) and yolo:  # Ultralytics': an image folder or list, labels beside
            source = root / item
            if not source.exists():
                raise DataError(f"{where}[{k}]: {source} not found")
            out.append(SplitSpec(images=source, yolo=yolo_tasks(source)))
            continue
        if isinstance(item, str):  # a bare images folder: no labels of any task
            item = {"images": item}
        if not isinstance(item, dict):
            raise DataError(f"{where}[{k}]: expected a mapping of {sorted(SPLIT_KEYS)}, got {item!r}")
        unknown = set(item) - SPLIT_KEYS
        if unknown:
            raise DataError(f"{where}[{k}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPLIT_KEYS)}")
        if "images" not in item:
            raise DataError(f"{where}[{k}]: 'images' is required")
        spec = SplitSpec(**{key: (root / str(v)) if v else None for key, v in item.items()})
        out.append(spec)
    return out


def read_json(json_file: Path) -> tuple[Any, bool]:
    """Parses a JSON file; returns ``(value, repaired)``.

    Bytes that are not valid in the file's encoding are replaced by U+FFFD (``repaired`` is then True)
    instead of failing: one bad byte in a caption must not stop a run on a 100k-image file, and the
    caller can find and count the affected strings. Malformed JSON is a :class:`DataError` naming the file,
    line and column.
    """
    try:
        with open(json_file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{json_file}: cannot read: {e}") from None
    encoding = json.detect_encoding(raw)  # what json.load(bytes) would use (utf-8, utf-8-sig, utf-16/32)
    repaired = False
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        text, repaired = raw.decode(encoding, errors="replace"), True
    del raw  # a COCO train JSON is ~450 MB: don't hold the bytes and the text while parsing
    try:
        return json.loads(text), repaired
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except RecursionError:
        raise DataError(f"{json_file}: malformed JSON (nested too deeply)") from None


def read_categories(json_file: Path) -> list[dict]:
    """The ``categories`` list of a COCO JSON, read without pycocotools (it may be a huge file)."""
    d, _ = read_json(json_file)
    cats = d.get("categories") if isinstance(d, dict) else None
    if not isinstance(cats, list):
        raise DataError(f"{json_file}: no 'categories' list")
    try:
        return sorted(cats, key=lambda c: int(c["id"]))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{json_file}: a category without an integer 'id'") from None


def load_data_config(data: str | Path, ensure: bool = True) -> DataConfig:
    """Reads a data yaml. With ``ensure``, a missing synthetic dataset is generated first."""
    file = find_data_yaml(data)
    try:
        d = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{file}: expected a mapping at the top level")
    unknown = set(d) - DATA_KEYS
    if unknown:
        raise DataError(f"{file}: unknown key(s) {sorted(unknown)}; allowed: {sorted(DATA_KEYS)}")
    for key in ("train", "val"):
        if key not in d:
            raise DataError(f"{file}: '{key}' is required")
    root = resolve_root(d.get("path"), file)
    yolo_names = _yolo_names(d, file) if "names" in d else None
    yolo = yolo_names is not None
    train, val = (_split(d[k], root, f"{file}: {k}", yolo) for k in ("train", "val"))
    test = _split(d["test"], root, f"{file}: test", yolo) if d.get("test") else []
    synthetic = d.get("synthetic")
    if ensure and synthetic is not None:
        ensure_synthetic(root, synthetic, train + val)
    elif ensure:
        missing = [str(s.images) for s in train + val + test if not s.images.exists()]
        if missing:
            hint = f" (download with: {d['download']})" if d.get("download") else ""
            raise DataError(f"{file}: image folder(s) not found: {missing}{hint}")
    inst_files = [s.instances for s in train + val if s.instances]
    thing_cats = read_categories(inst_files[0]) if inst_files else []
    if yolo_names is not None:
        if thing_cats and len(thing_cats) != len(yolo_names):
            raise DataError(f"{file}: 'names' lists {len(yolo_names)} classes, {inst_files[0]} {len(thing_cats)}")
        # YOLO class i is category id i + 1, unless a COCO split's JSON beside it gives the ids
        ids = [int(c["id"]) for c in thing_cats] or list(range(1, len(yolo_names) + 1))
        thing_cats = [{"id": i, "name": n} for i, n in zip(ids, yolo_names)]
    names = [str(c.get("name", c["id"])) for c in thing_cats]  # a nameless category is named by its id
    ids = [int(c["id"]) for c in thing_cats]
    sem_cats = dict(zip(ids, names))
    if d.get("semantic_categories"):
        for c in read_categories(root / d["semantic_categories"]):
            cid, name = int(c["id"]), str(c.get("name", c["id"]))
            if (cid, name) != COCO_STUFF_OTHER:  # a dead class: see COCO_STUFF_OTHER
                sem_cats.setdefault(cid, name)
    has_sem = any(s.semantic for s in train + val)
    sem_ids = sorted(sem_cats) if has_sem else []
    return DataConfig(file=file, root=root, train=train, val=val, names=names, category_ids=ids,
                      semantic_names=[sem_cats[i] for i in sem_ids], semantic_ids=sem_ids, synthetic=synthetic,
                      test=test)


def _yolo_names(d: dict, file: Path) -> list[str]:
    """Ultralytics' ``names``: a list, or a mapping ``{0: person, 1: bicycle, ...}`` with keys 0..n-1 (``nc``,
    when given, must agree)."""
    names = d["names"]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{file}: 'names' keys must be class indices 0..n-1") from None
        if keys != list(range(len(keys))):
            raise DataError(f"{file}: 'names' keys must be 0..{len(keys) - 1} without gaps, got {keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list) or not names:
        raise DataError(f"{file}: 'names' must be a non-empty list or mapping of class names")
    if "nc" in d and d["nc"] != len(names):
        raise DataError(f"{file}: nc {d['nc']} but {len(names)} names")
    return [str(n) for n in names]


def ensure_synthetic(root: Path, spec: dict, splits: list[SplitSpec]) -> None:
    """Generates the embedded dataset into ``root`` if any of its files are missing."""
    def complete(s: SplitSpec) -> bool:
        files = [s.images] + [p for p in (s.instances, s.semantic, s.captions, s.panoptic, s.panoptic_pngs) if p]
        return all(p.exists() for p in files)

    if all(complete(s) for s in splits):
        return

    sizes = {k: int(v) for k, v in spec.get("splits", {}).items()}
    print(f"Generating the synthetic dataset {sizes} in {root} (first use) ...")
    generate(root, splits=sizes, img_size=int(spec.get("img_size", 320)), seed=int(spec.get("seed", 0)))
