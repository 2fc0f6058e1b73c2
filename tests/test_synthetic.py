"""Tests for the synthetic COCO-layout dataset generator (tiny splits, a few seconds in all)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pycocotools.coco import COCO

from utils.data.synthetic import (
    NUMBER_WORDS,
    PALETTE,
    POSITIONS,
    STUFF_CATEGORIES,
    THING_CATEGORIES,
    generate,
    write_data_yaml,
)

SPLITS = {"train2017": 6, "val2017": 4}
IMG_SIZE = 96
THING_NAME = {c["id"]: c["name"] for c in THING_CATEGORIES}
COLOURS = "|".join(PALETTE)
SHAPES = "|".join(THING_NAME.values())
COUNT = "a|an|" + "|".join(NUMBER_WORDS[1:6])


def _count_word(word: str) -> int:
    return 1 if word in ("a", "an") else NUMBER_WORDS.index(word)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("shapes"), SPLITS, img_size=IMG_SIZE, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sem(root: Path, split: str, img: dict) -> np.ndarray:
    return cv2.imread(str(root / "stuffthingmaps" / split / img["file_name"].replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)


def _shape_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """Nearest palette colour to the median of the shape's inner pixels (edges suffer from JPEG)."""
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
    pix = image[(inner if inner.any() else mask).astype(bool)]
    med = np.median(pix, axis=0)
    return min(PALETTE, key=lambda c: float(np.sum((med - np.array(PALETTE[c])) ** 2)))


def test_layout(root: Path) -> None:
    ids = []
    for split, n in SPLITS.items():
        for kind in ("instances", "captions", "stuff"):
            assert (root / "annotations" / f"{kind}_{split}.json").is_file()
        inst = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= set(inst)
        assert len(inst["images"]) == n
        on_disk = sorted(p.name for p in (root / "images" / split).iterdir())
        assert on_disk == sorted(i["file_name"] for i in inst["images"])
        for img in inst["images"]:
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"]) and int(img["file_name"][:12]) == img["id"]
            im = cv2.imread(str(root / "images" / split / img["file_name"]))
            assert im.shape == (img["height"], img["width"], 3)
            sem = _sem(root, split, img)
            assert sem.dtype == np.uint8 and sem.shape == (img["height"], img["width"])
            assert max(img["width"], img["height"]) == IMG_SIZE
            assert min(img["width"], img["height"]) >= 0.6 * IMG_SIZE - 1
            ids.append(img["id"])
    assert len(set(ids)) == len(ids), "image ids must be unique across splits"
    assert min(ids) > 1
    sizes = {cv2.imread(str(p)).shape[:2] for p in (root / "images").rglob("*.jpg")}
    assert len(sizes) > 1, "image sizes should vary"


def test_instances_load_and_categories(root: Path) -> None:
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    ids = sorted(coco.getCatIds())
    assert ids == sorted(c["id"] for c in THING_CATEGORIES)
    assert ids != list(range(1, len(ids) + 1)), "thing ids must be non-contiguous like COCO's"
    assert len(coco.getAnnIds()) >= len(coco.getImgIds())  # every image has at least one shape


@pytest.mark.parametrize("split", list(SPLITS))
def test_polygons_match_semantic_map(root: Path, split: str) -> None:
    coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    for img_id, img in coco.imgs.items():
        sem = _sem(root, split, img)
        union: dict[int, np.ndarray] = {}
        for ann in coco.imgToAnns[img_id]:
            assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1
            poly = np.array(ann["segmentation"][0], np.float64).reshape(-1, 2)
            x, y, w, h = ann["bbox"]
            # bbox tight around the polygon
            assert [x, y, x + w, y + h] == [*poly.min(0).tolist(), *poly.max(0).tolist()]
            # area is the polygon's area
            px, py = poly[:, 0], poly[:, 1]
            assert ann["area"] == pytest.approx(abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))) / 2)
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"]
            assert mask[y : y + h, x : x + w].sum() == mask.sum(), "mask outside its bbox"
            # pycocotools' rasterization of the polygon == the semantic map's pixels of the class
            sem_box = sem[y : y + h, x : x + w] == ann["category_id"] - 1
            inst_box = mask[y : y + h, x : x + w].astype(bool)
            assert np.all(sem_box[inst_box]), "instance pixels not labelled with its class"
            union.setdefault(ann["category_id"], np.zeros_like(mask, bool))
            assert not (union[ann["category_id"]] & mask.astype(bool)).any(), "instances overlap"
            union[ann["category_id"]] |= mask.astype(bool)
        for cat_id in THING_NAME:  # a class's map pixels are exactly the union of its instances
            expected = union.get(cat_id, np.zeros(sem.shape, bool))
            assert np.array_equal(sem == cat_id - 1, expected)


def test_semantic_values(root: Path) -> None:
    valid = {255} | {c["id"] - 1 for c in THING_CATEGORIES} | {c["id"] - 1 for c in STUFF_CATEGORIES}
    seen: set[int] = set()
    for p in (root / "stuffthingmaps").rglob("*.png"):
        seen |= set(np.unique(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)).tolist())
    assert seen <= valid
    assert 255 in seen and seen & {c["id"] - 1 for c in STUFF_CATEGORIES}


def test_stuff_json(root: Path) -> None:
    coco = COCO(str(root / "annotations" / "stuff_val2017.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert cats and all(92 <= c["id"] <= 182 for c in cats)
    assert {"grass", "sky-other"} <= {c["name"] for c in cats}
    for img_id, img in coco.imgs.items():
        sem = _sem(root, "val2017", img)
        anns = coco.imgToAnns[img_id]
        assert len(anns) >= 2  # an upper and a lower region
        for ann in anns:
            assert np.array_equal(coco.annToMask(ann).astype(bool), sem == ann["category_id"] - 1)


@pytest.mark.parametrize("split", list(SPLITS))
def test_captions_describe_image(root: Path, split: str) -> None:
    inst = COCO(str(root / "annotations" / f"instances_{split}.json"))
    caps = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    assert {i["id"] for i in caps["images"]} == set(inst.imgs)
    by_image: dict[int, list[str]] = {}
    for a in sorted(caps["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    for img_id, img in inst.imgs.items():
        captions = by_image[img_id]
        assert len(captions) == 5 and len(set(captions)) == 5
        image = cv2.imread(str(root / "images" / split / img["file_name"]))
        truth = []  # (colour from the pixels, shape name, third of the width)
        for ann in inst.imgToAnns[img_id]:
            x, _, w, _ = ann["bbox"]
            third = min(int((x + w / 2) * 3 / img["width"]), 2)
            truth.append((_shape_colour(image, inst.annToMask(ann)), THING_NAME[ann["category_id"]], third))
        n = len(truth)
        text = " ".join(captions)
        # colour words name exactly the colours drawn (backgrounds are described without colours)
        assert set(re.findall(rf"\b({COLOURS})\b", text)) == {c for c, _, _ in truth}, (captions, truth)
        # total count in words
        totals = re.findall(rf"\b({'|'.join(NUMBER_WORDS[1:6])}) shapes?\b", text)
        assert totals and all(NUMBER_WORDS.index(t) == n for t in totals), (captions, n)
        # the first caption inventories colour + shape with counts
        inventory = Counter()
        for cnt, colour, shape in re.findall(rf"\b({COUNT}) ({COLOURS}) ({SHAPES})s?\b", captions[0]):
            inventory[(colour, shape)] += _count_word(cnt)
        assert inventory == Counter((c, s) for c, s, _ in truth), (captions[0], truth)
        # the second places each group in a third of the image
        placed = Counter()
        pattern = rf"\b({COUNT}) ({COLOURS}) ({SHAPES})s? ({'|'.join(POSITIONS)})"
        for cnt, colour, shape, where in re.findall(pattern, captions[1]):
            placed[(colour, shape, POSITIONS.index(where))] += _count_word(cnt)
        assert placed == Counter(truth), (captions[1], truth)


def test_deterministic(root: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "a", SPLITS, img_size=IMG_SIZE, seed=0)
    ref, new = _files(root), _files(again)
    assert ref.keys() == new.keys()
    for name in ref:
        if name.endswith((".json", ".png")):
            assert ref[name] == new[name], name
    other = _files(generate(tmp_path / "b", SPLITS, img_size=IMG_SIZE, seed=1))
    assert any(other.get(k) != v for k, v in ref.items() if k.endswith(".png"))
    assert other["annotations/instances_val2017.json"] != ref["annotations/instances_val2017.json"]


def test_split_content_independent_of_other_splits(root: Path, tmp_path: Path) -> None:
    alone = generate(tmp_path, {"val2017": SPLITS["val2017"]}, img_size=IMG_SIZE, seed=0)
    a = sorted(p.read_bytes() for p in (alone / "stuffthingmaps" / "val2017").iterdir())
    b = sorted(p.read_bytes() for p in (root / "stuffthingmaps" / "val2017").iterdir())
    assert a == b


def test_shape_polygons(tmp_path: Path) -> None:
    root = generate(tmp_path, {"val2017": 4}, img_size=IMG_SIZE, seed=3, polygons="shape")
    inst = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    points = {"circle": 32, "ellipse": 32, "star": 10, "square": 4, "triangle": 3}
    for ann in inst["annotations"]:
        assert len(ann["segmentation"][0]) == 2 * points[THING_NAME[ann["category_id"]]]


def test_write_data_yaml(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "shapes.yaml"
    write_data_yaml(root, path)
    data = yaml.safe_load(path.read_text())
    base = Path(data["path"])
    assert base == root.resolve()
    for key, split in (("train", "train2017"), ("val", "val2017")):
        assert set(data[key]) == {"images", "instances", "semantic", "captions", "panoptic"}
        assert all((base / p).exists() for p in data[key].values())
        assert data[key]["instances"] == f"annotations/instances_{split}.json"
    assert data["semantic_categories"] == "annotations/stuff_val2017.json"
