"""Run pictures, curves and the report: a tiny run leaves every file, --noplots leaves none, and the numbers
behind the curves and confusion matrices are right on hand-checked cases."""
from __future__ import annotations

import json
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import train as train_script
from tests.conftest import tiny_cfg, train_args
from utils.eval.curves import (
    DetConfusion,
    coco_curves,
    detection_confusion,
    interpolated_precision,
    pr_from_matches,
    pr_vs_conf,
)
from utils.viz.draw import SEMANTIC_PALETTE, box_color
from utils.viz.mosaic import TileLabels, render_tile
from utils.viz.plots import read_results, results_layout

PICTURES = ["train_batch0.jpg", "labels.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg", "PR_curve.png",
            "F1_curve.png", "mask_PR_curve.png", "confusion_matrix.png", "semantic_confusion_matrix.png",
            "results.png"]
METRIC_KEYS = {"det": ["box_map", "box_map50", "box_map75"], "inst": ["mask_map", "mask_map50"],
               "sem": ["sem_miou", "sem_pixacc"],
               "cap": ["cap_bleu1", "cap_bleu2", "cap_bleu3", "cap_bleu4", "cap_rougel", "cap_cider"]}


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(yaml.safe_dump(tiny_cfg()))
    return f


@pytest.fixture(scope="module")
def run_dir(cfg_file, tiny_data, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("plotruns")
    assert train_script.main(train_args(cfg_file, tiny_data, project, 2)) == 0
    return project / "exp"


# --- the run folder ------------------------------------------------------------------------------
def test_run_leaves_every_picture(run_dir):
    for name in PICTURES + ["report.html"]:
        f = run_dir / name
        assert f.is_file() and f.stat().st_size > 0, name
    for name in PICTURES:
        img = cv2.imread(str(run_dir / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, name


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if (tag, k) in (("img", "src"), ("a", "href"), ("link", "href"), ("script", "src")) and v:
                self.links.append(v)


def test_report_links_only_existing_files_and_lists_every_metric(run_dir):
    text = (run_dir / "report.html").read_text()
    parser = _Links()
    parser.feed(text)
    assert parser.links, "the report links no file"
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), f"not a relative link: {link}"
        assert (run_dir / link).is_file(), f"report links a missing file: {link}"
    linked = set(parser.links)
    for name in PICTURES:
        assert name in linked, f"{name} not shown in the report"
    header = read_results(run_dir / "results.csv")[0].keys()
    for task, keys in METRIC_KEYS.items():
        for k in keys:
            assert k in header, k  # the tiny run trains all four tasks
            assert f"<td>{k}</td>" in text, f"{task} metric {k} missing from the report"
    opt = yaml.safe_load((run_dir / "opt.yaml").read_text())
    assert f"<td>{opt['img']}</td>" in text and "lr0" in text  # opt and hyp tables


def test_noplots_leaves_no_pictures(cfg_file, tiny_data, tmp_path):
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "quiet", "--noplots")) == 0
    run = tmp_path / "quiet"
    assert (run / "results.csv").is_file() and (run / "weights/last.pt").is_file()
    leftovers = [p.name for p in run.iterdir() if p.suffix in (".jpg", ".png", ".html")]
    assert leftovers == []


def test_results_png_shows_task_weights_only_when_dynamic():
    rows = [{"epoch": e, "train/det_box": 1.0 / e, "val/det_box": 1.2 / e, "box_map": 0.1 * e, "sem_miou": 0.2,
             "train/cap_ce": 3.0, "weight/det": 1.0 + 0.1 * e, "weight/cap": 1.0, "lr/pg0": 0.01}
            for e in (1, 2, 3)]
    titles = lambda layout: [t for _, p in layout for t, _ in p]  # noqa: E731
    dyn = results_layout(rows, "dwa")
    assert [t for t, _ in dyn] == ["det", "sem", "cap", "other"]
    det = dict(dyn)["det"]
    assert det[0] == ("det_box", ["train/det_box", "val/det_box"])  # train and val in one panel
    assert ("task weights (dwa)", ["weight/det", "weight/cap"]) in dict(dyn)["other"]
    assert not any("weights" in t for t in titles(results_layout(rows, "fixed")))
    assert any("weights" in t for t in titles(results_layout(rows, None)))  # unknown balance: they changed
    assert not any(k.startswith("lr/") for _, p in dyn for _, ks in p for k in ks)


# --- the numbers ---------------------------------------------------------------------------------
def test_confusion_matrix_hand_case():
    """GT: a class-0 box and a class-1 box. Predictions: the class-0 box found as 0 (correct), the class-1 box
    found as 0 (wrong class), a class-1 box on nothing (false positive), and one below conf 0.25 (ignored)."""
    cm = DetConfusion(nc=2, conf=0.25, iou=0.45)
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    gt_cls = np.array([0, 1])
    det_boxes = np.array([[0, 0, 10, 11], [20, 20, 31, 30], [50, 50, 60, 60], [0, 0, 10, 10]], float)
    det_scores = np.array([0.9, 0.8, 0.7, 0.1])
    det_cls = np.array([0, 0, 1, 1])
    cm.update(det_boxes, det_scores, det_cls, gt_boxes, gt_cls)
    # rows = true (0, 1, background), columns = predicted (0, 1, background)
    expected = np.array([[1, 0, 0],
                         [1, 0, 0],
                         [0, 1, 0]])
    assert (cm.matrix == expected).all(), cm.matrix
    # a missed box lands in the background column; no detections at all on an image
    cm.update(np.zeros((0, 4)), np.zeros(0), np.zeros(0), gt_boxes[:1], gt_cls[:1])
    assert cm.matrix[0, 2] == 1
    assert np.allclose(cm.normalized()[0], [0.5, 0, 0.5])


def test_detection_confusion_from_coco_dicts(tmp_path):
    gt = _coco_gt(tmp_path, [([0, 0, 10, 10], 1), ([20, 20, 10, 10], 3)], cats=[1, 3])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8},
            {"image_id": 1, "category_id": 3, "bbox": [60, 60, 10, 10], "score": 0.7}]
    cm = detection_confusion(gt, dets, [1], [1, 3])
    assert (cm.matrix == np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])).all()


def test_ap50_hand_case(tmp_path):
    """Two ground truths; ranked detections TP, FP, TP, FP (a duplicate). Precision envelope: 1 up to recall
    0.5, then 2/3 up to recall 1, so COCO's 101-point AP50 = (51 * 1 + 50 * 2/3) / 101."""
    expected = (51 + 50 * 2 / 3) / 101
    tp, conf = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6])
    for t, c in ((tp, conf), (tp[::-1], conf[::-1])):  # input order does not matter
        _, r, p = pr_from_matches(t, c, 2)
        assert interpolated_precision(r, p).mean() == pytest.approx(expected)
    p, r = pr_vs_conf(tp, conf, 2, grid=np.array([0.95, 0.9, 0.7, 0.5]))
    assert np.allclose(r, [0, 0.5, 1, 1]) and np.allclose(p, [1, 1, 2 / 3, 0.5])
    # the same case through COCOeval: the curve helper reproduces pycocotools' own mAP@0.5
    from utils.eval.metrics.detection import coco_map

    gt = _coco_gt(tmp_path, [([0, 0, 20, 20], 1), ([50, 50, 20, 20], 1)], cats=[1, 2])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [70, 0, 20, 20], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.7},
            {"image_id": 1, "category_id": 1, "bbox": [51, 50, 20, 20], "score": 0.6}]
    curves = coco_curves(gt, dets, [1], [1, 2], ["a", "b"], "bbox")
    assert curves.names == ["a"]  # class b has no ground truth: no curve
    assert curves.ap50[0] == pytest.approx(expected)
    assert curves.map50 == pytest.approx(coco_map(gt, dets, [1], [1, 2], "bbox")["map50"])
    i = int(np.argmin(np.abs(curves.conf - 0.9)))
    assert curves.p[0, i] == pytest.approx(1.0) and curves.r[0, i] == pytest.approx(0.5)


def _coco_gt(tmp_path: Path, boxes: list[tuple[list[float], int]], cats: list[int]):
    from utils.eval.metrics.detection import load_ground_truth

    d = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
         "annotations": [{"id": k + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3],
                          "iscrowd": 0} for k, (b, c) in enumerate(boxes)],
         "categories": [{"id": c, "name": str(c)} for c in cats]}
    f = tmp_path / "gt.json"
    f.write_text(json.dumps(d))
    return load_ground_truth([f])


# --- drawing geometry ----------------------------------------------------------------------------
def test_tile_overlays_land_where_their_labels_are():
    """Not flipped, not transposed: a semantic label on the left half colours the left half only, a polygon
    in the bottom-right corner is filled there, and the enlargement of small inputs keeps them aligned."""
    h, w = 64, 96
    image = np.zeros((h, w, 3), np.uint8)
    sem = np.full((h, w), 255, np.uint8)
    sem[:, : w // 2] = 3
    poly = [np.array([[70, 40], [90, 40], [90, 60], [70, 60]], np.float32)]
    tl = TileLabels(boxes=np.zeros((0, 4)), classes=np.array([2]), polygons=[poly], semantic=sem)
    tile = render_tile(image, tl, ["a", "b", "c"], (h * 2, w * 2))  # drawn at twice the input size
    assert tile.shape == (h * 2, w * 2, 3)
    left, right = tile[10:50, 10:80].reshape(-1, 3), tile[10:50, 110:180].reshape(-1, 3)
    expect = SEMANTIC_PALETTE[3].astype(float) * 0.35
    assert np.abs(left.mean(0) - expect).max() < 2 and right.max() == 0
    inside = tile[2 * 44:2 * 56, 2 * 74:2 * 86].reshape(-1, 3).mean(0)
    assert np.abs(inside - np.array(box_color(2), float) * 0.35).max() < 2
    assert tile[2 * 44:2 * 56, 2 * 50:2 * 60].max() == 0  # left of the polygon, right of the map: untouched


def test_tensorboard_is_optional_and_logs_scalars_and_images(tmp_path, monkeypatch):
    from utils.engine.loggers import RunLogger

    calls: list[tuple] = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, k, v, step):
            calls.append(("scalar", k, v, step))

        def add_image(self, k, img, step, dataformats):
            calls.append(("image", k, img.shape, dataformats))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = RunLogger(tmp_path, ["a"], [], plots=True)
    log.epoch({"epoch": 1, "box_map": 0.5, "train/det_box": float("nan"), "note": "x"}, 0)
    assert ("scalar", "box_map", 0.5, 1) in calls and not any(c[1] == "train/det_box" for c in calls if c[0] == "scalar")
    cv2.imwrite(str(tmp_path / "results.png"), np.zeros((8, 8, 3), np.uint8))
    log._tb_images(0)
    assert ("image", "results", (8, 8, 3), "HWC") in calls
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: silently off
    assert RunLogger(tmp_path, ["a"], []).tb is None


def test_plotting_thread_stays_alive_between_pictures_and_ends_at_close(tmp_path):
    """A thread that exits runs OpenCV's thread-local cleanup under a mutex; a DataLoader worker forked at that
    moment hangs in cv2.imread (seen). So all pictures share one thread that does not exit before close()."""
    import threading

    from utils.engine.loggers import RunLogger

    def plot_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("plot")]

    log = RunLogger(tmp_path, ["a"], [], plots=True, tensorboard=False)
    drawn: list[str] = []

    def draw(i: int) -> None:
        cv2.imencode(".png", np.full((4, 4, 3), i, np.uint8))  # an OpenCV call in the plotting thread
        drawn.append(f"p{i}")

    for i in range(3):
        log._background(f"p{i}", draw, i)
        log.join()  # what the trainer does before every fork
        assert drawn[-1] == f"p{i}"
        alive = plot_threads()
        assert len(alive) == 1 and alive[0].is_alive()  # the same thread, idle, not exiting
        if i == 0:
            first = alive[0]
        assert alive[0] is first
    log.close()
    assert not first.is_alive() and drawn == ["p0", "p1", "p2"]
