"""Augmentations keep image, semantic map, boxes and polygons aligned (utils/data/augment.py).

Synthetic samples are painted from known polygons (cv2.fillPoly) onto both the image and the semantic
map, so after any transform the labels can be checked against the pixels they came with.
"""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest

from utils.data.augment import (
    augment_hsv,
    clip_and_filter,
    clip_polygon,
    hflip,
    letterbox,
    load_resized,
    mosaic4,
    polygon_area,
    random_perspective,
    vflip,
)
from utils.data.sample import Sample
from utils.ops.letterbox import letterbox_image
from utils.tasks import IGNORE_INDEX, TASKS

BG_SEM = 40
SEM_OF = {0: 10, 1: 20, 2: 30}  # spaced values: linear interpolation would create new ones
COLOUR = {0: (0, 0, 230), 1: (0, 230, 0), 2: (230, 0, 0)}  # BGR
ALLOWED_SEM = {BG_SEM, IGNORE_INDEX, *SEM_OF.values()}
REF_W, REF_H = 240, 200
# (class, polygons) in a 240 x 200 reference frame; non-integer vertices on purpose.
INSTANCES = [
    (0, [[(30.3, 40.2), (100.7, 30.5), (110.2, 95.4), (60.6, 115.8), (25.1, 90.9)]]),  # convex
    (1, [[(130.4, 30.2), (225.6, 30.2), (225.6, 70.3), (170.5, 70.3), (170.5, 125.7), (130.4, 125.7)]]),  # L
    (2, [[(30.5, 135.5), (90.2, 130.1), (95.8, 185.3), (35.3, 180.6)],  # two parts, one instance
         [(110.4, 140.2), (150.6, 140.2), (150.6, 185.9), (110.4, 185.9)]]),
]
BOX_ONLY = (1, (175.2, 140.3, 225.8, 185.6))  # an instance without polygons


def rasterize(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre is inside ``polys`` (COCO coordinates: pixel i spans [i, i+1))."""
    mask = np.zeros(shape, np.uint8)
    pts = [np.round((np.asarray(p, np.float64) - 0.5) * 16).astype(np.int32) for p in polys]
    cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def make_sample(w: int = REF_W, h: int = REF_H, bg: tuple[int, int, int] = (70, 70, 70), sem: bool = True,
                box_only: bool = True, image_id: int = 1) -> Sample:
    sx, sy = w / REF_W, h / REF_H
    image = np.empty((h, w, 3), np.uint8)
    image[:] = bg
    semantic = np.full((h, w), BG_SEM, np.uint8)
    semantic[:4] = IGNORE_INDEX  # an unlabeled strip, as real maps have
    boxes, classes, segments = [], [], []
    for cls, polys in INSTANCES:
        polys = [np.array(p, np.float32) * np.array([sx, sy], np.float32) for p in polys]
        m = rasterize(polys, (h, w))
        image[m], semantic[m] = COLOUR[cls], SEM_OF[cls]
        pts = np.concatenate(polys)
        boxes.append([*pts.min(0), *pts.max(0)])
        classes.append(cls)
        segments.append(polys)
    if box_only:
        cls, (x1, y1, x2, y2) = BOX_ONLY
        box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        m = rasterize([np.array([box[:2], [box[2], box[1]], box[2:], [box[0], box[3]]])], (h, w))
        image[m], semantic[m] = COLOUR[cls], SEM_OF[cls]
        boxes.append(box)
        classes.append(cls)
        segments.append([])
    return Sample(image=image, boxes=np.array(boxes, np.float32), classes=np.array(classes, np.int64),
                  segments=segments, semantic=semantic if sem else None, captions=["a synthetic image"],
                  image_id=image_id, path=f"img{image_id}.jpg",
                  present={t: (t != "sem" or sem) for t in TASKS})


def check_consistent(out: Sample, min_area: int = 150, min_agree: float = 0.95) -> int:
    """(a) boxes are tight boxes of polygons, (b) polygons land on their class in the map,
    (c) the map holds only pre-existing values, (d) pixels under polygons keep the object's colour.
    Returns how many polygon instances were checked."""
    h, w = out.image.shape[:2]
    assert out.semantic is not None and out.semantic.shape == (h, w) and out.semantic.dtype == np.uint8
    assert set(np.unique(out.semantic).tolist()) <= ALLOWED_SEM  # (c)
    assert len(out.boxes) == len(out.classes) == len(out.segments)
    assert out.boxes.dtype == np.float32 and out.classes.dtype == np.int64
    if len(out.boxes):
        assert (out.boxes >= 0).all() and (out.boxes[:, [0, 2]] <= w).all() and (out.boxes[:, [1, 3]] <= h).all()
        assert (out.boxes[:, 2] > out.boxes[:, 0]).all() and (out.boxes[:, 3] > out.boxes[:, 1]).all()
    checked = 0
    for box, cls, polys in zip(out.boxes, out.classes, out.segments):
        if not polys:
            continue
        pts = np.concatenate(polys)
        assert all(p.dtype == np.float32 and p.ndim == 2 and p.shape[1] == 2 and len(p) >= 3 for p in polys)
        assert (pts >= 0).all() and (pts[:, 0] <= w).all() and (pts[:, 1] <= h).all()
        np.testing.assert_allclose(box, [*pts.min(0), *pts.max(0)], atol=1.5)  # (a)
        mask = rasterize(polys, (h, w))
        if mask.sum() < min_area:  # too few pixels to measure agreement
            continue
        # (b) Nearest sampling moves the map's edges by up to ~1 px, which only matters for thin shapes
        # (e.g. slivers cut off at the border): judge compact polygons on their whole area, thin ones
        # on their interior (1 px eroded).
        area = sum(polygon_area(p) for p in polys)
        perimeter = sum(np.linalg.norm(p - np.roll(p, -1, 0), axis=1).sum() for p in polys)
        core = mask if area >= 10 * perimeter else cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        if core.sum() >= 30:
            agree = (out.semantic[core] == SEM_OF[int(cls)]).mean()
            assert agree >= min_agree, f"class {cls}: only {agree:.3f} of the polygon lands on its semantic class"
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # skip blended edges
        if inner.sum() >= 20:
            mean = out.image[inner].reshape(-1, 3).astype(np.float64).mean(0)
            assert np.abs(mean - COLOUR[int(cls)]).max() < 25, (cls, mean)  # (d)
        checked += 1
    return checked


def assert_same(a: Sample, b: Sample, atol: float = 0.0) -> None:
    np.testing.assert_array_equal(a.image, b.image)
    if a.semantic is None or b.semantic is None:
        assert a.semantic is None and b.semantic is None
    else:
        np.testing.assert_array_equal(a.semantic, b.semantic)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert len(a.segments) == len(b.segments)
    for pa, pb in zip(a.segments, b.segments):
        assert len(pa) == len(pb)
        for x, y in zip(pa, pb):
            np.testing.assert_allclose(x, y, atol=atol)
    assert a.present == b.present and a.captions == b.captions


def differs(a: Sample, b: Sample) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


# ------------------------------------------------------------------------------------------------ flips
def test_synthetic_sample_is_consistent():
    assert check_consistent(make_sample()) == len(INSTANCES)


@pytest.mark.parametrize("flip", [hflip, vflip])
def test_flip_consistent(flip):
    s = make_sample()
    out = flip(s)
    assert check_consistent(out, min_agree=0.995) == len(INSTANCES)  # exact: a 1-px offset gives ~0.98
    axis = 1 if flip is hflip else 0
    np.testing.assert_array_equal(out.image, np.flip(s.image, axis))
    np.testing.assert_array_equal(out.semantic, np.flip(s.semantic, axis))
    # the box-only instance moves exactly with the pixels: its painted rectangle is still under its box
    x1, y1, x2, y2 = out.boxes[-1]
    rect = rasterize([np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])], out.semantic.shape)
    assert (out.semantic[rect] == SEM_OF[BOX_ONLY[0]]).mean() > 0.995


@pytest.mark.parametrize("flip", [hflip, vflip])
def test_flip_twice_is_identity(flip):
    s = make_sample()
    assert_same(flip(flip(s)), s, atol=1e-4)


# ------------------------------------------------------------------------------------------------ letterbox
@pytest.mark.parametrize("new_shape, auto, scaleup, size", [
    (320, False, True, (320, 320)),
    ((256, 384), False, True, (256, 384)),
    (160, False, True, (160, 160)),  # shrink
    (320, True, True, None),  # minimum rectangle: stride multiple
    (480, False, False, (480, 480)),  # no upscaling: pad only
])
def test_letterbox(new_shape, auto, scaleup, size):
    s = make_sample()
    out, lb = letterbox(s, new_shape, auto=auto, scaleup=scaleup)
    ratio, (pw, ph) = lb.ratio, lb.pad
    assert lb.orig_shape == s.image.shape[:2] and lb.input_shape == out.image.shape[:2]
    h, w = out.image.shape[:2]
    if size is None:
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) == 320
    else:
        assert (h, w) == size
    if not scaleup:
        assert ratio == 1.0
    # padding: image fill colour and IGNORE_INDEX in the map
    left, top = int(pw), int(ph)
    uw, uh = round(REF_W * ratio), round(REF_H * ratio)
    assert out.semantic.shape == (h, w)
    if left:
        assert (out.image[:, :left] == 114).all() and (out.semantic[:, :left] == IGNORE_INDEX).all()
    if top:
        assert (out.image[:top] == 114).all() and (out.semantic[:top] == IGNORE_INDEX).all()
    assert (out.semantic[top + uh:] == IGNORE_INDEX).all() and (out.semantic[:, left + uw:] == IGNORE_INDEX).all()
    assert check_consistent(out) == len(INSTANCES)
    # (g) predictions map back with (x - pad) / ratio; only the rounding of the resized size remains
    back = (out.boxes - np.array([pw, ph, pw, ph], np.float32)) / ratio
    np.testing.assert_allclose(back, s.boxes, atol=0.5 / ratio + 1e-3)
    for pa, pb in zip(out.segments, s.segments):
        for x, y in zip(pa, pb):
            np.testing.assert_allclose((x - [pw, ph]) / ratio, y, atol=0.5 / ratio + 1e-3)
    assert out.present == s.present and out.captions == s.captions and out.orig_shape == s.orig_shape
    # the pixels are the letterbox of utils/ops that inference uses, the record its own
    image, semantic, lb_image = letterbox_image(s.image, new_shape, auto=auto, scaleup=scaleup, semantic=s.semantic)
    assert np.array_equal(image, out.image) and np.array_equal(semantic, out.semantic) and lb_image == lb
    assert lb.scales() == (uw / REF_W, uh / REF_H)


def test_load_resized():
    s = make_sample(300, 250)
    out = load_resized(s, 200)
    assert out.image.shape[:2] == (167, 200)
    check_consistent(out)
    same = load_resized(out, 200)
    assert_same(same, out)
    assert same.image is not out.image  # always a copy, safe to edit in place


# ------------------------------------------------------------------------------------------------ perspective
PERSPECTIVE_KW = dict(degrees=20.0, translate=0.1, scale=0.3, shear=5.0)


@pytest.mark.parametrize("perspective", [0.0, 5e-4])
@pytest.mark.parametrize("seed", range(4))
def test_random_perspective_consistent(seed, perspective):
    s = make_sample()
    out = random_perspective(s, np.random.default_rng(seed), perspective=perspective, **PERSPECTIVE_KW)
    assert out.image.shape == s.image.shape
    assert check_consistent(out) >= 1
    assert out.present == s.present and out.captions == s.captions


def test_random_perspective_identity():
    s = make_sample()
    out = random_perspective(s, np.random.default_rng(0), degrees=0, translate=0, scale=0, shear=0, perspective=0)
    assert_same(out, s)


@pytest.mark.parametrize("perspective", [0.0, 1e-3])
def test_random_perspective_border_crop_removes_outside(perspective):
    """(i) translation by a negative border: instances that end fully outside are removed."""
    h = w = 200
    image = np.full((h, w, 3), 70, np.uint8)
    semantic = np.full((h, w), BG_SEM, np.uint8)
    squares = {"tl": (10.2, 10.2, 30.7, 30.7), "mid": (90.3, 90.3, 110.6, 110.6), "br": (170.1, 170.1, 190.4, 190.4)}
    boxes, segments = [], []
    for _name, (x1, y1, x2, y2) in squares.items():
        poly = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
        m = rasterize([poly], (h, w))
        image[m], semantic[m] = COLOUR[0], SEM_OF[0]
        boxes.append([x1, y1, x2, y2])
        segments.append([poly])
    boxes.append([172.0, 10.0, 192.0, 30.0])  # box-only, top right: also outside
    segments.append([])
    s = Sample(image=image, boxes=np.array(boxes, np.float32), classes=np.zeros(4, np.int64), segments=segments,
               semantic=semantic, present={t: True for t in TASKS})
    # no randomness with all ranges zero except a tiny perspective: the centre 80x80 is cut out
    out = random_perspective(s, np.random.default_rng(0), degrees=0, translate=0, scale=0, shear=0,
                             perspective=perspective, border=(-60, -60))
    assert out.image.shape[:2] == (80, 80)
    assert len(out) == 1
    np.testing.assert_allclose(out.boxes[0], np.array(squares["mid"]) - 60, atol=0.2 if perspective else 1e-4)
    check_consistent(out, min_area=100)


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_big_translate_keeps_only_visible(seed):
    s = make_sample()
    out = random_perspective(s, np.random.default_rng(seed), translate=0.45, scale=0.0)
    h, w = out.image.shape[:2]
    check_consistent(out)
    for box, _polys in zip(out.boxes, out.segments):  # survivors are really inside the image
        assert box[2] - box[0] > 2 and box[3] - box[1] > 2 and box[2] <= w and box[3] <= h


# ------------------------------------------------------------------------------------------------ mosaic
def mosaic_inputs(sem_missing: int | None = None) -> list[Sample]:
    sizes = [(256, 224), (200, 256), (320, 280), (256, 256)]  # tile 2 needs resizing to long side 256
    bgs = [(70, 70, 70), (90, 60, 40), (40, 90, 60), (60, 40, 90)]
    return [make_sample(w, h, bg, sem=(i != sem_missing), image_id=i + 1)
            for i, ((w, h), bg) in enumerate(zip(sizes, bgs))]


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_then_perspective_consistent(seed):
    img_size = 256
    rng = np.random.default_rng(seed)
    m = mosaic4(mosaic_inputs(), img_size, rng)
    assert m.image.shape == (2 * img_size, 2 * img_size, 3)
    assert check_consistent(m) >= 1
    out = random_perspective(m, rng, border=(-img_size // 2, -img_size // 2), perspective=2e-4, **PERSPECTIVE_KW)
    assert out.image.shape == (img_size, img_size, 3)
    check_consistent(out)
    assert out.captions == [] and out.present == {"det": True, "inst": True, "sem": True, "cap": False}


def test_mosaic_tile_without_semantic():
    """(h) the tile lacking a semantic map is IGNORE_INDEX; captions dropped."""
    tiles = mosaic_inputs(sem_missing=1)
    checked = 0
    for seed in range(5):
        m = mosaic4(tiles, 256, np.random.default_rng(seed))
        assert m.captions == [] and m.present["cap"] is False and m.present["sem"] is True
        assert m.present["det"] and m.present["inst"]
        assert set(np.unique(m.semantic).tolist()) <= ALLOWED_SEM
        bg = [(m.image == np.array(t.image[10, 10])).all(-1) for t in tiles]  # each tile's background pixels
        assert (m.semantic[bg[1]] == IGNORE_INDEX).all()
        ys, xs = np.nonzero(bg[1])
        if len(ys):  # the whole visible tile (objects too) is unlabeled
            assert (m.semantic[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == IGNORE_INDEX).all()
            checked += 1
        for i in (0, 2, 3):  # other tiles keep their labels (their unlabeled strip aside)
            if bg[i].sum():
                assert (m.semantic[bg[i]] == BG_SEM).mean() > 0.9
    assert checked >= 3
    none = mosaic4([make_sample(sem=False) for _ in range(4)], 256, np.random.default_rng(0))
    assert none.semantic is None and none.present["sem"] is False


def test_mosaic_present_flags_and_ids():
    tiles = mosaic_inputs()
    tiles[2].present["inst"] = False
    m = mosaic4(tiles, 256, np.random.default_rng(0))
    assert m.present == {"det": True, "inst": False, "sem": True, "cap": False}
    assert m.image_id == tiles[0].image_id and m.path == tiles[0].path


# ------------------------------------------------------------------------------------------------ seeds, hsv
def _pipeline(sample: Sample, rng: np.random.Generator) -> Sample:
    out = random_perspective(sample, rng, perspective=1e-4, **PERSPECTIVE_KW)
    augment_hsv(out.image, rng)
    return out


PIPELINES = {
    "perspective+hsv": lambda rng: _pipeline(make_sample(), rng),
    "mosaic+perspective": lambda rng: random_perspective(mosaic4(mosaic_inputs(), 256, rng), rng,
                                                         border=(-128, -128), **PERSPECTIVE_KW),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_seed_reproducible(name):
    """(e) same seed -> identical output; different seeds -> different output."""
    fn = PIPELINES[name]
    assert_same(fn(np.random.default_rng(123)), fn(np.random.default_rng(123)))
    assert differs(fn(np.random.default_rng(123)), fn(np.random.default_rng(124)))


def test_augment_hsv_in_place_and_reproducible():
    a, b, c = (make_sample().image for _ in range(3))
    orig = a.copy()
    assert augment_hsv(a, np.random.default_rng(5)) is None
    augment_hsv(b, np.random.default_rng(5))
    augment_hsv(c, np.random.default_rng(6))
    assert not np.array_equal(a, orig)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    d = orig.copy()
    augment_hsv(d, np.random.default_rng(5), 0, 0, 0)
    np.testing.assert_array_equal(d, orig)


# ------------------------------------------------------------------------------------------------ clipping
def test_clip_polygon_exact_for_concave():
    # an L (area 30*90 + 50*30 = 4200) sticking out of a 100 x 50 image on the right and bottom
    L = np.array([[40, 10], [120, 10], [120, 40], [70, 40], [70, 100], [40, 100]], np.float32)
    c = clip_polygon(L, 100, 50)
    assert polygon_area(c) == pytest.approx(60 * 30 + 30 * 10)
    assert c[:, 0].max() == 100 and c[:, 1].max() == 50
    assert len(clip_polygon(L + 200, 100, 50)) == 0
    # a U cut by the top edge falls apart into two pieces joined along the edge: same pixels as unclipped
    U = np.array([[10, 10], [20, 10], [20, -30], [30, -30], [30, 20], [0, 20], [0, -30], [10, -30]], np.float32)
    U += np.array([5.3, 0.2], np.float32)
    cu = clip_polygon(U, 50, 50)
    assert polygon_area(cu) == pytest.approx(30 * 20.2 - 10 * 10.2, rel=1e-5)
    np.testing.assert_array_equal(rasterize([cu], (50, 50)), rasterize([U], (50, 50)))


def test_clip_and_filter():
    s = make_sample()
    s.boxes = np.concatenate([s.boxes, [[-50, -50, -10, -10], [230, 100, 300, 150], [10, 10, 11.5, 40]]]).astype(
        np.float32)
    s.classes = np.concatenate([s.classes, [0, 1, 2]])
    s.segments = s.segments + [[np.array([[-50, -50], [-10, -50], [-10, -10]], np.float32)], [], []]
    shifted = hflip(s)  # exercise a labelled sample, then push polygon instance 0 half out of the image
    shifted.segments[0] = [p + np.array([100, 0], np.float32) for p in shifted.segments[0]]
    out = clip_and_filter(shifted)
    # outside triangle and 1.5-px-wide box dropped; box partly outside clipped
    assert len(out) == len(s) - 2
    assert out.boxes[-1].tolist() == pytest.approx([0, 100, 10, 150])
    assert out.semantic is not s.semantic and out.image is not s.image
    # polygon instance 0: box is the tight box of its clipped polygon
    np.testing.assert_allclose(out.boxes[0], [*np.concatenate(out.segments[0]).min(0),
                                              *np.concatenate(out.segments[0]).max(0)])
    assert out.boxes[0][2] == REF_W and polygon_area(out.segments[0][0]) < polygon_area(shifted.segments[0][0])


def test_inputs_not_modified():
    s = make_sample()
    before = copy.deepcopy(s)
    rng = np.random.default_rng(0)
    for fn in (hflip, vflip, clip_and_filter, lambda x: letterbox(x, 320)[0], lambda x: load_resized(x, 120),
               lambda x: random_perspective(x, rng, perspective=1e-4, **PERSPECTIVE_KW),
               lambda x: mosaic4([x, x, x, x], 200, rng)):
        out = fn(s)
        out.image[...] = 0  # the output must not alias the input
        if out.semantic is not None:
            out.semantic[...] = 0
        out.present["det"] = False
        assert_same(s, before)
