"""The Python API (utils.deploy.api.YOLOR, hubconf.py): sources, .pt / .onnx agreement, call-time options, and
the Results object (plot, save, to_json, the same object detect.py writes from)."""
from __future__ import annotations

import json
import types
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.test_detect import CONF, assets, run_detect  # noqa: F401  (assets: the shared module fixture)
from tests.test_export import IMG
from utils.data.sources import SourceError
from utils.deploy.api import YOLOR
from utils.deploy.predictor import Results, coco_results
from utils.ops.options import PredictOptions
from utils.ops.postprocess import Result
from utils.ops.track import ByteTracker, track_result

OPTS = {"conf": float(CONF), "imgsz": IMG}


@pytest.fixture(scope="module")
def models(assets) -> dict[str, YOLOR]:  # noqa: F811  (the fixture imported above)
    return {fmt: YOLOR(assets[fmt], device="cpu") for fmt in ("pt", "onnx")}  # OpenVINO: tests/openvino_checks.py


def _same_boxes(a: Results, b: Results) -> None:
    """Two backends' results of one frame agree: classes exactly, boxes within 1e-3 of the frame, scores 1e-4."""
    assert a.path == b.path and a.frame == b.frame and len(a) == len(b)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3 * max(a.shape))
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_image_folder_and_video_agree_between_pt_and_onnx(models, assets):
    images = sorted(assets["images"].iterdir())
    got: dict[str, dict[str, list[Results]]] = {}
    for fmt, model in models.items():
        video = model(assets["video"], stream=True, **OPTS)
        assert isinstance(video, types.GeneratorType)  # stream=True: frames run as they are iterated
        got[fmt] = {"image": model(str(images[0]), **OPTS), "folder": model(assets["images"], **OPTS),
                    "video": list(video)}
        assert isinstance(got[fmt]["folder"], list)
    for fmt in got:
        one, folder, video = got[fmt]["image"], got[fmt]["folder"], got[fmt]["video"]
        assert len(one) == 1 and [r.path for r in folder] == [str(p) for p in images]
        assert [r.frame for r in video] == list(range(6)) and all(r.path == str(assets["video"]) for r in video)
        assert all(r.frame is None for r in folder)
        for r, p in zip(folder, images):
            assert isinstance(r, Results) and isinstance(r, Result)
            assert np.array_equal(r.orig_img, cv2.imread(str(p))) and r.shape == r.orig_img.shape[:2]
        assert all(r.orig_img.shape[:2] == (64, 96) for r in video)
        _same_boxes(one[0], folder[0])  # a file alone or within its folder: the same frame, the same result
    assert sum(len(r) for r in got["pt"]["folder"] + got["pt"]["video"]) > 0  # the comparison compares boxes
    for fmt in [f for f in got if f != "pt"]:
        for kind in ("image", "folder", "video"):
            for a, b in zip(got["pt"][kind], got[fmt][kind], strict=True):
                _same_boxes(a, b)
                assert a.caption == b.caption and a.caption is not None, fmt


def test_arrays_and_lists(models, assets):
    model = models["pt"]
    files = sorted(assets["images"].iterdir())[:2]
    frames = [cv2.imread(str(f)) for f in files]
    from_files = model([str(f) for f in files], **OPTS)
    from_arrays = model(frames, **OPTS)
    single = model(frames[1], **OPTS)
    assert [r.path for r in from_files] == [str(f) for f in files]
    assert [r.path for r in from_arrays] == ["image0", "image1"] and [r.image_id for r in from_arrays] == ["image0", "image1"]
    assert len(single) == 1 and single[0].path == "image0"
    for a, b in zip(from_files, from_arrays, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)  # one backend, the same pixels: identical
    np.testing.assert_array_equal(single[0].boxes, from_files[1].boxes)
    with pytest.raises(ValueError, match="uint8 BGR"):
        model(frames[0][..., 0], **OPTS)


def test_tasks_switched_off_at_call_time_are_absent(models, assets):
    image = str(min(assets["images"].iterdir()))
    model = models["onnx"]
    every = model(image, **OPTS)[0]
    assert every.masks is not None and every.semantic is not None and isinstance(every.caption, str)
    assert len(every) > 0 and every.tasks == ("det", "inst", "sem", "cap")
    det = model(image, tasks=("det",), **OPTS)[0]
    assert det.masks is None and det.semantic is None and det.caption is None and det.tokens is None
    np.testing.assert_array_equal(det.boxes, every.boxes)
    sem = model(image, tasks=["sem"], **OPTS)[0]
    assert len(sem) == 0 and sem.masks is None and sem.caption is None
    np.testing.assert_array_equal(sem.semantic, every.semantic)
    cap = model(image, tasks=("cap",), **OPTS)[0]
    assert cap.caption == every.caption and len(cap) == 0 and cap.semantic is None
    assert every.plot(semantic_alpha=0).tolist() != det.plot(semantic_alpha=0).tolist()  # masks, caption drawn
    with pytest.raises(ValueError, match="no such head"):
        model(image, tasks=("depth",))


def test_call_time_options(models, assets):
    image = str(min(assets["images"].iterdir()))
    model = models["pt"]
    base = model(image, **OPTS)[0]
    assert len(base) > 2
    top = model(image, conf=OPTS["conf"], imgsz=IMG, max_det=2)[0]
    assert len(top) == 2 and np.array_equal(top.scores, base.scores[:2])
    cls = int(base.classes[0])
    only = model(image, classes=[cls], **OPTS)[0]
    assert len(only) > 0 and set(only.classes.tolist()) == {cls}
    strict = model(image, conf=float(np.median(base.scores)), imgsz=IMG)[0]
    assert 0 < len(strict) < len(base) and (strict.scores > np.median(base.scores)).all()
    big = model(image, conf=OPTS["conf"], imgsz=96)[0]  # another input size: other numbers, same frame pixels
    assert big.shape == base.shape and big.letterbox.input_shape != base.letterbox.input_shape
    # one PredictOptions object gives the keywords' results; keywords change single fields of it
    opts = PredictOptions(conf_thres=OPTS["conf"], max_det=2)
    same = model(image, options=opts, imgsz=IMG)[0]
    assert np.array_equal(same.scores, top.scores) and np.array_equal(same.boxes, top.boxes)
    wider = model(image, options=opts, max_det=300, imgsz=IMG)[0]
    assert np.array_equal(wider.scores, base.scores)
    with pytest.raises(TypeError, match="conf_thres"):
        model(image, conf_thres=0.5)  # the options' own names go through options=, not as keywords


def test_results_plot_save_json_and_fields(models, assets, tmp_path):
    meta = torch.load(assets["pt"], weights_only=True)["meta"]
    r = models["pt"](min(assets["images"].iterdir()), **OPTS)[0]
    assert len(r) > 0 and r.names == meta["names"]
    assert r.class_names == [meta["names"][c] for c in r.classes.tolist()]
    assert r.category_ids.tolist() == [meta["category_ids"][c] for c in r.classes.tolist()]
    assert r.cpu() is r and r.numpy() is r
    if "panoptic" not in {f.name for f in fields(Result)}:  # until the panoptic task adds the field
        assert r.panoptic is None
    with pytest.raises(AttributeError):
        _ = r.no_such_field
    picture = r.plot()
    assert picture.shape == r.orig_img.shape and not np.array_equal(picture, r.orig_img)
    out = r.save(tmp_path / "sub" / "pic.png")
    assert np.array_equal(cv2.imread(str(out)), picture)  # png: lossless
    j = r.to_json()
    assert j["image_id"] == int(Path(r.path).stem) and j["caption"] == r.caption and j["shape"] == list(r.shape)
    assert j["detections"] == coco_results(r, j["image_id"], meta["category_ids"])
    assert {d["category_id"] for d in j["detections"]} <= set(meta["category_ids"])
    assert json.loads(json.dumps(j)) == j and r.to_json("x")["detections"][0]["image_id"] == "x"
    assert r.path in repr(r) and r.summary() in repr(r)


def test_to_json_is_what_detect_writes(models, assets, tmp_path):
    """detect.py and the API see one object: the API's to_json over a folder is detect.py's predictions.json."""
    rc, out, save = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["images"]), "--conf-thres",
                                CONF, "--save-json", "--nosave"], tmp_path)
    assert rc == 0, out
    api = [d for r in models["pt"](assets["images"], **OPTS) for d in r.to_json()["detections"]]
    assert api == json.loads((save / "predictions.json").read_text()) and len(api) > 0


def test_torch_hub_custom_loads_a_working_model(models, assets):
    image = str(min(assets["images"].iterdir()))
    for fmt in ("pt", "onnx"):
        hub = torch.hub.load(str(ROOT), "custom", path=str(assets[fmt]), source="local", device="cpu")
        assert isinstance(hub, YOLOR) and hub.tasks == models[fmt].tasks
        _same_boxes(hub(image, **OPTS)[0], models[fmt](image, **OPTS)[0])


def test_missing_weights_and_sources_are_clear_errors(models, tmp_path):
    missing = tmp_path / "best.pt"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        YOLOR(missing)
    with pytest.raises(FileNotFoundError, match=f"weights not found: '{missing}'"):
        torch.hub.load(str(ROOT), "custom", path=str(missing), source="local")
    with pytest.raises(FileNotFoundError, match="give the weights"):
        torch.hub.load(str(ROOT), "custom", source="local")
    with pytest.raises(SourceError, match="nope.jpg"):  # at the call, not when the generator is first iterated
        models["pt"](tmp_path / "nope.jpg", stream=True)


def test_track_gives_the_ids_of_bytetrack_over_the_same_frames(models, assets):
    """model.track() = ByteTrack over model()'s frames (what detect.py --track does); images stay untracked."""
    model = models["pt"]
    # the test model's scores sit around 0.5: new tracks from >= thresh + 0.1, so tracks are born and confirmed
    conf, thresh = 0.1, 0.3
    tracked = model.track(assets["video"], conf=conf, track_thresh=thresh, imgsz=IMG)
    tracker = ByteTracker(thresh)
    expected = [track_result(r, tracker) for r in model(assets["video"], conf=conf, imgsz=IMG)]
    assert len(tracked) == len(expected) == 6
    for got, want in zip(tracked, expected):
        assert got.track_ids is not None and len(got.track_ids) == len(got.boxes)
        np.testing.assert_array_equal(got.track_ids, want.track_ids)
        np.testing.assert_allclose(got.boxes, want.boxes)
    assert sum(len(r) for r in tracked) > 0  # the comparison is not of empty frames
    image = model.track(str(min(assets["images"].iterdir())))[0]
    assert image.track_ids is None
