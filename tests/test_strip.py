"""A finished run's checkpoints are stripped to the FP16 EMA (Ultralytics' strip_optimizer): small, loadable with
weights_only=True, scored as the full checkpoint within FP16 rounding, refused by --resume."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import test as test_script
import train as train_script
import utils.engine.trainer as trainer_module
from tests.conftest import train_args
from utils.engine.hooks import Hook
from utils.runtime.checkpoint import TRAINING_KEYS, is_stripped, strip_checkpoint

# test.py metrics of the stripped vs the full checkpoint: FP16 weights move scores by ~1e-3 relative, which may
# reorder near-tied detections; on 8 tiny val images a reordering moves an AP by at most a few 0.001
METRIC_TOL = 0.01


class KeepFull(Hook):
    """Copies the final epoch's last.pt (everything, FP32) before after_train strips it."""

    def after_epoch(self, trainer):
        if trainer.final_epoch:
            shutil.copy(trainer.wdir / "last.pt", trainer.wdir / "full.pt")


@pytest.fixture(scope="module")
def finished(tiny_cfg_file, tiny_data, tmp_path_factory):
    project = tmp_path_factory.mktemp("strip")
    opt = train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, project, 2, "exp", "--noplots"))
    return trainer_module.Trainer(opt, hooks=[KeepFull()]).run() / "weights"


def _size(ckpt: dict) -> int:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.tell()


def test_finished_checkpoints_are_the_fp16_ema(finished):
    full = torch.load(finished / "full.pt", weights_only=True)
    assert not is_stripped(full) and {"optimizer", "ema", "rng"} <= set(full)
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(finished / name, weights_only=True)
        assert is_stripped(ckpt) and not set(TRAINING_KEYS) - {"model"} & set(ckpt)
        assert {"cfg", "meta", "opt", "hyp", "epoch"} <= set(ckpt)
    last = torch.load(finished / "last.pt", weights_only=True)
    assert last["model"].keys() == full["ema"].keys()
    for k, v in full["ema"].items():
        want = v.half() if v.is_floating_point() else v
        assert torch.equal(last["model"][k], want), k
    # about a quarter of a checkpoint that keeps the FP32 model and EMA (the optimizer dropped)
    fp32 = {k: v for k, v in full.items() if k not in ("optimizer", "scheduler", "rng", "rank_rng", "balancer")}
    assert (finished / "last.pt").stat().st_size < 0.3 * _size(fp32)
    again = strip_checkpoint(last)  # stripping a stripped checkpoint changes nothing
    assert again.keys() == last.keys() and all(torch.equal(again["model"][k], v) for k, v in last["model"].items())


def _metrics(weights, out) -> dict:
    assert test_script.main(["--weights", str(weights), "--project", str(out), "--name", weights.stem, "--workers",
                             "0", "--batch-size", "8", "--device", "cpu"]) == 0
    return json.loads((out / weights.stem / "metrics.json").read_text())


def test_stripped_checkpoint_scores_as_the_full_one(finished, tmp_path):
    """test.py on the stripped last.pt vs the FP32 checkpoint of the same epoch: every metric within METRIC_TOL."""
    full, stripped = _metrics(finished / "full.pt", tmp_path), _metrics(finished / "last.pt", tmp_path)
    keys = [k for k in full if k not in ("images", "speed_ms")]
    assert {"box_map", "mask_map", "sem_miou", "cap_cider"} <= set(keys) and keys == [k for k in stripped if k in keys]
    print({k: (full[k], stripped[k]) for k in keys})
    for k in keys:
        assert stripped[k] == pytest.approx(full[k], abs=METRIC_TOL), k


def test_resume_of_a_finished_run_is_a_clear_error(finished, capsys):
    assert train_script.main(["--resume", str(finished / "last.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has finished" in err[0] and "--weights" in err[0]


def test_tied_weights_stay_one_fp16_tensor():
    """The caption head's tied embedding / output projection (one FP32 tensor under two names) is one FP16 tensor
    in the stripped checkpoint, saved once; an untied pair stays two."""
    from models.heads.caption import CaptionHead

    sizes = {}
    for tie in (True, False):
        torch.manual_seed(0)
        head = CaptionHead(0, [16, 32], [16, 32], 64, 1, 4, tie, vocab_size=500, max_len=10)
        state = head.state_dict()
        model = strip_checkpoint({"model": state, "cfg": {}})["model"]
        assert (model["out.weight"].data_ptr() == model["embed.weight"].data_ptr()) is tie
        assert all(torch.equal(model[k], v.half() if v.is_floating_point() else v) for k, v in state.items())
        sizes[tie] = _size(model)
    assert sizes[False] - sizes[True] >= 500 * 64 * 2  # the second FP16 copy of the (500, 64) matrix
