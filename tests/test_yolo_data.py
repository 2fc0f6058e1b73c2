"""Ultralytics YOLO-format datasets (utils/data/yolo.py), in the layout Ultralytics publishes (tests/yolo_layout.py):
detected from the data yaml, read into the records COCO splits give, checked and cached the same way, trained,
validated and exported by the README's commands, mixed with COCO splits."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export as export_script
import test as test_script
import train as train_script
from tests.conftest import train_args
from tests.yolo_layout import FIRST_ID, NAMES, write_coco8_seg
from utils.data import yolo
from utils.data.coco import LabelReport, load_split
from utils.data.config import DataError, load_data_config, yolo_label_path
from utils.data.dataset import CocoDataset
from utils.data.yolo import load_yolo_split


@pytest.fixture(scope="module")
def coco8_seg(tmp_path_factory) -> Path:
    return write_coco8_seg(tmp_path_factory.mktemp("ultralytics"))


def _label_polygons(label: Path, size: tuple[int, int]) -> list[tuple[int, np.ndarray]]:
    out = []
    for line in label.read_text().split("\n"):
        if line.strip():
            v = line.split()
            out.append((int(v[0]), np.asarray(v[1:], np.float64).reshape(-1, 2) * size))
    return out


def test_data_yaml_is_detected_and_read_as_published(coco8_seg, monkeypatch):
    """``path: ../datasets/coco8-seg`` (against the yaml's folder), ``names`` as a mapping: classes 0..2 are
    category ids 1..3, polygons give det + inst, each record holds the label file's polygons in pixels with
    their extents as boxes, and the numeric file stems as image ids."""
    monkeypatch.chdir(coco8_seg.parent)  # the cwd is tried first: ../datasets/coco8-seg is found there too
    data = load_data_config(coco8_seg)
    assert data.names == list(NAMES.values()) and data.category_ids == [1, 2, 3]
    assert data.tasks == ["det", "inst"] and all(s.yolo for s in data.train + data.val)
    assert data.root == (coco8_seg.parent.parent / "datasets/coco8-seg").resolve()
    ds = CocoDataset(data, data.val, 64)
    assert len(ds) == 4 and ds.labels_summary() == "no label problems"
    for split, rec in ds.items:
        image = split.images / rec.file
        assert rec.image_id == int(image.stem) >= FIRST_ID and (rec.width, rec.height) == (96, 72)
        truth = _label_polygons(yolo_label_path(image), (96, 72))
        assert rec.classes.tolist() == [c for c, _ in truth]
        for (_, poly), box, segs in zip(truth, rec.boxes, rec.segments):
            assert len(segs) == 1 and np.abs(segs[0] - poly).max() < 1e-3
            assert np.abs(box - np.r_[poly.min(0), poly.max(0)]).max() < 1e-3
        sample = ds.load(0)
        assert sample.present == {"det": True, "inst": True, "sem": False, "cap": False}


def test_boxes_give_det_only_and_names_as_a_list(tmp_path):
    data_yaml = write_coco8_seg(tmp_path, polygons=False)
    d = yaml.safe_load(data_yaml.read_text())
    data_yaml.write_text(yaml.safe_dump(d | {"names": list(NAMES.values()), "nc": 3}))
    data = load_data_config(data_yaml)
    assert data.tasks == ["det"] and data.names == list(NAMES.values())
    rec = CocoDataset(data, data.train, 64).items[0][1]
    assert len(rec.boxes) and all(s == [] for s in rec.segments)
    data_yaml.write_text(yaml.safe_dump(d | {"names": {0: "a", 2: "b"}}))
    with pytest.raises(DataError, match="without gaps"):
        load_data_config(data_yaml)
    data_yaml.write_text(yaml.safe_dump(d | {"nc": 5}))
    with pytest.raises(DataError, match="nc 5 but 3 names"):
        load_data_config(data_yaml)


def test_list_files_and_lists_of_them(coco8_seg, tmp_path):
    """``train: [train.txt, images/val]``: a .txt of ``./images/...`` lines (Ultralytics' own lists) beside a
    folder, as two splits; the labels still follow the images/ -> labels/ rule."""
    root = coco8_seg.parent.parent / "datasets/coco8-seg"
    (root / "train.txt").write_text("".join(f"./images/train/{p.name}\n" for p in sorted((root / "images/train").iterdir())))
    d = yaml.safe_load(coco8_seg.read_text())
    listed = coco8_seg.with_name("listed.yaml")
    listed.write_text(yaml.safe_dump(d | {"train": ["train.txt", "images/val"]}))
    data = load_data_config(listed)
    assert [s.images.name for s in data.train] == ["train.txt", "val"]
    ds = CocoDataset(data, data.train, 64, use_cache=False)
    assert len(ds) == 12 and ds.labels_summary() == "no label problems"
    assert ds.items[0][1].file == str(root / "images/train/000000900001.jpg")
    assert (root / "train.txt.cache").exists() is False  # use_cache=False


BAD = {"not numbers": "0 a b c d", "too few values": "1 0.5 0.5 0.2", "class out of range": "7 0.5 0.5 0.2 0.2",
       "negative class": "-1 0.5 0.5 0.2 0.2", "fractional class": "0.5 0.5 0.5 0.2 0.2",
       "odd polygon": "0 0.1 0.1 0.5 0.1 0.5", "degenerate polygon": "0 0.1 0.1 0.9 0.9 0.5 0.5",
       "degenerate box": "2 0.5 0.5 0.0 0.3", "outside": "1 -0.5 -0.5 0.6 0.1 0.6 0.6"}


def test_bad_label_lines_are_counted_by_name_never_fatal(tmp_path):
    data_yaml = write_coco8_seg(tmp_path, n_train=2, n_val=1)
    label = tmp_path / "datasets/coco8-seg/labels/train/000000900001.txt"
    good = label.read_text().splitlines()
    label.write_text("\n".join(good + list(BAD.values()) + [good[0]]) + "\n")
    (tmp_path / "datasets/coco8-seg/labels/train/000000900002.txt").unlink()
    data = load_data_config(data_yaml)
    report = LabelReport()
    recs = load_yolo_split(data.train[0], data.category_ids, report, use_cache=False)
    p, n = report.problems, len(good)
    assert p["bad label lines"] == [f"{label.name}:{n + k}" for k in (1, 2, 6)]
    assert p["class ids outside 'names'"] == [f"{label.name}:{n + k}" for k in (3, 4, 5)]
    assert p["degenerate polygons (box kept)"] == [f"{label.name}:{n + 7}"]
    assert p["boxes outside the image or degenerate"] == [f"{label.name}:{n + 8}"]
    assert p["label coordinates outside 0-1 (clipped)"] == [f"{label.name}:{n + 9}"]
    assert p["duplicate label lines (dropped)"] == [f"{label.name}:{n + 10}"]
    assert p["images without a label file (no objects)"] == ["000000900002.jpg"]
    # kept: the good lines, the degenerate polygon's box, and the clipped polygon
    assert len(recs[0].boxes) == n + 2 and recs[0].segments[n] == [] and len(recs[0].segments[n + 1]) == 1
    assert (recs[0].boxes >= 0).all() and len(recs[1].boxes) == 0


def test_label_cache_is_reused_and_rebuilt_when_a_label_changes(tmp_path, monkeypatch):
    data = load_data_config(write_coco8_seg(tmp_path, n_train=3, n_val=1))
    split = data.train[0]
    first = load_split(split, data.category_ids, LabelReport(), parse=yolo.parse_yolo_split, key_of=yolo.yolo_cache_key)
    assert Path(str(split.images) + ".cache").is_file()
    calls = []
    real = yolo.parse_yolo_split
    monkeypatch.setattr(yolo, "parse_yolo_split", lambda *a: calls.append(1) or real(*a))
    again = yolo.load_yolo_split(split, data.category_ids, LabelReport())
    assert not calls and [r.boxes.tolist() for r in again] == [r.boxes.tolist() for r in first]
    label = tmp_path / "datasets/coco8-seg/labels/train/000000900001.txt"
    label.write_text("0 0.5 0.5 0.5 0.5\n")
    os.utime(label, ns=(1, 1))
    rebuilt = yolo.load_yolo_split(split, data.category_ids, LabelReport())
    assert calls and rebuilt[0].boxes.tolist() == [[24.0, 18.0, 72.0, 54.0]]


@pytest.mark.slow
def test_trains_validates_and_exports_from_the_readme_commands(coco8_seg, tiny_cfg_file, tmp_path):
    """train.py --data coco8-seg.yaml, then test.py and export.py on its best.pt: box and mask metrics under
    category ids 1..3, an ONNX graph verified against PyTorch."""
    project = tmp_path / "runs"
    assert train_script.main(train_args(tiny_cfg_file, coco8_seg, project, 2, "exp", "--noplots")) == 0
    rows = (project / "exp/results.csv").read_text().splitlines()
    assert "box_map" in rows[0] and "mask_map" in rows[0] and "sem_miou" not in rows[0]
    weights = project / "exp/weights/best.pt"
    ckpt = torch.load(weights, weights_only=True)
    assert ckpt["meta"]["names"] == list(NAMES.values()) and ckpt["meta"]["category_ids"] == [1, 2, 3]
    assert ckpt["tasks"] == ["det", "inst"]
    out = tmp_path / "test"
    assert test_script.main(["--weights", str(weights), "--project", str(out), "--workers", "0", "--save-json",
                             "--conf-thres", "0.0001"]) == 0
    metrics = json.loads((out / "exp/metrics.json").read_text())
    assert 0 <= metrics["box_map"] <= 1 and 0 <= metrics["mask_map"] <= 1 and metrics["images"] == 4
    preds = json.loads((out / "exp/predictions.json").read_text())
    assert {p["category_id"] for p in preds} <= {1, 2, 3} and {p["image_id"] for p in preds} <= set(range(FIRST_ID, FIRST_ID + 12))
    assert export_script.main(["--weights", str(weights), "--include", "onnx", "--img", "64"]) == 0
    assert weights.with_suffix(".onnx").is_file()


def test_mixed_list_coco_captions_beside_yolo_boxes(coco8_seg, tiny_data, tiny_cfg_file, tmp_path):
    """A COCO caption split beside a YOLO-format split in one list: cap from one, det + inst from the other,
    each masked per image; a run trains on it and validates every task."""
    coco = load_data_config(tiny_data)
    caps = {"images": str(coco.train[0].images), "captions": str(coco.train[0].captions)}
    val_caps = {"images": str(coco.val[0].images), "captions": str(coco.val[0].captions)}
    d = yaml.safe_load(coco8_seg.read_text())
    mixed = coco8_seg.with_name("mixed.yaml")
    mixed.write_text(yaml.safe_dump(d | {"train": ["images/train", caps], "val": ["images/val", val_caps]}))
    data = load_data_config(mixed)
    assert data.tasks == ["det", "inst", "cap"] and data.category_ids == [1, 2, 3]
    ds = CocoDataset(data, data.train, 64)
    present = {(s.yolo is not None, tuple(sorted(k for k, v in ds.load(i).present.items() if v)))
               for i, (s, _) in enumerate(ds.items)}
    assert present == {(True, ("det", "inst")), (False, ("cap",))}
    project = tmp_path / "runs"
    assert train_script.main(train_args(tiny_cfg_file, mixed, project, 1, "exp", "--noplots")) == 0
    header = (project / "exp/results.csv").read_text().splitlines()[0]
    assert all(k in header for k in ("box_map", "mask_map", "cap_cider", "train/cap_loss", "train/det_box"))
    shutil.rmtree(project)


def _boxes(data_yaml: Path, split: str = "val") -> dict[int, tuple[list, list]]:
    data = load_data_config(data_yaml)
    ds = CocoDataset(data, getattr(data, split), 64, use_cache=False)
    return {rec.image_id: (rec.classes.tolist(), rec.boxes) for _, rec in ds.items}


def test_convert_yolo_to_coco_and_back(coco8_seg, tmp_path):
    """``python -m utils.data.convert --to coco`` of the YOLO dataset gives a COCO data yaml whose records are
    the YOLO reader's (same ids, classes, boxes); ``--to yolo`` of that gives YOLO labels read back the same."""
    from utils.data import convert

    assert convert.main(["--to", "coco", "--data", str(coco8_seg), "--out", str(tmp_path / "coco")]) == 0
    as_coco = tmp_path / "coco/data.yaml"
    cats = json.loads((tmp_path / "coco/annotations/instances_val.json").read_text())["categories"]
    assert cats == [{"id": i + 1, "name": n} for i, n in NAMES.items()]
    assert convert.main(["--to", "yolo", "--data", str(as_coco), "--out", str(tmp_path / "yolo")]) == 0
    original, coco, back = _boxes(coco8_seg), _boxes(as_coco), _boxes(tmp_path / "yolo/seg.yaml")
    assert original.keys() == coco.keys() == back.keys() and len(original) == 4
    for iid, (classes, boxes) in original.items():
        for other in (coco, back):
            assert other[iid][0] == classes and np.abs(other[iid][1] - boxes).max() < 0.02
    assert convert.main(["--to", "coco", "--data", str(as_coco), "--out", str(tmp_path / "x")]) == 2


def test_merge_polygons_joins_pieces_into_one_outline():
    """Two squares become one outline through both (every vertex kept, filled area of both plus a cut)."""
    import cv2

    from utils.data.convert import merge_polygons

    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], np.float32)
    b = a + 30
    merged = merge_polygons([a, b])
    assert len(merged) == 4 + 4 + 1 + 1 and {tuple(p) for p in merged} == {tuple(p) for p in np.r_[a, b]}
    canvas = np.zeros((50, 50), np.uint8)
    cv2.fillPoly(canvas, [merged.round().astype(np.int32)], 1)
    assert canvas[5, 5] == canvas[35, 35] == 1 and canvas[5, 35] == 0
