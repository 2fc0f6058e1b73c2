"""train.py's --freeze and --single-cls (YOLOv5's), in real tiny CPU runs."""
from __future__ import annotations

import json

import pytest
import torch

import test as test_script
import train as train_script
import utils.engine.trainer as trainer_module
from tests.conftest import train_args
from utils.engine.optim import freeze_rows


def _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, *extra: str) -> trainer_module.Trainer:
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", 8)  # a step after every batch of 8
    return trainer_module.Trainer(train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, 1, "exp",
                                                                    "--noval", "--noplots", *extra)))


@pytest.mark.parametrize("spec, rows", [("", []), ("0", []), ("3", [0, 1, 2]), ("5,", [5]), ("4,1,1", [1, 4])])
def test_freeze_rows_count_or_indices(spec, rows):
    assert freeze_rows(spec, 30) == rows


@pytest.mark.parametrize("spec", ["31", "-1", "2,30", "a", "1;2"])
def test_freeze_rows_refuses_what_the_cfg_does_not_have(spec):
    with pytest.raises(ValueError, match="--freeze"):
        freeze_rows(spec, 30)


def _params(model, rows) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"layers.{r}." for r in rows)
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefixes)}


def _bn_statistics(model, rows) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"layers.{r}." for r in rows)
    return {k: v.clone() for k, v in model.named_buffers() if k.startswith(prefixes) and k.endswith("running_mean")}


@pytest.mark.parametrize("spec, frozen", [("10", range(10)), ("0,4", [0, 4])])
def test_frozen_rows_do_not_move_and_the_others_do(spec, frozen, tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """After an epoch of optimizer steps (3), every parameter and BatchNorm statistic of a frozen row is
    bit-identical; every other row with parameters has changed, and so have the other rows' statistics."""
    trainer = _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, "--freeze", spec)
    model = trainer.model
    others = [i for i in range(len(model.layers)) if i not in frozen and any(True for _ in model.layers[i].parameters())]
    before, before_others = _params(model, frozen), {i: _params(model, [i]) for i in others}
    stats, stats_others = _bn_statistics(model, frozen), _bn_statistics(model, others)
    assert before and stats and stats_others
    assert all(not p.requires_grad for k, p in model.named_parameters() if k in before)
    trainer.run()
    after, stats_after = _params(model, frozen), _bn_statistics(model, frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(stats[k], stats_after[k]) for k in stats)
    moved = _bn_statistics(model, others)
    assert any(not torch.equal(v, moved[k]) for k, v in stats_others.items())
    for i in others:
        now = _params(model, [i])
        assert any(not torch.equal(v, now[k]) for k, v in before_others[i].items()), f"row {i} did not train"


def test_single_cls_trains_one_class_item_and_scores_it(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """--single-cls: a 1-class model named 'item' (the data has several classes), every target class 0, and
    box / mask metrics out of validation and of test.py on the same checkpoint (ground truth collapsed)."""
    seen = set()
    trainer = _trainer(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, "--single-cls")
    assert trainer.data.names == ["item"] and trainer.model.nc == 1
    assert len(trainer.data.label_ids) > 1  # the labels are read with the data's own classes
    trainer.on_step.append(lambda t: seen.update(t.batch.targets[:, 1].tolist()))
    run = trainer.run()
    assert seen == {0.0}
    ckpt = torch.load(run / "weights/best.pt", weights_only=True)
    assert ckpt["meta"]["names"] == ["item"] and ckpt["meta"]["category_ids"] == [1]
    metrics = trainer.metrics
    assert 0.0 <= metrics["box_map"] <= 1.0 and 0.0 <= metrics["mask_map"] <= 1.0
    out = tmp_path / "test"
    assert test_script.main(["--weights", str(run / "weights/best.pt"), "--project", str(out), "--workers", "0",
                             "--batch-size", "8", "--device", "cpu"]) == 0
    scored = json.loads((out / "exp/metrics.json").read_text())
    assert scored["box_map"] == pytest.approx(metrics["box_map"], abs=1e-6)
    assert not train_script.parse_opt([]).single_cls and train_script.parse_opt([]).freeze == ""


def test_single_cls_ground_truth_is_one_category(tiny_data):
    """The evaluation's ground truth under --single-cls: every annotation of every class is category 1."""
    from utils.data.config import load_data_config
    from utils.eval.metrics.detection import load_ground_truth

    data = load_data_config(tiny_data)
    files = [s.instances for s in data.val]
    plain, single = load_ground_truth(files), load_ground_truth(files, 1)
    assert len({a["category_id"] for a in plain.dataset["annotations"]}) > 1
    assert {a["category_id"] for a in single.dataset["annotations"]} == {1}
    assert len(single.dataset["annotations"]) == len(plain.dataset["annotations"])
    assert single.getCatIds() == [1]


def test_rect_shapes_follow_yolov5s_rule(tmp_path):
    """Sorted by aspect ratio; a batch of wide images is letterboxed to ceil(ratio * img / stride + pad) * stride
    high and img wide (+ pad), one of tall images the other way round, a square one stays square; the images keep
    their square-validation scale inside those shapes (padding only)."""
    from tests.yolo_layout import write_coco8_seg
    from utils.data.config import load_data_config
    from utils.data.dataset import CocoDataset

    wide = write_coco8_seg(tmp_path / "wide", n_train=2, n_val=3, size=(96, 48))
    tall = write_coco8_seg(tmp_path / "tall", n_train=2, n_val=2, size=(48, 96), seed=1)
    data = load_data_config(wide)
    ds = CocoDataset(data, data.val + load_data_config(tall).val, 64)
    ds.rect(2, 32, 0.5)
    ratios = [rec.height / rec.width for _, rec in ds.items]
    assert ratios == sorted(ratios) == [0.5] * 3 + [2.0] * 2
    # h/w 0.5: ceil(0.5 * 2 + 0.5) = 2 strides high, ceil(2.5) = 3 wide; the mixed batch is square
    assert ds.batch_shapes.tolist() == [[64, 96], [96, 96], [96, 64]]
    assert [tuple(ds[i]["image"].shape[1:]) for i in range(5)] == [(64, 96)] * 2 + [(96, 96)] * 2 + [(96, 64)]
    # a rect shape only pads: each image has the scale it has in square validation (long side 64), as YOLOv5
    square = CocoDataset(data, data.val + load_data_config(tall).val, 64)
    scale = {square.items[i][1].file: square[i]["letterbox"].ratio for i in range(5)}
    assert [ds[i]["letterbox"].ratio for i in range(5)] == [scale[rec.file] for _, rec in ds.items]
    assert set(scale.values()) == {64 / 96}


def test_rect_trains_and_validates_with_square_metrics(tiny_cfg_file, tmp_path, monkeypatch):
    """--rect on 4:3 images at --img 128: training batches 96 x 128 (pad 0, not shuffled, no mosaic); test.py
    --rect (128 x 160 batches) gives the square validation's metrics within 0.05 (a tiny model's scores move
    with the padding's few pixels), every image scored."""
    from tests.yolo_layout import write_coco8_seg

    data = write_coco8_seg(tmp_path, n_train=8, n_val=4, size=(96, 72))
    shapes = set()
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", 8)
    opt = train_script.parse_opt(train_args(tiny_cfg_file, data, tmp_path / "runs", 1, "exp", "--noplots", "--rect",
                                            "--img", "128", "--batch-size", "4"))
    trainer = trainer_module.Trainer(opt)
    trainer.on_step.append(lambda t: shapes.add(tuple(t.batch.images.shape[2:])))
    weights = trainer.run() / "weights/best.pt"
    assert shapes == {(96, 128)} and trainer.train_set.batch_shapes.tolist() == [[96, 128]] * 2
    metrics = {}
    for rect in (False, True):
        out = tmp_path / f"test{rect}"
        assert test_script.main(["--weights", str(weights), "--project", str(out), "--workers", "0", "--batch-size",
                                 "2", "--device", "cpu"] + ["--rect"] * rect) == 0
        metrics[rect] = json.loads((out / "exp/metrics.json").read_text())
    assert metrics[True]["images"] == metrics[False]["images"] == 4
    for k in ("box_map", "box_map50", "mask_map", "mask_map50"):
        assert metrics[True][k] == pytest.approx(metrics[False][k], abs=0.05), k
