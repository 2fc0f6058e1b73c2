"""Hostile data: a damaged copy of the synthetic dataset trains to the end, every bad item counted by name.

The damage covers what real COCO-layout datasets contain: broken, empty and missing image files, odd but
valid encodings (grey, RGBA, 16-bit, EXIF-rotated), bad labels (unknown ids, boxes off the image,
degenerate polygons), empty and non-UTF-8 captions, semantic maps of the wrong size or with values of no
category, malformed entries.
Malformed JSON is the one thing that must stop a run: at once, naming the file, line and column.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import train as train_script
from tests.conftest import tiny_cfg, train_args
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.data.synthetic import generate, write_data_yaml

N_TRAIN, N_VAL, IMG = 24, 8, 96
BAD_BYTE_MARK = "@@NOT-UTF8@@"  # replaced by a lone 0xE4 byte (latin-1 'ä') after the JSON is serialized


@dataclass
class Hostile:
    """The damaged copy: its data yaml, damaged file names by summary kind, and files that must still load."""

    yaml: Path
    damaged: dict[str, list[str]] = field(default_factory=dict)   # summary kind -> file names
    kept: dict[str, str] = field(default_factory=dict)             # what was done -> image file name
    originals: dict[str, np.ndarray] = field(default_factory=dict)  # image file name -> BGR pixels before damage

    @property
    def skipped(self) -> int:
        return sum(len(v) for k, v in self.damaged.items() if k in SKIPPING_KINDS)


SKIPPING_KINDS = {"truncated JPEGs", "truncated PNGs", "empty image files", "missing images"}


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 EXIF segment holding only IFD0/Orientation, built by hand (no PIL needed)."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count 1, value left-justified
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def make_hostile(root: Path) -> Hostile:
    """Generates a fresh tiny dataset in ``root`` and damages its train split, one kind per image."""
    generate(root, {"train2017": N_TRAIN, "val2017": N_VAL}, img_size=IMG, seed=2)
    write_data_yaml(root, root / "data.yaml")
    h = Hostile(root / "data.yaml")
    ann_dir, img_dir, sem_dir = root / "annotations", root / "images/train2017", root / "stuffthingmaps/train2017"
    inst = json.loads((ann_dir / "instances_train2017.json").read_text())
    caps = json.loads((ann_dir / "captions_train2017.json").read_text())
    images = inst["images"]
    by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)

    def damaged(kind: str, name: str) -> None:
        h.damaged.setdefault(kind, []).append(name)

    def rename(k: int, suffix: str) -> str:
        """Points image ``k`` at a new file name in both JSONs (the captions file lists images too)."""
        old = images[k]["file_name"]
        new = old.rsplit(".", 1)[0] + suffix
        images[k]["file_name"] = new
        next(i for i in caps["images"] if i["id"] == images[k]["id"])["file_name"] = new
        (img_dir / old).unlink()
        return new

    def pixels(k: int) -> np.ndarray:
        return cv2.imread(str(img_dir / images[k]["file_name"]), cv2.IMREAD_COLOR)

    # -- files that cannot be used: skipped
    f = img_dir / images[0]["file_name"]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    damaged("truncated JPEGs", f.name)
    (img_dir / images[1]["file_name"]).write_bytes(b"")
    damaged("empty image files", images[1]["file_name"])
    (img_dir / images[2]["file_name"]).unlink()
    damaged("missing images", images[2]["file_name"])
    png = cv2.imencode(".png", pixels(3))[1].tobytes()
    name = rename(3, ".png")
    (img_dir / name).write_bytes(png[: len(png) // 2])
    damaged("truncated PNGs", name)

    # -- odd but valid encodings: kept, decoded to 8-bit 3-channel BGR
    bgr = pixels(4)
    cv2.imwrite(str(img_dir / images[4]["file_name"]), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    h.kept["grey"] = images[4]["file_name"]
    bgr = pixels(5)
    alpha = np.full(bgr.shape[:2], 128, np.uint8)
    name = rename(5, ".png")
    cv2.imwrite(str(img_dir / name), np.dstack([bgr, alpha]))
    h.kept["rgba"], h.originals[name] = name, bgr
    bgr = pixels(6)
    name = rename(6, ".png")
    cv2.imwrite(str(img_dir / name), bgr.astype(np.uint16) * 257)  # 16-bit; >> 8 gives back ``bgr``
    h.kept["16bit"], h.originals[name] = name, bgr
    k = next(k for k in range(7, N_TRAIN) if images[k]["width"] != images[k]["height"])  # rotation must show
    f = img_dir / images[k]["file_name"]
    h.originals[f.name] = pixels(k)
    f.write_bytes(with_exif_orientation(f.read_bytes(), 6))
    h.kept["exif"] = f.name
    damaged("EXIF-oriented images (tag ignored, stored pixels match the JSON)", f.name)

    # -- bad labels on the remaining images (each has at least one shape)
    rest = [i for i in range(7, N_TRAIN) if i != k]
    anns = [by_image[images[i]["id"]][0] for i in rest[:5]]
    anns[0]["category_id"] = 999
    damaged("unknown category ids", images[rest[0]]["file_name"])
    anns[1]["bbox"] = [5000, 5000, 10, 10]
    damaged("boxes outside the image or degenerate", images[rest[1]]["file_name"])
    x, y = anns[2]["bbox"][:2]
    anns[2]["segmentation"] = [[x, y, x + 5, y + 5]]  # two points
    x, y = anns[3]["bbox"][:2]
    anns[3]["segmentation"] = [[x, y, x + 5, y, x + 10, y]]  # three collinear points: zero area
    damaged("degenerate polygons (box kept)", images[rest[2]]["file_name"])
    damaged("degenerate polygons (box kept)", images[rest[3]]["file_name"])
    anns[4]["segmentation"] = [["x", "y"] * 3, 7]  # not numbers, not a list: a hand-edited file
    damaged("degenerate polygons (box kept)", images[rest[4]]["file_name"])
    inst["annotations"].append({"id": 99999, "category_id": 1, "bbox": [1, 1, 5, 5]})  # no image_id
    damaged("malformed annotation entries", "instances_train2017.json")

    # -- captions: empty, whitespace-only, and one with a byte that is not UTF-8
    cap_of = {c["image_id"]: c for c in reversed(caps["annotations"])}  # the first caption of each image
    cap_of[images[rest[5]]["id"]]["caption"] = ""
    cap_of[images[rest[6]]["id"]]["caption"] = "  \n "
    damaged("empty captions", images[rest[5]]["file_name"])
    damaged("empty captions", images[rest[6]]["file_name"])
    c = cap_of[images[rest[7]]["id"]]
    c["caption"] = c["caption"] + " on gr" + BAD_BYTE_MARK + "ss"
    damaged("non-UTF-8 captions (skipped)", images[rest[7]]["file_name"])

    # -- a semantic map of the wrong size (repaired at load time, counted when the cache is built)
    m = sem_dir / (images[rest[8]]["file_name"].rsplit(".", 1)[0] + ".png")
    sem = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(m), cv2.resize(sem, (sem.shape[1] // 2, sem.shape[0] // 2), interpolation=cv2.INTER_NEAREST))
    damaged("semantic maps of the wrong size (resized)", m.name)
    h.kept["small map"] = images[rest[8]]["file_name"]
    # -- a semantic map with values of no category (another id convention, a stray 'other'): ignored, counted
    m = sem_dir / (images[rest[9]]["file_name"].rsplit(".", 1)[0] + ".png")
    sem = cv2.imread(str(m), cv2.IMREAD_UNCHANGED)
    sem[:3, :3], sem[-3:, -3:] = 182, 200  # 183 'other' and 201 are no semantic class here
    cv2.imwrite(str(m), sem)
    damaged("semantic maps with values of no category (ignored)", f"{m.name}:182,200")
    h.kept["bad caption"] = images[rest[7]]["file_name"]

    (ann_dir / "instances_train2017.json").write_text(json.dumps(inst))
    raw = json.dumps(caps).encode().replace(BAD_BYTE_MARK.encode(), b"\xe4")
    (ann_dir / "captions_train2017.json").write_bytes(raw)
    return h


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Hostile:
    return make_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(yaml.safe_dump(tiny_cfg()))
    return f


def test_the_damage_is_real(hostile):
    """Guards the fixture itself: the bad byte is in the file, and the EXIF tag is one OpenCV obeys."""
    root = hostile.yaml.parent
    with pytest.raises(UnicodeDecodeError):
        (root / "annotations/captions_train2017.json").read_bytes().decode("utf-8")
    f = root / "images/train2017" / hostile.kept["exif"]
    stored = cv2.imread(str(f), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape[:2]
    assert cv2.imread(str(f), cv2.IMREAD_COLOR).shape[:2] == stored[::-1]


@pytest.mark.slow
def test_hostile_copy_trains_to_the_end_with_one_summary(hostile, cfg_file, tmp_path, capsys):
    rc = train_script.main(train_args(cfg_file, hostile.yaml, tmp_path, 1))
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("train: ")]
    assert len(lines) == 1, out
    summary = lines[0]
    print(summary)  # shown with -s; the report quotes it
    assert summary.startswith(f"train: {N_TRAIN - hostile.skipped} images (")
    for kind, names in hostile.damaged.items():
        assert f"{len(names)} {kind}: " in summary, kind
        for name in names:
            assert name in summary, (kind, name)
    for what in ("grey", "rgba", "16bit"):  # valid files are neither skipped nor reported
        assert hostile.kept[what] not in summary, what
    assert (tmp_path / "exp/weights/last.pt").is_file()


def test_summary_names_every_damaged_file(hostile):
    """The summary the trainer prints, without training: every kind counted, every file named."""
    data = load_data_config(hostile.yaml)
    summary = CocoDataset(data, data.train, 64, use_cache=False).labels_summary()
    for kind, names in hostile.damaged.items():
        assert f"{len(names)} {kind}: " in summary, kind
        for name in names:
            assert name in summary, (kind, name)


def test_odd_encodings_load_as_8bit_bgr_in_the_labels_frame(hostile):
    data = load_data_config(hostile.yaml)
    ds = CocoDataset(data, data.train, 64, use_cache=False)
    index = {rec.file: i for i, (_, rec) in enumerate(ds.items)}
    for what, name in hostile.kept.items():
        s = ds.load(index[name])
        rec = ds.items[index[name]][1]
        assert s.image.dtype == np.uint8 and s.image.shape == (rec.height, rec.width, 3), what
        assert s.semantic is not None and s.semantic.shape == s.image.shape[:2], what
        if name in hostile.originals:  # the exact pixels: alpha dropped, 16-bit scaled, EXIF tag ignored
            assert np.array_equal(s.image, hostile.originals[name]), what
    grey = ds.load(index[hostile.kept["grey"]]).image
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    caps = ds.items[index[hostile.kept["bad caption"]]][1].captions
    assert len(caps) == 4 and not any("\ufffd" in c for c in caps)  # 5 references, the mangled one skipped


def test_label_summary_is_cached_with_the_labels(hostile):
    """A second start reads the cache and must print the same summary (header checks are not redone)."""
    data = load_data_config(hostile.yaml)
    first = CocoDataset(data, data.train, 64).labels_summary()
    second = CocoDataset(data, data.train, 64).labels_summary()
    assert first == second and "semantic maps of the wrong size" in second


def test_json_rotated_size_applies_the_exif_rotation(tmp_path):
    """If the JSON gives the rotated size, the labels are in the displayed frame: the image is rotated."""
    generate(tmp_path, {"train2017": 2, "val2017": 1}, img_size=IMG, seed=3)
    write_data_yaml(tmp_path, tmp_path / "data.yaml")
    inst_file = tmp_path / "annotations/instances_train2017.json"
    inst = json.loads(inst_file.read_text())
    img = next(i for i in inst["images"] if i["width"] != i["height"])
    f = tmp_path / "images/train2017" / img["file_name"]
    f.write_bytes(with_exif_orientation(f.read_bytes(), 6))
    img["width"], img["height"] = img["height"], img["width"]
    for a in inst["annotations"]:  # labels of the rotated frame do not matter here, only their extent
        if a["image_id"] == img["id"]:
            a["bbox"] = [1, 1, 4, 4]
            a["segmentation"] = [[1, 1, 5, 1, 5, 5, 1, 5]]
    inst_file.write_text(json.dumps(inst))
    data = load_data_config(tmp_path / "data.yaml")
    ds = CocoDataset(data, data.train, 64, use_cache=False)
    i = next(i for i, (_, r) in enumerate(ds.items) if r.file == img["file_name"])
    s = ds.load(i)
    assert s.image.shape[:2] == (img["height"], img["width"]) == s.semantic.shape
    assert img["file_name"] not in ds.labels_summary()  # neither an EXIF nor an image-size problem
    assert "semantic maps of the wrong size (resized)" in ds.labels_summary()  # the map kept the stored frame


@pytest.mark.parametrize("which", ["instances_train2017.json", "captions_train2017.json"])
def test_malformed_json_stops_at_once_naming_file_line_column(which, cfg_file, tmp_path, capsys):
    root = tmp_path / "data"
    generate(root, {"train2017": 8, "val2017": 4}, img_size=64, seed=4)
    write_data_yaml(root, root / "data.yaml")
    f = root / "annotations" / which
    text = json.dumps(json.loads(f.read_text()), indent=1)  # many lines, so line and column mean something
    lines = text.splitlines()
    k = len(lines) // 2
    lines[k] = lines[k].rstrip(",") + " ]"  # a stray bracket in the middle of the file
    bad = "\n".join(lines)
    f.write_text(bad)
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(bad)
    rc = train_script.main(train_args(cfg_file, root / "data.yaml", tmp_path / "runs", 1))
    out, err = capsys.readouterr()
    assert rc == 2
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), err
    assert str(f) in err_lines[0] and f"line {e.value.lineno} column {e.value.colno}" in err_lines[0]
    assert "epoch" not in out  # stopped before training
