"""Multi-object tracking by detection: :class:`ByteTracker` gives each detection of a video frame a track id that
stays the same across frames, and :func:`track_result` applies it to a :class:`~utils.ops.postprocess.Result`.

The rules are ByteTrack's (Zhang et al., "ByteTrack: Multi-Object Tracking by Associating Every Detection Box",
ECCV 2022, reference code github.com/ifzhang/ByteTrack, MIT):

1. every track's box is predicted into the new frame by a constant-velocity Kalman filter over
   ``(cx, cy, aspect, h)`` and their velocities (the DeepSORT/ByteTrack filter and noise weights);
2. detections split by score: high ``score >= track_thresh``, low ``low_thresh <= score < track_thresh``;
3. first association: high detections to all tracks (tracked and lost), cost ``1 - IoU * score``
   (ByteTrack's score fusion), pairs with cost above ``match_thresh`` are not allowed;
4. second association: low detections to the still unmatched *tracked* tracks, cost ``1 - IoU``, at most
   ``0.5`` (a low-score box is usually an occluded or blurred object, so it may only continue a track);
5. tracks born last frame and not yet confirmed get the remaining high detections (cost at most ``0.7``),
   else they are dropped;
6. a remaining high detection scoring at least ``new_track_thresh`` starts a track: confirmed at once on the
   first frame, otherwise when it is matched again in the next frame (one-frame false positives get no id);
7. an unmatched track becomes lost; a lost track is kept ``track_buffer`` frames (predicted, matchable in
   step 3) and then removed; a lost track overlapping a tracked one (IoU > 0.85) is removed as a duplicate.

Assignment is an exact minimum-cost matching with unmatched pairs allowed (what ``lap.lapjv(...,
cost_limit=t)`` solves), built on ``scipy.optimize.linear_sum_assignment`` by padding the cost matrix.

Why our own: Ultralytics' tracker is AGPL-3.0 (not for a permissive project) and the reference ByteTrack is
MIT but no pip package and tied to YOLOX; the algorithm is about 200 lines of numpy.

Matching is class-agnostic by default (``per_class=False``), as ByteTrack's: a detector's class of one object
flickers between similar classes from frame to frame, and a per-class matcher would then cut the track and give
the object a new id; the track takes the class of its latest detection. ``per_class=True`` forbids matches across
classes, for scenes where objects of different classes overlap (a rider on a bicycle).

Deviations from the reference: ``track_buffer`` counts frames (the reference scales it by ``fps / 30``; the caller
may pass ``fps``-scaled values), ids are given when a track is confirmed, so they count up 1, 2, 3 without gaps
(the reference numbers unconfirmed tracks too), and a duplicate is always resolved by removing the lost track.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from utils.ops.panoptic import PanopticSpec, merge_panoptic
from utils.ops.postprocess import Result

__all__ = ["KalmanFilterXYAH", "ByteTracker", "box_iou_np", "linear_assignment", "track_result"]


class KalmanFilterXYAH:
    """Constant-velocity Kalman filter over ``(cx, cy, a, h, vcx, vcy, va, vh)`` (``a = w / h``), ByteTrack's.

    Process and measurement noise scale with the box height (``1/20`` of it for positions, ``1/160`` for
    velocities), so a large near object may move more pixels per frame than a small far one.
    """

    std_position = 1.0 / 20
    std_velocity = 1.0 / 160

    def __init__(self):
        self.motion = np.eye(8)
        self.motion[:4, 4:] = np.eye(4)  # x' = x + v (one frame)
        self.observe = np.eye(4, 8)

    def initiate(self, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of a new track from its first measurement (velocities 0, uncertain)."""
        h = xyah[3]
        std = np.array([2 * self.std_position * h, 2 * self.std_position * h, 1e-2, 2 * self.std_position * h,
                        10 * self.std_velocity * h, 10 * self.std_velocity * h, 1e-5, 10 * self.std_velocity * h])
        return np.r_[xyah, np.zeros(4)], np.diag(std ** 2)

    def predict(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One frame ahead."""
        h = mean[3]
        std = np.array([self.std_position * h, self.std_position * h, 1e-2, self.std_position * h,
                        self.std_velocity * h, self.std_velocity * h, 1e-5, self.std_velocity * h])
        return self.motion @ mean, self.motion @ cov @ self.motion.T + np.diag(std ** 2)

    def update(self, mean: np.ndarray, cov: np.ndarray, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Corrected by a measurement ``xyah``."""
        h = mean[3]
        r = np.diag(np.array([self.std_position * h, self.std_position * h, 1e-1, self.std_position * h]) ** 2)
        s = self.observe @ cov @ self.observe.T + r
        gain = np.linalg.solve(s, self.observe @ cov).T  # S is symmetric: (cov H^T S^-1) = (S^-1 H cov)^T
        mean = mean + gain @ (xyah - self.observe @ mean)
        return mean, cov - gain @ s @ gain.T


def xyxy2xyah(boxes: np.ndarray) -> np.ndarray:
    """``(n, 4)`` ``x1 y1 x2 y2`` -> ``cx cy w/h h``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, w / np.maximum(h, 1e-6), h], 1)


def xyah2xyxy(xyah: np.ndarray) -> np.ndarray:
    """``(n, 4)`` ``cx cy a h`` -> ``x1 y1 x2 y2``."""
    w, h = xyah[:, 2] * xyah[:, 3], xyah[:, 3]
    return np.stack([xyah[:, 0] - w / 2, xyah[:, 1] - h / 2, xyah[:, 0] + w / 2, xyah[:, 1] + h / 2], 1)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, m)`` IoU of ``xyxy`` boxes ``a (n, 4)`` and ``b (m, 4)`` (numpy: tracking runs on host arrays)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def linear_assignment(cost: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-cost matching where leaving a row and a column unmatched costs ``thresh`` (so no pair above
    ``thresh`` is ever used): ``(k, 2)`` matched ``[row, col]``, unmatched rows, unmatched columns.

    Padding makes it a square problem scipy solves exactly: row ``i`` may take its own dummy column at
    ``thresh / 2``, column ``j`` its own dummy row at ``thresh / 2``, dummies pair with dummies for free.
    A plain rectangular ``linear_sum_assignment`` would instead force ``min(n, m)`` pairs, and a gated-out
    pair could push a good one aside.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.empty((0, 2), np.int64), np.arange(n), np.arange(m)
    big = 1e6  # stands in for "not allowed"; finite, so a full assignment always exists
    pad = np.full((n + m, m + n), big)
    pad[:n, :m] = np.where(cost <= thresh, cost, big)
    pad[:n, m:][np.diag_indices(n)] = thresh / 2
    pad[n:, :m][np.diag_indices(m)] = thresh / 2
    pad[n:, m:] = 0.0
    rows, cols = linear_sum_assignment(pad)
    keep = (rows < n) & (cols < m) & (pad[rows, cols] < big)
    matches = np.stack([rows[keep], cols[keep]], 1).astype(np.int64)
    return (matches, np.setdiff1d(np.arange(n), matches[:, 0]), np.setdiff1d(np.arange(m), matches[:, 1]))


TRACKED, LOST = "tracked", "lost"


@dataclasses.dataclass
class _Track:
    """One object's filter state; ``id`` is 0 until the track is confirmed."""

    mean: np.ndarray
    cov: np.ndarray
    cls: int
    score: float
    start: int  # frame it was born
    last: int  # frame it was last matched
    id: int = 0
    state: str = TRACKED

    @property
    def box(self) -> np.ndarray:
        """Current ``x1 y1 x2 y2``."""
        return xyah2xyxy(self.mean[None, :4])[0]


class ByteTracker:
    """ByteTrack over per-frame detections (see the module docstring for the rules and why ours).

    Args:
        track_thresh: score splitting high from low detections (ByteTrack: 0.5; Ultralytics' yaml 0.25 for its
            detectors' lower scores).
        track_buffer: frames a lost track is kept for re-identification before it is removed.
        match_thresh: the most ``1 - IoU * score`` a first-stage match may cost (0.8).
        new_track_thresh: the least score that starts a track (default ``track_thresh + 0.1``, ByteTrack's).
        low_thresh: detections below it are ignored (0.1).
        per_class: only match a track with detections of its class (default: class-agnostic, see above).
    """

    def __init__(self, track_thresh: float = 0.5, track_buffer: int = 30, match_thresh: float = 0.8,
                 new_track_thresh: float | None = None, low_thresh: float = 0.1, per_class: bool = False):
        if track_buffer < 0:
            raise ValueError(f"track_buffer {track_buffer}: must be >= 0")
        if not 0 <= low_thresh <= track_thresh <= 1:
            raise ValueError(f"thresholds must satisfy 0 <= low_thresh {low_thresh} <= track_thresh {track_thresh} <= 1")
        self.track_thresh, self.track_buffer, self.match_thresh = track_thresh, track_buffer, match_thresh
        self.new_track_thresh = track_thresh + 0.1 if new_track_thresh is None else new_track_thresh
        self.low_thresh, self.per_class = low_thresh, per_class
        self.kf = KalmanFilterXYAH()
        self.reset()

    def reset(self) -> None:
        """Forgets every track and restarts ids at 1 (a new video)."""
        self.tracks: list[_Track] = []
        self.frame = 0
        self.next_id = 1

    def _cost(self, tracks: list[_Track], boxes: np.ndarray, scores: np.ndarray | None,
              classes: np.ndarray) -> np.ndarray:
        """``1 - IoU`` (times the detection score when given) of predicted track boxes vs detections; pairs of
        different classes are made unmatchable when ``per_class``."""
        if not tracks or not len(boxes):
            return np.zeros((len(tracks), len(boxes)))
        iou = box_iou_np(np.stack([t.box for t in tracks]), boxes)
        cost = 1 - (iou * scores[None] if scores is not None else iou)
        if self.per_class:
            cost[np.array([t.cls for t in tracks])[:, None] != classes[None]] = np.inf
        return cost

    def _match(self, tracks: list[_Track], det: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
               classes: np.ndarray, thresh: float, fuse: bool, ids: np.ndarray
               ) -> tuple[list[_Track], np.ndarray]:
        """Matches ``tracks`` to detections ``det`` (indices into the frame's arrays), updates the matched ones
        and writes their ids; returns the unmatched tracks and unmatched detection indices."""
        cost = self._cost(tracks, boxes[det], scores[det] if fuse else None, classes[det])
        matches, u_track, u_det = linear_assignment(cost, thresh)
        for ti, di in matches:
            t, d = tracks[ti], det[di]
            t.mean, t.cov = self.kf.update(t.mean, t.cov, xyxy2xyah(boxes[d:d + 1])[0])
            t.cls, t.score, t.last, t.state = int(classes[d]), float(scores[d]), self.frame, TRACKED
            if not t.id:  # matched the frame after its birth: confirmed
                t.id, self.next_id = self.next_id, self.next_id + 1
            ids[d] = t.id
        return [tracks[i] for i in u_track], det[u_det]

    def update(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """One frame's detections -> ``(n,)`` int64 track id per detection, ``-1`` for a detection that belongs
        to no confirmed track (a low-score one nothing continues, one below ``new_track_thresh``, or the first
        sighting of a new object, which gets its id when it is seen again next frame).

        Args:
            boxes: ``(n, 4)`` ``x1 y1 x2 y2`` pixels; scores: ``(n,)``; classes: ``(n,)`` (``None``: one class).
        """
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        classes = np.zeros(len(boxes), np.int64) if classes is None else np.asarray(classes, np.int64).reshape(-1)
        self.frame += 1
        ids = np.full(len(boxes), -1, np.int64)
        for t in self.tracks:
            if t.state == LOST:
                t.mean[7] = 0  # a lost box stops changing its height (ByteTrack): it drifts in position only
            t.mean, t.cov = self.kf.predict(t.mean, t.cov)
        high = np.flatnonzero(scores >= self.track_thresh)
        low = np.flatnonzero((scores >= self.low_thresh) & (scores < self.track_thresh))
        confirmed = [t for t in self.tracks if t.id]
        unconfirmed = [t for t in self.tracks if not t.id]

        # 1. high detections to every confirmed track, lost ones included (re-identification after occlusion)
        rest, high_left = self._match(confirmed, high, boxes, scores, classes, self.match_thresh, True, ids)
        # 2. low detections continue the still unmatched tracks that were tracked last frame
        tracked_rest = [t for t in rest if t.state == TRACKED]
        unmatched, _ = self._match(tracked_rest, low, boxes, scores, classes, 0.5, False, ids)
        for t in unmatched:
            t.state = LOST
        # 3. tracks born last frame take the remaining high detections, or die
        dead, high_left = self._match(unconfirmed, high_left, boxes, scores, classes, 0.7, True, ids)
        # 4. new tracks; confirmed at once on a video's first frame (nothing to confirm them against)
        born = []
        for d in high_left[scores[high_left] >= self.new_track_thresh]:
            mean, cov = self.kf.initiate(xyxy2xyah(boxes[d:d + 1])[0])
            t = _Track(mean, cov, int(classes[d]), float(scores[d]), self.frame, self.frame)
            if self.frame == 1:
                t.id, self.next_id = self.next_id, self.next_id + 1
                ids[d] = t.id
            born.append(t)
        # 5. forget the dead, lost tracks past the buffer, and lost duplicates of tracked ones
        gone = {id(t) for t in dead}
        keep = [t for t in self.tracks if id(t) not in gone and self.frame - t.last <= self.track_buffer] + born
        tracked = [t for t in keep if t.state == TRACKED]
        lost = [t for t in keep if t.state == LOST]
        if tracked and lost:
            dup = box_iou_np(np.stack([t.box for t in lost]), np.stack([t.box for t in tracked])).max(1) > 0.85
            lost = [t for t, d in zip(lost, dup) if not d]
        self.tracks = tracked + lost
        return ids


def track_result(result: Result, tracker: ByteTracker, panoptic: PanopticSpec | None = None) -> Result:
    """``result`` reduced to the detections ``tracker`` gives an id, with those ids in ``track_ids``; boxes,
    scores, classes and masks are cut together, so detection ``i``'s mask stays with detection ``i``'s id.
    A panoptic merge in ``result`` is redone from the kept detections with ``panoptic`` (the rule it was made
    with), so no segment belongs to a detection the tracker dropped; without a rule it is dropped."""
    ids = tracker.update(result.boxes, result.scores, result.classes)
    keep = ids >= 0
    masks = None if result.masks is None else result.masks[keep]
    merged = None
    if result.panoptic is not None and panoptic is not None and result.semantic is not None:
        merged = merge_panoptic(masks, result.scores[keep], result.classes[keep], result.semantic, panoptic)
    return dataclasses.replace(result, boxes=result.boxes[keep], scores=result.scores[keep],
                               classes=result.classes[keep], track_ids=ids[keep], masks=masks, panoptic=merged)
