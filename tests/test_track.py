"""ByteTracker on synthetic box sequences (crossing, occlusion, second-stage low scores, buffer, classes), the
assignment it is built on, Result filtering, and detect.py --track end to end on a generated video."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import detect as detect_script
from benchmarks.track import moving_scene, run_scene, write_scene_video
from tests.test_export import IMG, train_tiny_model
from utils.ops.letterbox import Letterbox
from utils.ops.panoptic import PanopticSpec, merge_panoptic
from utils.ops.postprocess import Result
from utils.ops.track import ByteTracker, linear_assignment, track_result
from utils.viz.draw import draw_boxes


def box(cx: float, cy: float, w: float = 40, h: float = 40) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def run(tracker: ByteTracker, frames: list[list[tuple[list[float], float]]]) -> list[np.ndarray]:
    """Ids per frame of ``(box, score)`` detections."""
    out = []
    for dets in frames:
        boxes = np.array([b for b, _ in dets], np.float64).reshape(-1, 4)
        out.append(tracker.update(boxes, np.array([s for _, s in dets], np.float64)))
    return out


def test_crossing_objects_keep_their_ids():
    # same size, opposite directions, the same row: at frame 20 both boxes coincide exactly, so only the
    # Kalman velocities can tell them apart afterwards
    frames = [[(box(10 + 7 * f, 100), 0.9), (box(290 - 7 * f, 100), 0.9)] for f in range(40)]
    ids = np.stack(run(ByteTracker(), frames))
    assert (ids > 0).all()
    assert (ids[:, 0] == ids[0, 0]).all() and (ids[:, 1] == ids[0, 1]).all() and ids[0, 0] != ids[0, 1]


def test_occluded_object_keeps_its_id_and_is_forgotten_after_the_buffer():
    def frames(gap: range) -> list:
        return [[(box(20 + 5 * f, 60), 0.9)] + ([] if f in gap else [(box(40 + 6 * f, 150, 30, 60), 0.85)])
                for f in range(30)]

    ids = run(ByteTracker(track_buffer=30), frames(range(10, 15)))  # missing for 5 frames
    second = [i[1] for i in ids if len(i) == 2]
    assert len(second) == 25 and len(set(second)) == 1 and second[0] != ids[0][0]
    assert {int(i[0]) for i in ids} == {int(ids[0][0])}  # the other object never took its place
    short = run(ByteTracker(track_buffer=3), frames(range(10, 15)))  # lost longer than its buffer
    after = [int(i[1]) for i in short[15:] if i[1] > 0]
    assert after and after[0] not in {int(i[1]) for i in short[:10]}


def test_low_score_detection_continues_a_track_only_in_the_second_stage():
    scores = [0.9] * 5 + [0.3] * 4 + [0.9] * 3
    frames = [[(box(50 + 4 * f, 80), s), (box(250, 200), 0.3)] for f, s in enumerate(scores)]
    ids = run(ByteTracker(track_thresh=0.5), frames)
    assert all(i[0] == ids[0][0] > 0 for i in ids)  # continued through the low-score frames
    assert all(i[1] == -1 for i in ids)  # a low-score detection alone never starts a track
    # without a second stage (nothing counts as low) the same track is lost at the first low score
    no_low = run(ByteTracker(track_thresh=0.5, low_thresh=0.5), frames)
    assert [int(i[0]) for i in no_low[5:9]] == [-1] * 4


def test_new_object_gets_its_id_when_seen_a_second_time():
    frames = [[(box(60 + 3 * f, 60), 0.9)] + ([(box(200, 150), 0.8)] if f >= 3 else []) for f in range(6)]
    ids = run(ByteTracker(), frames)
    assert ids[0][0] == 1  # the first frame confirms at once
    assert ids[3][1] == -1 and ids[4][1] == ids[5][1] == 2  # one sighting is not yet an object
    # a one-frame false positive never gets an id (and so ids stay 1, 2, ... without gaps)
    flash = run(ByteTracker(), [[(box(60, 60), 0.9)], [(box(60, 60), 0.9), (box(200, 150), 0.9)],
                                [(box(60, 60), 0.9)], [(box(60, 60), 0.9), (box(120, 200), 0.9)],
                                [(box(60, 60), 0.9), (box(120, 200), 0.9)]])
    assert flash[1][1] == -1 and flash[4][1] == 2


def test_class_agnostic_by_default_per_class_on_request():
    boxes = np.array([box(100, 100)])
    for per_class, same in ((False, True), (True, False)):
        t = ByteTracker(per_class=per_class)
        first = t.update(boxes, np.array([0.9]), np.array([0]))
        second = t.update(boxes + 2, np.array([0.9]), np.array([1]))  # the detector changed its mind
        assert bool(second[0] == first[0]) is same


def test_assignment_is_the_minimum_cost_partial_matching():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, m = rng.integers(0, 4, 2)
        cost, t = rng.uniform(0, 1, (n, m)), 0.6
        matches, u_rows, u_cols = linear_assignment(cost, t)
        got = cost[matches[:, 0], matches[:, 1]].sum() + t / 2 * (len(u_rows) + len(u_cols))
        best = np.inf
        for k in range(min(n, m) + 1):  # every partial matching of size k, pairs within the gate only
            for rows in itertools.combinations(range(n), k):
                for cols in itertools.permutations(range(m), k):
                    c = cost[list(rows), list(cols)]
                    if (c <= t).all():
                        best = min(best, c.sum() + t / 2 * (n + m - 2 * k))
        assert got == pytest.approx(best) and (cost[matches[:, 0], matches[:, 1]] <= t).all()
        assert sorted([*matches[:, 0], *u_rows]) == list(range(n)) and sorted([*matches[:, 1], *u_cols]) == list(range(m))


def test_track_result_drops_untracked_detections_with_their_masks():
    boxes = np.array([box(30, 30, 20, 20), box(70, 30, 20, 20), box(50, 70, 20, 20)], np.float32)
    masks = np.zeros((3, 100, 100), bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        m[y1:y2, x1:x2] = True
    r = Result(Letterbox.identity((100, 100)), boxes, np.array([0.9, 0.3, 0.8], np.float32), np.array([0, 1, 2]),
               masks=masks)
    out = track_result(r, ByteTracker())  # the 0.3 one is low and there is no track for it to continue
    assert out.track_ids.dtype == np.int64 and out.track_ids.tolist() == [1, 2]
    assert out.classes.tolist() == [0, 2] and np.array_equal(out.masks, masks[[0, 2]])
    assert r.track_ids is None and len(r) == 3  # the input is left as it was


def test_tracked_panoptic_has_no_segment_of_a_dropped_detection():
    """The merge is redone from the kept detections: the dropped one's pixels go to stuff, not to a segment."""
    boxes = np.array([[10, 10, 40, 40], [50, 50, 90, 90]], np.float32)
    masks = np.zeros((2, 100, 100), bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
        m[y1:y2, x1:x2] = True
    semantic = np.full((100, 100), 2, np.uint8)  # semantic index 2: a stuff class everywhere
    spec = PanopticSpec.from_meta([1, 3], [1, 3, 124], score_thres=0.2, stuff_area=1)
    scores, classes = np.array([0.9, 0.3], np.float32), np.array([0, 1])
    r = Result(Letterbox.identity((100, 100)), boxes, scores, classes, masks=masks, semantic=semantic,
               panoptic=merge_panoptic(masks, scores, classes, semantic, spec))
    assert sorted(s["category_id"] for s in r.panoptic.segments) == [1, 3, 124]  # both instances merged
    out = track_result(r, ByteTracker(), spec)  # the 0.3 detection gets no track
    assert out.track_ids.tolist() == [1]
    assert sorted(s["category_id"] for s in out.panoptic.segments) == [1, 124]
    stuff = next(s["id"] for s in out.panoptic.segments if s["category_id"] == 124)
    assert (out.panoptic.ids[50:90, 50:90] == stuff).all()  # the dropped object's pixels are stuff again
    assert track_result(r, ByteTracker()).panoptic is None  # no rule to redo the merge with: none kept


def test_draw_boxes_labels_carry_the_ids():
    img = np.zeros((120, 200, 3), np.uint8)
    b, c, s = np.array([[20, 40, 120, 100]]), np.array([0]), np.array([0.91])
    plain = draw_boxes(img.copy(), b, c, ["person"], s)
    with_id = draw_boxes(img.copy(), b, c, ["person"], s, ids=np.array([7]))
    tab = lambda im: (im[:37].sum(2) > 0).any(0).sum()  # width of the label tab above the box (line at y 40)
    assert tab(with_id) > tab(plain)


def test_ground_truth_detections_through_the_tracker_have_few_id_switches():
    s = run_scene(frames=150, objects=3, seed=0)
    print(f"\nid switches / frames: {s.switches} / {s.frames}; untracked {s.untracked} / {s.detections}; ids {s.ids}")
    assert s.switches <= 1 and s.ids <= 4 and s.untracked < 0.05 * s.detections


# --------------------------------------------------------------------------------------------------
# detect.py --track
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("track")
    video = write_scene_video(root / "scene.mp4", moving_scene(12, 3, (160, 120), seed=1), (160, 120), fps=5)
    image = root / "images"
    image.mkdir()
    cv2.imwrite(str(image / "a.jpg"), np.full((64, 64, 3), 100, np.uint8))
    return {"pt": train_tiny_model(tiny_data, root), "video": video, "images": image}


def run_detect(args: list[str], project: Path) -> tuple[int, str, Path]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = detect_script.main(args + ["--img", str(IMG), "--project", str(project), "--device", "cpu"])
    saved = re.search(r"^Results saved to (\S+)", out.getvalue(), re.MULTILINE)
    return rc, out.getvalue() + err.getvalue(), Path(saved.group(1)) if saved else project / "missing"


def test_detect_track_writes_ids_to_txt_json_and_video(assets, tmp_path):
    # the untrained model's scores sit around 0.5: a lower high-score split so that tracks start
    rc, out, save = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["video"]), "--track",
                                "--track-thresh", "0.3", "--save-txt", "--save-conf", "--save-json"], tmp_path)
    assert rc == 0, out
    per_frame = []
    for i in range(12):
        rows = [ln.split() for ln in (save / "labels" / f"scene_{i}.txt").read_text().splitlines()]
        assert all(len(v) == 7 and 0 < float(v[5]) <= 1 for v in rows)  # class cx cy w h conf id
        ids = [int(v[6]) for v in rows]
        assert len(set(ids)) == len(ids)  # one detection per track and frame
        per_frame.append(ids)
    every = sorted({i for ids in per_frame for i in ids})
    assert every and every == list(range(1, len(every) + 1))  # confirmed ids count up without gaps
    preds = json.loads((save / "predictions.json").read_text())
    assert len(preds) == sum(map(len, per_frame))
    for i, ids in enumerate(per_frame):
        assert sorted(p["track_id"] for p in preds if p["image_id"] == f"scene_{i}") == sorted(ids)
    cap = cv2.VideoCapture(str(save / "scene.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    cap.release()
    # without --track the same video gives plain YOLO lines and no track_id key
    rc, out, plain = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["video"]), "--save-txt",
                                 "--save-json", "--nosave"], tmp_path)
    assert rc == 0, out
    assert all(len(ln.split()) == 5 for f in (plain / "labels").glob("*.txt") for ln in f.read_text().splitlines())
    assert all("track_id" not in p for p in json.loads((plain / "predictions.json").read_text()))


def test_detect_track_on_images_is_a_clear_error(assets, tmp_path):
    rc, out, _ = run_detect(["--weights", str(assets["pt"]), "--source", str(assets["images"]), "--track"], tmp_path)
    assert rc == 2 and "--track needs a video" in out
