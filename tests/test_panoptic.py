"""Panoptic: the merge rule, PQ (hand-checked and against torchmetrics), the ground truth files and their
derivation, detect.py --save-panoptic round trip, and the metrics evaluate() reports."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.test_detect import run_detect
from tests.test_export import IMG, train_tiny_model
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.panoptic import derive_panoptic, load_panoptic_json, read_panoptic_png
from utils.eval.evaluate import EVAL_OPTIONS, EvalSettings, LabelSpace, evaluate
from utils.eval.metrics.panoptic import PQStat
from utils.ops.panoptic import PanopticSpec, id2rgb, merge_panoptic, rgb2id
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.tasks import FITNESS_TERMS, fitness, task_of_key, task_score

SPEC = PanopticSpec.from_meta([1, 3], [1, 3, 100, 101], stuff_area=6)  # things 1, 3; stuff 100, 101


def _box(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[rows, cols] = True
    return m


def test_merge_rule_hand_checked() -> None:
    """4x6 image. m0 (0.9, class 0) rows 0-1 cols 0-2: 6 px, all free -> segment 1. m1 (0.8) rows 0-1 cols 1-3:
    4 of its 6 px are m0's (> 0.5) -> dropped. m2 (0.7, class 1) rows 1-2 cols 2-4: 1 of 6 px taken (<= 0.5)
    -> segment 2 with the 5 free px. m3 (0.3) is under the score threshold. Semantic: cols 0-3 stuff 100
    (index 2), cols 4-5 stuff 101 (index 3) except pixel (3, 5) = thing class 1. Stuff 100 on the free
    pixels: (0,3), (2,0), (2,1), row 3 cols 0-3 = 7 px >= 6 -> segment 3, bbox [0, 0, 4, 4]; stuff 101:
    8 - 2 (m2) - 1 (thing pixel) = 5 px < 6 -> void; the thing pixel is void (instances own things)."""
    h, w = 4, 6
    masks = np.stack([_box(h, w, slice(0, 2), slice(0, 3)), _box(h, w, slice(0, 2), slice(1, 4)),
                      _box(h, w, slice(1, 3), slice(2, 5)), _box(h, w, slice(3, 4), slice(0, 6))])
    scores, classes = np.array([0.9, 0.8, 0.7, 0.3], np.float32), np.array([0, 1, 1, 0])
    semantic = np.full((h, w), 2, np.uint8)
    semantic[:, 4:] = 3
    semantic[3, 5] = 0
    pan = merge_panoptic(masks, scores, classes, semantic, SPEC)
    expected = np.array([[1, 1, 1, 3, 0, 0],
                         [1, 1, 1, 2, 2, 0],
                         [3, 3, 2, 2, 2, 0],
                         [3, 3, 3, 3, 0, 0]], np.int32)
    np.testing.assert_array_equal(pan.ids, expected)
    got = [(s["id"], s["category_id"], s["isthing"], s["area"], s["bbox"]) for s in pan.segments]
    assert got == [(1, 1, True, 6, [0, 0, 3, 2]), (2, 3, True, 5, [2, 1, 3, 2]), (3, 100, False, 7, [0, 0, 4, 4])]
    # a looser overlap rule keeps m1 (its 2 free pixels), a smaller stuff limit keeps stuff 101
    loose = PanopticSpec.from_meta([1, 3], [1, 3, 100, 101], overlap_thres=0.7, stuff_area=5)
    cats = [s["category_id"] for s in merge_panoptic(masks, scores, classes, semantic, loose).segments]
    assert cats == [1, 3, 3, 100, 101]


def test_png_id_encoding_round_trips(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 255], [256, 65535, 2 ** 24 - 1]], np.int32)
    rgb = id2rgb(ids)
    assert rgb[1, 0].tolist() == [0, 1, 0]  # 256 = G 1
    cv2.imwrite(str(tmp_path / "p.png"), rgb[..., ::-1])
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "p.png"), ids)
    np.testing.assert_array_equal(rgb2id(rgb), ids)


def _row(*runs: tuple[int, int]) -> np.ndarray:
    """A 1 x N id map from (id, length) runs."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in runs])[None]


def test_pq_hand_checked_with_crowd_and_void() -> None:
    """1 x 20 image. Ground truth: thing A (cat 1) px 0-5, stuff S (cat 100) px 6-13, a crowd of cat 1 px
    14-17, void px 18-19. Prediction: p1 (cat 1) px 0-4 + 18: IoU with A = 5 / (6 + 6 - 5 - 1 void) = 5/6, TP;
    p2 (cat 100) px 5-11: IoU with S = 6 / (7 + 8 - 6) = 2/3, TP; p3 (cat 1) px 14-16 + 19: crowd + void is
    4/4 > 0.5 -> not a FP; p4 (cat 100) px 12, 13, 17: unmatched, no void or crowd of its class -> FP. The
    crowd is no FN. Cat 1: PQ = SQ = 5/6, RQ = 1; cat 100: SQ = 2/3, RQ = 1 / 1.5 = 2/3, PQ = 4/9.
    PQ = (5/6 + 4/9) / 2 = 23/36, SQ = (5/6 + 2/3) / 2 = 3/4, RQ = (1 + 2/3) / 2 = 5/6."""
    gt = _row((1, 6), (2, 8), (3, 4), (0, 2))
    gt_seg = {1: {"category_id": 1, "iscrowd": 0}, 2: {"category_id": 100, "iscrowd": 0},
              3: {"category_id": 1, "iscrowd": 1}}
    pred = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 4, 4, 3, 3, 3, 4, 1, 3]], np.int32)
    pred_seg = {1: {"category_id": 1}, 2: {"category_id": 100}, 3: {"category_id": 1}, 4: {"category_id": 100}}
    stat = PQStat()
    stat.update(gt, gt_seg, pred, pred_seg)
    m, per_class = stat.summary({1: True, 3: True, 100: False})
    assert m["pq"] == pytest.approx(23 / 36) and m["sq"] == pytest.approx(3 / 4) and m["rq"] == pytest.approx(5 / 6)
    assert m["pq_th"] == pytest.approx(5 / 6) and m["pq_st"] == pytest.approx(4 / 9)
    assert per_class == pytest.approx({1: 5 / 6, 100: 4 / 9})  # cat 3 never occurs: not averaged
    # without the crowd flag, p3 matches that region: IoU 3 / (4 + 4 - 3 - 1 void) = 3/4 -> a second TP of cat 1
    stat = PQStat()
    stat.update(gt, gt_seg | {3: {"category_id": 1, "iscrowd": 0}}, pred, pred_seg)
    c = stat.counts[1]
    assert (c.tp, c.fp, c.fn) == (2, 0, 0) and c.iou == pytest.approx(5 / 6 + 3 / 4)


def _random_panoptic(rng: np.random.Generator, h: int, w: int, things: list[int], stuffs: list[int],
                     void: bool) -> tuple[np.ndarray, dict[int, dict]]:
    """A random crowd-free scene: stuff bands (one segment per stuff class), then up to 4 thing rectangles;
    with ``void``, some pixels are void."""
    ids = np.zeros((h, w), np.int32)
    seg: dict[int, dict] = {}
    cuts = np.sort(rng.choice(np.arange(1, h), len(stuffs) - 1, replace=False))
    for k, (cat, rows) in enumerate(zip(stuffs, np.split(np.arange(h), cuts))):
        ids[rows] = 100 + k
        seg[100 + k] = {"category_id": cat, "iscrowd": 0}
    for k in range(int(rng.integers(1, 5))):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        ids[y:y + rng.integers(2, h // 2), x:x + rng.integers(2, w // 2)] = k + 1
        seg[k + 1] = {"category_id": int(rng.choice(things)), "iscrowd": 0}
    if void:
        ids[rng.random((h, w)) < 0.1] = 0
        ids[:2, :] = 0
    return ids, {i: s for i, s in seg.items() if (ids == i).any()}


def _perturb(rng: np.random.Generator, ids: np.ndarray, seg: dict[int, dict], things: list[int]) -> tuple:
    """A prediction from a ground truth: shifted, each thing's class flipped with probability 0.3, no void."""
    pred = np.roll(ids, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), (0, 1))
    stuff_ids = [i for i in seg if i >= 100]
    pred[pred == 0] = stuff_ids[0]  # full coverage: torchmetrics forgives FNs under predicted void, COCO does not
    out = {}
    for i in np.unique(pred).tolist():
        cat = seg[i]["category_id"]
        out[i] = {"category_id": int(rng.choice(things)) if i < 100 and rng.random() < 0.3 else cat}
    return pred, out


def _torchmetrics_input(ids: np.ndarray, seg: dict[int, dict]) -> np.ndarray:
    """(h, w, 2) (category, instance) pairs; void -> category 0, not a listed category."""
    cat = np.zeros_like(ids)
    for i, s in seg.items():
        cat[ids == i] = s["category_id"]
    return np.stack([cat, ids], -1)


def test_pq_matches_torchmetrics() -> None:
    """Same crowd-free inputs (ground truth with void, predictions without): PQ / SQ / RQ and per-class PQ
    equal torchmetrics' PanopticQuality to 1e-6."""
    tm = pytest.importorskip("torchmetrics.detection")
    things, stuffs = [1, 3, 6], [100, 101, 102]
    rng = np.random.default_rng(0)
    stat, preds, targets = PQStat(), [], []
    for _ in range(6):
        gt, gt_seg = _random_panoptic(rng, 24, 32, things, stuffs, void=True)
        pred, pred_seg = _perturb(rng, gt, gt_seg, things)
        stat.update(gt, gt_seg, pred, pred_seg)
        preds.append(_torchmetrics_input(pred, pred_seg))
        targets.append(_torchmetrics_input(gt, gt_seg))
    ours, per_class = stat.summary({c: c in things for c in things + stuffs})
    counts = [(c.tp, c.fp, c.fn) for c in stat.counts.values()]
    assert sum(tp for tp, _, _ in counts) > 3 and sum(fp for _, fp, _ in counts) > 0  # a test of both terms
    metric = tm.PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True, return_per_class=True)
    metric.update(torch.from_numpy(np.stack(preds)).long(), torch.from_numpy(np.stack(targets)).long())
    theirs = metric.compute().double().reshape(-1, 3)  # per class [pq, sq, rq], sorted category order
    occurring = [c for c in sorted(things + stuffs) if c in per_class]
    cats = sorted(things + stuffs)
    for c in occurring:
        assert per_class[c] == pytest.approx(float(theirs[cats.index(c), 0]), abs=1e-6)
    mean = theirs[[cats.index(c) for c in occurring]].mean(0)
    assert [ours["pq"], ours["sq"], ours["rq"]] == pytest.approx(mean.tolist(), abs=1e-6)


def test_embedded_panoptic_files_agree_with_instances_and_maps(tiny_data: Path) -> None:
    """The generator's panoptic PNG/JSON and the derivation from instances + stuffthingmaps describe the same
    segmentation: PQ of one against the other is 1, and the JSON's areas and boxes are the PNG's."""
    data = load_data_config(tiny_data)
    split = data.val[0]
    anns = load_panoptic_json(split.panoptic)
    inst = json.loads(split.instances.read_text())
    stat = PQStat()
    for img in inst["images"]:
        ann = anns[img["id"]]
        ids = read_panoptic_png(split.panoptic_pngs / ann["file_name"])
        assert ids.shape == (img["height"], img["width"])
        for s in ann["segments_info"]:
            m = ids == s["id"]
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum() and s["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        mine = [a for a in inst["annotations"] if a["image_id"] == img["id"]]
        stuff_map = cv2.imread(str(split.semantic / ann["file_name"]), cv2.IMREAD_UNCHANGED)
        d_ids, d_seg = derive_panoptic(mine, stuff_map, data.category_ids, ids.shape)
        assert sum(s["isthing"] for s in d_seg.values()) == len(mine)
        stat.update(ids, {s["id"]: s for s in ann["segments_info"]}, d_ids, d_seg)
    m, _ = stat.summary({c: True for c in data.category_ids} | {c: False for c in data.semantic_ids
                                                               if c not in data.category_ids})
    assert m["pq"] == pytest.approx(1.0) and m["pq_th"] == pytest.approx(1.0) and m["pq_st"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def weights(tiny_data, tmp_path_factory) -> Path:
    return train_tiny_model(tiny_data, tmp_path_factory.mktemp("pan"))


def test_detect_save_panoptic_loads_back_and_scores_pq_1(weights: Path, tiny_data: Path, tmp_path: Path) -> None:
    """detect.py --save-panoptic: each PNG decodes to exactly the ids of its segments_info (areas, boxes),
    the JSON has the original image sizes and category ids, and the output scored against itself is PQ 1."""
    src = tiny_data.parent / "images/val2017"
    rc, log, save = run_detect(["--weights", str(weights), "--source", str(src), "--save-panoptic",
                                "--pan-stuff-area", "64", "--conf-thres", "0.3", "--tasks", "pan"], tmp_path)
    assert rc == 0, log
    out = json.loads((save / "panoptic.json").read_text())
    files = sorted(src.glob("*.jpg"))
    assert len(out["annotations"]) == len(files) == len(out["images"])
    cats = {c["id"]: c["isthing"] for c in out["categories"]}
    assert {c for c, t in cats.items() if t} == {1, 3, 6, 9, 12}
    stat, n_seg = PQStat(), 0
    for img, ann, f in zip(out["images"], out["annotations"], files):
        assert (img["height"], img["width"]) == cv2.imread(str(f)).shape[:2]
        ids = read_panoptic_png(save / "panoptic" / ann["file_name"])
        assert ids.shape == (img["height"], img["width"])
        seg = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == set(seg)
        for s in ann["segments_info"]:
            assert s["category_id"] in cats and s["area"] == int((ids == s["id"]).sum())
        n_seg += len(seg)
        stat.update(ids, seg, ids, seg)
    assert n_seg > 0
    m, _ = stat.summary(cats)
    assert m["pq"] == pytest.approx(1.0)
    assert (save / files[0].name).is_file()  # the panoptic overlay was drawn
    # the files as the reference implementation reads them: each image's (category, segment id) pairs scored
    # against themselves by torchmetrics' PanopticQuality (one image at a time: their sizes differ)
    tm = pytest.importorskip("torchmetrics.detection")
    metric = tm.PanopticQuality(things={c for c, t in cats.items() if t}, stuffs={c for c, t in cats.items() if not t})
    for ann in out["annotations"]:
        pairs = torch.from_numpy(_torchmetrics_input(read_panoptic_png(save / "panoptic" / ann["file_name"]),
                                                     {s["id"]: s for s in ann["segments_info"]}))[None].long()
        metric.update(pairs, pairs)
    assert float(metric.compute()) == pytest.approx(1.0)


def test_evaluate_reports_panoptic_metrics_and_fitness_share(weights: Path, tiny_data: Path) -> None:
    """evaluate() composes the panoptic evaluator for a det + inst + sem model on a split with panoptic files:
    pq pq_th pq_st sq rq in [0, 1] over every val image; fitness counts the pan share only when pq is there."""
    model = build_from_checkpoint(load_checkpoint(weights))
    data = load_data_config(tiny_data)
    dataset = CocoDataset(data, data.val, IMG, augment=False)
    spec = PanopticSpec.from_meta(data.category_ids, model.meta["semantic_ids"], stuff_area=64)
    res = evaluate(model, create_dataloader(dataset, 8, False, 0), dataset,
                   LabelSpace(data.category_ids, len(data.semantic_ids)), torch.device("cpu"),
                   replace(EVAL_OPTIONS, panoptic=spec), EvalSettings(progress=False))
    assert {"pq", "pq_th", "pq_st", "sq", "rq"} <= set(res.metrics)
    assert all(0.0 <= res.metrics[k] <= 1.0 for k in ("pq", "sq", "rq"))
    assert res.scored_images["pan"] == len(dataset)
    without = {k: v for k, v in res.metrics.items() if task_of_key(k) != "pan"}
    scores = [task_score(t, without) for t in FITNESS_TERMS]
    assert task_score("pan", without) is None
    assert fitness(without) == pytest.approx(np.mean([v for v in scores if v is not None]))
    with_pan = without | {"pq": 0.9}
    assert fitness(with_pan) == pytest.approx(np.mean([v for v in scores if v is not None] + [0.9]))
