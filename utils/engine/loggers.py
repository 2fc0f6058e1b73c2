"""What a run writes besides checkpoints and results.csv: pictures, optional TensorBoard, report.html.

Kept off the training hot path: ``labels.jpg`` and the three ``train_batch*.jpg`` are drawn in a background
thread from batches the loop already loaded, and everything that needs a model (validation pictures, PR
curves, confusion matrices) is drawn once, after the last epoch, from the final EMA model and the last
validation's predictions. Plotting never fails a run: an error in a picture is a warning.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from utils.eval.curves import coco_curves, detection_confusion
from utils.viz import plots
from utils.viz.report import write_report

N_TRAIN_BATCHES = N_VAL_BATCHES = 3
DISPLAY_CONF = 0.25  # boxes drawn on val_batch*_pred.jpg, and the confusion matrix threshold


def open_tensorboard(save_dir: Path):
    """A ``SummaryWriter`` into ``save_dir`` when TensorBoard is installed, else ``None`` (not a dependency)."""
    try:  # imported here, not at the top: TensorBoard is an optional dependency
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a broken tensorboard install: logging is optional
        return None
    try:
        return SummaryWriter(str(save_dir))
    except Exception:
        return None


class RunLogger:
    """Pictures, TensorBoard and the report of one run. Only rank 0 should be ``enabled``.

    Args:
        save_dir: the run folder.
        names: thing class names; semantic_names: semantic class names.
        enabled: False on non-zero ranks: every method is then a no-op.
        plots: ``--plots`` (False: no picture and no report is written; TensorBoard scalars still are).
        tensorboard: log to TensorBoard when it is importable.
    """

    def __init__(self, save_dir: Path, names: list[str], semantic_names: list[str], enabled: bool = True,
                 plots: bool = True, tensorboard: bool = True):
        self.save_dir = Path(save_dir)
        self.names, self.semantic_names = list(names), list(semantic_names)
        self.enabled = enabled
        self.plots = enabled and plots
        self._pool: ThreadPoolExecutor | None = None  # the one plotting thread, alive until close()
        self._pending: list[Future] = []
        self.tb = open_tensorboard(self.save_dir) if enabled and tensorboard else None
        self.timings: dict[str, float] = {}  # seconds per picture group, for the report and the benchmark
        self._lock = threading.Lock()

    # --- helpers ---------------------------------------------------------------------------------
    def _safe(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        except Exception as e:  # a picture is never worth a failed run
            warnings.warn(f"plot {name} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}",
                          stacklevel=2)
            return None
        finally:
            with self._lock:
                self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _background(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        # One long-lived thread rather than one per picture. A thread that exits runs OpenCV's thread-local
        # cleanup under an OpenCV mutex; a DataLoader worker forked in that instant inherits the mutex locked
        # and hangs forever in its first cv2.imread (seen on CPU and on GPU, even right after join()). An
        # idle live thread holds no lock, so forking is safe once join() has returned.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plot")
        self._pending.append(self._pool.submit(self._safe, name, fn, *args))

    def join(self) -> None:
        """Waits for the background pictures; the plotting thread stays, idle (see ``_background``)."""
        for f in self._pending:
            f.result()
        self._pending.clear()

    def close(self) -> None:
        """Ends the plotting thread: call after the run's last DataLoader has forked its workers."""
        self.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- during training -------------------------------------------------------------------------
    def labels(self, dataset, vocab, max_caption_words: int | None = None) -> None:
        """labels.jpg, in the background (it reads a sample of the semantic maps)."""
        if self.plots:
            self._background("labels", plots.plot_labels, dataset, self.names, self.semantic_names, vocab,
                             self.save_dir / "labels.jpg", 200, max_caption_words)

    def train_batch(self, i: int, batch, caption_tokens: torch.Tensor | None, vocab, captions: bool) -> None:
        """train_batch{i}.jpg for the first batches of the first epoch, drawn in the background.

        ``caption_tokens``: the ``(B, T)`` teacher-forcing ids the loop feeds the caption head (CPU), decoded
        back to words so the picture shows exactly the caption each image is trained with (``<unk>`` kept);
        ``(B, R, T)`` with hyp ``cap_refs`` R > 1, of which the picture shows the first.
        """
        if not self.plots or i >= N_TRAIN_BATCHES:
            return
        if caption_tokens is not None and caption_tokens.dim() == 3:
            caption_tokens = caption_tokens[:, 0]

        def draw() -> None:
            caps = None
            if captions:
                present = batch.task_present("cap").tolist()
                caps = [vocab.decode(row) if (has and caption_tokens is not None) else None
                        for row, has in zip(caption_tokens.tolist() if caption_tokens is not None
                                            else [[]] * len(batch), present)]
            plots.plot_train_batch(batch, self.save_dir / f"train_batch{i}.jpg", self.names, self.semantic_names,
                                   caps, title=f"train batch {i} (augmented, as the network sees it)")

        self._background(f"train_batch{i}", draw)

    def epoch(self, row: dict[str, Any], epoch: int) -> None:
        """TensorBoard scalars of one results.csv row."""
        if self.tb is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, float(v), epoch + 1)
        self.tb.flush()

    # --- after training --------------------------------------------------------------------------
    def finish(self, *, model, val_loader, eval_result, vocab, category_ids: list[int], results_csv: Path,
               balance: str | None = None, epoch: int = 0) -> None:
        """Every picture that needs the trained model or the whole run, then report.html; closes TensorBoard.

        Args:
            model: the final EMA model (eval mode); its ``tasks`` say which pictures apply.
            val_loader: the validation loader (its first batches are drawn).
            eval_result: the last validation's :class:`utils.eval.evaluators.EvalResult` (``None``: no curves).
        """
        if not self.enabled:
            return
        t0 = time.perf_counter()
        self.join()
        if self.plots:
            tasks = model.tasks
            if Path(results_csv).is_file():
                self._safe("results", plots.plot_results, Path(results_csv), balance)
            self._safe("val_batches", self.val_batches, model, val_loader, vocab, "cap" in tasks)
            if eval_result is not None:
                self._safe("curves", self.curves, eval_result, tasks, category_ids)
            self.timings["after_training"] = time.perf_counter() - t0
            notes = [f"pictures drawn in {self.timings['after_training']:.1f} s after training; "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items() if k != "after_training")]
            captions = eval_result.captions if eval_result is not None else ()
            self._safe("report", write_report, self.save_dir, list(tasks), captions, notes)
            self._tb_images(epoch)
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.close()

    def val_batches(self, model, val_loader, vocab, captions: bool) -> None:
        """val_batch{0,1,2}_labels.jpg and _pred.jpg: the first validation batches, labels next to predictions."""
        for i, batch in enumerate(val_loader):
            if i >= N_VAL_BATCHES:
                break
            preds = plots.predict_batch(model, batch, vocab, replace(plots.PREVIEW_OPTIONS, conf_thres=DISPLAY_CONF))
            plots.plot_val_batch(batch, preds, self.save_dir / f"val_batch{i}_labels.jpg",
                                 self.save_dir / f"val_batch{i}_pred.jpg", self.names, self.semantic_names,
                                 captions=captions, conf=DISPLAY_CONF)

    def curves(self, res, tasks: Sequence[str], category_ids: list[int]) -> None:
        """PR / F1 curves (boxes, masks), the detection confusion matrix and the semantic confusion matrix."""
        d = self.save_dir
        if "det" in tasks and res.ground_truth is not None:
            box = coco_curves(res.ground_truth, res.detections, res.image_ids, category_ids, self.names, "bbox")
            if box is not None:
                plots.plot_pr_curve(box, d / "PR_curve.png", "box")
                plots.plot_f1_curve(box, d / "F1_curve.png", "box")
            cm = detection_confusion(res.ground_truth, res.detections, res.image_ids, category_ids, DISPLAY_CONF, 0.45)
            plots.plot_confusion_matrix(cm.matrix, self.names + ["background"], d / "confusion_matrix.png",
                                        f"detection confusion (IoU 0.45, conf {DISPLAY_CONF})")
            if "inst" in tasks:
                mask = coco_curves(res.ground_truth, res.masks, res.image_ids, category_ids, self.names, "segm")
                if mask is not None:
                    plots.plot_pr_curve(mask, d / "mask_PR_curve.png", "mask")
                    plots.plot_f1_curve(mask, d / "mask_F1_curve.png", "mask")
        if "sem" in tasks and res.semantic_confusion is not None:
            plots.plot_confusion_matrix(np.asarray(res.semantic_confusion), self.semantic_names,
                                        d / "semantic_confusion_matrix.png", "semantic confusion (pixels)",
                                        drop_empty=True)

    def _tb_images(self, epoch: int) -> None:
        if self.tb is None:
            return
        for f in sorted(self.save_dir.glob("*.jpg")) + sorted(self.save_dir.glob("*.png")):
            img = cv2.imread(str(f))
            if img is not None:
                self.tb.add_image(f.stem, img[..., ::-1].copy(), epoch + 1, dataformats="HWC")
        self.tb.flush()

