"""A tiny dataset with the quirks of COCO 2017 / COCO-Stuff / COCO Captions as published.

Unlike ``utils.data.synthetic`` (our own conventions), this reproduces what the real files look like:

* instances JSON: ``info``/``licenses`` keys, image entries with ``license``/``coco_url``/``date_captured``,
  non-contiguous thing ids with COCO's names and ``supercategory`` (1 person, 3 car, 18 dog, 44 bottle),
  float polygon segmentations, and ``iscrowd: 1`` annotations whose segmentation is an *uncompressed* RLE
  (``{"counts": [ints], "size": [h, w]}``) with COCO's 12-digit crowd annotation ids (above 2**31);
* image files named ``000000000139.jpg`` with COCO's (sparse) image ids;
* ``stuff_{train,val}2017.json``: stuff ids among 92..182 plus 183 'other' (supercategory 'other'), with
  annotations as compressed RLE strings; as in COCO-Stuff, 'other' covers the thing pixels there;
* ``stuffthingmaps_trainval2017/<split>/<name>.png``: value = category_id - 1 for stuff *and* things,
  255 unlabeled; value 182 ('other') never occurs, as in the real maps. 'playingfield' (145) is listed in
  the stuff JSON but drawn only in val maps, so one listed class has no training pixel;
* captions JSONs without ``categories``, five per image, capitals and punctuation ("A man riding a wave on
  top of a surfboard."), some with trailing whitespace, caption ids unrelated to image ids;
* a data yaml whose ``val`` is a list: the full val2017 split and a caption-only split (images + captions,
  ``COCO_val2014_000000000042.jpg`` names, image ids distinct from val2017's).

Images are drawn with cv2: each object is a filled polygon of its class's colour, so a model could learn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

THING_CATEGORIES: tuple[dict[str, Any], ...] = (  # key order as in instances_*.json
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "kitchen", "id": 44, "name": "bottle"},
)
STUFF_CATEGORIES: tuple[dict[str, Any], ...] = (  # real COCO-Stuff ids and names; 183 'other' last, as there
    {"supercategory": "plant", "id": 124, "name": "grass"},
    {"supercategory": "ground", "id": 145, "name": "playingfield"},
    {"supercategory": "ground", "id": 149, "name": "road"},
    {"supercategory": "water", "id": 155, "name": "sea"},
    {"supercategory": "sky", "id": 157, "name": "sky-other"},
    {"supercategory": "other", "id": 183, "name": "other"},
)
OTHER_ID = 183
TRAIN_ONLY_ABSENT = "playingfield"  # listed, but drawn in val maps only
SPLITS: dict[str, list[int]] = {  # COCO image ids: sparse, not 0..n
    "train2017": [139, 285, 632, 724, 776, 785, 802, 872],
    "val2017": [885, 1000, 1268, 1296],
}
CAPTION_ONLY = ("val2014", [42, 73, 74, 133])
SIZES = ((96, 72), (72, 96), (88, 64), (64, 80))  # (width, height), cycled
CROWD_IMAGES = {285, 1000}  # one per split with instances
_COLOUR = {1: (40, 40, 210), 3: (200, 60, 30), 18: (30, 190, 230), 44: (60, 200, 60)}  # BGR per thing
_STUFF_BGR = {"sky-other": (230, 190, 140), "grass": (50, 140, 90), "road": (90, 90, 90), "sea": (140, 90, 30),
              "playingfield": (70, 170, 120)}
_PHRASE = {"grass": "the grass", "road": "a road", "sea": "the water", "playingfield": "a field"}
_INFO = {"description": "COCO 2017 Dataset", "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
         "contributor": "COCO Consortium", "date_created": "2017/09/01"}
_LICENSES = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
              "name": "Attribution-NonCommercial-ShareAlike License"},
             {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]


def uncompressed_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """COCO's uncompressed RLE of a binary mask: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}


def _mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _thing_polygon(cid: int, cx: float, cy: float, s: float) -> np.ndarray:
    """A class-typical outline: a tall ellipse (person), a car body, a wide ellipse (dog), a bottle."""
    if cid == 1:
        pts = cv2.ellipse2Poly((int(cx), int(cy)), (max(int(s * 0.3), 3), max(int(s * 0.6), 5)), 0, 0, 360, 30)
    elif cid == 18:
        pts = cv2.ellipse2Poly((int(cx), int(cy)), (max(int(s * 0.6), 5), max(int(s * 0.35), 3)), 0, 0, 360, 30)
    elif cid == 3:
        a, b = s * 0.7, s * 0.35
        pts = np.array([[cx - a, cy + b], [cx - a, cy], [cx - a / 2, cy - b], [cx + a / 2, cy - b], [cx + a, cy],
                        [cx + a, cy + b]])
    else:
        a, b = s * 0.2, s * 0.6
        pts = np.array([[cx - a, cy + b], [cx - a, cy - b / 3], [cx - a / 2, cy - b], [cx + a / 2, cy - b],
                        [cx + a, cy - b / 3], [cx + a, cy + b]])
    return np.asarray(pts, np.float64)


def _render(rng: np.random.Generator, k: int, w: int, h: int, lower: str, crowd: bool):
    """One scene: ``(image BGR, map uint8, things [(cid, polygon, mask)], crowd mask or None, other mask)``."""
    sem = np.full((h, w), 156, np.uint8)  # sky-other (157 - 1) above the horizon
    horizon = int(h * (0.4 + 0.1 * rng.random()))
    stuff_value = {c["name"]: c["id"] - 1 for c in STUFF_CATEGORIES}
    sem[horizon:] = stuff_value[lower]
    img = np.zeros((h, w, 3), np.uint8)
    img[:horizon] = _STUFF_BGR["sky-other"]
    img[horizon:] = _STUFF_BGR[lower]
    crowd_mask = None
    x0 = 0
    if crowd:  # a packed crowd of people in the left third (one region, as COCO labels crowds)
        crowd_mask = np.zeros((h, w), np.uint8)
        crowd_mask[horizon - 6:h - 4, 2:w // 3] = 1
        crowd_mask[horizon - 6:horizon - 2, 2:w // 3:4] = 0  # ragged top: heads
        x0 = w // 3 + 2
    things = []
    cids = [THING_CATEGORIES[k % 4]["id"], THING_CATEGORIES[(k + 1) % 4]["id"]][: 1 + (not crowd)]
    slot = (w - x0) / len(cids)
    for j, cid in enumerate(cids):
        s = min(slot, h) * 0.4
        cx = x0 + slot * (j + 0.5) + rng.uniform(-2, 2)
        cy = min(max(horizon + rng.uniform(-4, 8), s * 0.7), h - s * 0.7)
        poly = _thing_polygon(cid, cx, cy, s)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        things.append((cid, poly, mask))
    for cid, _, mask in things:
        sem[mask > 0] = cid - 1
        img[mask > 0] = _COLOUR[cid]
    if crowd_mask is not None:
        sem[crowd_mask > 0] = 0  # person - 1: crowd pixels are thing pixels in stuffthingmaps
        img[crowd_mask > 0] = _COLOUR[1]
        img[crowd_mask > 0, 1] = 90
    sem[h - 3:, w - 8:] = 255  # an unlabeled strip, as annotators leave at borders
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    thing_pixels = np.isin(sem, [c["id"] - 1 for c in THING_CATEGORIES]).astype(np.uint8)
    return img, sem, things, crowd_mask, thing_pixels


def _captions(rng: np.random.Generator, things: list, lower: str, crowd: bool) -> list[str]:
    name = {c["id"]: c["name"] for c in THING_CATEGORIES}
    first = name[things[0][0]]
    where = _PHRASE[lower]
    caps = [f"A {first} on {where} under a blue sky.",
            f"There is a {first} in this picture next to {where}.",
            f"a {first} by {where}",  # no capital, no full stop: COCO has many of these
            f"A picture of a {first} on {where}. \n",  # trailing whitespace and a newline, as published
            f"The {first} is standing  near {where} ."]
    if len(things) > 1:
        caps[1] = f"A {first} and a {name[things[1][0]]} near {where}."
    if crowd:
        caps[4] = f"A crowd of people behind a {first}, on {where}."
    rng.shuffle(caps)
    return caps


def _image_entry(iid: int, file_name: str, w: int, h: int, split: str) -> dict[str, Any]:
    return {"license": 4 if iid % 2 else 1, "file_name": file_name,
            "coco_url": f"http://images.cocodataset.org/{split}/{file_name}", "height": h, "width": w,
            "date_captured": "2013-11-14 11:18:45", "flickr_url": f"http://farm4.staticflickr.com/{iid}.jpg",
            "id": iid}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_coco_published(root: Path, seed: int = 0) -> Path:
    """Writes the dataset under ``root`` (see the module docstring); returns its data yaml.

    8 train and 4 + 4 val images of 64-96 px, deterministic for a ``seed``; about a second to write.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ann_ids = iter(rng.permutation(np.arange(150000, 160000))[:200].tolist())
    cap_ids = iter(rng.permutation(np.arange(1, 800000))[:200].tolist())
    k = 0
    for split, ids in SPLITS.items():
        img_dir, sem_dir = root / "images" / split, root / "stuffthingmaps_trainval2017" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        sem_dir.mkdir(parents=True, exist_ok=True)
        lowers = ["grass", "road", "sea"] + (["playingfield"] if split != "train2017" else [])
        images, instances, stuff, captions = [], [], [], []
        for iid in ids:
            w, h = SIZES[k % len(SIZES)]
            lower = lowers[k % len(lowers)]
            name = f"{iid:012d}.jpg"
            img, sem, things, crowd, thing_pixels = _render(rng, k, w, h, lower, iid in CROWD_IMAGES)
            cv2.imwrite(str(img_dir / name), img)
            cv2.imwrite(str(sem_dir / name.replace(".jpg", ".png")), sem)
            images.append(_image_entry(iid, name, w, h, split))
            for cid, poly, mask in things:
                x, y = poly.min(0)
                x2, y2 = poly.max(0)
                flat = [round(float(v), 2) for v in poly.reshape(-1)]
                instances.append({"segmentation": [flat], "area": float(mask.sum()), "iscrowd": 0, "image_id": iid,
                                  "bbox": [round(float(x), 2), round(float(y), 2), round(float(x2 - x), 2),
                                           round(float(y2 - y), 2)], "category_id": cid, "id": next(ann_ids)})
            if crowd is not None:
                instances.append({"segmentation": uncompressed_rle(crowd), "area": int(crowd.sum()), "iscrowd": 1,
                                  "image_id": iid, "bbox": _mask_bbox(crowd), "category_id": 1,
                                  "id": 900100000000 + iid})  # COCO's crowd ids exceed 2**31
            for cat in STUFF_CATEGORIES:  # COCO-Stuff: stuff regions, and 'other' = the thing pixels
                m = thing_pixels if cat["id"] == OTHER_ID else (sem == cat["id"] - 1).astype(np.uint8)
                if m.any():
                    stuff.append({"id": next(ann_ids) + 10000000, "image_id": iid, "category_id": cat["id"],
                                  "segmentation": _compressed_rle(m), "area": float(m.sum()), "bbox": _mask_bbox(m),
                                  "iscrowd": 0})
            for text in _captions(rng, things, lower, crowd is not None):
                captions.append({"image_id": iid, "id": next(cap_ids), "caption": text})
            k += 1
        head = {"info": _INFO, "licenses": _LICENSES, "images": images}
        _write_json(root / f"annotations/instances_{split}.json",
                    {**head, "annotations": instances, "categories": list(THING_CATEGORIES)})
        _write_json(root / f"annotations/stuff_{split}.json",
                    {**head, "annotations": stuff, "categories": list(STUFF_CATEGORIES)})
        _write_json(root / f"annotations/captions_{split}.json", {**head, "annotations": captions})
    cap_split, cap_image_ids = CAPTION_ONLY
    img_dir = root / "images" / cap_split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for iid in cap_image_ids:
        w, h = SIZES[k % len(SIZES)]
        lower = ("grass", "road", "sea")[k % 3]
        name = f"COCO_{cap_split}_{iid:012d}.jpg"
        img, _, things, _, _ = _render(rng, k, w, h, lower, False)
        cv2.imwrite(str(img_dir / name), img)
        images.append(_image_entry(iid, name, w, h, cap_split))
        captions += [{"image_id": iid, "id": next(cap_ids), "caption": t} for t in _captions(rng, things, lower, False)]
        k += 1
    _write_json(root / f"annotations/captions_{cap_split}.json", {"info": _INFO, "licenses": _LICENSES,
                                                                   "images": images, "annotations": captions})

    def full(split: str) -> dict[str, str]:
        return {"images": f"images/{split}", "instances": f"annotations/instances_{split}.json",
                "semantic": f"stuffthingmaps_trainval2017/{split}", "captions": f"annotations/captions_{split}.json"}

    data = {"path": str(root.resolve()), "train": full("train2017"),
            "val": [full("val2017"),  # and a caption-only split
                    {"images": f"images/{cap_split}", "captions": f"annotations/captions_{cap_split}.json"}],
            "semantic_categories": "annotations/stuff_val2017.json"}
    yaml_path = root / "coco_published.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_path
