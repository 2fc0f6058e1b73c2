"""train.py's YOLOv5/Ultralytics training habits: --close-mosaic, --cache ram|disk and --multi-scale, seen from
inside real (tiny, CPU) runs through a user hook."""
from __future__ import annotations

import math

import numpy as np
import pytest

import train as train_script
import utils.engine.trainer as trainer_module
from tests.conftest import train_args
from utils.data import augment as A
from utils.data.dataset import multi_scale_shape
from utils.engine.hooks import Hook
from utils.engine.hyp import HYPS_DIR, load_hyp
from utils.viz.plots import read_results

# 24 training images in batches of 8: 3 batches an epoch; a nominal batch of 8: a step after every batch
NOMINAL, NB = 8, 3


class Crash(Exception):
    """Stands in for a killed run (raised after an epoch's last.pt is written)."""


class MosaicLog(Hook):
    """Per epoch: the dataset's mosaic switch at its start and the mosaics built during it; optionally crashes
    after epoch ``crash_after`` (0-based), once its checkpoint is written (user hooks run after the default ones)."""

    def __init__(self, monkeypatch, crash_after: int = -1) -> None:
        self.epochs: dict[int, tuple[bool, int]] = {}
        self.crash_after = crash_after
        self.calls = 0
        real = A.mosaic4

        def counting(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(A, "mosaic4", counting)  # --workers 0: items are made in this process

    def before_epoch(self, trainer):
        self.calls = 0
        self.epochs[trainer.epoch] = (trainer.train_set.mosaic, -1)

    def after_epoch(self, trainer):
        self.epochs[trainer.epoch] = (self.epochs[trainer.epoch][0], self.calls)
        if trainer.epoch == self.crash_after:
            raise Crash


def _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, epochs: int, *extra: str):
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", NOMINAL)
    return train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, epochs, "exp", "--noval", "--noplots",
                                             *extra))


def test_close_mosaic_last_epochs_and_after_resume(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, capsys):
    """--close-mosaic 1 of 3 epochs: mosaics in epochs 1-2, none in epoch 3, said once. A run killed after
    epoch 1 and resumed is in the same state per epoch (the epoch decides) and keeps the flag."""
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 3, "--close-mosaic", "1")
    assert train_script.parse_opt([]).close_mosaic == 0  # default: off, as before
    log = MosaicLog(monkeypatch, crash_after=0)
    with pytest.raises(Crash):
        trainer_module.Trainer(opt, hooks=[log]).run()
    assert log.epochs[0][0] is True and log.epochs[0][1] > 0
    assert "closing mosaic" not in capsys.readouterr().out

    resumed = MosaicLog(monkeypatch)
    trainer = trainer_module.Trainer(train_script.parse_opt(["--resume", str(tmp_path / "exp/weights/last.pt")]),
                                     hooks=[resumed])
    assert trainer.opt.close_mosaic == 1  # from the checkpoint's opt
    trainer.run()
    assert set(resumed.epochs) == {1, 2}
    assert resumed.epochs[1][0] is True and resumed.epochs[1][1] > 0
    assert resumed.epochs[2] == (False, 0)
    out = capsys.readouterr().out
    assert out.count("closing mosaic for the last 1 epochs") == 1


class BatchShapes(Hook):
    """(epoch, batch index, image shape, targets, semantic shape) of every batch as the model gets it."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple[int, ...], object, tuple[int, ...] | None]] = []

    def before_batch(self, trainer):
        b = trainer.batch
        self.seen.append((trainer.epoch, trainer.batch_index, tuple(b.images.shape), b.targets.clone(),
                          None if b.semantic is None else tuple(b.semantic.shape)))


def test_multi_scale_batches(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """--multi-scale at --img 64: every batch a multiple of 32 in [32, 96], square, semantic maps and boxes
    with it; the sizes vary, and are those drawn from (seed, epoch, batch) (so a rerun or resume repeats them)."""
    rec = BatchShapes()
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 2, "--multi-scale")
    trainer_module.Trainer(opt, hooks=[rec]).run()
    assert len(rec.seen) == 2 * NB
    sizes = []
    for epoch, i, shape, targets, sem in rec.seen:
        h, w = shape[2:]
        assert h == w and h % 32 == 0 and 32 <= h <= 96
        assert sem is None or sem[1:] == (h, w)
        assert len(targets) and (targets[:, 2:] >= -1e-3).all() and (targets[:, 2:] <= h + 1e-3).all()
        rng = np.random.default_rng([trainer_module.MULTI_SCALE_STREAM, opt.seed, epoch, i])
        assert (h, w) == multi_scale_shape(64, 32, (64, 64), rng)
        sizes.append(h)
    assert len(set(sizes)) > 1
    assert not train_script.parse_opt([]).multi_scale


def test_cache_ram_run(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, capsys):
    """--cache (= ram) with a loader worker: the images are read up front in the main process, then trained on
    (the forked worker reads the same cache); --noval: the validation images are not cached."""
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, "--cache", "--workers", "1")
    assert opt.cache == "ram"
    trainer = trainer_module.Trainer(opt)
    assert trainer.train_set.cache == "ram" and trainer.val_set.cache is None
    trainer.run()
    assert "train: cached 24 images in RAM" in capsys.readouterr().out


def test_lr_fit_gives_adamw_ultralytics_class_count_rule(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """hyp ``lr_fit: true``: --optimizer auto's AdamW starts at lr0_adamw * 5 / (4 + nc); off, at lr0_adamw."""
    hyp = tmp_path / "hyp.yaml"
    base = (HYPS_DIR / "hyp.scratch.yaml").read_text()
    lrs = {}
    for fit in (False, True):
        hyp.write_text(base + f"\nlr_fit: {str(fit).lower()}\n")
        trainer = trainer_module.Trainer(_opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, "--hyp", str(hyp)))
        assert trainer.optimizer_name == "AdamW"
        lrs[fit] = (trainer.lr0, trainer.model.nc, trainer.hyp["lr0_adamw"])
    lr_plain, nc, lr0 = lrs[False]
    assert lr_plain == lr0 and nc > 1
    assert lrs[True][0] == pytest.approx(lr0 * 5 / (4 + nc))


@pytest.mark.parametrize("xe", [0.0, 0.5])
def test_scst_epochs_switch_the_caption_loss_in_the_last_epochs(xe, tiny_cfg_file, tiny_data, tmp_path, monkeypatch,
                                                                capsys):
    """hyp ``scst_epochs: 1`` of 2 epochs: cross-entropy in epoch 1, the self-critical loss (its mean sample
    reward logged) in epoch 2, with the cross-entropy beside it when ``scst_xe > 0``; said once; the
    decoder's weights still change under it."""
    import csv

    import torch

    hyp = tmp_path / "hyp.yaml"
    hyp.write_text((HYPS_DIR / "hyp.scratch.yaml").read_text() + f"\nscst_epochs: 1\nscst_xe: {xe}\n")  # last wins
    trainer = trainer_module.Trainer(_opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 2, "--hyp", str(hyp)))
    assert trainer.loss.scst_loss is not None and not trainer.loss.scst
    seen = []

    class Watch(Hook):
        def before_epoch(self, t):
            seen.append((t.loss.scst, {k: v.clone() for k, v in t.model.head("cap").state_dict().items()}))

    trainer.register(Watch())
    save_dir = trainer.run()
    rows = list(csv.DictReader(open(save_dir / "results.csv")))
    assert [s for s, _ in seen] == [False, True]
    assert rows[0]["train/cap_ce"] and not rows[0].get("train/cap_reward")
    assert float(rows[1]["train/cap_reward"]) >= 0 and bool(rows[1]["train/cap_ce"]) == (xe > 0)
    after = trainer.model.head("cap").state_dict()
    assert any(not torch.equal(after[k], v) for k, v in seen[1][1].items())
    assert capsys.readouterr().out.count("self-critical caption training") == 1


def test_scst_needs_as_many_cross_entropy_epochs_first():
    """The SelfCritical hook: on for the last N epochs only when at least N cross-entropy epochs come first."""
    from types import SimpleNamespace

    from utils.engine.hooks import SelfCritical

    def states(n: int, epochs: int) -> tuple[list[bool], list[str]]:
        logs: list[str] = []
        t = SimpleNamespace(opt=SimpleNamespace(epochs=epochs), loss=SimpleNamespace(scst_loss=object(), scst=None),
                            log=logs.append)
        hook, out = SelfCritical(n), []
        for e in range(epochs):
            t.epoch = e
            hook.before_epoch(t)
            out.append(t.loss.scst)
        return out, logs

    assert states(3, 10)[0] == [False] * 7 + [True] * 3
    assert states(3, 6)[0] == [False] * 3 + [True] * 3
    on, logs = states(3, 5)
    assert on == [False] * 5 and len(logs) == 1 and "needs at least 6 epochs" in logs[0]
    assert states(0, 4) == ([False] * 4, [])


@pytest.mark.parametrize("ramp, steps", [(True, 3), (False, 1)])
def test_accumulation_ramps_up_from_one_over_the_warmup(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, ramp, steps):
    """YOLOv5's and Ultralytics' warmup ramp: accumulation starts at one batch a step and reaches the nominal
    batch at the warmup's end. A nominal batch of 24 (3 batches of 8) steps once a batch in the warmup's first
    batches (3 steps in the epoch), against once without the ramp (after batch 3 of 3)."""
    hyp = (HYPS_DIR / "hyp.scratch.yaml").read_text().replace("accumulate_ramp: true", f"accumulate_ramp: {str(ramp).lower()}")
    assert f"accumulate_ramp: {str(ramp).lower()}" in hyp
    (tmp_path / "hyp.yaml").write_text(hyp)
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, "--hyp", str(tmp_path / "hyp.yaml"))
    monkeypatch.setattr(trainer_module, "NOMINAL_BATCH", 3 * 8)
    trainer = trainer_module.Trainer(opt)
    assert trainer.accumulate == 3
    ramp_at = [trainer.accumulate_at(ni, 100) for ni in range(0, 201, 10)]
    assert ramp_at == ([1] * 3 + [2] * 5 + [3] * 13 if ramp else [3] * 21)  # round(interp(ni, [0, 100], [1, 3]))
    trainer.run()
    assert trainer.ema.updates == steps


@pytest.mark.parametrize("optimizer, extra_hyp, beta1", [("auto", "", 0.9), ("auto", "momentum_adamw: 0.85\n", 0.85),
                                                          ("AdamW", "", 0.937)])
def test_auto_adamw_takes_its_own_beta1(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, optimizer, extra_hyp, beta1):
    """--optimizer auto resolves a short run to AdamW with Ultralytics' beta1 0.9 (hyp momentum_adamw), not the
    SGD momentum 0.937; an explicit --optimizer AdamW keeps hyp momentum as its beta1."""
    (tmp_path / "hyp.yaml").write_text((HYPS_DIR / "hyp.scratch.yaml").read_text().replace("momentum_adamw: 0.9", "")
                                       + extra_hyp)
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, "--hyp", str(tmp_path / "hyp.yaml"),
               "--optimizer", optimizer)
    trainer = trainer_module.Trainer(opt)
    assert type(trainer.optimizer).__name__ == "AdamW"
    assert {g["betas"][0] for g in trainer.optimizer.param_groups} == {beta1}


def test_mixed_precision_dtype_per_device(monkeypatch):
    """fp16 on CUDA; bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), fp32 on one without (emulated bf16 is
    slower than fp32); --no-amp: fp32 everywhere."""
    import torch

    from utils.runtime.device import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype(torch.device("cuda:0")) == torch.float16
    for bf16, amx, want in [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert autocast_dtype(cpu) == want
        assert autocast_dtype(cpu, enabled=False) is None and autocast_dtype(torch.device("cuda:0"), False) is None


@pytest.mark.parametrize("amp", [True, False])
def test_cpu_training_runs_in_the_mixed_precision_it_reports(amp, tiny_cfg_file, tiny_data, tmp_path, monkeypatch,
                                                             capsys):
    """A CPU run's convolutions see bf16 under autocast (where the CPU has native bf16: forced here, so both
    paths are tested on any CPU) and fp32 with --no-amp; the loss and the weights stay fp32; the log says which."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, *([] if amp else ["--no-amp"]))
    trainer = trainer_module.Trainer(opt)
    seen = []
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)  # not validation's
    trainer.run()
    assert seen and set(seen) == {torch.bfloat16 if amp else torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert f"device cpu, {'bfloat16' if amp else 'fp32'}" in capsys.readouterr().out


def test_hyp_nbs_sets_the_nominal_batch(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """hyp nbs (Ultralytics' name) replaces the nominal batch of 64: batch 8 and nbs 16 step every 2 batches,
    weight decay scaled to 16 images."""
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text((HYPS_DIR / "hyp.scratch.yaml").read_text() + "nbs: 16\n")
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 1, "--hyp", str(hyp))
    trainer = trainer_module.Trainer(opt)
    assert trainer.accumulate == 2
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups} - {0.0}
    assert len(decays) == 1 and decays.pop() == pytest.approx(trainer.hyp["weight_decay"] * 8 * 2 / 16)


def test_a_hyp_file_starts_from_its_base(tmp_path):
    """``base:`` reads the named file (beside this one, or in data/hyps/) and this file's keys replace its; the
    shipped recipes are what they say: hyp.caption.yaml is hyp.scratch.yaml with cap_view 1.0 and 5 SCST epochs."""
    scratch = load_hyp("hyp.scratch.yaml")
    (tmp_path / "mine.yaml").write_text("base: hyp.scratch.yaml\nlr0: 0.05\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\nnbs: 16\n")
    assert load_hyp(tmp_path / "child.yaml") == scratch | {"lr0": 0.05, "nbs": 16}
    caption = load_hyp("hyp.caption.yaml")
    assert {k: v for k, v in caption.items() if scratch.get(k) != v} == {"cap_view": 1.0, "scst_epochs": 5}
    assert load_hyp("hyp.short.yaml")["scst_epochs"] == 0 and load_hyp("hyp.short.yaml")["lr0"] == scratch["lr0"]
    (tmp_path / "typo.yaml").write_text("base: hyp.scratch.yaml\nlr00: 0.05\n")
    with pytest.raises(ValueError, match="lr00"):
        load_hyp(tmp_path / "typo.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_hyp(tmp_path / "a.yaml")


class Validations(Hook):
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, bool]] = []

    def after_epoch(self, trainer):
        self.seen.append((trainer.epoch, trainer.validated, "box_map" in trainer.metrics))


def test_val_period_validates_every_nth_and_the_final_epoch(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """--val-period 2 of 5 epochs validates after epochs 2, 4 and 5 only; results.csv has metrics on those rows."""
    opt = train_script.parse_opt(train_args(tiny_cfg_file, tiny_data, tmp_path, 5, "exp", "--noplots",
                                            "--val-period", "2"))
    hook = Validations()
    run = trainer_module.Trainer(opt, hooks=[hook]).run()
    assert hook.seen == [(e, e in (1, 3, 4), e in (1, 3, 4)) for e in range(5)]
    rows = read_results(run / "results.csv")
    assert [math.isfinite(r.get("box_map", math.nan)) for r in rows] == [False, True, False, True, True]


def test_patience_counts_only_validated_epochs(tiny_cfg_file, tiny_data, tmp_path, monkeypatch):
    """--noval --patience 1: no epoch before the last is validated, so none can be 'without improvement' and
    the run trains all its epochs (it used to stop after the second, epoch 1 having been taken as the best)."""
    opt = _opt(tiny_cfg_file, tiny_data, tmp_path, monkeypatch, 3, "--patience", "1")
    hook = Validations()
    trainer_module.Trainer(opt, hooks=[hook]).run()
    assert hook.seen == [(0, False, False), (1, False, False), (2, True, True)]
