"""benchmarks/gpu.py at a tiny size on the CPU: the same script the GPU table comes from prints a row per model with
numbers in every column (no timing is asserted: only that the figures exist and are consistent)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from benchmarks import gpu
from benchmarks.gpu import COLUMNS

# Ultralytics is not a dependency of the project; benchmarks install it into a run folder. A folder it already
# imports from (e.g. a benchmarks/peers.py run's <project>/_ultralytics) can be named here to test the peer rows too.
PEER_SITE = os.environ.get("YOLOR_ULTRALYTICS_SITE", "")


def table_rows(out: str) -> dict[str, list[float]]:
    """Model name -> the numbers of its row in the printed table."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = {}
    for line in lines[head + 1:]:
        cells = line.split()
        if len(cells) != len(COLUMNS) + 1:
            break
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_tiny_cpu_run_prints_every_column(tmp_path: Path, capsys) -> None:
    args = ["--device", "cpu", "--img", "64", "--batch", "2", "--max-batch", "2", "--steps", "1", "--warmup", "1",
            "--images", "6", "--loader-batch", "2", "--loader-batches", "1", "--scales", "n", "--project",
            str(tmp_path), "--no-install"] + (["--peer-site", PEER_SITE] if PEER_SITE else [])
    returned = gpu.main(args)
    out = capsys.readouterr().out
    rows = table_rows(out)
    header = next(line for line in out.splitlines() if line.startswith("model "))
    assert all(c in header for c in COLUMNS)
    expected = ["yolor-mt-n", "yolor-mt-c2f-n"] + (["yolov8n-seg"] if PEER_SITE else [])  # both bodies, then the peer
    assert list(rows) == expected
    for name, (params, batch, img_s, peak, loader, feed) in rows.items():
        assert all(math.isfinite(v) for v in (params, batch, img_s, peak, loader, feed)), name
        assert batch == 2 and params > 1 and img_s > 0 and peak > 0 and loader > 0, name
        # cores to feed is the training rate over the loader's per-core rate
        assert math.isclose(feed, returned[name]["img_s"] / returned[name]["loader"], rel_tol=0.06, abs_tol=0.06)
    # the peak holds at least the weights, the EMA copy and AdamW's two moments: 4 fp32 copies of the parameters
    assert rows["yolor-mt-n"][3] > 4 * 4 * rows["yolor-mt-n"][0] * 1e6 / 2**20
    assert "171 semantic classes" in out and "img/s by batch 2:" in out
    if not PEER_SITE:
        assert "Ultralytics rows skipped: it does not import from" in out


def test_coco_like_data_has_cocos_counts(tmp_path: Path) -> None:
    """The data the GPU and memory figures are measured on: COCO's 80 thing and 171 semantic classes, 5 captions per
    image over a vocabulary every word of which is used, thing pixels of the maps under their instances' class."""
    import json

    import numpy as np

    from benchmarks.coco_like import write_coco_like
    from utils.data.config import load_data_config
    from utils.data.dataset import CocoDataset
    from utils.data.vocab import Vocabulary

    data = write_coco_like(tmp_path, 12, (96, 72), vocab=300)
    cfg = load_data_config(data)
    assert (cfg.nc, len(cfg.semantic_ids)) == (80, 171)
    ds = CocoDataset(cfg, cfg.train, 96)
    assert all(len(rec.captions) == 5 for _, rec in ds.items)
    vocab = Vocabulary.build((c for _, rec in ds.items for c in rec.captions), min_count=1)
    assert len(vocab) >= 300  # every made-up word (+ the special tokens)
    instances = json.loads(cfg.train[0].instances.read_text())["annotations"]
    assert 4 < len(instances) / 12 < 11  # ~7.3 per image, Poisson
    s = ds.load(0)
    lut = cfg.semantic_lut()
    thing = {int(lut[c - 1]) for c in cfg.category_ids}
    assert set(np.unique(s.semantic).tolist()) & thing  # instances painted over the stuff bands
    stamp = data.stat().st_mtime_ns
    assert write_coco_like(tmp_path, 12, (96, 72), vocab=300) == data
    assert data.stat().st_mtime_ns == stamp  # the same arguments: not rewritten
