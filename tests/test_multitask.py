"""Multi-task rules: caption-safe augmentation, partial labels across splits, balancing in a real run."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

import train as train_script
from tests.conftest import tiny_cfg, train_args
from utils.data import augment as A
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader


def test_flipped_or_mosaic_samples_never_reach_the_caption_loss(tiny_data):
    """Every training sample that still carries captions is exactly the weak view (letterbox only)."""
    data = load_data_config(tiny_data)
    hyp = {"mosaic": 0.5, "fliplr": 1.0, "degrees": 10.0, "translate": 0.2, "scale": 0.5,
           "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}  # flip always: any leak would show
    ds = CocoDataset(data, data.train, 96, augment=True, hyp=hyp, seed=0, caption_view=0.5)
    with_caps = 0
    for epoch in range(3):
        ds.epoch = epoch
        for i in range(len(ds)):
            sample, _ = ds.transform(i)
            if not sample.present["cap"]:
                assert sample.captions == []
                continue
            with_caps += 1
            weak, _ = A.letterbox(A.load_resized(ds.load(i), 96), 96)
            assert sample.captions == weak.captions and sample.captions
            np.testing.assert_allclose(sample.boxes, weak.boxes, atol=1e-4)  # not flipped, not warped
            assert np.array_equal(sample.image, weak.image)  # HSV gains are 0 here
    assert 0 < with_caps < 3 * len(ds)  # both views occur


def test_no_caption_view_without_a_caption_head(tiny_data):
    data = load_data_config(tiny_data)
    ds = CocoDataset(data, data.train, 96, augment=True, hyp={"mosaic": 0.0}, caption_view=0.0)
    assert not any(ds.transform(i)[0].present["cap"] for i in range(len(ds)))


@pytest.fixture(scope="module")
def mixed_data(tiny_data, tmp_path_factory):
    """train = [a split with only captions, a split with only boxes/masks and maps]."""
    d = yaml.safe_load(tiny_data.read_text())
    t = d["train"]
    d["train"] = [{"images": t["images"], "captions": t["captions"]},
                  {"images": d["val"]["images"], "instances": d["val"]["instances"], "semantic": d["val"]["semantic"]}]
    f = tmp_path_factory.mktemp("mixed") / "mixed.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def test_partial_labels_are_flags_per_image(mixed_data):
    data = load_data_config(mixed_data)
    assert data.tasks == ["det", "inst", "sem", "cap"]
    ds = CocoDataset(data, data.train, 64)
    flags = {tuple(ds.load(i).present.values()) for i in range(len(ds))}
    assert flags == {(False, False, False, True), (True, True, True, False)}
    batch = next(iter(create_dataloader(ds, len(ds), shuffle=False)))
    caption_only = ~batch.task_present("det")
    assert batch.task_present("cap")[caption_only].all()
    assert (batch.semantic[caption_only] == 255).all()  # no map: ignored everywhere, not "background"


@pytest.mark.parametrize("balance", ["mtcp", "uncertainty"])
def test_mixed_partial_labels_train_with_dynamic_balancing(mixed_data, tmp_path, balance):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg()))
    args = train_args(cfg, mixed_data, tmp_path, 3, "run", "--balance", balance)
    assert train_script.main(args) == 0
    with open(tmp_path / "run/results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for t in ("det", "inst", "sem", "cap"):
        assert f"weight/{t}" in rows[0] and np.isfinite(float(rows[-1][f"train/{t}_loss"]))
        for k in ("box_map", "mask_map", "sem_miou", "cap_bleu4"):
            assert k in rows[-1]
    weights = [float(rows[-1][f"weight/{t}"]) for t in ("det", "inst", "sem", "cap")]
    assert len(set(weights)) > 1  # the rule moved the weights away from the fixed gains


def test_single_task_caption_run_survives_batches_without_captions(tiny_data, tmp_path):
    """--tasks cap: strong-view batches carry no caption at all; the step is an exact zero, not a crash."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg()))
    hyp_file = Path(__file__).resolve().parents[1] / "data/hyps/hyp.scratch.yaml"
    hyp = yaml.safe_load(hyp_file.read_text()) | {"cap_view": 0.0}  # no batch has a caption
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    args = train_args(cfg, tiny_data, tmp_path, 1, "cap", "--batch-size", "4", "--tasks", "cap", "--noplots",
                      "--hyp", str(tmp_path / "hyp.yaml"))
    assert train_script.main(args) == 0
    with open(tmp_path / "cap/results.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    assert "cap_bleu4" in row and "box_map" not in row
