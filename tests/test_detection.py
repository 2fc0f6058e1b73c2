"""Detection: loss behaviour, assignment, NMS options, and COCOeval on hand-checked cases."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
from pycocotools.coco import COCO

from models.model import Model
from tests.conftest import tiny_cfg
from utils.eval.metrics.detection import coco_map
from utils.loss.detection import DetectionLoss, TaskAlignedAssigner, pad_targets
from utils.ops.nms import non_max_suppression
from utils.ops.options import PredictOptions


def test_pad_targets_groups_by_image():
    t = torch.tensor([[1, 2, 0, 0, 5, 5], [0, 1, 1, 1, 4, 4], [1, 0, 2, 2, 8, 8]], dtype=torch.float32)
    cls, boxes, mask = pad_targets(t, 3)
    assert cls.tolist() == [[1, -1], [2, 0], [-1, -1]]
    assert mask.tolist() == [[True, False], [True, True], [False, False]]
    assert boxes[1, 1].tolist() == [2, 2, 8, 8]


def test_assigner_picks_points_inside_the_object():
    points = torch.tensor([[x + 0.5, y + 0.5] for y in range(8) for x in range(8)], dtype=torch.float32)
    gt = torch.tensor([[[1.0, 1.0, 4.0, 4.0]]])
    scores = torch.full((1, 64, 2), 0.5)
    boxes = gt.expand(1, 64, 4).clone()
    tb, ts, fg, _ = TaskAlignedAssigner(topk=4)(scores, boxes, points, torch.tensor([[1]]), gt, torch.tensor([[True]]))
    assert fg.sum() == 4
    inside = (points[:, 0] > 1) & (points[:, 0] < 4) & (points[:, 1] > 1) & (points[:, 1] < 4)
    assert inside[fg[0]].all()
    assert (ts[0, fg[0], 1] > 0).all() and (ts[0, :, 0] == 0).all()


def test_min_side_widens_only_where_candidates_are_chosen():
    """A 1.5-pixel object on a 1-pixel grid holds one point; with min_side 4 (Ultralytics widens sides under its
    middle stride) it may take points from a 4 x 4 region about its centre, while its target box stays itself."""
    points = torch.tensor([[x + 0.5, y + 0.5] for y in range(8) for x in range(8)], dtype=torch.float32)
    gt = torch.tensor([[[3.0, 3.0, 4.5, 4.5]]])
    scores = torch.full((1, 64, 1), 0.5)
    boxes = gt.expand(1, 64, 4).clone()
    args = (scores, boxes, points, torch.tensor([[0]]), gt, torch.tensor([[True]]))
    _, _, fg, _ = TaskAlignedAssigner(topk=20)(*args)
    tb, _, wide, _ = TaskAlignedAssigner(topk=20, min_side=4.0)(*args)
    assert fg.sum() == 1 and wide.sum() == 16  # about the centre (3.75, 3.75): points 2.5 .. 5.5 on each axis
    assert wide[fg].all()
    chosen = points[wide[0]]
    assert (chosen > 1.75).all() and (chosen < 5.75).all()
    assert torch.equal(tb[0, wide[0]], gt[0].expand(16, 4))


def test_ciou_assigner_prefers_the_centred_prediction_of_equal_iou():
    # two predictions with the same IoU to the object; CIoU's centre-distance term breaks the tie toward
    # the one whose centre is the object's, plain IoU scores them equal
    points = torch.tensor([[5.0, 5.0], [5.5, 5.0]])
    gt = torch.tensor([[[2.0, 2.0, 8.0, 8.0]]])
    boxes = torch.tensor([[[2.0, 2.0, 8.0, 8.0 - 1.2], [2.0, 2.6, 8.0, 8.0 - 0.6]]])  # same size, shifted
    scores = torch.full((1, 2, 1), 0.5)
    args = (scores, boxes, points, torch.tensor([[0]]), gt, torch.tensor([[True]]))
    _, plain, _, _ = TaskAlignedAssigner(topk=2)(*args)
    _, ciou, _, _ = TaskAlignedAssigner(topk=2, ciou=True)(*args)
    assert torch.allclose(plain[0, 0], plain[0, 1])
    assert ciou[0, 1, 0] > ciou[0, 0, 0]
    assert DetectionLoss(Model(tiny_cfg(), nc=3, tasks=["det"]).head("det"), {"assign_ciou": True}).assigner.ciou
    degenerate = torch.tensor([[[5.0, 5.0, 5.0, 5.0], [2.0, 2.6, 8.0, 7.4]]])  # a zero-size prediction
    _, ts, fg, _ = TaskAlignedAssigner(topk=2, ciou=True)(scores, degenerate, *args[2:])
    assert torch.isfinite(ts).all() and fg.any()


def overfit_detection(steps: int, present: bool = True, cfg: dict | None = None, loss_cls=DetectionLoss,
                      hyp: dict | None = None):
    """Trains a det-only model on two fixed images (3 objects) for ``steps``; ``present`` flags image 0's labels.
    Returns (model, images, losses, last parts); shared by the anchor-free and anchor-based head tests."""
    torch.manual_seed(0)
    model = Model(cfg or tiny_cfg(), nc=3, tasks=["det"])
    loss_fn = loss_cls(model.head("det"), {"box": 7.5, "cls": 0.5, "dfl": 1.5} if hyp is None else hyp)
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 8, 8, 40, 30], [1, 2, 20, 10, 60, 60], [1, 0, 2, 40, 20, 62]], dtype=torch.float32)
    pres = torch.tensor([present, True])
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    losses = []
    for _ in range(steps):
        loss, parts, _ = loss_fn(model(x).det.feats, targets, pres)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, x, losses, parts


def test_detection_loss_is_finite_and_decreases_when_overfitting():
    model, x, losses, parts = overfit_detection(60)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(parts) == {"box", "cls", "dfl"}
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # decode train-mode maps: 60 steps are too few for BatchNorm running stats
        det = non_max_suppression(model.head("det").decode(model(x).det.feats),
                                  PredictOptions(conf_thres=0.05, iou_thres=0.5))
    from torchvision.ops import box_iou

    top = det[1][:2]  # image 1 has two objects: class 2 at (20,10,60,60) and class 0 at (2,40,20,62)
    assert len(top) == 2 and sorted(top[:, 5].long().tolist()) == [0, 2]
    gt = torch.tensor([[20.0, 10, 60, 60], [2, 40, 20, 62]])
    assert box_iou(top[:, :4], gt).max(1).values.min() > 0.5


def test_absent_labels_contribute_nothing():
    torch.manual_seed(0)
    model = Model(tiny_cfg(), nc=3, tasks=["det"])
    loss_fn = DetectionLoss(model.head("det"), {})
    feats = model(torch.rand(2, 3, 64, 64)).det.feats
    t1 = torch.tensor([[0, 1, 8, 8, 40, 30], [1, 2, 20, 10, 60, 60]], dtype=torch.float32)
    t2 = torch.tensor([[0, 0, 1, 1, 20, 20], [1, 2, 20, 10, 60, 60]], dtype=torch.float32)
    pres = torch.tensor([False, True])
    a, *_ = loss_fn(feats, t1, pres)
    b, *_ = loss_fn(feats, t2, pres)
    assert torch.allclose(a, b)
    c, *_ = loss_fn(feats, t2, torch.tensor([True, True]))
    assert not torch.allclose(a, c)
    none, *_ = loss_fn(feats, torch.zeros((0, 6)), torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # still a graph: an all-absent batch must not crash the step


def test_nms_options():
    pred = torch.zeros(1, 4, 4 + 2)
    pred[0, :, :4] = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    pred[0, :, 4:] = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.3, 0.0]])
    opts = PredictOptions(conf_thres=0.25, iou_thres=0.5)
    out = non_max_suppression(pred, opts)[0]
    assert out.shape == (3, 6) and out[:, 5].tolist() == [0, 1, 0]  # class-aware: box 2 kept (other class)
    agn = non_max_suppression(pred, replace(opts, agnostic=True))[0]
    assert agn.shape[0] == 2
    assert non_max_suppression(pred, replace(opts, max_det=1))[0].shape[0] == 1
    only = replace(opts, conf_thres=0.5, classes=[1])
    assert only.classes == (1,)  # any sequence is stored as a tuple
    assert non_max_suppression(pred, only)[0][:, 5].tolist() == [1]
    with pytest.raises(ValueError):
        non_max_suppression(pred, PredictOptions(conf_thres=1.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.conf_thres = 0.5  # frozen: shared defaults cannot be changed under another caller


def _gt() -> COCO:
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 7, "width": 100, "height": 100}, {"id": 9, "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "a"}, {"id": 11, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 11, "bbox": [50, 40, 20, 40], "area": 800, "iscrowd": 0},
        ],
    }
    gt.createIndex()
    return gt


def test_coco_map_hand_checked():
    gt = _gt()
    perfect = [{"image_id": 7, "category_id": 3, "bbox": [10, 10, 30, 30], "score": 0.9},
               {"image_id": 9, "category_id": 11, "bbox": [50, 40, 20, 40], "score": 0.8}]
    m = coco_map(gt, perfect, [7, 9], [3, 11])
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    # class 11 predicted with the wrong id -> class 11 AP 0, class 3 AP 1 -> mAP 0.5
    wrong = [perfect[0], perfect[1] | {"category_id": 3}]
    m = coco_map(gt, wrong, [7, 9], [3, 11])
    assert m["map"] == pytest.approx(0.5) and m["per_class"][11] == 0.0
    # a box with IoU 0.6 (x shifted by 10 of width 30 -> 20/40) counts at IoU 0.5 and 0.55 only: 2 of 10
    shifted = [perfect[0] | {"bbox": [20, 10, 30, 30]}]
    m = coco_map(gt, shifted, [7], [3])
    assert m["map50"] == pytest.approx(1.0) and m["map"] == pytest.approx(0.1)
    assert coco_map(gt, [], [7, 9], [3, 11])["map"] == 0.0


def test_ground_truth_is_read_once_until_the_file_changes(tmp_path):
    """Validation every epoch reuses the parsed instances JSON; an edited file is read again."""
    import json
    import os

    from utils.eval.metrics.detection import load_ground_truth

    def write(n_boxes: int, mtime: int) -> None:
        d = {"images": [{"id": 1, "width": 50, "height": 50, "file_name": "a.jpg"}],
             "annotations": [{"image_id": 1, "category_id": 1, "bbox": [i, i, 5, 5]} for i in range(n_boxes)],
             "categories": [{"id": 1, "name": "a"}]}
        f.write_text(json.dumps(d))
        os.utime(f, ns=(mtime, mtime))

    f = tmp_path / "instances.json"
    write(2, 10**18)
    first = load_ground_truth([f])
    assert load_ground_truth([f]) is first and len(first.getAnnIds()) == 2
    write(3, 2 * 10**18)
    again = load_ground_truth([f])
    assert again is not first and len(again.getAnnIds()) == 3
