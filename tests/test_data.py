"""Data yaml convention, COCO-layout reading, label cache, bad input handling, and collate."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import utils.data.dataset as dataset_module
from utils.data import augment as A
from utils.data.coco import LabelReport, load_split
from utils.data.config import DataError, load_data_config
from utils.data.dataset import (
    CocoDataset,
    LoaderStalledError,
    collate,
    create_dataloader,
    multi_scale_shape,
    rescale_batch,
    stall_guard,
)
from utils.tasks import IGNORE_INDEX, TASKS


def test_config_reads_classes_with_original_ids(tiny_data):
    data = load_data_config(tiny_data)
    cats = json.loads((data.root / "annotations/instances_train2017.json").read_text())["categories"]
    assert data.category_ids == sorted(c["id"] for c in cats)
    assert data.category_ids != list(range(1, data.nc + 1)), "embedded ids should be non-contiguous like COCO"
    assert set(data.semantic_ids) > set(data.category_ids)  # things + stuff merged by id
    assert all(92 <= i <= 182 for i in set(data.semantic_ids) - set(data.category_ids))
    assert data.tasks == ["det", "inst", "sem", "cap"]
    lut = data.semantic_lut()
    for idx, cid in enumerate(data.semantic_ids):
        assert lut[cid - 1] == idx
    assert lut[254] == IGNORE_INDEX


def test_missing_task_key_means_no_labels(tiny_data, tmp_path):
    d = yaml.safe_load(tiny_data.read_text())
    for split in ("train", "val"):
        d[split].pop("captions")
        d[split].pop("semantic")
    f = tmp_path / "det_only.yaml"
    f.write_text(yaml.safe_dump(d))
    data = load_data_config(f)
    assert data.tasks == ["det", "inst"]
    ds = CocoDataset(data, data.val, 64)
    s = ds.load(0)
    assert s.present == {"det": True, "inst": True, "sem": False, "cap": False}
    assert s.semantic is None and s.captions == []


@pytest.mark.parametrize("bad, match", [
    ({"trian": {}}, "unknown key"),
    ({"train": {"images": "x", "boxes": "y"}}, "unknown key"),
    ({"train": {"instances": "y"}}, "'images' is required"),
])
def test_bad_data_yaml_is_a_clear_error(tiny_data, tmp_path, bad, match):
    d = yaml.safe_load(tiny_data.read_text()) | bad
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(DataError, match=match):
        load_data_config(f)


def test_malformed_json_names_file_and_position(tiny_data, tmp_path):
    data = load_data_config(tiny_data)
    root = tmp_path / "copy"
    shutil.copytree(data.root, root, ignore=shutil.ignore_patterns("*.cache"))
    inst = root / "annotations/instances_val2017.json"
    inst.write_text(inst.read_text()[:500])
    d = yaml.safe_load(tiny_data.read_text()) | {"path": str(root)}
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump(d))
    data2 = load_data_config(f)
    with pytest.raises(DataError, match=r"instances_val2017.json: malformed JSON at line \d+ column \d+"):
        CocoDataset(data2, data2.val, 64)


def test_label_cache_is_reused_and_invalidated(tiny_data):
    data = load_data_config(tiny_data)
    split = data.val[0]
    cache = Path(str(split.images) + ".cache")
    cache.unlink(missing_ok=True)
    recs = load_split(split, data.category_ids, LabelReport())
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again = load_split(split, data.category_ids, LabelReport())
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    assert [r.image_id for r in again] == [r.image_id for r in recs]
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(recs, again))
    # a changed annotation file changes the key: the cache is rebuilt
    load_split(split, data.category_ids[:-1], LabelReport())
    assert cache.stat().st_mtime_ns != stamp


def test_records_match_json(tiny_data):
    data = load_data_config(tiny_data)
    recs = load_split(data.val[0], data.category_ids, LabelReport())
    gt = json.loads(data.val[0].instances.read_text())
    n_ann = sum(1 for a in gt["annotations"] if not a.get("iscrowd"))
    assert sum(len(r.boxes) for r in recs) == n_ann
    ann = gt["annotations"][0]
    rec = next(r for r in recs if r.image_id == ann["image_id"])
    x, y, w, h = ann["bbox"]
    assert np.any(np.all(np.isclose(rec.boxes, [x, y, x + w, y + h], atol=1e-3), axis=1))
    caps = json.loads(data.val[0].captions.read_text())["annotations"]
    assert sum(len(r.captions) for r in recs) == len(caps)


def test_corrupt_and_missing_images_are_skipped_and_counted(tiny_data, tmp_path):
    data = load_data_config(tiny_data)
    root = tmp_path / "hostile"
    shutil.copytree(data.root, root, ignore=shutil.ignore_patterns("*.cache"))
    imgs = sorted((root / "images/val2017").iterdir())
    imgs[0].write_bytes(imgs[0].read_bytes()[:200])  # truncated JPEG
    imgs[1].write_bytes(b"")                          # zero bytes
    imgs[2].unlink()                                   # referenced by the JSON, missing on disk
    d = yaml.safe_load(tiny_data.read_text()) | {"path": str(root)}
    f = tmp_path / "h.yaml"
    f.write_text(yaml.safe_dump(d))
    data2 = load_data_config(f)
    ds = CocoDataset(data2, data2.val, 64)
    assert len(ds) == 8 - 3
    summary = ds.labels_summary()
    for name in (imgs[0].name, imgs[1].name, imgs[2].name):
        assert name in summary
    # an image that passes the header check but cannot be decoded is replaced at load time, and counted
    split, rec = ds.items[0]
    (split.images / rec.file).write_bytes(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9")
    with pytest.warns(UserWarning, match="unreadable image"):
        item = ds[0]
    assert item["image"].shape == (3, 64, 64)
    assert ds.read_failures == [str(split.images / rec.file)]


def test_unknown_category_and_bad_boxes_are_counted(tiny_data, tmp_path):
    data = load_data_config(tiny_data)
    root = tmp_path / "labels"
    shutil.copytree(data.root, root, ignore=shutil.ignore_patterns("*.cache"))
    inst = root / "annotations/instances_val2017.json"
    d = json.loads(inst.read_text())
    d["annotations"][0]["category_id"] = 999
    d["annotations"][1]["bbox"] = [5000, 5000, 10, 10]
    inst.write_text(json.dumps(d))
    y = yaml.safe_load(tiny_data.read_text()) | {"path": str(root)}
    f = tmp_path / "l.yaml"
    f.write_text(yaml.safe_dump(y))
    data2 = load_data_config(f)
    ds = CocoDataset(data2, data2.val, 64)
    s = ds.labels_summary()
    assert "1 unknown category ids" in s and "1 boxes outside the image or degenerate" in s


@pytest.mark.parametrize("augment", [False, True])
def test_batches_keep_tasks_together(tiny_data, augment):
    data = load_data_config(tiny_data)
    hyp = {"mosaic": 1.0, "fliplr": 0.5, "degrees": 5.0, "scale": 0.3}
    ds = CocoDataset(data, data.train, 96, augment=augment, hyp=hyp, seed=3)
    batch = next(iter(create_dataloader(ds, 4, shuffle=False)))
    assert batch.images.shape == (4, 3, 96, 96) and batch.images.dtype == torch.uint8
    assert batch.semantic.shape == (4, 96, 96)
    assert batch.targets.shape[1] == 6 and len(batch.segments) == len(batch.targets)
    b = batch.targets
    assert (b[:, 2:] >= -1e-3).all() and (b[:, 2:] <= 96 + 1e-3).all()
    assert (b[:, 4] > b[:, 2]).all() and (b[:, 5] > b[:, 3]).all()
    # every box covers semantic pixels of its own class (the map moved with the boxes)
    sem_idx = {cid: i for i, cid in enumerate(data.semantic_ids)}
    for t in b:
        i, c, x1, y1, x2, y2 = t.tolist()
        patch = batch.semantic[int(i), int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
        if patch.numel() >= 16:
            assert (patch == sem_idx[data.category_ids[int(c)]]).float().mean() > 0.2
    assert batch.present.shape == (4, len(TASKS))
    if augment:  # mosaic images have no caption (a caption describes one whole image)
        assert not batch.task_present("cap").any()
    else:
        assert batch.task_present("cap").all() and all(batch.captions)


def test_augmentation_is_reproducible(tiny_data):
    data = load_data_config(tiny_data)
    ds = CocoDataset(data, data.train, 96, augment=True, hyp={"mosaic": 1.0}, seed=5)
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"])
    ds.epoch = 1
    assert not torch.equal(a["image"], ds[3]["image"])


def _same_item(a: dict, b: dict) -> None:
    """Two dataset items are byte-identical: image, every label, and the letterbox."""
    assert torch.equal(a["image"], b["image"]) and a["letterbox"] == b["letterbox"]
    sa, sb = a["sample"], b["sample"]
    assert np.array_equal(sa.boxes, sb.boxes) and np.array_equal(sa.classes, sb.classes)
    assert len(sa.segments) == len(sb.segments)
    for pa, pb in zip(sa.segments, sb.segments):
        assert len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert (sa.semantic is None) == (sb.semantic is None)
    assert sa.semantic is None or np.array_equal(sa.semantic, sb.semantic)
    assert sa.captions == sb.captions and sa.present == sb.present and sa.orig_shape == sb.orig_shape


def test_closed_mosaic_is_exactly_the_no_mosaic_view(tiny_data, monkeypatch):
    """``mosaic = False`` (--close-mosaic) never builds a mosaic, and each item is the one a dataset with
    ``hyp mosaic: 0`` gives (letterbox + perspective + flips, the same draws)."""
    calls = []
    real = A.mosaic4
    monkeypatch.setattr(A, "mosaic4", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = load_data_config(tiny_data)
    hyp = {"mosaic": 1.0, "fliplr": 0.5, "flipud": 0.5, "degrees": 10.0, "scale": 0.3}
    ds = CocoDataset(data, data.train, 96, augment=True, hyp=hyp, seed=4)
    plain = CocoDataset(data, data.train, 96, augment=True, hyp=hyp | {"mosaic": 0.0}, seed=4)
    ds[0]
    assert calls  # open: mosaics
    calls.clear()
    ds.mosaic = False
    for epoch in (0, 1):
        ds.epoch = plain.epoch = epoch
        for i in range(len(ds)):
            _same_item(ds[i], plain[i])
    assert not calls


class _CountReads:
    """Counts cv2.imread calls (images and semantic PNGs alike) while passing them through."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        real = cv2.imread

        def imread(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(cv2, "imread", imread)


@pytest.mark.parametrize("augment", [False, True])
def test_ram_cache_gives_the_same_items_without_reading_again(tiny_data, monkeypatch, augment):
    """--cache ram: the items are byte-identical to the uncached dataset's, in two epochs, and after the
    up-front read no image or semantic map is read again (the uncached dataset reads them every time)."""
    data = load_data_config(tiny_data)
    hyp = {"mosaic": 0.5, "fliplr": 0.5, "degrees": 5.0, "hsv_v": 0.4}
    plain = CocoDataset(data, data.train, 96, augment=augment, hyp=hyp, seed=2)
    cached = CocoDataset(data, data.train, 96, augment=augment, hyp=hyp, seed=2)
    reads = _CountReads(monkeypatch)
    line = cached.cache_images("ram")
    assert cached.cache == "ram" and f"cached {len(cached)} images in RAM" in line
    assert reads.n == 2 * len(cached)  # each image and its semantic map, once
    for epoch in (0, 1):
        cached.epoch = plain.epoch = epoch
        reads.n = 0
        got = [cached[i] for i in range(len(cached))]
        assert reads.n == 0, "the RAM cache read an image again"
        want = [plain[i] for i in range(len(plain))]
        assert reads.n >= 2 * len(plain)
        for a, b in zip(got, want):
            _same_item(a, b)
    shape = cached[3]["sample"].orig_shape
    assert np.array_equal(cached.semantic_target(3, shape), plain.semantic_target(3, shape))


def test_disk_cache_writes_npy_once_and_reads_them(tiny_data, tmp_path, monkeypatch):
    """--cache disk: one .npy per image beside the images folder, written once (a second dataset reuses
    them), read with np.load instead of decoding; the items are byte-identical to the uncached ones."""
    root = tmp_path / "disk"
    data = load_data_config(_copy_data(tiny_data, root))
    hyp = {"mosaic": 1.0, "fliplr": 0.5}
    plain = CocoDataset(data, data.train, 96, augment=True, hyp=hyp, seed=1)
    first = CocoDataset(data, data.train, 96, augment=True, hyp=hyp, seed=1)
    assert f", {len(first)} written now)" in first.cache_images("disk")
    npys = sorted((root / "images/train2017_npy").glob("*.npy"))
    assert len(npys) == len(first) and first.npy_path(0) in npys
    cached = CocoDataset(data, data.train, 96, augment=True, hyp=hyp, seed=1)
    assert ", 0 written now)" in cached.cache_images("disk")
    decodes = []
    real = cached.decode
    monkeypatch.setattr(cached, "decode", lambda i: decodes.append(i) or real(i))
    for i in range(len(cached)):
        _same_item(cached[i], plain[i])
    assert not decodes
    # a newer image replaces its stale .npy
    split, rec = cached.items[0]
    img = split.images / rec.file
    os.utime(img, (cached.npy_path(0).stat().st_mtime + 10,) * 2)
    assert ", 1 written now)" in cached.cache_images("disk")


def test_ram_cache_falls_back_when_it_would_not_fit(tiny_data, monkeypatch):
    """Images over half the available RAM: a warning, and the dataset reads from the files as without --cache."""
    data = load_data_config(tiny_data)
    ds = CocoDataset(data, data.train, 96)
    monkeypatch.setattr(dataset_module, "available_memory", lambda: ds.cache_bytes())  # 2x the room needed
    with pytest.warns(UserWarning, match="not cached"):
        ds.cache_images("ram")
    assert ds.cache is None and ds._ram is None
    monkeypatch.setattr(dataset_module, "available_memory", lambda: 2 * ds.cache_bytes())
    ds.cache_images("ram")
    assert ds.cache == "ram"
    with pytest.raises(ValueError, match="--cache 'gpu'"):
        ds.cache_images("gpu")


def test_ram_cache_still_skips_and_counts_an_unreadable_image(tiny_data, tmp_path):
    data = load_data_config(_copy_data(tiny_data, tmp_path / "bad"))
    ds = CocoDataset(data, data.val, 64)
    split, rec = ds.items[0]
    (split.images / rec.file).write_bytes(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9")  # header ok, no pixels
    ds.cache_images("ram")
    with pytest.warns(UserWarning, match="unreadable image"):
        item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["sample"].path != str(split.images / rec.file)
    assert ds.read_failures == [str(split.images / rec.file)]


@pytest.mark.parametrize("shape", [(64, 64), (160, 128)])
def test_rescale_batch_moves_every_label_with_the_images(tiny_data, shape):
    """--multi-scale's resize: boxes and polygons keep their coordinates relative to the image, the semantic
    map is resized by nearest neighbour (values kept, still under its boxes), the images bilinearly; the
    input batch is left as it was."""
    data = load_data_config(tiny_data)
    ds = CocoDataset(data, data.train, 96, augment=False)
    batch = next(iter(create_dataloader(ds, 4, shuffle=False)))
    before = (batch.images.clone(), batch.targets.clone(), batch.semantic.clone())
    out = rescale_batch(batch, shape)
    h, w = shape
    assert out.images.shape == (4, 3, h, w) and out.images.dtype == torch.uint8
    assert out.semantic.shape == (4, h, w) and out.semantic.dtype == torch.uint8
    assert set(out.semantic.unique().tolist()) <= set(batch.semantic.unique().tolist())
    norm = torch.tensor([96, 96, 96, 96.0])
    assert torch.allclose(out.targets[:, 2:] / torch.tensor([w, h, w, h]), batch.targets[:, 2:] / norm, atol=1e-6)
    assert torch.equal(out.targets[:, :2], batch.targets[:, :2])
    for new, old in zip(out.segments, batch.segments):
        for p, q in zip(new, old):
            assert np.allclose(p / [w, h], q / 96.0, atol=1e-6)
    ref = torch.nn.functional.interpolate(batch.images.float(), size=shape, mode="bilinear", align_corners=False)
    assert (out.images.float() - ref).abs().max() <= 1.0
    assert out.letterboxes[0].input_shape == shape and out.orig_shapes[0] == shape
    sem_idx = {cid: i for i, cid in enumerate(data.semantic_ids)}
    for t in out.targets:
        i, c, x1, y1, x2, y2 = t.tolist()
        patch = out.semantic[int(i), int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))]
        if patch.numel() >= 16:
            assert (patch == sem_idx[data.category_ids[int(c)]]).float().mean() > 0.2
    assert all(torch.equal(a, b) for a, b in zip(before, (batch.images, batch.targets, batch.semantic)))
    assert rescale_batch(batch, (96, 96)) is batch


def test_multi_scale_shape_range():
    """Sizes are multiples of the stride within [0.5, 1.5] x img, every one of them reachable; a non-square
    batch keeps its aspect, each side a multiple of the stride."""
    got = {multi_scale_shape(640, 32, (640, 640), np.random.default_rng(k)) for k in range(500)}
    assert {h for h, w in got} == set(range(320, 961, 32)) and all(h == w for h, w in got)
    assert {multi_scale_shape(64, 32, (64, 64), np.random.default_rng(k))[0] for k in range(100)} == {32, 64, 96}
    for k in range(50):
        h, w = multi_scale_shape(640, 32, (480, 640), np.random.default_rng(k))
        assert h % 32 == 0 and w % 32 == 0 and 320 <= w <= 960 and abs(h / w - 0.75) < 32 / w


def test_collate_without_semantic():
    from utils.data.sample import Sample
    from utils.ops.letterbox import Letterbox

    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "sample": Sample(np.zeros((8, 8, 3), np.uint8)),
              "letterbox": Letterbox.identity((8, 8))} for _ in range(2)]
    batch = collate(items)
    assert batch.semantic is None and batch.targets.shape == (0, 6)
    assert batch.letterboxes == [Letterbox.identity((8, 8))] * 2 and batch.orig_shapes == [(8, 8)] * 2


def _hang_in_worker(index: int):
    """Stands in for a worker stuck on a lock or a dead mount (only in a worker: the test process is safe)."""
    import time

    time.sleep(30)


def test_a_hung_worker_stops_with_a_clear_error_not_forever(tiny_data, monkeypatch):
    """With workers, a batch that never comes raises LoaderStalledError after the timeout (train.py prints it
    as one line and exits 2) instead of leaving the run waiting for ever."""
    import time

    d = load_data_config(tiny_data)
    ds = CocoDataset(d, d.train, 64, augment=False, hyp={}, seed=0)
    monkeypatch.setattr(ds, "load", _hang_in_worker)  # pickled into the forked worker with the dataset
    loader = create_dataloader(ds, 2, False, workers=1, timeout=2)
    t0 = time.time()
    with pytest.raises(LoaderStalledError, match="no batch from the data loader workers for 2 s.*--resume"):
        next(iter(stall_guard(loader)))
    assert time.time() - t0 < 20
    other = RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass through unchanged
        next(iter(stall_guard(_raise(other))))


def _raise(error: Exception):
    raise error
    yield  # a generator


# --- COCO as published (tests/coco_published.py) -------------------------------------------------------

def _copy_data(data_yaml: Path, dest: Path) -> Path:
    """A copy of ``data_yaml``'s dataset in ``dest`` (label caches left behind), and a yaml pointing at it."""
    d = yaml.safe_load(data_yaml.read_text())
    root = load_data_config(data_yaml).root
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.cache"))
    f = dest / "copy.yaml"
    f.write_text(yaml.safe_dump(d | {"path": str(dest)}))
    return f


def test_published_coco_is_read_as_written(coco_published):
    data = load_data_config(coco_published)
    inst = json.loads(data.train[0].instances.read_text())
    assert data.names == [c["name"] for c in inst["categories"]] and data.category_ids == [1, 3, 18, 44]
    assert [s.tasks for s in data.val] == [{"det", "inst", "sem", "cap"}, {"cap"}]
    ds = CocoDataset(data, data.train, 64)
    assert ds.labels_summary() == "no label problems"
    by_id = {rec.image_id: rec for _, rec in ds.items}
    assert sorted(by_id) == sorted(i["id"] for i in inst["images"]) != list(range(len(by_id)))
    for c in json.loads(data.train[0].captions.read_text())["annotations"]:
        assert " ".join(c["caption"].split()) in by_id[c["image_id"]].captions  # capitals, punctuation kept
    assert all(len(r.captions) == 5 for r in by_id.values())
    val = CocoDataset(data, data.val, 64)
    cap_only = [i for i, (s, _) in enumerate(val.items) if s.instances is None]
    assert len(val) == 8 and len(cap_only) == 4
    s = val.load(cap_only[0])
    assert s.present == {"det": False, "inst": False, "sem": False, "cap": True} and len(s.captions) == 5
    assert {r.image_id for s, r in val.items if s.instances is None}.isdisjoint(
        {r.image_id for s, r in val.items if s.instances is not None})


def test_published_crowd_rle_is_no_instance_but_keeps_its_semantic_pixels(coco_published):
    """COCO's crowd regions (uncompressed RLE) are not boxes or polygons (YOLOv5 and COCOeval ignore them);
    their pixels stay labelled in the semantic map."""
    from pycocotools import mask as mask_utils

    data = load_data_config(coco_published)
    inst = json.loads(data.train[0].instances.read_text())
    crowd = [a for a in inst["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed, as COCO's
    report = LabelReport()
    recs = {r.image_id: r for r in load_split(data.train[0], data.category_ids, report, use_cache=False)}
    assert report.summary() == "no label problems"  # a crowd RLE is not a "degenerate polygon"
    for a in crowd:
        rec = recs[a["image_id"]]
        own = [b for b in inst["annotations"] if b["image_id"] == a["image_id"] and not b["iscrowd"]]
        assert len(rec.boxes) == len(rec.segments) == len(own)
        assert all(len(polys) for polys in rec.segments)
        x, y, w, h = a["bbox"]
        assert not np.any(np.all(np.isclose(rec.boxes, [x, y, x + w, y + h], atol=1), axis=1))
        mask = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], rec.height, rec.width))
        assert mask.sum() == a["area"] > 0
        ds = CocoDataset(data, data.train, 64)
        i = next(i for i, (_, r) in enumerate(ds.items) if r.image_id == a["image_id"])
        sem = ds.load(i).semantic
        assert (sem[mask > 0] == data.semantic_ids.index(a["category_id"])).all()


def test_coco_stuff_other_is_not_a_semantic_class(coco_published):
    """Item 5: 'other' (183) is listed in stuff_*.json but never in the maps; it is no class."""
    from utils.data.config import read_categories

    data = load_data_config(coco_published)
    stuff = read_categories(data.root / "annotations/stuff_val2017.json")
    assert {"id": 183, "name": "other", "supercategory": "other"} in stuff  # the published quirk is there
    assert 183 not in data.semantic_ids and "other" not in data.semantic_names
    assert data.semantic_ids == sorted(data.category_ids + [c["id"] for c in stuff if c["id"] != 183])
    assert len(data.semantic_ids) == data.nc + len(stuff) - 1
    assert data.semantic_lut()[182] == IGNORE_INDEX


def test_coco_category_lists_give_171_semantic_classes(tmp_path):
    """Real COCO: 80 thing ids in 1..90 and COCO-Stuff's 92..183 make 80 + 91 classes, 'other' dropped."""
    missing = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # the ids COCO 2017 skips
    things = [{"supercategory": "x", "id": i, "name": f"thing{i}"} for i in range(1, 91) if i not in missing]
    stuff = [{"supercategory": "x", "id": i, "name": f"stuff{i}"} for i in range(92, 183)]
    stuff.append({"supercategory": "other", "id": 183, "name": "other"})
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": things}))
    (ann / "stuff.json").write_text(json.dumps({"images": [], "annotations": [], "categories": stuff}))
    split = {"images": "images", "instances": "annotations/instances.json", "semantic": "maps"}
    f = tmp_path / "coco.yaml"
    f.write_text(yaml.safe_dump({"path": str(tmp_path), "train": split, "val": split,
                                 "semantic_categories": "annotations/stuff.json"}))
    data = load_data_config(f, ensure=False)
    assert data.nc == 80 and len(data.semantic_ids) == 171 and max(data.semantic_ids) == 182


def test_semantic_classes_without_training_pixels_are_warned_once(coco_published, monkeypatch):
    """Item 5, generalised: a listed class no training map has a pixel of is named in one warning, from the
    values stored in the label cache (a second start decodes no map)."""
    import utils.data.coco as coco

    data = load_data_config(coco_published)
    ds = CocoDataset(data, data.train, 64)
    with pytest.warns(UserWarning) as caught:
        absent = ds.warn_absent_semantic_classes()
    assert absent == ["playingfield"]  # listed in stuff_val2017.json, drawn in val maps only
    assert len(caught) == 1 and f"1 of {len(data.semantic_ids)} semantic classes" in str(caught[0].message)
    assert "playingfield" in str(caught[0].message)
    assert CocoDataset(data, data.val[:1], 64).absent_semantic_classes() == []  # the val maps have it

    def not_again(*args, **kwargs):
        raise AssertionError("the label cache should have been used")

    monkeypatch.setattr(coco, "parse_split", not_again)
    monkeypatch.setattr(coco, "read_semantic_map", not_again)
    assert CocoDataset(data, data.train, 64).absent_semantic_classes() == ["playingfield"]


def test_semantic_values_of_no_category_are_counted_by_file(coco_published, tmp_path):
    """Item 11: map values the LUT sends to 255 are named with the file; also after the ids change."""
    f = _copy_data(coco_published, tmp_path / "copy")
    data = load_data_config(f)
    maps = sorted(data.train[0].semantic.iterdir())
    m = cv2.imread(str(maps[0]), cv2.IMREAD_UNCHANGED)
    m[:4, :4], m[4:8, :4] = 182, 200  # 'other' written as a value, and a value of no category at all
    cv2.imwrite(str(maps[0]), m)
    summary = CocoDataset(data, data.train, 64).labels_summary()
    assert f"1 semantic maps with values of no category (ignored): {maps[0].name}:182,200" in summary
    # fewer semantic classes (the stuff JSON edited): the cache is rebuilt and 'sea' maps are reported
    stuff_file = data.root / "annotations/stuff_val2017.json"
    stuff = json.loads(stuff_file.read_text())
    stuff["categories"] = [c for c in stuff["categories"] if c["name"] != "sea"]
    stuff_file.write_text(json.dumps(stuff))
    data = load_data_config(f)
    has_sea = [p.name for p in maps if (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) == 154).any()]
    summary = CocoDataset(data, data.train, 64).labels_summary()
    assert has_sea and f"{len(has_sea) + (maps[0].name not in has_sea)} semantic maps with values" in summary
    assert all(f"{name}:154" in summary for name in has_sea if name != maps[0].name)


# --- the label cache: keyed on everything it stores (item 7) ---------------------------------------------

def test_label_cache_is_reused_for_an_unchanged_tree(coco_published, tmp_path, monkeypatch):
    import utils.data.coco as coco

    data = load_data_config(_copy_data(coco_published, tmp_path / "copy"))
    first = CocoDataset(data, data.train, 64)
    monkeypatch.setattr(coco, "parse_split", lambda *a, **k: pytest.fail("parsed again"))
    second = CocoDataset(data, data.train, 64)
    assert [r.image_id for _, r in second.items] == [r.image_id for _, r in first.items]
    assert second.labels_summary() == first.labels_summary()


def test_label_cache_is_rebuilt_when_a_semantic_map_changes(coco_published, tmp_path):
    data = load_data_config(_copy_data(coco_published, tmp_path / "copy"))
    before = CocoDataset(data, data.train, 64)
    png = min(data.train[0].semantic.iterdir())
    m = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    m[-8:] = data.semantic_ids[data.semantic_names.index("playingfield")] - 1
    cv2.imwrite(str(png), m[:, :-2])  # new values, and the wrong size
    ds = CocoDataset(data, data.train, 64)
    assert f"1 semantic maps of the wrong size (resized): {png.name}" in ds.labels_summary()
    assert before.absent_semantic_classes() == ["playingfield"] and ds.absent_semantic_classes() == []


def test_label_cache_is_rebuilt_when_an_image_is_truncated(coco_published, tmp_path):
    data = load_data_config(_copy_data(coco_published, tmp_path / "copy"))
    n = len(CocoDataset(data, data.train, 64))
    jpg = sorted(data.train[0].images.iterdir())[3]
    jpg.write_bytes(jpg.read_bytes()[:300])
    ds = CocoDataset(data, data.train, 64)
    assert len(ds) == n - 1 and f"1 truncated JPEGs: {jpg.name}" in ds.labels_summary()


def test_label_cache_is_rebuilt_when_a_caption_changes_in_place(coco_published, tmp_path):
    """Same size, same mtime: the JSON's content decides."""
    import os

    data = load_data_config(_copy_data(coco_published, tmp_path / "copy"))
    CocoDataset(data, data.train, 64)
    f = data.train[0].captions
    st = f.stat()
    d = json.loads(f.read_text())
    old = d["annotations"][0]["caption"]
    new = old.swapcase()
    assert new != old and len(new.encode()) == len(old.encode())
    d["annotations"][0]["caption"] = new
    f.write_text(json.dumps(d))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    ds = CocoDataset(data, data.train, 64)
    rec = next(r for _, r in ds.items if r.image_id == d["annotations"][0]["image_id"])
    assert " ".join(new.split()) in rec.captions and " ".join(old.split()) not in rec.captions
