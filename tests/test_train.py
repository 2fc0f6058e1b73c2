"""End to end: train.py -> checkpoints that load with weights_only -> test.py metrics.json; resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import test as test_script
import train as train_script
from tests.conftest import (
    ROOT,
    assert_same_weights,
    subprocess_env,
    tiny_cfg,
    train_args,
)


@pytest.fixture(scope="module")
def trained(tiny_cfg_file, tiny_data, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    assert train_script.main(train_args(tiny_cfg_file, tiny_data, project, 2)) == 0
    return project / "exp"


def test_run_folder_contents(trained):
    for f in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png", "opt.yaml", "hyp.yaml"):
        assert (trained / f).is_file(), f
    rows = (trained / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "box_map" in rows[0] and "train/det_box" in rows[0]


def test_checkpoint_loads_with_weights_only(trained):
    ckpt = torch.load(trained / "weights/best.pt", map_location="cpu", weights_only=True)
    assert {"model", "cfg", "meta", "epoch"} <= set(ckpt)
    assert "optimizer" not in ckpt and "ema" not in ckpt  # finished runs are stripped like Ultralytics': FP16 EMA
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float16}
    assert ckpt["meta"]["category_ids"] and len(ckpt["meta"]["names"]) == len(ckpt["meta"]["category_ids"])


def test_test_py_writes_metrics_json(trained, tmp_path):
    out = tmp_path / "test"
    rc = test_script.main(["--weights", str(trained / "weights/best.pt"), "--project", str(out), "--batch-size", "4",
                           "--workers", "0", "--save-json"])
    assert rc == 0
    metrics = json.loads((out / "exp/metrics.json").read_text())
    assert 0.0 <= metrics["box_map"] <= metrics["box_map50"] <= 1.0
    preds = json.loads((out / "exp/predictions.json").read_text())
    data_ids = set(torch.load(trained / "weights/best.pt", weights_only=True)["meta"]["category_ids"])
    assert preds and {p["category_id"] for p in preds} <= data_ids  # original COCO ids written out


def test_bad_config_is_one_clear_line(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_cfg() | {"backbone": [[-1, 1, "Nope", []]]}))
    assert train_script.main(train_args(bad, tiny_data, tmp_path, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 0 (backbone): unknown module 'Nope'" in err[0]
    assert train_script.main(train_args(bad, tiny_data, tmp_path, 1) + ["--tasks", "depth"]) == 2


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tiny_cfg_file, tiny_data, tmp_path):
    """kill -9 during epoch 2 of 3, resume from last.pt: final weights equal an uninterrupted run."""
    env = subprocess_env()
    cmd = [sys.executable, str(ROOT / "train.py")]
    full = subprocess.run(cmd + train_args(tiny_cfg_file, tiny_data, tmp_path, 3, "full"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(cmd + train_args(tiny_cfg_file, tiny_data, tmp_path, 3, "killed"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = tmp_path / "killed/results.csv"
    deadline = time.time() + 600
    while time.time() < deadline and not (csv.is_file() and len(csv.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    last = tmp_path / "killed/weights/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] in (0, 1)  # a whole checkpoint, not a torn one
    resumed = subprocess.run(cmd + ["--resume", str(last)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full/weights/last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_weights(a, b)
