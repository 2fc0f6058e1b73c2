"""Trainer hooks: everything around the training loop that is not the training itself.

A :class:`Hook` is told of named events, each with the :class:`~utils.engine.trainer.Trainer` (as
detectron2's ``HookBase`` and Ultralytics' callbacks); the loop calls every registered hook, in registration
order, at each event:

    before_train                          once, before the first epoch
      before_epoch                        the epoch's data is seeded; ``trainer.epoch``, ``trainer.progress``
        before_batch                      a batch is loaded and its head inputs built, nothing computed yet:
                                          ``trainer.batch_index``, ``trainer.batch``, ``trainer.batch_inputs``
        after_step                        right after an optimizer step (``trainer.progress.last_step``)
        after_batch                       every batch, trained or skipped for a non-finite loss
      after_epoch                         losses reduced over the ranks, validated, best tracked:
                                          ``trainer.metrics`` (the results.csv row), ``trainer.is_best``
    after_train                           once, after the last epoch or an early stop

What the default hooks do, in this order (:func:`default_hooks`): the training data's per-epoch mode
(``--close-mosaic``), mid-epoch checkpoints, the ``on_step``
callbacks, best/last checkpoints, results.csv, TensorBoard scalars, the console (progress bar, epoch row),
early stop, pictures. A user hook is added with ``Trainer(opt, hooks=[...])`` or ``trainer.register(hook)``;
it runs after the default ones.

Distributed runs: every hook runs on every rank unless its ``main_only`` is True (then on rank 0 alone).
A collective (gather, broadcast, all-reduce) must run on every rank in the same order, so it belongs only in
a hook that is not ``main_only``, at an event every rank reaches the same number of times. To stop, a hook
calls ``trainer.request_stop()``; rank 0's request is broadcast at the end of the epoch.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from utils.data.vocab import hyp_max_len
from utils.engine.loggers import N_TRAIN_BATCHES
from utils.runtime.checkpoint import load_checkpoint, save_checkpoint, strip_checkpoint
from utils.runtime.device import rng_state
from utils.runtime.distributed import gather_objects

if TYPE_CHECKING:  # the trainer imports this module: its type is only named here, for the annotations
    from utils.engine.trainer import Trainer

EVENTS = ("before_train", "before_epoch", "before_batch", "after_step", "after_batch", "after_epoch", "after_train")


class Hook:
    """Base of the trainer hooks: override the events of interest; each receives the trainer.

    Attributes:
        main_only: True: the hook runs on rank 0 only, so it must not contain a collective.
    """

    main_only: bool = False

    def before_train(self, trainer: Trainer) -> None:
        """Once, before the first epoch (of this process: after a resume, the first epoch still to train)."""

    def before_epoch(self, trainer: Trainer) -> None:
        """At the start of ``trainer.epoch``; ``trainer.batch_index`` is its first batch (> 0 after a
        mid-epoch resume)."""

    def before_batch(self, trainer: Trainer) -> None:
        """Batch ``trainer.batch_index`` is loaded (``trainer.batch``) and its head inputs built
        (``trainer.batch_inputs``, on the CPU); the forward pass comes next."""

    def after_step(self, trainer: Trainer) -> None:
        """Right after the optimizer step that ended at batch ``trainer.progress.last_step`` (no gradient is
        accumulated at this point, so a checkpoint taken here is complete)."""

    def after_batch(self, trainer: Trainer) -> None:
        """After batch ``trainer.batch_index``, stepped, accumulated, or skipped for a non-finite loss."""

    def after_epoch(self, trainer: Trainer) -> None:
        """After ``trainer.epoch``: ``trainer.metrics`` is its results.csv row (validation metrics and lrs on
        rank 0 only), ``trainer.is_best`` whether it is the best so far (rank 0)."""

    def after_train(self, trainer: Trainer) -> None:
        """Once, after the last epoch or an early stop."""


# --- data ----------------------------------------------------------------------------------------------

class CloseMosaic(Hook):
    """``--close-mosaic N`` (Ultralytics' ``close_mosaic``): no mosaics in the last N epochs of ``--epochs``,
    each training image then gets the letterbox + perspective + flips view, as with ``hyp mosaic: 0``. Off
    when N < 1.

    Set at every ``before_epoch`` from the epoch alone (a resumed run is in the same state as an uninterrupted
    one), on every rank: each has its own dataset. The loader's workers are forked after ``before_epoch``,
    each epoch, so they see it. Says so once, at the first epoch that closes it.
    """

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.said = False

    def before_epoch(self, trainer: Trainer) -> None:
        start = trainer.opt.epochs - self.epochs
        closed = self.epochs > 0 and trainer.epoch >= start
        trainer.train_set.mosaic = not closed
        if closed and not self.said:
            trainer.log(f"closing mosaic for the last {self.epochs} epochs (from epoch {start + 1})")
            self.said = True


class SelfCritical(Hook):
    """hyp ``scst_epochs: N``: the caption loss is self-critical sequence training (CIDEr-D reward,
    :class:`~utils.loss.caption.SelfCriticalLoss`) in the last N epochs of ``--epochs``, cross-entropy before.
    SCST needs a decoder that already writes sentences, so a run of fewer than 2N epochs (fewer cross-entropy
    epochs than self-critical ones) keeps cross-entropy throughout. Set from the epoch alone, so a resumed run
    is in the same state; says so once."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.said = False

    def before_epoch(self, trainer: Trainer) -> None:
        start = trainer.opt.epochs - self.epochs
        wanted = self.epochs > 0 and trainer.loss.scst_loss is not None
        on = wanted and start >= self.epochs and trainer.epoch >= start
        trainer.loss.scst = on
        if wanted and not self.said and (on or start < self.epochs):
            trainer.log(f"self-critical caption training (CIDEr-D reward) for the last {self.epochs} epochs "
                        f"(from epoch {start + 1})" if on else
                        f"scst_epochs {self.epochs} needs at least {2 * self.epochs} epochs: cross-entropy throughout")
            self.said = True


# --- checkpoints ---------------------------------------------------------------------------------------

class MidEpochCheckpoint(Hook):
    """``--save-period N``: refreshes last.pt right after the first optimizer step at or after every multiple
    of N batches (counted over the run), so a killed run continues mid-epoch. Off when N < 1.

    Runs on every rank: each sends its loss sums and RNG state (a collective), rank 0 writes, atomically.
    Every write is recorded in ``trainer.mid_epoch_saves`` as (epoch, next batch).
    """

    def __init__(self, period: int):
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        progress, base = trainer.progress, trainer.nb * trainer.epoch
        before, done = base + progress.prev_step + 1, base + progress.last_step + 1  # batches trained so far
        if self.period > 0 and done // self.period > before // self.period:
            self.save(trainer, progress.last_step + 1)

    @staticmethod
    def save(trainer: Trainer, batch: int) -> None:
        """Writes last.pt continuing ``trainer.epoch`` at ``batch``; every rank must call it (a gather)."""
        progress = trainer.progress
        ranks = gather_objects(progress.rank_state() | {"rng": rng_state(trainer.cuda)}, trainer.dist)
        if trainer.dist.main:
            mid = {"batch": batch, "progress": progress.state(ranks, trainer.nonfinite_run)}
            state = trainer.checkpoint(trainer.epoch, rank_rng=[r["rng"] for r in ranks]) | mid
            save_checkpoint(state, trainer.wdir / "last.pt")
            trainer.mid_epoch_saves.append((trainer.epoch, batch))


class StepCallbacks(Hook):
    """Calls plain functions ``f(trainer)`` after every optimizer step, on every rank: ``trainer.on_step``.

    The list is held, not copied: functions appended to it later are called too.
    """

    def __init__(self, callbacks: list[Callable[[Trainer], None]]):
        self.callbacks = callbacks

    def after_step(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback(trainer)


class Checkpoints(Hook):
    """weights/last.pt after every epoch and best.pt when it is the best; when training ends, both are
    stripped to their EMA weights in FP16 (:func:`~utils.runtime.checkpoint.strip_checkpoint`, Ultralytics'
    strip_optimizer)."""

    main_only = True

    def after_epoch(self, trainer: Trainer) -> None:
        ckpt = trainer.checkpoint(trainer.epoch, rank_rng=trainer.rank_rng)  # one state for both files
        if trainer.is_best:
            save_checkpoint(ckpt, trainer.wdir / "best.pt")
        save_checkpoint(ckpt, trainer.wdir / "last.pt")

    def after_train(self, trainer: Trainer) -> None:
        for name in ("best.pt", "last.pt"):
            f = trainer.wdir / name
            if f.is_file():
                save_checkpoint(strip_checkpoint(load_checkpoint(f)), f)


# --- logging ---------------------------------------------------------------------------------------------

def write_results(path: Path, row: dict) -> None:
    """Appends one epoch to results.csv (header from the first row; new keys extend it), atomically.

    The reader is ``utils.viz.plots.read_results``.
    """
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class ResultsCSV(Hook):
    """One results.csv row per epoch (``trainer.metrics``)."""

    main_only = True

    def after_epoch(self, trainer: Trainer) -> None:
        write_results(trainer.results_csv, trainer.metrics)


class TensorBoard(Hook):
    """The epoch's results.csv row as TensorBoard scalars, when TensorBoard is installed (``trainer.logger``)."""

    main_only = True

    def after_epoch(self, trainer: Trainer) -> None:
        trainer.logger.epoch(trainer.metrics, trainer.epoch)


class Console(Hook):
    """The tqdm bar of each epoch (``--no-progress``: none) with the running loss means, and the epoch's row
    (without the learning rates) printed when it ends."""

    main_only = True

    def __init__(self, progress: bool = True):
        self.progress = progress
        self.bar: tqdm | None = None

    def before_epoch(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.nb, initial=trainer.progress.batch, disable=not self.progress,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.opt.epochs}")

    def after_batch(self, trainer: Trainer) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in trainer.progress.means().items() if k.endswith("_loss")},
                             refresh=False)
        self.bar.update(1)
        if trainer.batch_index == trainer.nb - 1:  # closed before validation draws its own bar
            self._close()

    def after_epoch(self, trainer: Trainer) -> None:
        self._close()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trainer.metrics.items()
                       if not k.startswith("lr/")))

    def after_train(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EarlyStop(Hook):
    """``--patience N``: stops when N epochs in a row have not improved the best fitness, checked after each
    validated epoch (``--val-period``, ``--noval``) and never after the final one, which ends the run anyway.
    Off when N is 0."""

    main_only = True

    def __init__(self, patience: int):
        self.patience = patience

    def after_epoch(self, trainer: Trainer) -> None:
        if (self.patience and trainer.validated and not trainer.final_epoch
                and trainer.epoch - trainer.best_epoch >= self.patience):
            print(f"early stop: no improvement for {self.patience} epochs (best epoch {trainer.best_epoch + 1})")
            trainer.request_stop()


class Pictures(Hook):
    """The run's pictures through ``trainer.logger``: labels.jpg before training, the first train batches of
    the first epoch (in the background, from the batches the loop loaded), and, after training, everything
    that needs the trained model or the whole run (then report.html; TensorBoard is closed)."""

    main_only = True

    def before_train(self, trainer: Trainer) -> None:
        if not (trainer.save_dir / "labels.jpg").is_file():  # a resumed run has it
            cap_words = hyp_max_len(trainer.hyp) - 2 if trainer.vocab is not None else None  # <bos>, <eos>
            trainer.logger.labels(trainer.train_set, trainer.vocab, cap_words)

    def before_batch(self, trainer: Trainer) -> None:
        if trainer.epoch == 0 and trainer.batch_index < N_TRAIN_BATCHES:  # label check, from this very batch
            trainer.logger.train_batch(trainer.batch_index, trainer.batch, trainer.batch_inputs.get("captions"),
                                       trainer.vocab, "cap" in trainer.model.tasks)

    def after_train(self, trainer: Trainer) -> None:
        opt = trainer.opt
        trainer.logger.finish(model=trainer.ema.ema, val_loader=trainer.val_loader, eval_result=trainer.last_eval,
                              vocab=trainer.vocab, category_ids=trainer.data.category_ids,
                              results_csv=trainer.results_csv, balance=opt.balance, epoch=opt.epochs - 1)


def default_hooks(trainer: Trainer) -> list[Hook]:
    """The hooks every run has, in the order they are called, configured from ``trainer.opt``.

    The data's mode for the epoch is set first (before any hook could look at the epoch's data), the
    checkpoint hooks come before the logging ones (a crash while logging leaves the epoch saved), the
    ``on_step`` callbacks right after the mid-epoch save (a test kills the process there), early stop after
    the epoch's row is printed, and the pictures last (after training they take longest; the checkpoints are
    final, stripped, before they start).
    """
    opt = trainer.opt
    return [CloseMosaic(getattr(opt, "close_mosaic", 0)), SelfCritical(int(trainer.hyp.get("scst_epochs", 0))),
            MidEpochCheckpoint(getattr(opt, "save_period", -1)),
            StepCallbacks(trainer.on_step), Checkpoints(), ResultsCSV(), TensorBoard(), Console(opt.progress), EarlyStop(getattr(opt, "patience", 0)), Pictures()]

