"""The training loop behind train.py: data, model, optimizer, AMP, EMA, validation, checkpoints, resume.

``Trainer.__init__`` runs named build steps in a fixed order (the random draws of dataset and model
construction must come in the same order on every run, for a seeded run to repeat); ``Trainer.run`` is the
epoch loop. What happens around the loop (checkpoints, results.csv, TensorBoard, console, early stop,
pictures) lives in hooks (utils/engine/hooks.py), called at named events; ``Trainer(opt, hooks=[...])`` or
``trainer.register(hook)`` adds one without editing the loop.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from models.model import Model
from utils.data.config import DataConfig, load_data_config
from utils.data.dataset import (
    CocoDataset,
    create_dataloader,
    multi_scale_shape,
    rescale_batch,
    stall_guard,
)
from utils.data.vocab import Vocabulary, hyp_max_len, resolve_max_len
from utils.engine.ema import ModelEMA, unwrap
from utils.engine.hooks import EVENTS, Hook, default_hooks
from utils.engine.hyp import load_hyp
from utils.engine.loggers import RunLogger
from utils.engine.optim import (
    build_optimizer,
    fit_adamw_lr,
    freeze,
    freeze_rows,
    hold_frozen_statistics,
    row_parameters,
)
from utils.eval.evaluate import EvalSettings, LabelSpace, evaluate
from utils.loss.multitask import MultiTaskLoss
from utils.ops.letterbox import to_float
from utils.runtime.checkpoint import is_stripped, load_checkpoint
from utils.runtime.device import autocast_dtype, rng_state, select_device, set_rng_state, set_seed
from utils.runtime.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup,
    gather_objects,
    init_distributed,
    sum_across_ranks,
)
from utils.runtime.runs import increment_path, latest_run
from utils.tasks import fitness, parse_tasks

# gradients are accumulated up to this batch, and weight decay scaled to it, unless the hyp's ``nbs`` says
# otherwise; read when a Trainer is built, so a test may set utils.engine.trainer.NOMINAL_BATCH first
NOMINAL_BATCH = 64
MULTI_SCALE_STREAM = 7  # --multi-scale draws from (this, seed, epoch, batch): apart from the datasets' streams


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many non-finite losses in a row."""


@dataclasses.dataclass
class EpochProgress:
    """How far the loop is into one epoch: what a mid-epoch checkpoint stores to continue it exactly."""

    batch: int = 0  # the first batch this process trains (a resumed epoch starts past the saved ones)
    last_step: int = -1  # batch of the latest optimizer step; gradients accumulate from the batch after it
    prev_step: int = -1  # batch of the step before it: the latest step trained batches prev_step+1 .. last_step
    # logged loss parts summed over batches, and counted per part: a task absent from a batch is not
    # averaged in as zero
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    start: float = dataclasses.field(default_factory=time.time)  # wall time the epoch began (moved back on resume)

    def add(self, parts: dict[str, float]) -> None:
        """Adds one batch's logged loss parts."""
        self._merge(parts, dict.fromkeys(parts, 1))

    def _merge(self, sums: dict[str, float], counts: dict[str, int]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + counts[k]

    def step(self, batch: int) -> None:
        """Records an optimizer step after ``batch``."""
        self.prev_step, self.last_step = self.last_step, batch

    def means(self) -> dict[str, float]:
        """This process's epoch means so far, per logged loss part."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def global_means(self, dist: DistInfo) -> dict[str, float]:
        """The epoch means over every rank's batches: sums and counts reduced over the union of the ranks'
        keys (a task may have no labels in one rank's share), then divided; ``means()`` on one process."""
        sums, counts = sum_across_ranks(self.sums, dist), sum_across_ranks(self.counts, dist)
        return {k: v / counts[k] for k, v in sums.items() if counts[k] > 0}

    def elapsed(self) -> float:
        """Training seconds of this epoch, including those before a resume."""
        return time.time() - self.start

    def rank_state(self) -> dict:
        """This rank's loss sums (under DDP every rank's go into the checkpoint)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def state(self, ranks: list[dict], nonfinite_run: int) -> dict:
        """The checkpoint's ``progress`` entry from every rank's ``rank_state()``: plain values only, so it
        loads with weights_only=True."""
        sums = [{"sums": r["sums"], "counts": r["counts"]} for r in ranks]
        return {"last_step": self.last_step, "nonfinite_run": nonfinite_run, "train_s": self.elapsed(), "ranks": sums}

    @classmethod
    def restore(cls, state: dict, batch: int, rank: int, world: int) -> EpochProgress:
        """This rank's progress from a checkpoint continuing at ``batch``: its own loss sums when the world
        size is the one saved (exact), else a share of the saved ranks' sums."""
        progress = cls(batch=batch, last_step=int(state["last_step"]), start=time.time() - float(state["train_s"]))
        for saved in state["ranks"][rank::world]:
            progress._merge(saved["sums"], saved["counts"])
        return progress


class Trainer:
    """One training run. ``run()`` trains and returns the run folder.

    Args:
        opt: train.py's options (``--resume`` replaces them with the checkpoint's).
        hooks: extra hooks, called after the default ones (:func:`utils.engine.hooks.default_hooks`).

    What hooks read, besides the parts built here (``opt``, ``hyp``, ``dist``, ``model``, ``ema``, ``optimizer``,
    ``train_set``, ``logger``, ...): ``epoch``, ``nb`` (batches per epoch), ``progress`` (the epoch's
    :class:`EpochProgress`), ``batch_index``, ``batch``, ``batch_inputs``, ``metrics`` (the epoch's row),
    ``validated`` (this epoch was), ``is_best``, ``best_fitness``, ``best_epoch``, ``final_epoch``, ``last_eval`` (the
    latest validation).
    Kept for callers and tests: ``on_step`` (functions called after each optimizer step, on every rank),
    ``mid_epoch_saves`` and ``skipped_steps``.
    """

    def __init__(self, opt: argparse.Namespace, hooks: Iterable[Hook] = ()):
        self.opt = opt
        self._build_runtime()
        resume_ckpt = self._resume_opt() if opt.resume else None  # replaces self.opt
        set_seed(self.opt.seed)  # before the datasets and the model draw anything
        self.hyp = load_hyp(self.opt.hyp) if isinstance(self.opt.hyp, (str, Path)) else dict(self.opt.hyp)
        self._build_run_folder()
        self._build_data(resume_ckpt)
        self._build_model()
        self._build_loaders()
        self._build_optimizer()
        self._build_sync_bn()
        self.ema = ModelEMA(self.model)  # after SyncBN: the EMA copies the converted model
        self._build_loss()
        self._build_resume_state(resume_ckpt)
        self._build_ddp()
        self._build_logging()
        self.hooks: list[Hook] = []
        self.register(*default_hooks(self), *hooks)

    # --- build steps, in the order __init__ runs them ------------------------------------------
    def _build_runtime(self) -> None:
        """Device and process group; the run's records and the loop's per-event state."""
        self.dist, dist_device = init_distributed(self.opt.device)
        self.device = dist_device or select_device(self.opt.device)
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = autocast_dtype(self.device, not getattr(self.opt, "no_amp", False))
        self.on_step: list[Callable[[Trainer], None]] = []  # callbacks after each optimizer step (StepCallbacks)
        self.mid_epoch_saves: list[tuple[int, int]] = []  # (epoch, next batch) of each mid-epoch last.pt written
        self.skipped_steps: list[tuple[int, int]] = []  # (epoch, batch) of each batch skipped for a non-finite loss
        self.stop_requested = False  # set by request_stop(); rank 0's is broadcast at the end of the epoch
        self.epoch, self.nb, self.batch_index = 0, 0, 0
        self.progress: EpochProgress | None = None
        self.batch, self.batch_inputs = None, {}
        self.metrics: dict = {}
        self.is_best = self.validated = False
        self.rank_rng: list[dict] | None = None  # every rank's RNG state at the end of the epoch (DDP)
        self.last_eval = None  # the latest validation (its predictions feed the curves drawn at the end)
        # section(name) -> context manager around each named part of a training batch (head_inputs, to_device,
        # forward, loss, backward, step, ema); a no-op unless a profiler sets it (benchmarks/profile_step.py)
        self.section: Callable[[str], contextlib.AbstractContextManager] = _no_section

    def _build_run_folder(self) -> None:
        """The run folder (a new runs/train/expN, or the resumed one), decided by rank 0."""
        opt = self.opt
        save_dir = Path(opt.save_dir) if opt.resume else increment_path(Path(opt.project) / opt.name, opt.exist_ok)
        self.save_dir = broadcast_object(save_dir, self.dist)
        self.wdir = self.save_dir / "weights"
        self.results_csv = self.save_dir / "results.csv"
        if self.dist.main:
            self.wdir.mkdir(parents=True, exist_ok=True)

    def _build_data(self, resume_ckpt: dict | None) -> None:
        """The data config, both datasets and the caption vocabulary (a resumed run keeps its own)."""
        opt = self.opt
        if not self.dist.main:  # let rank 0 generate the dataset and write the label caches first
            barrier(self.dist)
        self.data: DataConfig = load_data_config(opt.data)
        if getattr(opt, "single_cls", False):  # checkpoints from before --single-cls: off
            self.data = self.data.single_class()
        tasks = self._tasks()
        cap_view = self.hyp.get("cap_view", 0.5) if "cap" in tasks else 0.0
        self.train_set = CocoDataset(self.data, self.data.train, opt.img, augment=True, hyp=self.hyp, seed=opt.seed,
                                     caption_view=cap_view)
        if self.dist.main and "sem" in tasks:  # a listed class no training map has a pixel of: said once
            self.train_set.warn_absent_semantic_classes()
        self.val_set = CocoDataset(self.data, self.data.val, opt.img, augment=False, hyp=self.hyp, seed=opt.seed)
        self._cache_images()  # before the barrier: rank 0 writes the --cache disk files, the others reuse them
        if self.dist.main:
            barrier(self.dist)
        self.tasks = tasks
        self.vocab = None
        if "cap" in tasks:
            if resume_ckpt is not None:
                self.vocab = Vocabulary.from_list(resume_ckpt["meta"]["vocab"])
                # the length the run was built with (its hyp file may say auto)
                self.hyp["cap_max_len"] = int(resume_ckpt["head_kwargs"]["cap"]["max_len"])
            else:
                captions = [c for _, rec in self.train_set.items for c in rec.captions]
                self.vocab = Vocabulary.build(captions, min_count=int(self.hyp.get("cap_min_count", 2)),
                                              max_unk=float(self.hyp.get("cap_max_unk", 1.0)))
                # resolved once and kept in the run's hyp, so the head, the losses, hyp.yaml and a resume agree
                self.hyp["cap_max_len"] = resolve_max_len(self.hyp.get("cap_max_len"), captions)

    def _cache_images(self) -> None:
        """``--cache ram|disk``: the training images, and the validation ones unless ``--noval`` (then validated
        once), read once now, in this process, before any loader worker is forked (they share the RAM cache)."""
        mode = getattr(self.opt, "cache", None)  # checkpoints from before --cache: none
        if not mode:
            return
        sets = [("train", self.train_set)] + ([] if getattr(self.opt, "noval", False) else [("val", self.val_set)])
        for name, ds in sets:
            self.log(ds.cache_images(mode, prefix=f"{name}: ", progress=self.opt.progress and self.dist.main))

    def _build_model(self) -> None:
        """The network for the trained tasks, with ``--weights`` transferred (not on resume: restored later)."""
        opt = self.opt
        # channels-last weights make every convolution run NHWC (oneDNN on CPU, cuDNN's tensor-core kernels
        # under AMP): a nano joint batch's forward + backward measured about 18% faster on 2 CPU cores
        self.model = Model(opt.cfg, nc=max(self.data.nc, 1), tasks=self.tasks,
                           head_kwargs=self._head_kwargs(self.tasks)).to(self.device, memory_format=torch.channels_last)
        loaded = self._load_pretrained(opt.weights) if opt.weights and not opt.resume else None
        self.frozen_rows = freeze_rows(getattr(opt, "freeze", ""), len(self.model.layers))  # from before --freeze: ""
        if self.frozen_rows:
            # a frozen row left at its initial weights would stay random for the whole run
            fresh = [k for k in row_parameters(self.model, self.frozen_rows) if k not in loaded] if loaded is not None else []
            if fresh:
                raise ValueError(f"--freeze: {len(fresh)} parameter tensors of the frozen rows were not in --weights "
                                 f"{opt.weights} with --cfg {opt.cfg}'s shapes (first: {fresh[0]}); is --cfg the "
                                 "network the weights were trained as?")
            n = freeze(self.model, self.frozen_rows)
            self.log(f"freeze: rows {','.join(map(str, self.frozen_rows))} ({n} parameter tensors get no gradient, "
                     "BatchNorm statistics held)")

    def _build_loaders(self) -> None:
        """The train and val loaders; ``--batch-size`` is the total over all processes, as YOLOv5."""
        opt = self.opt
        self.log(f"train: {len(self.train_set)} images ({self.train_set.labels_summary()})")
        self.log(f"val:   {len(self.val_set)} images ({self.val_set.labels_summary()})")
        if opt.batch_size % self.dist.world:
            raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of the {self.dist.world} processes")
        per_rank = opt.batch_size // self.dist.world
        rect = getattr(opt, "rect", False)  # checkpoints from before --rect: off
        if rect:
            # grouped by the total batch: a DistributedSampler deals rank r the items r, r + world, ..., so
            # every rank's batch j lies inside the same group j (validation's per-rank batches too)
            gs = max(int(self.model.stride), 32)
            self.train_set.rect(opt.batch_size, gs, 0.0)
            self.val_set.rect(opt.batch_size, gs, 0.5)
            self.log("--rect: batches of similar aspect ratio, letterboxed to their own shape, not shuffled, no mosaic")
        self.train_loader = create_dataloader(self.train_set, per_rank, not rect, opt.workers, opt.seed,
                                              self.dist.enabled)
        self.val_loader = create_dataloader(self.val_set, per_rank, False, opt.workers, opt.seed)

    def _build_optimizer(self) -> None:
        """Gradient accumulation, the optimizer (``--optimizer auto`` resolved), the lr schedule, the AMP scaler."""
        opt = self.opt
        nominal = int(self.hyp.get("nbs", NOMINAL_BATCH))
        self.accumulate = max(round(nominal / opt.batch_size), 1)
        decay = self.hyp.get("weight_decay", 5e-4) * opt.batch_size * self.accumulate / nominal
        iterations = opt.epochs * math.ceil(len(self.train_set) / opt.batch_size)
        name = opt.optimizer
        if name == "auto":  # Ultralytics' rule: AdamW for short schedules, SGD for long ones
            name = "AdamW" if iterations < 10000 else "SGD"
        self.optimizer_name = name
        auto_adam = name in ("Adam", "AdamW") and opt.optimizer == "auto"
        self.lr0 = self.hyp.get("lr0_adamw", 0.002) if auto_adam else self.hyp["lr0"]
        if auto_adam and self.hyp.get("lr_fit", False):
            self.lr0 = fit_adamw_lr(self.lr0, self.model.nc)
        # a high starting bias LR suits SGD only: Adam's step is ~lr per parameter, so 0.1 would throw every
        # head's prior bias (e.g. the class prior) far off in the first steps (Ultralytics does the same)
        self.warmup_bias_lr = self.hyp.get("warmup_bias_lr", 0.1) if name == "SGD" else 0.0
        # Ultralytics' auto rule gives its AdamW beta1 0.9, not the SGD momentum 0.937
        momentum = self.hyp.get("momentum_adamw", 0.9) if auto_adam else self.hyp["momentum"]
        self.optimizer = build_optimizer(self.model, name, self.lr0, momentum, decay)
        lrf = self.hyp.get("lrf", 0.01)
        if opt.cos_lr:
            self.lf = lambda x: ((1 - math.cos(x * math.pi / opt.epochs)) / 2) * (lrf - 1) + 1
        else:
            self.lf = lambda x: (1 - x / opt.epochs) * (1.0 - lrf) + lrf
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _build_sync_bn(self) -> None:
        """``--sync-bn`` under torchrun on CUDA: batch statistics over all ranks (the parameters stay the
        optimizer's: the converted layers reuse them)."""
        if getattr(self.opt, "sync_bn", False) and self.dist.enabled:
            if self.cuda:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                self.log("--sync-bn ignored: SyncBatchNorm needs CUDA")

    def _build_loss(self) -> None:
        """The multi-task loss; learned task weights (``--balance uncertainty``) get their own optimizer group
        (no decay), so the schedule is rebuilt to cover it."""
        corpus = [rec.captions for _, rec in self.train_set.items] if self.vocab is not None else None
        self.loss = MultiTaskLoss(self.model, self.hyp, self.vocab, self.opt.balance, caption_corpus=corpus)
        self.loss.balancer.to(self.device)
        if any(True for _ in self.loss.balancer.parameters()):
            self.optimizer.add_param_group({"params": list(self.loss.balancer.parameters()), "weight_decay": 0.0,
                                            "lr": self.lr0, "initial_lr": self.lr0})
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def _build_resume_state(self, resume_ckpt: dict | None) -> None:
        """Where training starts: epoch 0, or the resumed checkpoint's state (weights, optimizer, RNG, ...)."""
        self.start_epoch, self.best_fitness, self.best_epoch = 0, -1.0, 0
        self.resume_progress: EpochProgress | None = None  # set when resuming a mid-epoch checkpoint
        self.nonfinite_run = 0  # non-finite losses in a row (across epochs)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)

    def _build_ddp(self) -> None:
        """``self.net``, what the loop calls: under torchrun the DDP wrapper, else the model itself."""
        self.net = self.model
        if self.dist.enabled:
            # unused: the caption decoder in batches without captions (its loss is masked out)
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.cuda else None, find_unused_parameters=True)

    def _build_logging(self) -> None:
        """The run logger (pictures, TensorBoard; enabled on rank 0) and the run's opt.yaml / hyp.yaml."""
        opt = self.opt
        self.logger = RunLogger(self.save_dir, self.data.names, self.data.semantic_names, enabled=self.dist.main,
                                plots=getattr(opt, "plots", True))  # checkpoints from before --plots: on
        if self.dist.main:
            with open(self.save_dir / "opt.yaml", "w") as f:
                yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}, f, sort_keys=False)
            with open(self.save_dir / "hyp.yaml", "w") as f:
                yaml.safe_dump(self.hyp, f, sort_keys=False)
        self.log(f"model: {self.model.info()}; optimizer {self.optimizer_name} lr0={self.lr0}; "
                 f"accumulate {self.accumulate}; device {self.device}, "
                 f"{str(self.amp_dtype).removeprefix('torch.') if self.amp_dtype else 'fp32'}")
        if getattr(self.vocab, "min_count", None):  # built by this run, not resumed
            self.log(f"captions: {len(self.vocab)} tokens (words seen >= {self.vocab.min_count} times; <unk> "
                     f"{100 * self.vocab.unk_share:.1f}% of the training words), at most "
                     f"{self.hyp['cap_max_len'] - 2} words a caption")

    # --- hooks ---------------------------------------------------------------------------------
    def register(self, *hooks: Hook) -> None:
        """Adds hooks, called after those already registered, at every event of the run."""
        for hook in hooks:
            if not isinstance(hook, Hook):
                raise TypeError(f"{hook!r} is not a utils.engine.hooks.Hook")
            self.hooks.append(hook)

    def request_stop(self) -> None:
        """Ends training after the current epoch (its checkpoints and row are written; after_train runs).
        Under DDP rank 0's request decides, for every rank."""
        self.stop_requested = True

    @property
    def final_epoch(self) -> bool:
        """Whether ``self.epoch`` is the last of ``--epochs``."""
        return self.epoch + 1 == self.opt.epochs

    def _fire(self, event: str) -> None:
        """Calls ``event`` on every hook, in order; ``main_only`` hooks on rank 0 alone."""
        assert event in EVENTS, event
        for hook in self.hooks:
            if self.dist.main or not hook.main_only:
                getattr(hook, event)(self)

    def log(self, msg: str) -> None:
        """Prints on rank 0 only (every rank would repeat the same line)."""
        if self.dist.main:
            print(msg)

    # --- setup helpers -------------------------------------------------------------------------
    def _tasks(self) -> list[str]:
        available = self.data.tasks
        if not self.opt.tasks:
            return available
        wanted = parse_tasks(self.opt.tasks)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise ValueError(f"--tasks {','.join(missing)}: {self.data.file} has no labels for it (it provides {available})")
        return wanted

    def _head_kwargs(self, tasks: list[str]) -> dict:
        """Head sizes that come from the data: semantic classes, caption vocabulary and length."""
        kw: dict = {}
        if "sem" in tasks:
            kw["sem"] = {"num_classes": len(self.data.semantic_ids)}
        if "cap" in tasks:
            kw["cap"] = {"vocab_size": len(self.vocab), "max_len": hyp_max_len(self.hyp)}
        return kw

    def _load_pretrained(self, weights: str) -> set[str]:
        """Loads every tensor of ``weights`` whose name and shape the model has; returns their names."""
        ckpt = load_checkpoint(weights)
        state = ckpt.get("ema") or ckpt["model"]  # a stripped checkpoint's model is its FP16 EMA
        own = self.model.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(v.dim() > 0 for v in matched.values()):  # BN step counters (0-dim) always "match"
            raise ValueError(f"--weights {weights}: no tensor matches --cfg {self.opt.cfg}; is it the same network?")
        self.model.load_state_dict(matched, strict=False)
        self.log(f"weights: transferred {len(matched)}/{len(own)} tensors from {weights}")
        return set(matched)

    def _resume_opt(self) -> dict:
        path = self.opt.resume if isinstance(self.opt.resume, str) and self.opt.resume not in ("", "True") else latest_run()
        if path is None:
            raise FileNotFoundError("--resume: no runs/train/exp*/weights/last.pt found; give the path to last.pt")
        ckpt = load_checkpoint(path)
        if is_stripped(ckpt):
            raise ValueError(f"--resume {path}: this run has finished; its checkpoint keeps only the FP16 EMA weights "
                             f"(no optimizer state). Train on from it with --weights {path}")
        saved = argparse.Namespace(**ckpt["opt"])
        saved.resume, saved.save_dir = str(path), str(Path(path).parents[1])
        saved.device = self.opt.device or saved.device
        self.opt = saved
        batch = int(ckpt.get("batch", -1))
        where = f"at epoch {ckpt['epoch'] + 1} after {batch} batches" if batch >= 0 else f"after epoch {ckpt['epoch'] + 1}"
        self.log(f"resuming {path} {where}")
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.ema.load_state_dict(ckpt["ema"])
        self.ema.updates = int(ckpt.get("ema_updates", 0))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("balancer"):
            self.loss.balancer.load_state_dict(ckpt["balancer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        epoch, batch = int(ckpt["epoch"]), int(ckpt.get("batch", -1))
        if batch >= 0:  # saved mid-epoch: continue that epoch where it stopped
            self.start_epoch = epoch
            self.resume_progress = EpochProgress.restore(ckpt["progress"], batch, self.dist.rank, self.dist.world)
            self.nonfinite_run = int(ckpt["progress"]["nonfinite_run"])
        else:
            self.start_epoch = epoch + 1
        self.best_fitness = float(ckpt.get("best_fitness", -1.0))
        self.best_epoch = int(ckpt.get("best_epoch", ckpt["epoch"]))
        rng = ckpt.get("rng", {})
        if len(ckpt.get("rank_rng", [])) == self.dist.world:  # each rank's own stream (else rank 0's for all)
            rng = ckpt["rank_rng"][self.dist.rank]
        if rng:
            set_rng_state(rng, self.cuda)

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, epoch: int, final: bool = False, rank_rng: list[dict] | None = None) -> dict:
        """Everything to resume after ``epoch``, as tensors and plain Python values (loads with weights_only=True).

        ``rank_rng``: every rank's ``rng_state()`` under DDP (ranks draw different dropout masks, so their
        streams differ); rank 0's is taken now.
        """
        ckpt = {
            "epoch": epoch,
            "batch": -1,  # saved at the end of `epoch`; a mid-epoch checkpoint has the next batch to train here
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.ema.state_dict(),
            "ema_updates": self.ema.updates,
            "cfg": {k: v for k, v in self.model.yaml.items()},
            "tasks": self.model.tasks,
            "head_kwargs": self._head_kwargs(self.model.tasks),
            "meta": self.data.to_meta() | {"img_size": self.opt.img, "stride": float(self.model.stride),
                                           "vocab": self.vocab.to_list() if self.vocab else []},
            "opt": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.opt).items()},
            "hyp": self.hyp,
        }
        if not final:
            ckpt |= {
                "optimizer": self.optimizer.state_dict(),
                "balancer": self.loss.balancer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.cuda else None,
                "rng": rng_state(self.cuda),
            }
            if rank_rng and len(rank_rng) > 1:
                ckpt["rank_rng"] = [ckpt["rng"], *rank_rng[1:]]
        return ckpt

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Trains from ``start_epoch`` to ``--epochs`` (or an early stop); returns the run folder."""
        self.nb = len(self.train_loader)  # before any epoch sets the sampler's skip: a whole epoch's batches
        warmup_epochs = self.hyp.get("warmup_epochs", 3)
        warmup = max(round(warmup_epochs * self.nb), 100) if warmup_epochs > 0 else 0
        self._fire("before_train")
        for epoch in range(self.start_epoch, self.opt.epochs):
            self.epoch = epoch
            # DataLoader workers are forked below: not while a picture is being drawn (a forked worker would
            # inherit a lock the plotting thread holds, and hang); see RunLogger._background
            self.logger.join()
            self.progress = self._begin_epoch(epoch)
            self.batch_index = self.progress.batch
            self._fire("before_epoch")
            self.logger.join()  # in case a before_epoch hook queued a picture
            # i stays the true batch index after a mid-epoch resume (warmup and caption rotation use it)
            for i, batch in enumerate(stall_guard(self.train_loader), self.progress.batch):
                self.batch_index = i
                self._train_batch(i, batch, warmup)
                self._fire("after_batch")
            self.batch, self.batch_inputs = None, {}  # the last batch is not kept alive past its epoch
            self._end_epoch()
            self._fire("after_epoch")
            # decided on rank 0 (its hooks ran alone there), followed by every rank
            if broadcast_object(self.stop_requested, self.dist):
                break
        self._fire("after_train")
        if self.dist.main:
            print(f"results saved to {self.save_dir}")
        cleanup(self.dist)
        return self.save_dir

    def _begin_epoch(self, epoch: int) -> EpochProgress:
        """Seeds the epoch's data and returns where it starts: batch 0, or where a mid-epoch checkpoint
        stopped (the batches before are dropped by the sampler, so their images are never loaded)."""
        self.model.train()
        hold_frozen_statistics(self.model, self.frozen_rows)
        self.train_set.epoch = epoch
        # shuffle order and augmentation depend only on (seed, epoch): a resumed run sees the same data
        self.train_loader.generator.manual_seed(self.opt.seed + epoch)
        progress, self.resume_progress = self.resume_progress or EpochProgress(), None
        sampler = self.train_loader.sampler  # a SkipSampler
        sampler.set_epoch(epoch)
        sampler.skip = progress.batch * self.train_loader.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        return progress

    def _warmup(self, ni: int, warmup: int) -> None:
        """Linear warmup over the first ``warmup`` batches of the run: lr (bias lr from warmup_bias_lr) and
        momentum ramp to their scheduled values."""
        if ni > warmup:
            return
        hyp = self.hyp
        for j, g in enumerate(self.optimizer.param_groups):
            start = self.warmup_bias_lr if j == 0 else 0.0
            g["lr"] = float(np.interp(ni, [0, warmup], [start, g["initial_lr"] * self.lf(self.epoch)]))
            if "momentum" in g:
                g["momentum"] = float(np.interp(ni, [0, warmup], [hyp.get("warmup_momentum", 0.8), hyp["momentum"]]))

    def accumulate_at(self, ni: int, warmup: int) -> int:
        """Batches per optimizer step at run batch ``ni``: 1 at the start, rising linearly to ``accumulate``
        over the warmup (YOLOv5's and Ultralytics' ramp: more, smaller steps while the lr is low), then
        ``accumulate``. A function of ``ni`` alone, so a resumed run and every DDP rank step together."""
        if self.hyp.get("accumulate_ramp", True) and ni <= warmup:
            return max(1, int(np.interp(ni, [0, warmup], [1, self.accumulate]).round()))
        return self.accumulate

    def _train_batch(self, i: int, batch, warmup: int) -> None:
        """Forward, loss and backward of batch ``i``; an optimizer step (then ``after_step``) when
        ``accumulate`` batches are in, or at the epoch's last batch. A non-finite loss skips the batch."""
        epoch, progress = self.epoch, self.progress
        ni = i + self.nb * epoch
        self._warmup(ni, warmup)
        batch = self._multi_scale(i, batch)
        section = self.section
        with section("to_device"):
            x = to_float(batch.images, self.device)
        with section("head_inputs"):
            inputs = self.loss.head_inputs(batch, ni)
        with section("to_device"):
            head_inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self.batch, self.batch_inputs = batch, inputs
        self._fire("before_batch")
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            with section("forward"):
                out = self.net(x, **head_inputs)
            with section("loss"):
                loss, parts = self.loss(out, batch, head_inputs, self.dist)
                if self.dist.enabled:  # DDP needs every output in the graph, even a masked-out task's
                    loss = loss + 0.0 * sum(t.float().sum() for t in output_tensors(out))
        # every rank skips together: one rank skipping backward() alone would leave the others
        # waiting in DDP's gradient all-reduce for ever
        if not self.dist.all_true(bool(torch.isfinite(loss))):
            self._skip_batch(i, loss, parts)
            return
        self.nonfinite_run = 0
        with section("backward"):
            self.scaler.scale(loss).backward()
        progress.add(parts)  # before the step: a checkpoint written there includes this batch
        if i - progress.last_step >= self.accumulate_at(ni, warmup) or i == self.nb - 1:
            with section("step"):
                self.dist.average_gradients(self.loss.balancer.parameters())  # not inside DDP's module
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.hyp.get("grad_clip", 10.0))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            with section("ema"):
                self.ema.update(self.model)
            progress.step(i)
            self._fire("after_step")  # right after the step: a mid-epoch checkpoint needs no gradient kept

    def _multi_scale(self, i: int, batch):
        """``--multi-scale`` (YOLOv5's): batch ``i`` resized to a random multiple of the grid stride (at least
        32) in ``[0.5, 1.5] * --img``, with its labels (:func:`~utils.data.dataset.rescale_batch`); drawn from
        (seed, epoch, batch index) alone, so a run, and a resumed run, repeats the same sizes."""
        if not getattr(self.opt, "multi_scale", False):  # checkpoints from before --multi-scale: off
            return batch
        gs = max(int(self.model.stride), 32)
        rng = np.random.default_rng([MULTI_SCALE_STREAM, self.opt.seed, self.epoch, i])
        return rescale_batch(batch, multi_scale_shape(self.opt.img, gs, tuple(batch.images.shape[2:]), rng))

    def _skip_batch(self, i: int, loss: torch.Tensor, parts: dict[str, float]) -> None:
        """A non-finite loss on some rank: no step anywhere; too many in a row raise NonFiniteLossError."""
        self.nonfinite_run += 1
        self.skipped_steps.append((self.epoch, i))
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        where = (bad or "total") if not torch.isfinite(loss) else "another rank's batch"
        warnings.warn(f"non-finite loss at epoch {self.epoch} batch {i} in {where}; step skipped", stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        max_nonfinite = int(self.hyp.get("max_nonfinite", 10))
        if self.nonfinite_run >= max_nonfinite:
            tasks = sorted({k.split("_")[0] for k in bad}) or ["total"]
            raise NonFiniteLossError(f"{self.nonfinite_run} non-finite losses in a row (last in {bad}) in task(s) "
                                     f"{tasks}; stopping: lower lr0 or check that task's labels")

    def _end_epoch(self) -> None:
        """The epoch's row (``self.metrics``): loss means over every rank, task weights, timing; then, on
        rank 0, learning rates, and validation and the best fitness after every ``--val-period``-th epoch (none
        under --noval) and the final one. The collectives here run on every rank, in the same order."""
        epoch, progress = self.epoch, self.progress
        self.scheduler.step()
        train_time = progress.elapsed()
        means = progress.global_means(self.dist)
        row = {"epoch": epoch + 1} | {f"train/{k}": v for k, v in means.items()}
        row |= {f"weight/{t}": w for t, w in self.loss.balancer.weights().items()}
        self.loss.balancer.end_epoch({t: means[f"{t}_loss"] for t in self.model.tasks if f"{t}_loss" in means})
        row |= {"time/train_s": train_time, "time/img_per_s": len(self.train_set) / max(train_time, 1e-9)}
        # ranks' RNG streams differ (dropout), so each rank's goes into the checkpoints; validation,
        # checkpoints and logs happen once, on rank 0
        self.rank_rng = gather_objects(rng_state(self.cuda), self.dist) if self.dist.enabled else None
        self.metrics, self.is_best, self.validated = row, False, False
        if not self.dist.main:
            return
        row |= {f"lr/pg{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)}
        period = max(getattr(self.opt, "val_period", 1), 1)
        if self.final_epoch or (not getattr(self.opt, "noval", False) and (epoch + 1) % period == 0):
            self._validate(row)
            # only a validated epoch can be the best one (and so reset --patience's count)
            fit, self.validated = fitness(row), True
            self.is_best = fit > self.best_fitness or self.best_fitness < 0
            if self.is_best:
                self.best_fitness, self.best_epoch = fit, epoch

    def _validate(self, row: dict) -> None:
        """Validates the EMA model into ``row`` and ``last_eval`` (rank 0)."""
        opt = self.opt
        self.logger.join()  # the val loader forks its workers: no picture mid-draw (see run())
        labels = LabelSpace(self.data.category_ids, len(self.data.semantic_ids), self.data.semantic_ids, self.vocab)
        res = evaluate(self.ema.ema, self.val_loader, self.val_set, labels, self.device,
                       settings=EvalSettings(progress=opt.progress), loss_fn=self.loss)
        row |= res.metrics
        self.last_eval = res


def _no_section(name: str) -> contextlib.AbstractContextManager:
    """``Trainer.section`` when nothing profiles the loop: times nothing."""
    return contextlib.nullcontext()


def output_tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dataclasses / lists / tuples of model outputs."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in output_tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in output_tensors(o)]
    return []
