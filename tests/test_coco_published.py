"""A run on COCO as published (tests/coco_published.py: stuff JSON with 183 'other', crowd annotations as
uncompressed RLE, captions with capitals and punctuation, a caption-only split in the val list) trains,
validates every task on the images that carry it, and its checkpoint's semantic classes exclude 183."""
from __future__ import annotations

import json

import pytest
import torch

import test as test_script
import train as train_script
from tests.coco_published import (
    CAPTION_ONLY,
    OTHER_ID,
    SPLITS,
    STUFF_CATEGORIES,
    THING_CATEGORIES,
    TRAIN_ONLY_ABSENT,
)
from tests.conftest import train_args


@pytest.mark.slow
def test_published_coco_trains_validates_and_drops_other(tiny_cfg_file, coco_published, tmp_path):
    with pytest.warns(UserWarning, match=f"no pixel in any training map: {TRAIN_ONLY_ABSENT}$"):
        assert train_script.main(train_args(tiny_cfg_file, coco_published, tmp_path / "runs", 1, "coco", "--noplots")) == 0
    save_dir = tmp_path / "runs/coco"
    ckpt = torch.load(save_dir / "weights/last.pt", weights_only=True)
    meta = ckpt["meta"]
    stuff = [c["id"] for c in STUFF_CATEGORIES if c["id"] != OTHER_ID]
    assert OTHER_ID not in meta["semantic_ids"]
    assert meta["semantic_ids"] == sorted(c["id"] for c in THING_CATEGORIES) + stuff
    assert ckpt["head_kwargs"]["sem"]["num_classes"] == len(THING_CATEGORIES) + len(stuff)
    assert meta["category_ids"] == [c["id"] for c in THING_CATEGORIES]  # original ids, in JSON order

    out = tmp_path / "test/exp"
    assert test_script.main(["--weights", str(save_dir / "weights/last.pt"), "--data", str(coco_published), "--img",
                             "64", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--project",
                             str(tmp_path / "test"), "--save-json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("box_map", "mask_map", "sem_miou", "cap_cider"):  # every task scored, none crashed
        assert key in metrics, sorted(metrics)
    # boxes are scored on the split with instances only; captions on both splits
    boxes = json.loads((out / "predictions.json").read_text())
    assert {d["image_id"] for d in boxes} <= set(SPLITS["val2017"])
    assert not {d["image_id"] for d in boxes} & set(CAPTION_ONLY[1])
