"""benchmarks/peers.py's conversion to Ultralytics' label formats and its constant-caption floor (the
peers themselves need Ultralytics, which the benchmark installs; the tests do not)."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks import caption_lm, peers, real
from benchmarks.peers import constant_caption_floor
from benchmarks.ultralytics_peer import convert
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.engine.hyp import load_hyp
from utils.eval.metrics.caption import caption_scores


def join(polys: list[list[float]]) -> list[np.ndarray]:
    return [np.asarray(p, np.float32).reshape(-1, 2) for p in polys]


def test_yolo_labels_and_masks_are_what_our_loader_reads(tiny_data, tmp_path):
    yamls = convert(str(tiny_data), tmp_path, merge=join)
    seg = yaml.safe_load(yamls["seg"].read_text())
    cfg = load_data_config(tiny_data)
    assert seg["names"] == dict(enumerate(cfg.names))
    sem = yaml.safe_load(yamls["sem"].read_text())
    assert sem["names"] == dict(enumerate(cfg.semantic_names)) and sem["masks_dir"] == "masks"
    ds = CocoDataset(cfg, cfg.val, augment=False)
    checked = 0
    for i in range(len(ds)):
        s = ds.load(i)
        stem = f"{s.image_id:012d}"
        assert (tmp_path / "images/val" / (stem + Path(s.path).suffix)).resolve() == Path(s.path).resolve()
        lines = [ln.split() for ln in (tmp_path / "labels/val" / f"{stem}.txt").read_text().splitlines()]
        assert len(lines) == len(s)
        h, w = s.orig_shape
        for line, c, box in zip(lines, s.classes.tolist(), s.boxes):
            xy = np.array(line[1:], np.float32).reshape(-1, 2)
            assert int(line[0]) == c and xy.min() >= 0 and xy.max() <= 1
            # the outline spans the instance's box (pixels back from normalized coordinates)
            x1, y1 = xy.min(0) * (w, h)
            x2, y2 = xy.max(0) * (w, h)
            assert np.allclose([x1, y1, x2, y2], box, atol=2.0)
            checked += 1
        mask = cv2.imread(str(tmp_path / "masks/val" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, s.semantic)
    assert checked > 0


def test_constant_caption_floor_is_the_most_frequent_training_caption(tiny_data):
    cfg = load_data_config(tiny_data)
    train = json.loads(cfg.train[0].captions.read_text())["annotations"]
    caption, cider = constant_caption_floor(str(tiny_data))
    counts = Counter(" ".join(a["caption"].strip().split()) for a in train)
    assert counts[caption] == max(counts.values())
    val = CocoDataset(cfg, cfg.val, augment=False)
    refs = {int(r.image_id): r.captions for _, r in val.items if r.captions}
    assert cider == caption_scores({i: caption for i in refs}, refs)["cider"]
    assert cider < caption_scores({i: c[0] for i, c in refs.items()}, refs)["cider"]  # a floor, below a real caption


def test_a_retrained_benchmark_run_starts_from_an_empty_folder(tiny_cfg_file, tiny_data, tmp_path):
    """benchmarks retrain into project/name (peers.py --only): the old run's results.csv rows are not kept,
    where train.py --exist-ok alone would append the new epochs to them and the table would read both runs."""
    from benchmarks.common import run_training
    from tests.conftest import train_args
    from utils.viz.plots import read_results

    stale = tmp_path / "joint"
    stale.mkdir()
    (stale / "results.csv").write_text("epoch,box_map\n1,0.9\n2,0.9\n3,0.9\n")
    run, _ = run_training(train_args(tiny_cfg_file, tiny_data, tmp_path, 1, "joint", "--noval", "--noplots"),
                          tmp_path, "joint")
    rows = read_results(run / "results.csv")
    assert [r["epoch"] for r in rows] == [1.0]


def test_a_real_image_budget_sets_one_recipe_for_every_model(tmp_path):
    """benchmarks.real's CPU budget: small images, no augmentation and a step every batch, given to our hyp file
    and to the peers' overrides alike; any of its settings is still a flag."""
    opt = real.parse(["--project", str(tmp_path)])
    assert (opt.img, opt.epochs, opt.nbs, opt.aug, opt.peers, opt.latency) == (128, 100, 8, "off", "yolov8n-seg", 0)
    hyp = load_hyp(peers.our_hyp(opt, tmp_path))
    overrides = peers.recipe_overrides(opt)
    assert overrides["nbs"] == 8 and overrides["mosaic"] == 0 and overrides["fliplr"] == 0
    assert {k: hyp[k] for k in overrides} == overrides
    assert hyp["lr0"] == load_hyp(opt.hyp)["lr0"]  # the rest is --hyp's
    assert peers.recipe_overrides(real.parse(["--aug", "on"])) == {"nbs": 8}
    assert (real.parse(["--budget", "gpu"]).img, real.parse(["--budget", "gpu", "--img", "320"]).img) == (640, 320)


def test_caption_lm_prints_both_bounds_at_each_reported_epoch(tiny_data, capsys):
    """benchmarks.caption_lm trains the decoder on one shared input and on one input per image and prints a row
    per reported epoch for each, with the vocabulary rule it took."""
    caption_lm.main(["--data", str(tiny_data), "--epochs", "2", "--at", "1,2", "--batch-size", "8", "--d-model", "32",
                     "--layers", "1", "--heads", "4"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("language model", "image identity"))]
    assert [(r[0], int(r[2])) for r in rows] == [("language", 1), ("language", 2), ("image", 1), ("image", 2)]
    assert all(math.isfinite(float(r[3])) and float(r[3]) > 0 for r in rows)  # cross-entropy
    assert "decoder d_model 32, 1 layers, 4 heads" in out
