"""ByteTracker on a synthetic scene with known identities: id switches per frame.

Coloured shapes move at constant velocity and bounce off the frame edges (so they cross each other's paths);
their ground-truth boxes, jittered, partly missed and partly given low scores, are the "detections" the tracker
sees. Identities are known, so every id switch is counted exactly: an object's id switches when the track id
of its detection differs from the id it had when last tracked.

    python -m benchmarks.track                   # 5 scenes x 300 frames, 3 objects, 2 px jitter, 5% missed, 20% low
    python -m benchmarks.track --speed 2 5 --frames 1000 --objects 5 --drop 0.1 --video scene.mp4

The scene also makes a test video (``tests/test_track.py``): ``write_scene_video`` draws it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.ops.track import ByteTracker

COLORS = ((40, 40, 230), (230, 120, 30), (40, 200, 60), (200, 40, 200), (20, 200, 220))  # BGR


def moving_scene(frames: int = 300, objects: int = 3, size: tuple[int, int] = (320, 240), seed: int = 0,
                 speed: tuple[float, float] = (1.0, 4.0)) -> np.ndarray:
    """``(frames, objects, 4)`` float ``x1 y1 x2 y2`` of boxes of 30..70 px moving ``speed`` px/frame per axis,
    bouncing off the edges of a ``size = (w, h)`` frame (a bounce reverses the velocity at once: the
    constant-velocity filter's hardest case)."""
    rng = np.random.default_rng(seed)
    w, h = size
    wh = rng.uniform(30, 70, (objects, 2))
    pos = rng.uniform(0, 1, (objects, 2)) * (np.array([w, h]) - wh)
    vel = rng.uniform(speed[0], speed[1], (objects, 2)) * rng.choice([-1, 1], (objects, 2))
    out = np.zeros((frames, objects, 4))
    for f in range(frames):
        out[f] = np.concatenate([pos, pos + wh], 1)
        pos = pos + vel
        for axis, limit in ((0, w), (1, h)):  # reflect at the edges
            over = (pos[:, axis] < 0) | (pos[:, axis] + wh[:, axis] > limit)
            vel[over, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], 0, limit - wh[:, axis])
    return out


def write_scene_video(path: str | Path, boxes: np.ndarray, size: tuple[int, int] = (320, 240), fps: float = 10.0
                      ) -> Path:
    """Draws ``boxes`` (:func:`moving_scene`) as filled coloured ellipses/rectangles on grey into an mp4."""
    path = Path(path)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        raise ValueError(f"cannot write video {path} (OpenCV has no mp4v encoder?)")
    try:
        for frame_boxes in boxes:
            img = np.full((h, w, 3), 110, np.uint8)
            for k, (x1, y1, x2, y2) in enumerate(frame_boxes.round().astype(int)):
                color = COLORS[k % len(COLORS)]
                if k % 2:
                    cv2.rectangle(img, (x1, y1), (x2, y2), color, -1)
                else:
                    cv2.ellipse(img, (((x1 + x2) / 2, (y1 + y2) / 2), (float(x2 - x1), float(y2 - y1)), 0.0), color, -1)
            writer.write(img)
    finally:
        writer.release()
    return path


def fake_detections(gt: np.ndarray, rng: np.random.Generator, jitter: float = 2.0, drop: float = 0.05,
                    low: float = 0.2) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame ``(boxes, scores, object index)``: each ground-truth box with Gaussian corner jitter (px),
    missed with probability ``drop``, scored 0.15..0.45 (low, second-stage) with probability ``low``,
    else 0.6..0.95; shuffled, so detection order says nothing about identity."""
    out = []
    for frame in gt:
        n = len(frame)
        keep = np.flatnonzero(rng.random(n) >= drop)
        keep = keep[rng.permutation(len(keep))]
        boxes = frame[keep] + rng.normal(0, jitter, (len(keep), 4))
        scores = np.where(rng.random(len(keep)) < low, rng.uniform(0.15, 0.45, len(keep)),
                          rng.uniform(0.6, 0.95, len(keep)))
        out.append((boxes, scores, keep))
    return out


@dataclass
class TrackStats:
    """Identity errors of one tracked sequence with known objects."""

    frames: int
    switches: int  # an object's id differs from the id it had when last tracked
    untracked: int  # detections of real objects the tracker gave no id (-1)
    detections: int
    ids: int  # distinct ids given (ideally the number of objects)


def count_id_switches(objects: list[np.ndarray], ids: list[np.ndarray]) -> TrackStats:
    """Per frame the object index and the track id of each detection -> :class:`TrackStats`."""
    last: dict[int, int] = {}
    switches = untracked = detections = 0
    seen: set[int] = set()
    for obj, tid in zip(objects, ids):
        for o, i in zip(obj.tolist(), tid.tolist()):
            detections += 1
            if i < 0:
                untracked += 1
                continue
            seen.add(i)
            switches += o in last and last[o] != i
            last[o] = i
    return TrackStats(len(objects), switches, untracked, detections, len(seen))


def run_scene(frames: int = 300, objects: int = 3, seed: int = 0, jitter: float = 2.0, drop: float = 0.05,
              low: float = 0.2, tracker: ByteTracker | None = None, speed: tuple[float, float] = (1.0, 4.0)
              ) -> TrackStats:
    """Tracks :func:`fake_detections` of a :func:`moving_scene` and counts its id errors."""
    gt = moving_scene(frames, objects, seed=seed, speed=speed)
    tracker = tracker or ByteTracker()
    rng = np.random.default_rng(seed + 1)
    objs, ids = [], []
    for boxes, scores, obj in fake_detections(gt, rng, jitter, drop, low):
        ids.append(tracker.update(boxes, scores))
        objs.append(obj)
    return count_id_switches(objs, ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--seeds", type=int, default=5, help="scenes to average over (seeds 0..n-1)")
    p.add_argument("--speed", nargs=2, type=float, default=[1.0, 4.0], metavar=("LO", "HI"), help="px/frame per axis")
    p.add_argument("--jitter", type=float, default=2.0, help="box corner noise, px (std)")
    p.add_argument("--drop", type=float, default=0.05, help="probability a detection is missed")
    p.add_argument("--low", type=float, default=0.2, help="probability a detection scores low (0.15..0.45)")
    p.add_argument("--track-thresh", type=float, default=0.5)
    p.add_argument("--track-buffer", type=int, default=30)
    p.add_argument("--video", default="", help="also write seed 0's scene to this mp4")
    opt = p.parse_args(argv)
    print(f"{opt.objects} objects at {opt.speed[0]:g}..{opt.speed[1]:g} px/frame, {opt.frames} frames, jitter {opt.jitter:g} px, {opt.drop:.0%} missed, "
          f"{opt.low:.0%} low-score; ByteTracker(track_thresh={opt.track_thresh}, track_buffer={opt.track_buffer})")
    print(f"{'seed':>4} {'id switches / frames':>21} {'untracked dets':>15} {'ids':>4}")
    total_sw = total_f = 0
    for seed in range(opt.seeds):
        s = run_scene(opt.frames, opt.objects, seed, opt.jitter, opt.drop, opt.low,
                      ByteTracker(opt.track_thresh, opt.track_buffer), tuple(opt.speed))
        total_sw, total_f = total_sw + s.switches, total_f + s.frames
        print(f"{seed:>4} {f'{s.switches} / {s.frames}':>21} {f'{s.untracked} / {s.detections}':>15} {s.ids:>4}")
    print(f"all: {total_sw} id switches / {total_f} frames")
    if opt.video:
        print(f"wrote {write_scene_video(opt.video, moving_scene(opt.frames, opt.objects, seed=0, speed=tuple(opt.speed)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
