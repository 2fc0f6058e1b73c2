"""The caption-content measure: hand-made captions against hand-made objects, and its ground truth from images."""
from __future__ import annotations

import json
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch

from utils.data.synthetic import OTHER_COLOURS, PALETTE, nearest_colour, scene_truths
from utils.data.vocab import Vocabulary, fitted_max_len, hyp_max_len, resolve_max_len
from utils.eval.metrics.caption_content import ContentReader
from utils.loss.caption import SelfCriticalLoss

NAMES = ["circle", "square", "triangle", "star", "ellipse", "box"]
READER = ContentReader(NAMES, list(PALETTE) + list(OTHER_COLOURS))
SCENE = (("red", "circle"), ("blue", "star"), ("blue", "star"))  # three objects


@pytest.mark.parametrize("caption, named, count, wrong", [
    ("a red circle and two blue stars on grass", True, 3, False),
    ("two blue stars on the left", True, 2, False),           # a present object with its colour; count is short
    ("a green circle on grass", False, 1, True),              # the shape is there, the colour is not
    ("a blue circle", False, 1, True),                        # both words present, not together
    ("three shapes on water under a clear sky", False, 3, False),
    ("there are 3 shapes in the picture", False, 3, False),   # digits count too
    ("two shapes on water", False, 2, False),
    ("red and blue shapes on grass", False, None, False),    # colours but no object, no count
    ("the largest shape is a red circle", True, 1, False),
    ("a red circle and stars", True, None, False),            # an object without a count: no count stated
    ("a single red circle on the left", True, 1, False),
    ("a picture of two red boxes on sand", False, 2, True),  # plural with -es
    ("", False, None, False),
])
def test_hand_made_captions(caption: str, named: bool, count: int | None, wrong: bool) -> None:
    assert READER.named(caption, SCENE) is named
    assert READER.stated_count(caption) == count
    assert READER.wrong(caption, SCENE) is wrong


def test_shares_over_images() -> None:
    truths = {1: SCENE, 2: (("yellow", "square"),), 3: (("white", "ellipse"), ("black", "ellipse"))}
    captions = {1: "a red circle and two blue stars", 2: "a yellow square on sand", 3: "three shapes on dirt",
                4: "an image the truths do not hold"}
    shares = READER.shares(captions, truths)
    assert shares["images"] == 3
    assert shares["named"] == pytest.approx(2 / 3)
    assert shares["count"] == pytest.approx(2 / 3)  # image 3 has two ellipses, not three
    assert shares["both"] == pytest.approx(2 / 3)
    assert shares["wrong"] == 0
    assert shares["exact"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("caption, exact", [
    ("a red circle and two blue stars on grass", True),
    ("two blue stars and a red circle", True),          # order is free
    ("a red circle and a blue star", False),            # one star short
    ("a red circle and three blue stars", False),       # one star too many
    ("a blue circle and two red stars", False),         # right kinds, right colours, bound wrongly
    ("a red square and two blue stars", False),         # a wrong kind with the right colour
    ("three shapes: a red circle and two blue stars", True),  # a generic total does not list objects
    ("three shapes on grass", False),
])
def test_exact_inventory(caption: str, exact: bool) -> None:
    assert READER.exact(caption, SCENE) is exact


def test_multiword_names_and_grey() -> None:
    reader = ContentReader(["traffic light", "light"], ["grey", "red"])
    assert reader.phrases("two grey traffic lights and a red light")[0].noun == "traffic light"
    assert reader.named("a gray traffic light", (("gray", "traffic light"),))
    assert reader.stated_count("two grey traffic lights and a red light") == 3


def _write_split(tmp_path, image: np.ndarray, anns: list[dict]) -> tuple:
    """One image and its instances JSON (categories: NAMES with ids 1..)."""
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "1.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    h, w = image.shape[:2]
    data = {"images": [{"id": 7, "file_name": "1.jpg", "width": w, "height": h}],
            "annotations": [{"id": k + 1, "image_id": 7, "iscrowd": 0, **a} for k, a in enumerate(anns)],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return tmp_path / "images", path


def test_truth_colours_from_pixels_and_fields(tmp_path) -> None:
    img = np.full((64, 96, 3), 128, np.uint8)
    img[8:30, 8:30] = PALETTE["red"]
    img[36:60, 50:90] = PALETTE["yellow"]
    square = {"category_id": 2, "segmentation": [[8, 8, 30, 8, 30, 30, 8, 30]]}
    ellipse = {"category_id": 5, "segmentation": [[50, 36, 90, 36, 90, 60, 50, 60]]}
    labelled = {"category_id": 1, "segmentation": [[40, 2, 44, 2, 44, 6, 40, 6]], "colour": "purple"}
    images, instances = _write_split(tmp_path, img, [square, ellipse, labelled])
    assert scene_truths(images, instances) == {7: (("red", "square"), ("yellow", "ellipse"), ("purple", "circle"))}


def test_nearest_colour() -> None:
    for name, bgr in PALETTE.items():
        assert nearest_colour(np.asarray(bgr) + 14) == name  # within the generator's colour jitter
    assert nearest_colour((0, 150, 250)) == "orange"


def test_truths_of_generated_data_agree_with_its_inventory_captions(tiny_data) -> None:
    """The generator's first caption of every image lists all its shapes with colours and counts: read against
    the truth made from pixels it is named, counted right and never wrong (so pixels and generator agree)."""
    root = tiny_data.parent
    for split in ("train2017", "val2017"):
        truths = scene_truths(root / "images" / split, root / "annotations" / f"instances_{split}.json")
        caps = defaultdict(list)
        for a in json.loads((root / "annotations" / f"captions_{split}.json").read_text())["annotations"]:
            caps[a["image_id"]].append(a["caption"])
        first = {i: c[0] for i, c in caps.items()}
        assert READER.shares(first, truths) == {"named": 1.0, "count": 1.0, "both": 1.0, "wrong": 0.0,
                                                "exact": 1.0, "images": float(len(truths))}


def test_fitted_max_len_keeps_99_percent_whole() -> None:
    short, long = ["a red circle on grass"] * 99, ["one two three four five six seven eight nine ten"]
    assert fitted_max_len(short + long) == 5 + 2  # the one long caption is the 1 % cut
    assert fitted_max_len(short[:98] + long * 2) == 10 + 2  # two of 100: the 99th caption is long
    assert fitted_max_len([]) == 2
    assert resolve_max_len("auto", short + long) == resolve_max_len(None, short + long) == 7
    assert resolve_max_len(24, long) == 24
    with pytest.raises(ValueError):
        resolve_max_len("long", long)
    with pytest.raises(ValueError, match="not resolved"):
        hyp_max_len({"cap_max_len": "auto"})
    assert hyp_max_len({}) == 24 and hyp_max_len({"cap_max_len": 31}) == 31


def test_contrastive_reward_prefers_the_caption_that_tells_images_apart() -> None:
    """Under plain CIDEr-D a sentence every image's references share ("three shapes on grass") earns about what
    the image's own inventory does; with ``scst_contrast`` the inventory, which fits no other image, wins."""
    refs = [["a red circle, a blue star and a white square on grass", "three shapes on grass",
             "a red circle above a blue star"],
            ["a green triangle, a black ellipse and a yellow star on grass", "three shapes on grass",
             "a green triangle above a black ellipse"],
            ["a white square on sand", "one shape on sand", "a single white square in the middle"]]
    vocab = Vocabulary.build(c for r in refs for c in r)
    samples = ["three shapes on grass", "a red circle, a blue star and a white square on grass"]
    words = samples + ["a white square on sand"] * 2 + ["one shape on sand"] * 2  # image 0's two samples first
    plain = SelfCriticalLoss(vocab, refs, {"scst_samples": 2})
    own, other = plain.rewards(words, refs, [0, 1, 2])
    assert own.shape == other.shape == (3, 2) and (other == 0).all()
    contrast = SelfCriticalLoss(vocab, refs, {"scst_samples": 2, "scst_contrast": 1.0})
    own_c, other_c = contrast.rewards(words, refs, [0, 1, 2])
    torch.testing.assert_close(own_c, own)
    assert other_c[0, 0] > other_c[0, 1] >= 0  # the template matches image 1's references too
    template, inventory = (own_c - other_c)[0]
    assert inventory > template
    assert inventory - template > own[0, 1] - own[0, 0]  # the contrast widens the inventory's lead
    single, none = contrast.rewards(samples, refs[:1], [0])
    assert (none == 0).all()
