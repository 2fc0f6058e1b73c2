"""Data yaml convention, COCO-layout reading, label cache, bad input handling, and collate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from utils.data.coco import LabelReport, load_split
from utils.data.config import DataError, load_data_config
from utils.data.dataset import CocoDataset, LoaderStalledError, collate, create_dataloader, stall_guard
from utils.data.sample import IGNORE_INDEX, TASKS


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


def test_collate_without_semantic():
    from utils.data.sample import Sample

    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "sample": Sample(np.zeros((8, 8, 3), np.uint8)),
              "ratio_pad": (1.0, (0.0, 0.0))} for _ in range(2)]
    batch = collate(items)
    assert batch.semantic is None and batch.targets.shape == (0, 6)


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
