"""Bad configuration, non-finite losses and interrupted checkpoint writes.

Configuration mistakes end a run with exit code 2 and one ``error: ...`` line on stderr (no traceback);
a non-finite loss skips the step and, ``max_nonfinite`` times in a row, stops the run naming the task;
a checkpoint is either the old one or the new one, never a torn file.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import train as train_script
from tests.conftest import HEAD_KW, tiny_cfg, train_args
from utils.engine.trainer import Trainer
from utils.loss.semantic import SemanticLoss
from utils.runtime.checkpoint import load_checkpoint, save_checkpoint

HYP = Path(__file__).resolve().parents[1] / "data/hyps/hyp.scratch.yaml"


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(yaml.safe_dump(tiny_cfg()))
    return f


def hyp_file(tmp_path: Path, **changes) -> Path:
    f = tmp_path / "hyp.yaml"
    f.write_text(yaml.safe_dump(yaml.safe_load(HYP.read_text()) | changes))
    return f


def one_error_line(capsys) -> str:
    """The single stderr line of a failed run (asserting there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- bad configuration -------------------------------------------------------------------------------

def test_unknown_hyp_key(cfg_file, tiny_data, tmp_path, capsys):
    hyp = hyp_file(tmp_path, lr00=0.1)  # a typo of lr0
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--hyp", str(hyp))) == 2
    line = one_error_line(capsys)
    assert "unknown hyperparameter" in line and "lr00" in line and str(hyp) in line


def test_caption_task_without_captions(cfg_file, tiny_data, tmp_path, capsys):
    d = yaml.safe_load(tiny_data.read_text())
    for split in ("train", "val"):
        d[split].pop("captions")
    data = tmp_path / "no_captions.yaml"
    data.write_text(yaml.safe_dump(d))
    assert train_script.main(train_args(cfg_file, data, tmp_path, 1, "exp", "--tasks", "cap")) == 2
    line = one_error_line(capsys)
    assert "--tasks cap" in line and "no labels" in line and data.name in line


def test_unknown_cfg_path(tiny_data, tmp_path, capsys):
    assert train_script.main(train_args(tmp_path / "nope.yaml", tiny_data, tmp_path, 1)) == 2
    line = one_error_line(capsys)
    assert "cfg file not found" in line and "nope.yaml" in line


def _foreign_checkpoint(path: Path) -> Path:
    """A checkpoint of another network: a valid file whose tensors share no name with ours."""
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    save_checkpoint({"model": other.state_dict(), "cfg": {"note": "another network"}}, path)
    return path


@pytest.mark.parametrize("weights, match", [
    ("foreign", "no tensor matches --cfg"),
    ("missing", "weights not found"),
    ("corrupt", "not a loadable yolor-mt checkpoint"),
])
def test_bad_weights(cfg_file, tiny_data, tmp_path, capsys, weights, match):
    path = tmp_path / f"{weights}.pt"
    if weights == "foreign":
        _foreign_checkpoint(path)
    elif weights == "corrupt":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # looks like torch's zip format, is not
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--weights", str(path))) == 2
    line = one_error_line(capsys)
    assert match in line and path.name in line


def test_weights_matching_only_batchnorm_counters_are_rejected(cfg_file, tiny_data, tmp_path, capsys):
    from models.model import Model

    state = Model(tiny_cfg(), nc=5, head_kwargs=HEAD_KW).state_dict()
    counters = {k: v for k, v in state.items() if k.endswith("num_batches_tracked")}
    path = tmp_path / "counters.pt"
    save_checkpoint({"model": counters, "cfg": {"note": "a different cfg"}}, path)
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--weights", str(path))) == 2


def test_freezing_rows_the_weights_do_not_fill_is_refused(cfg_file, tiny_data, tmp_path, capsys):
    """--freeze with --weights of another shape (here one tensor of row 1 missing): the frozen row would stay
    random for the whole run, so the run stops naming it; the same weights without --freeze train."""
    from models.model import Model

    state = Model(tiny_cfg(), nc=5, head_kwargs=HEAD_KW).state_dict()
    dropped = next(k for k in state if k.startswith("layers.1.") and k.endswith("weight"))
    path = tmp_path / "partial.pt"
    save_checkpoint({"model": {k: v for k, v in state.items() if k != dropped}, "cfg": tiny_cfg()}, path)
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--weights", str(path),
                                        "--freeze", "3")) == 2
    line = one_error_line(capsys)
    assert "--freeze" in line and dropped in line and path.name in line
    assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--weights", str(path),
                                        "--freeze", "1")) == 0


# --- non-finite losses ---------------------------------------------------------------------------------

def _nan_semantic(monkeypatch, times: int | None) -> None:
    """Makes the semantic loss NaN for its first ``times`` calls (``None``: always)."""
    real = SemanticLoss.__call__
    calls = {"n": 0}

    def fake(self, logits, target, present, *sync):
        calls["n"] += 1
        if times is None or calls["n"] <= times:
            return logits.sum() * float("nan"), {"ce": float("nan"), "dice": 0.0}
        return real(self, logits, target, present, *sync)

    monkeypatch.setattr(SemanticLoss, "__call__", fake)


def test_nonfinite_losses_in_a_row_stop_the_run_naming_the_task(cfg_file, tiny_data, tmp_path, monkeypatch):
    _nan_semantic(monkeypatch, None)
    opt = train_script.parse_opt(train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--hyp", str(hyp_file(tmp_path, max_nonfinite=2))))
    trainer = Trainer(opt)
    with pytest.warns(UserWarning, match=r"non-finite loss at epoch 0 batch \d+ in \[.*'sem_.*step skipped") as rec, \
            pytest.raises(RuntimeError, match=r"2 non-finite losses in a row \(last in \[.*'sem_") as e:
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # pycocotools on numpy 2, re-emitted
        trainer.run()
    assert sum("non-finite loss" in str(w.message) for w in rec) == 2
    assert "det_" not in str(e.value)  # the finite tasks are not blamed


def test_nonfinite_stop_is_one_clear_line(cfg_file, tiny_data, tmp_path, monkeypatch, capsys):
    _nan_semantic(monkeypatch, None)
    args = train_args(cfg_file, tiny_data, tmp_path, 1, "exp", "--hyp", str(hyp_file(tmp_path, max_nonfinite=2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = train_script.main(args)
    assert rc != 0 and "sem" in one_error_line(capsys)


@pytest.mark.slow
def test_one_nonfinite_step_is_skipped_and_the_checkpoint_is_safe(cfg_file, tiny_data, tmp_path, monkeypatch):
    """One NaN step: skipped with a warning, the run finishes, its weights are finite and load safely."""
    _nan_semantic(monkeypatch, 1)
    with pytest.warns(UserWarning, match="non-finite loss .*sem_") as rec:
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # pycocotools on numpy 2, re-emitted
        assert train_script.main(train_args(cfg_file, tiny_data, tmp_path, 1)) == 0
    assert sum("non-finite loss" in str(w.message) for w in rec) == 1
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "exp/weights" / name, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
        assert all(math.isfinite(float(v)) for v in (ckpt["best_fitness"], ckpt["epoch"]))


# --- atomic checkpoints ----------------------------------------------------------------------------------

def test_interrupted_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "weights/last.pt"
    old = {"model": {"w": torch.arange(1000.0)}, "cfg": {"depth_multiple": 0.33}, "epoch": 3}
    save_checkpoint(old, path)
    before = path.read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(len(before) // 3)
        f.truncate()  # what a kill mid-write leaves on disk: a prefix
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed_midway)
    new = {"model": {"w": torch.zeros(1000)}, "cfg": {"depth_multiple": 0.33}, "epoch": 4}
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no partial temp file left behind
    again = load_checkpoint(path)
    assert again["epoch"] == 3 and torch.equal(again["model"]["w"], old["model"]["w"])
    save_checkpoint(new, path)  # and the next save goes through over the leftover
    assert load_checkpoint(path)["epoch"] == 4
