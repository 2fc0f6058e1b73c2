"""detect.py: sources (folders, videos, bad inputs), annotated outputs, .pt vs .onnx agreement, saved formats."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

import detect as detect_script
import export as export_script
from tests.test_export import IMG, train_tiny_model
from utils.data.sources import LoadSource, SourceError, make_demo_video

CONF = "0.3"  # scores of the test model sit around 0.5 (see train_tiny_model)


@pytest.fixture(scope="module")
def assets(tiny_data, tmp_path_factory) -> dict:
    """A trained tiny model, its dynamic ONNX export, a folder of 4 val images and a 6-frame 96x64 video."""
    root = tmp_path_factory.mktemp("detect")
    weights = train_tiny_model(tiny_data, root)
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_script.main(["--weights", str(weights), "--img", str(IMG), "--dynamic"]) == 0
    images = root / "images"
    images.mkdir()
    for f in sorted((tiny_data.parent / "images/val2017").glob("*.jpg"))[:4]:
        shutil.copy(f, images / f.name)
    video = make_demo_video(root / "clip.mp4", tiny_data, frames=6, fps=5, size=(96, 64))
    return {"pt": weights, "onnx": weights.with_suffix(".onnx"), "images": images, "video": video, "root": root}


def run_detect(args: list[str], project: Path) -> tuple[int, str, Path]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = detect_script.main(args + ["--img", str(IMG), "--project", str(project), "--device", "cpu"])
    saved = re.search(r"^Results saved to (\S+)", out.getvalue(), re.MULTILINE)
    return rc, out.getvalue(), Path(saved.group(1)) if saved else project / "missing"


def test_folder_writes_one_annotated_image_per_input(assets, tmp_path):
    rc, out, save = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["images"]),
                                "--conf-thres", CONF], tmp_path)
    assert rc == 0, out
    inputs = sorted(p.name for p in assets["images"].iterdir())
    assert sorted(p.name for p in save.glob("*.jpg")) == inputs
    for name in inputs:
        src, res = cv2.imread(str(assets["images"] / name)), cv2.imread(str(save / name))
        assert res.shape == src.shape and not np.array_equal(res, src)  # something was drawn
    assert out.count("ms pre,") == len(inputs) and "Speed:" in out and "infer" in out


def test_video_keeps_frame_count_fps_and_size(assets, tmp_path):
    rc, out, save = run_detect(["--weights", str(assets["onnx"]), "--source", str(assets["video"]),
                                "--conf-thres", CONF], tmp_path)
    assert rc == 0, out
    cap = cv2.VideoCapture(str(save / "clip.mp4"))
    try:
        assert cap.isOpened()
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (96, 64)
        n = 0
        while cap.read()[0]:
            n += 1
        assert n == 6
    finally:
        cap.release()
    assert "(6/6)" in out


def _predictions(save: Path) -> list[dict]:
    return sorted(json.loads((save / "predictions.json").read_text()),
                  key=lambda d: (str(d["image_id"]), -d["score"], d["bbox"]))


def test_pt_and_onnx_give_the_same_results(assets, tmp_path):
    res = {}
    for fmt in ("pt", "onnx"):
        rc, out, save = run_detect(["--weights", str(assets[fmt]), "--source", str(assets["images"]), "--conf-thres",
                                    CONF, "--save-json", "--save-masks", "--name", fmt], tmp_path)
        assert rc == 0, out
        res[fmt] = (_predictions(save), json.loads((save / "captions.json").read_text()), save)
    (pt, pt_caps, pt_dir), (ox, ox_caps, ox_dir) = res["pt"], res["onnx"]
    assert len(pt) == len(ox) > 0
    for a, b in zip(pt, ox):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        size = max(a["bbox"][2:] + [1.0])
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1e-3 * max(size, 96)  # 1e-3 relative
        assert abs(a["score"] - b["score"]) <= 1e-4
    assert pt_caps == ox_caps and len(pt_caps) == 4
    for f in pt_dir.glob("masks/*.png"):  # semantic maps: at most a few boundary pixels may flip
        assert (cv2.imread(str(f), cv2.IMREAD_UNCHANGED) != cv2.imread(str(ox_dir / "masks" / f.name),
                                                                       cv2.IMREAD_UNCHANGED)).mean() < 0.01


def test_nms_graph_in_detect_matches_pt(assets, tmp_path):
    w = tmp_path / "nms.pt"
    shutil.copy(assets["pt"], w)
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_script.main(["--weights", str(w), "--img", str(IMG), "--nms", "--conf-thres", "0.2"]) == 0
    got = {}
    for fmt, weights in (("pt", assets["pt"]), ("onnx", w.with_suffix(".onnx"))):
        rc, out, save = run_detect(["--weights", str(weights), "--source", str(assets["images"]), "--conf-thres", CONF,
                                    "--save-json", "--name", fmt], tmp_path / "runs")
        assert rc == 0, out
        got[fmt] = _predictions(save)
    assert len(got["pt"]) == len(got["onnx"]) > 0
    for a, b in zip(got["pt"], got["onnx"]):
        assert a["category_id"] == b["category_id"] and np.abs(np.subtract(a["bbox"], b["bbox"])).max() < 0.1


@pytest.mark.parametrize("kind", ["corrupt video", "empty folder", "missing file", "corrupt image"])
def test_bad_sources_exit_2_with_one_line(assets, tmp_path, capsys, kind):
    if kind == "corrupt video":
        src = tmp_path / "bad.mp4"
        src.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif kind == "missing file":
        src = tmp_path / "nope.jpg"
    else:
        src = tmp_path / "bad.jpg"
        src.write_bytes(b"not a jpeg at all")
    rc, _, _ = run_detect(["--weights", str(assets["onnx"]), "--source", str(src)], tmp_path / "runs")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(src) in err[0]


def test_save_json_txt_masks_are_well_formed(assets, tmp_path):
    rc, out, save = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["images"]), "--conf-thres", CONF,
                                "--save-txt", "--save-conf", "--save-json", "--save-masks", "--nosave"], tmp_path)
    assert rc == 0, out
    meta = torch.load(assets["pt"], weights_only=True)["meta"]
    images = sorted(assets["images"].iterdir())
    assert not list(save.glob("*.jpg"))  # --nosave
    n_lines = 0
    for img in images:
        lines = (save / "labels" / f"{img.stem}.txt").read_text().splitlines()
        for line in lines:
            v = line.split()
            assert len(v) == 6 and 0 <= int(v[0]) < len(meta["names"])
            assert all(0.0 <= float(x) <= 1.0 for x in v[1:])
        n_lines += len(lines)
    preds = json.loads((save / "predictions.json").read_text())
    assert len(preds) == n_lines > 0
    for p in preds:
        assert set(p) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert p["category_id"] in meta["category_ids"] and len(p["bbox"]) == 4 and 0 < p["score"] <= 1
        h, w = cv2.imread(str(assets["images"] / f"{p['image_id']:012d}.jpg")).shape[:2]
        assert p["segmentation"]["size"] == [h, w] and mask_util.decode(p["segmentation"]).shape == (h, w)
    caps = json.loads((save / "captions.json").read_text())
    assert sorted(caps) == [p.name for p in images] and all(isinstance(c, str) for c in caps.values())
    allowed = {cid - 1 for cid in meta["semantic_ids"]} | {255}
    for img in images:
        m = cv2.imread(str(save / "masks" / f"{img.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert m.dtype == np.uint8 and m.shape == cv2.imread(str(img)).shape[:2]
        assert set(np.unique(m).tolist()) <= allowed


def test_tasks_flag_and_default_weights(assets, tmp_path, monkeypatch, capsys):
    rc, out, save = run_detect(["--weights", str(assets["onnx"]), "--source", str(assets["images"]), "--tasks", "sem",
                                "--save-json", "--conf-thres", CONF], tmp_path)
    assert rc == 0, out
    assert json.loads((save / "predictions.json").read_text()) == [] and not (save / "captions.json").exists()
    rc, _, _ = run_detect(["--weights", str(assets["onnx"]), "--source", str(assets["images"]), "--tasks", "depth"],
                          tmp_path)
    assert rc == 2 and "--tasks depth" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no runs/train here
    rc, _, _ = run_detect(["--source", str(assets["images"])], tmp_path / "runs")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "python train.py" in err[0]


def test_sources_glob_list_and_stride(assets, tmp_path):
    listing = tmp_path / "list.txt"
    files = sorted(assets["images"].iterdir())
    listing.write_text("\n".join(str(f) for f in files[:2]) + f"\n{assets['video']}\n")
    frames = list(LoadSource(str(listing), vid_stride=2))
    assert [f.index for f in frames] == [0, 0, 0, 2, 4] and frames[2].video.fps == pytest.approx(5.0)
    assert frames[0].video is None and frames[0].image.ndim == 3
    assert len(list(LoadSource(str(assets["images"] / "*.jpg")))) == len(files)
    with pytest.raises(SourceError, match="no images or videos match"):
        LoadSource(str(tmp_path / "*.png"))


@contextlib.contextmanager
def http_server(folder: Path):
    """A local HTTP server over ``folder`` (what an http:// camera stream looks like to OpenCV's FFmpeg)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_stream_is_read_to_its_end_and_saved_as_a_video(assets, tmp_path):
    """An http:// source goes through the stream path (opened up front, named from its URL) and every frame
    it sends is detected and saved; an unreachable URL is a one-line error."""
    with http_server(assets["video"].parent) as url:
        rc, out, save = run_detect(["--weights", str(assets["pt"]), "--source", f"{url}/{assets['video'].name}",
                                    "--conf-thres", CONF], tmp_path)
    assert rc == 0, out
    saved = list(save.glob("*.mp4"))
    assert len(saved) == 1 and saved[0].name.startswith("127.0.0.1")
    cap = cv2.VideoCapture(str(saved[0]))
    try:
        n = 0
        while cap.read()[0]:
            n += 1
    finally:
        cap.release()
    assert n == 6 and out.count("ms pre,") == 6
    with pytest.raises(SourceError, match="cannot open stream"):
        LoadSource("http://127.0.0.1:9/nothing.mp4")  # port 9 (discard): refused at once
