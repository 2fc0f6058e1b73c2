"""Anchor-based detection head: target matching, loss, decoding, instance refusal, training, export, k-means.

Fuse parity of DetectAnchor is in tests/test_model.py (test_fuse_is_exact_and_complete).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

import train as train_script
from models.heads.detect_anchor import COCO_ANCHORS, DetectAnchor
from models.model import Model
from models.parser import CfgError
from tests.conftest import HEAD_KW, randomize_bn_and_implicits, tiny_cfg, train_args
from tests.test_detection import overfit_detection
from utils.data.dataset import dataset_wh
from utils.loss.detection_anchor import AnchorDetectionLoss
from utils.ops.anchors import anchors_per_level, best_possible_recall, kmeans_anchors
from utils.ops.nms import non_max_suppression
from utils.ops.options import PredictOptions
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint

ANCHORS = [[8, 8, 16, 16, 24, 24], [20, 40, 40, 20, 40, 40], [40, 60, 60, 40, 70, 70]]  # pixels at 64


def anchor_cfg(anchors: list | None = ANCHORS) -> dict:
    """The tiny test cfg with its Detect row swapped for DetectAnchor."""
    d = tiny_cfg()
    row = next(r for r in d["heads"] if r[2] == "Detect")
    row[2], row[3] = "DetectAnchor", [anchors] if anchors is not None else []
    return d


def test_build_targets_hand_checked():
    # two levels of a 64 px image: stride 8 (8x8 cells) and 16 (4x4); anchors in pixels
    head = DetectAnchor(2, [8, 8], [8, 16], anchors=[[8, 8, 80, 80], [32, 32, 80, 80]])
    loss = AnchorDetectionLoss(head, {})
    targets = torch.tensor([[0, 1, 11, 5, 27, 21],    # 16x16 box centred at (19, 13)
                            [1, 0, 2, 30, 62, 34]],   # 60x4: 7.5:1 or worse against every anchor
                           dtype=torch.float32)
    lv0, lv1 = loss.build_targets([(8, 8), (4, 4)], targets)
    # stride 8: centre (2.375, 1.625) cells, size 2x2 cells. Anchor 0 (1x1 cells, ratio 2) matches, anchor 1
    # (10x10, ratio 5 > anchor_t 4) does not. Cells: its own (2, 1); x fraction .375 < .5 -> left neighbour
    # (1, 1); y fraction .625 -> the lower one (2, 2).
    got0 = sorted(zip(lv0.image.tolist(), lv0.anchor.tolist(), lv0.gi.tolist(), lv0.gj.tolist()))
    assert got0 == [(0, 0, 1, 1), (0, 0, 2, 1), (0, 0, 2, 2)]
    # stride 16: centre (1.1875, 0.8125), size 1x1 cell. Anchor 0 (2x2, ratio 2) matches. Own cell (1, 0);
    # x fraction .1875 -> left (0, 0); y .8125 -> below (1, 1) (there is no cell above row 0 anyway)
    got1 = sorted(zip(lv1.image.tolist(), lv1.anchor.tolist(), lv1.gi.tolist(), lv1.gj.tolist()))
    assert got1 == [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 1, 1)]
    assert lv0.target.tolist() == [0] * 3 and lv0.cls.tolist() == [1] * 3  # the thin box matched nothing
    torch.testing.assert_close(lv0.box, torch.tensor([[2.375, 1.625, 2.0, 2.0]] * 3))
    torch.testing.assert_close(lv1.box, torch.tensor([[1.1875, 0.8125, 1.0, 1.0]] * 3))
    # a looser ratio lets the 10x10-cell anchor match the 2x2-cell box too (ratio 5 < 6)
    loose = AnchorDetectionLoss(head, {"anchor_t": 6.0}).build_targets([(8, 8), (4, 4)], targets)[0]
    assert sorted(set(loose.anchor.tolist())) == [0, 1]


def test_decode_hand_made_map():
    head = DetectAnchor(2, [8], [8], anchors=[[10, 20, 30, 40]]).eval()  # one level, 2 anchors, 2 classes
    f = torch.zeros(1, 2 * 7, 2, 3)  # logits 0 everywhere: sigmoid 0.5 -> cell centre, anchor size, 0.5 * 0.5
    big = 30.0
    a, gj, gi = 1, 1, 2  # anchor 1 at row 1, column 2
    f[0, a * 7 + 0, gj, gi] = big  # x: 2 * 1 - 0.5 + 2 = 3.5 cells = 28 px
    f[0, a * 7 + 1, gj, gi] = -big  # y: -0.5 + 1 = 0.5 cells = 4 px
    f[0, a * 7 + 2, gj, gi] = torch.logit(torch.tensor(0.25))  # w: (2 * 0.25)^2 * 30 = 7.5 px
    f[0, a * 7 + 4, gj, gi] = big  # objectness 1
    f[0, a * 7 + 6, gj, gi] = torch.logit(torch.tensor(0.8))
    pred = head.decode([f])
    assert pred.shape == (1, 2 * 2 * 3, 4 + 2)
    row = a * 6 + gj * 3 + gi  # order: anchor, row, column
    torch.testing.assert_close(pred[0, row], torch.tensor([28 - 3.75, 4 - 20, 28 + 3.75, 4 + 20, 0.5, 0.8]))
    torch.testing.assert_close(pred[0, 0], torch.tensor([4 - 5, 4 - 10, 4 + 5, 4 + 10, 0.25, 0.25]))  # anchor 0
    torch.testing.assert_close(pred[0, 5], torch.tensor([20 - 5, 12 - 10, 20 + 5, 12 + 10, 0.25, 0.25]))  # (1, 2)


def test_eval_output_matches_detect_layout():
    model = Model(anchor_cfg(), nc=3, tasks=["det"]).eval()
    out = model(torch.rand(2, 3, 64, 96)).det
    assert [tuple(f.shape) for f in out.feats] == [(2, 3 * 8, 8, 12), (2, 3 * 8, 4, 6), (2, 3 * 8, 2, 3)]
    assert out.pred.shape == (2, 3 * (96 + 24 + 6), 4 + 3)
    assert 0 <= out.pred[..., 4:].min() and out.pred[..., 4:].max() <= 1
    head = model.head("det")
    assert head.anchors.tolist() == torch.tensor(ANCHORS, dtype=torch.float32).view(3, 3, 2).tolist()
    assert "anchors" not in head.state_dict()  # the cfg holds them
    default = Model(anchor_cfg(None), nc=3, tasks=["det"]).head("det")
    assert default.anchors.view(3, -1).tolist() == [[float(v) for v in level] for level in COCO_ANCHORS]


def test_loss_is_finite_and_decreases_when_overfitting():
    model, x, losses, parts = overfit_detection(60, cfg=anchor_cfg(), loss_cls=AnchorDetectionLoss, hyp={})
    assert all(np.isfinite(losses)) and set(parts) == {"box", "obj", "cls"}
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # decode train-mode maps: 60 steps are too few for BatchNorm running stats
        det = non_max_suppression(model.head("det").decode(model(x).det.feats),
                                  PredictOptions(conf_thres=0.05, iou_thres=0.5))
    top = det[1][:2]  # image 1: class 2 at (20,10,60,60) and class 0 at (2,40,20,62)
    assert len(top) == 2 and sorted(top[:, 5].long().tolist()) == [0, 2]
    assert box_iou(top[:, :4], torch.tensor([[20.0, 10, 60, 60], [2, 40, 20, 62]])).max(1).values.min() > 0.5


def test_absent_labels_contribute_nothing_and_assignment_points_at_objects():
    torch.manual_seed(0)
    model = Model(anchor_cfg(), nc=3, tasks=["det"])
    loss_fn = AnchorDetectionLoss(model.head("det"), {})
    feats = model(torch.rand(2, 3, 64, 64)).det.feats
    t1 = torch.tensor([[0, 1, 8, 8, 40, 30], [1, 2, 20, 10, 60, 60], [1, 0, 2, 40, 20, 62]], dtype=torch.float32)
    t2 = torch.tensor([[0, 0, 1, 1, 20, 20], [1, 2, 20, 10, 60, 60], [1, 0, 2, 40, 20, 62]], dtype=torch.float32)
    pres = torch.tensor([False, True])
    a, _, assign = loss_fn(feats, t1, pres)
    b, *_ = loss_fn(feats, t2, pres)
    assert torch.allclose(a, b)  # image 0's labels (and its background) are not looked at
    c, *_ = loss_fn(feats, t2, torch.tensor([True, True]))
    assert not torch.allclose(a, c)
    assert not assign.fg[0].any() and assign.fg[1].any()
    # every positive of image 1 points at one of its two objects (slots 0, 1 as pad_targets lays them out)
    gts = assign.target_gt[1][assign.fg[1]]
    assert set(gts.tolist()) == {0, 1}
    torch.testing.assert_close(assign.target_boxes[1][assign.fg[1]], t1[1 + gts, 2:6])
    none, *_ = loss_fn(feats, torch.zeros((0, 6)), torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # still a graph: an all-absent batch must not crash the step


def test_instance_task_is_a_clear_error_other_tasks_work():
    with pytest.raises(CfgError) as e:
        Model(anchor_cfg(), nc=3, head_kwargs=HEAD_KW)
    msg = str(e.value)
    assert "\n" not in msg and "InstanceHead needs an anchor-free detection head" in msg and "DetectAnchor" in msg
    model = Model(anchor_cfg(), nc=3, tasks=["det", "sem", "cap"], head_kwargs=HEAD_KW).eval()
    out = model(torch.rand(1, 3, 64, 64))
    assert out.det.pred.shape[-1] == 7 and out.sem is not None and out.cap is not None and out.inst is None


@pytest.mark.parametrize("anchors, match", [
    ([[10, 13, 16, 30]], "one list per input level"),
    ([[10, 13, 16], [1, 2, 3], [4, 5, 6]], "same number of"),
    ([[10, 13], [16, 30], [0, 5]], "positive"),
])
def test_bad_anchors_are_cfg_errors_naming_the_row(anchors, match):
    with pytest.raises(CfgError, match=match) as e:
        Model(cfg := anchor_cfg(anchors), nc=3, tasks=["det"])
    row = len(cfg["backbone"]) + len(cfg["neck"])  # the first heads row: the detection head
    assert f"row {row} (heads)" in str(e.value)


def test_tiny_training_through_train_py(tiny_data, tmp_path):
    cfg = tmp_path / "anchor.yaml"
    cfg.write_text(yaml.safe_dump(anchor_cfg()))
    args = train_args(cfg, tiny_data, tmp_path / "runs", 1, "exp", "--noplots", "--tasks", "det")
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_script.main(args) == 0
    run = tmp_path / "runs/exp"
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert {"train/det_box", "train/det_obj", "train/det_cls", "box_map"} <= set(header)
    model = build_from_checkpoint(load_checkpoint(run / "weights/best.pt")).eval()
    assert isinstance(model.head("det"), DetectAnchor)
    assert model.head("det").anchors.view(3, -1).tolist() == [[float(v) for v in a] for a in ANCHORS]
    assert model(torch.rand(1, 3, 64, 64)).det.pred.shape == (1, 3 * (64 + 16 + 4), 4 + model.nc)


def test_onnx_export_parity(tmp_path):
    import onnxruntime as ort

    from utils.deploy.export import (
        RUNTIME_TOL,
        compare_outputs,
        export_onnx,
        run_deploy,
        vision_dynamic_axes,
    )
    from utils.deploy.interface import DeployModel

    torch.manual_seed(0)
    model = Model(anchor_cfg(), nc=3, tasks=["det"]).eval()
    randomize_bn_and_implicits(model)
    deploy = DeployModel(model.fuse())
    path = export_onnx(deploy, (torch.rand(1, 3, 64, 64),), tmp_path / "anchor.onnx", ["images"],
                       deploy.output_names, vision_dynamic_axes(deploy.output_names), 17, {})
    x = torch.rand(2, 3, 96, 64)  # another batch and shape than the export's: the grid must stay dynamic
    ref = run_deploy(deploy, deploy.output_names, x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = dict(zip(deploy.output_names, sess.run(None, {"images": x.numpy()})))
    (diff,) = compare_outputs(ref, out, (96, 64))
    assert diff.shape == (2, 3 * (96 + 24 + 6), 7) and diff.normalized <= RUNTIME_TOL, diff


def test_kmeans_recovers_planted_box_sizes():
    rng = np.random.default_rng(0)
    planted = np.array([[0.05, 0.10], [0.20, 0.20], [0.60, 0.30]])  # fractions of the longer image side
    wh = np.concatenate([c * np.exp(rng.normal(0, 0.05, (300, 2))) for c in planted])
    anchors = kmeans_anchors(wh, 3, img_size=640, seed=1)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, planted * 640, rtol=0.1)  # sorted by area, as the planted sizes
    np.testing.assert_array_equal(anchors, kmeans_anchors(wh, 3, img_size=640, seed=1))  # seeded
    assert best_possible_recall(wh * 640, anchors) == 1.0
    assert best_possible_recall(wh * 640, np.array([[2.0, 2.0]])) == 0.0  # far too small for every box
    assert anchors_per_level(np.arange(12.0).reshape(6, 2), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_dataset_wh_and_benchmark_cfg(tiny_data):
    from benchmarks.det_head import anchor_cfg as bench_cfg
    from utils.data.config import load_data_config

    wh = dataset_wh(load_data_config(tiny_data))
    n_boxes = len(json.loads((tiny_data.parent / "annotations/instances_train2017.json").read_text())["annotations"])
    assert wh.shape == (n_boxes, 2) and (wh > 0).all() and (wh <= 1).all()
    anchors = anchors_per_level(kmeans_anchors(wh, 9, 64, gens=100), 3)
    d = bench_cfg("cfg/yolor-mt-n.yaml", anchors)
    assert d["scale"] == "n" and [r[2] for r in d["heads"]][0] == "DetectAnchor"
    base = copy.deepcopy(d)
    head = Model(d, nc=3, tasks=["det"]).head("det")
    assert isinstance(head, DetectAnchor)
    torch.testing.assert_close(head.anchors.view(3, -1), torch.tensor(anchors))
    assert d == base  # building does not change the dict the benchmark writes
