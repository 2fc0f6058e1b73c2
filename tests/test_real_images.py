"""Real photographs end to end: train.py, test.py, detect.py (images, and --track on a video of them) and export.py
on ``tests/fixtures/coco-real`` (5 COCO val2017 photographs under CC BY / BY-SA 2.0, see its ATTRIBUTION.md; a
portrait, a square one, a crowd RLE, COCO's 80 non-contiguous ids, captions as published), not only on shapes.

One tiny checkpoint is trained once for the module, on a temporary copy of the fixture (the reader writes its label
cache next to the images folder, which must not land in the repository). No timing assertions.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import export as export_script
import test as test_script
import train as train_script
from benchmarks import rect as rect_bench
from tests.conftest import ROOT, tiny_cfg, train_args
from tests.test_detect import _predictions, run_detect
from tests.test_export import IMG, zero_class_priors
from utils.data.coco import LabelReport, load_split
from utils.data.config import load_data_config
from utils.data.vocab import Vocabulary
from utils.deploy.export import verification_images
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint

FIXTURE = ROOT / "tests/fixtures/coco-real"
INSTANCES = json.loads((FIXTURE / "annotations/instances_val2017.json").read_text())
CAPTIONS = json.loads((FIXTURE / "annotations/captions_val2017.json").read_text())
CATEGORY_IDS = [c["id"] for c in INSTANCES["categories"]]  # COCO's 80, 1..90 with gaps
IMAGES = {im["id"]: im for im in INSTANCES["images"]}
CONF, MAX_DET = "0.3", "10"  # class priors zeroed: scores around 0.5 (see tests.test_export.zero_class_priors)


def recalibrate_bn(weights: Path, data: Path) -> None:
    """Recomputes the BatchNorm running statistics of ``weights`` (model and EMA) on the data's val images.

    Two short epochs move them only a few percent from their initial mean 0 / variance 1, so in eval mode every
    layer shrinks the signal and by the heads the outputs no longer depend on the image (~1e-7 apart); the
    photographs' own statistics make the predictions differ from one photograph to the next, as a trained
    model's do.
    """
    ckpt = load_checkpoint(weights)
    x = verification_images(data, (IMG, IMG), len(IMAGES)).float() / 255.0
    for key in ("model", "ema"):
        model = build_from_checkpoint(ckpt, ema=key == "ema")
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: exactly these images' statistics
        with torch.no_grad():
            model.train()(x)
        ckpt[key] = model.state_dict()
    save_checkpoint(ckpt, weights)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """The fixture copied to a temporary folder (its data yaml's ``path`` pointed there), a 2-epoch tiny run on it
    (all its tasks: det, inst, cap) with the run's printout, and the run's best.pt with its class priors zeroed and
    its BatchNorm statistics taken on the photographs (``model``).

    The tiny model has the C2f body: with statistics recalibrated on five photographs, an untrained network passes
    its inputs' float rounding on with a gain at every layer, and GELAN's deeper rows bring it past the export's 1e-4
    fused-unfused tolerance (boxes 7.8e-4 of the image size; a trained GELAN nano, 1.9e-6). The export of a GELAN model
    is tests/test_export.py's (the default cfg) and test_gelan.py's."""
    root = tmp_path_factory.mktemp("coco_real")
    cfg = root / "c2f.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg("yolor-mt-c2f.yaml")))
    folder = root / "coco-real"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("*.cache", "make.py", "__pycache__"))
    data = folder / "data.yaml"
    d = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**d, "path": str(folder)}, sort_keys=False))
    caches = _caches()  # a local run on the fixture itself may have left one (ignored by git)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train_script.main(train_args(cfg, data, root / "runs", 2, "real"))
    run, model = root / "runs/real", root / "model/real.pt"
    if rc == 0:
        recalibrate_bn(zero_class_priors(run / "weights/best.pt", model), data)
    return {"rc": rc, "log": out.getvalue(), "run": run, "data": data, "images": folder / "images/val2017",
            "model": model, "root": root, "caches": caches}


def _caches() -> dict[Path, int]:
    """Label caches inside the repository's fixture, with their mtimes."""
    return {p: p.stat().st_mtime_ns for p in FIXTURE.rglob("*.cache")}


def test_fixture_is_the_published_files_filtered():
    assert sorted(p.name for p in (FIXTURE / "images/val2017").iterdir()) == sorted(
        im["file_name"] for im in IMAGES.values())
    assert all(im["license"] in (4, 5) for im in IMAGES.values())  # CC BY / BY-SA 2.0 only
    attribution = (FIXTURE / "ATTRIBUTION.md").read_text()
    for im in IMAGES.values():
        assert im["flickr_url"] in attribution and im["coco_url"] in attribution
    assert len(CATEGORY_IDS) == 80 and max(CATEGORY_IDS) == 90
    assert CAPTIONS["images"] == INSTANCES["images"]
    assert {a["image_id"] for a in CAPTIONS["annotations"]} == set(IMAGES)
    assert any(a["iscrowd"] and isinstance(a["segmentation"]["counts"], list) for a in INSTANCES["annotations"])
    assert any(im["height"] > im["width"] for im in IMAGES.values())  # a portrait


def test_train_on_real_photographs(real):
    assert real["rc"] == 0, real["log"]
    log, run = real["log"], real["run"]
    assert "train: 5 images (no label problems)" in log and "val:   5 images (no label problems)" in log, log
    assert "tasks ['det', 'inst', 'cap']" in log
    assert (run / "weights/last.pt").is_file() and (run / "weights/best.pt").is_file()
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in ("box_map", "box_map50", "mask_map", "mask_map50", "cap_bleu4", "cap_cider", "val/det_loss"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    ckpt = torch.load(run / "weights/last.pt", weights_only=True)
    assert ckpt["meta"]["category_ids"] == CATEGORY_IDS  # the real ids, in JSON order
    assert ckpt["meta"]["names"] == [c["name"] for c in INSTANCES["categories"]]
    # the vocabulary is the one the real captions give (capitals and punctuation tokenized away)
    vocab = Vocabulary.build([a["caption"] for a in CAPTIONS["annotations"]], min_count=int(ckpt["hyp"]["cap_min_count"]),
                             max_unk=float(ckpt["hyp"]["cap_max_unk"]))
    assert ckpt["meta"]["vocab"] == vocab.to_list() and {"laptop", "motorcycle"} <= set(vocab.to_list())
    # the label cache went into the temporary copy, never into the repository's fixture
    assert (real["images"].parent / "val2017.cache").is_file()
    assert _caches() == real["caches"]


def test_crowd_rle_is_not_an_instance_and_polygons_are_kept(real):
    data = load_data_config(real["data"])
    report = LabelReport()
    records = {r.image_id: r for r in load_split(data.train[0], data.category_ids, report, use_cache=False)}
    assert report.summary() == "no label problems" and set(records) == set(IMAGES)
    for iid, rec in records.items():
        anns = [a for a in INSTANCES["annotations"] if a["image_id"] == iid and not a["iscrowd"]]
        assert len(rec.boxes) == len(rec.segments) == len(anns), iid
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        np.testing.assert_allclose(rec.boxes, np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], atol=1.0)
        assert (rec.width, rec.height) == (IMAGES[iid]["width"], IMAGES[iid]["height"])
    crowded = [a["image_id"] for a in INSTANCES["annotations"] if a["iscrowd"]]
    assert crowded and len(records[crowded[0]].boxes) > 0  # the crowd image still trains on its other objects


def test_validate_checkpoint(real, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # a conf and max-det that keep NMS short on scores all around 0.5
        rc = test_script.main(["--weights", str(real["model"]), "--data", str(real["data"]), "--batch-size", "5",
                               "--conf-thres", CONF, "--max-det", MAX_DET, "--workers", "0", "--device", "cpu",
                               "--project", str(tmp_path), "--save-json"])
    assert rc == 0, out.getvalue()
    metrics = json.loads((tmp_path / "exp/metrics.json").read_text())
    for key in ("box_map", "box_map50", "mask_map", "mask_map50", "cap_bleu1", "cap_bleu4", "cap_rougel",
                "cap_cider"):
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)
    assert not any(k.startswith("sem_") for k in metrics)  # no semantic maps in this data
    preds = json.loads((tmp_path / "exp/predictions.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= set(IMAGES)
    assert {p["category_id"] for p in preds} <= set(CATEGORY_IDS)


def test_rect_validation_computes_fewer_pixels_on_real_aspect_ratios(real, tmp_path):
    """benchmarks.rect scores the checkpoint square and ``--rect``: the same metrics reported, and on photographs of
    real aspect ratios (a portrait among landscapes) the rectangular batches feed fewer pixels per image at 640
    (YOLOv5's half-stride pad makes the long side 672, so at tiny sizes rect can feed more)."""
    with contextlib.redirect_stdout(io.StringIO()):
        rows = rect_bench.run(rect_bench.parse(["--weights", str(real["model"]), "--data", str(real["data"]),
                                                "--img", "640", "--batch-size", "2", "--rounds", "1", "--workers", "0",
                                                "--conf-thres", CONF, "--max-det", MAX_DET,
                                                "--project", str(tmp_path)]))
    assert set(rows["rect"]) == set(rows["square"]) and "box_map" in rows["rect"] and "cap_cider" in rows["rect"]
    assert rows["rect"]["pixels"] < rows["square"]["pixels"]


def test_detect_keeps_original_sizes_and_real_ids(real, tmp_path):
    rc, out, save = run_detect(["--weights", str(real["model"]), "--source", str(real["images"]), "--conf-thres",
                                CONF, "--max-det", MAX_DET, "--save-json"], tmp_path)
    assert rc == 0, out
    for im in IMAGES.values():  # portrait, square and wide pictures at their own size, something drawn on each
        src, res = cv2.imread(str(real["images"] / im["file_name"])), cv2.imread(str(save / im["file_name"]))
        assert res.shape == src.shape == (im["height"], im["width"], 3) and not np.array_equal(res, src)
    preds = _predictions(save)
    assert preds and {p["image_id"] for p in preds} <= set(IMAGES)
    assert {p["category_id"] for p in preds} <= set(CATEGORY_IDS)
    for p in preds:  # boxes in the original picture's pixels
        x, y, w, h = p["bbox"]
        im = IMAGES[p["image_id"]]
        assert -1 <= x and -1 <= y and x + w <= im["width"] + 1 and y + h <= im["height"] + 1, p
    per_image = {iid: sorted((p["category_id"], *np.round(p["bbox"]).tolist()) for p in preds if p["image_id"] == iid)
                 for iid in IMAGES}
    assert len({tuple(v) for v in per_image.values()}) == len(IMAGES)  # each photograph its own detections
    captions = json.loads((save / "captions.json").read_text())
    assert len(captions) == len(IMAGES)


def test_track_on_a_video_of_the_photographs(real, tmp_path):
    """Each photograph held for 3 frames: tracks start on it and keep their ids while it is shown."""
    video, size, hold = tmp_path / "photos.mp4", (160, 120), 3
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, size)
    for im in IMAGES.values():
        frame = cv2.resize(cv2.imread(str(real["images"] / im["file_name"])), size, interpolation=cv2.INTER_AREA)
        for _ in range(hold):
            writer.write(frame)
    writer.release()
    rc, out, save = run_detect(["--weights", str(real["model"]), "--source", str(video), "--track", "--track-thresh",
                                CONF, "--max-det", MAX_DET, "--save-json"], tmp_path / "runs")
    assert rc == 0, out
    cap = cv2.VideoCapture(str(save / video.name))
    try:
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == hold * len(IMAGES)
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == size
    finally:
        cap.release()
    preds = json.loads((save / "predictions.json").read_text())
    frames_of: dict[int, set[int]] = {}
    for p in preds:
        frames_of.setdefault(p["track_id"], set()).add(int(p["image_id"].rsplit("_", 1)[1]))
    assert frames_of and max(map(len, frames_of.values())) >= 2  # some object kept its id over frames


def test_export_verifies_on_the_photographs_and_onnx_detects_the_same(real, tmp_path):
    weights = tmp_path / "real.pt"
    shutil.copy(real["model"], weights)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # parity on all five photographs (the checkpoint's data yaml)
        rc = export_script.main(["--weights", str(weights), "--img", str(IMG), "--batch", str(len(IMAGES)),
                                 "--dynamic", "--device", "cpu"])
    assert rc == 0, out.getvalue()
    assert "export success" in out.getvalue() and weights.with_suffix(".onnx").is_file()
    assert f"captions: torch greedy == ORT greedy for {len(IMAGES)}/{len(IMAGES)} image(s)" in out.getvalue()
    got = {}
    for w in (weights, weights.with_suffix(".onnx")):
        rc, log, save = run_detect(["--weights", str(w), "--source", str(real["images"]), "--conf-thres", CONF,
                                    "--max-det", MAX_DET, "--save-json", "--nosave", "--name", w.suffix[1:]],
                                   tmp_path / "runs")
        assert rc == 0, log
        got[w.suffix] = (_predictions(save), json.loads((save / "captions.json").read_text()))
    (pt, pt_caps), (ox, ox_caps) = got[".pt"], got[".onnx"]
    assert len(pt) == len(ox) > 0 and pt_caps == ox_caps
    left = list(ox)
    for a in pt:  # the same detections, in whatever order near-equal scores leave them
        b = next((b for b in left if b["image_id"] == a["image_id"] and b["category_id"] == a["category_id"]
                  and abs(a["score"] - b["score"]) <= 1e-4 and np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 0.5),
                 None)
        assert b is not None, a
        left.remove(b)
