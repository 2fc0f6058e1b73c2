"""The training loop behind train.py: data, model, optimizer, AMP, EMA, validation, checkpoints, resume."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from models.implicit import Implicit
from models.model import Model
from utils.data.config import DataConfig, load_data_config
from utils.data.dataset import CocoDataset, create_dataloader, stall_guard
from utils.data.vocab import Vocabulary
from utils.engine.checkpoint import load_checkpoint, save_checkpoint
from utils.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup,
    gather_objects,
    init_distributed,
    sum_across_ranks,
)
from utils.engine.ema import ModelEMA, unwrap
from utils.engine.loggers import RunLogger
from utils.engine.torch_utils import (
    increment_path,
    latest_run,
    rng_state,
    select_device,
    set_rng_state,
    set_seed,
)
from utils.eval.evaluate import evaluate, to_float
from utils.loss.multitask import MultiTaskLoss
from utils.tasks import fitness, parse_tasks

NOMINAL_BATCH = 64  # gradients are accumulated up to this batch, and weight decay scaled to it
HYP_KEYS = {"lr0", "lr0_adamw", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum",
            "warmup_bias_lr", "grad_clip", "box", "cls", "dfl", "hsv_h", "hsv_s", "hsv_v", "degrees",
            "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic",
            "inst", "sem", "cap", "det", "label_smoothing", "max_nonfinite", "mask", "sem_dice", "cap_max_len",
            "cap_min_count", "cap_view", "mtcp_k", "dwa_temp", "anchor_box", "anchor_obj", "anchor_cls", "anchor_t"}


def load_hyp(path: str | Path) -> dict:
    """Reads a hyp yaml; unknown keys are an error (a typo would otherwise be silently ignored)."""
    path = Path(path)
    if not path.is_file():
        alt = Path(__file__).resolve().parents[2] / "data" / "hyps" / path.name
        path = alt if alt.is_file() else path
    hyp = yaml.safe_load(path.read_text()) or {}
    unknown = set(hyp) - HYP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(HYP_KEYS)}")
    return hyp


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, decay: float) -> torch.optim.Optimizer:
    """Three groups, as YOLOv5: 0 biases (no decay; the warmup ramps its lr from warmup_bias_lr), 1 decayed
    weights, 2 no decay: every parameter anywhere inside an Implicit module (any form, including the nn form's
    Linear weight) and normalisation weights.

    A bias is any parameter whose name has "bias" as an underscore-separated word (bias, and
    MultiheadAttention's in_proj_bias, bias_k and bias_v).  Each parameter lands in exactly one group, the first time it is met (shared ones are not repeated).
    """
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # _NormBase: BatchNorm*, SyncBN, InstanceNorm
    decayed, undecayed, biases = [], [], []
    seen: set[int] = set()
    # named_modules() visits a parent before its children, so the Implicit modules a module is nested
    # in are known when its own parameters are met: their prefixes mark the whole subtree as implicit.
    implicit_prefixes: list[str] = []
    for mname, module in model.named_modules():
        if isinstance(module, Implicit):
            implicit_prefixes.append(mname + "." if mname else "")
        in_implicit = any((mname + ".").startswith(pre) for pre in implicit_prefixes)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if in_implicit or isinstance(module, norms):
                undecayed.append(p)  # implicit knowledge and norm scales are not shrunk toward 0
            elif "bias" in pname.split("_"):  # bias, in_proj_bias, bias_k, bias_v
                biases.append(p)
            else:
                decayed.append(p)
    if name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        opt = cls(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"--optimizer {name}: choose SGD, Adam, AdamW or auto")
    opt.add_param_group({"params": decayed, "weight_decay": decay})
    opt.add_param_group({"params": undecayed, "weight_decay": 0.0})
    return opt


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many non-finite losses in a row."""


@dataclasses.dataclass
class EpochProgress:
    """How far the loop is into one epoch: what a mid-epoch checkpoint stores to continue it exactly."""

    batch: int = 0  # the first batch this process trains (a resumed epoch starts past the saved ones)
    last_step: int = -1  # batch of the latest optimizer step; gradients accumulate from the batch after it
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

    def means(self) -> dict[str, float]:
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
    def restore(cls, state: dict, batch: int, rank: int, world: int) -> "EpochProgress":
        """This rank's progress from a checkpoint continuing at ``batch``: its own loss sums when the world
        size is the one saved (exact), else a share of the saved ranks' sums."""
        progress = cls(batch=batch, last_step=int(state["last_step"]), start=time.time() - float(state["train_s"]))
        for saved in state["ranks"][rank::world]:
            progress._merge(saved["sums"], saved["counts"])
        return progress


class Trainer:
    """One training run. ``run()`` trains and returns the run folder."""

    def __init__(self, opt: argparse.Namespace):
        self.opt = opt
        self.dist, dist_device = init_distributed(opt.device)
        self.device = dist_device or select_device(opt.device)
        self.cuda = self.device.type == "cuda"
        self.on_step: list[Callable[["Trainer"], None]] = []  # callbacks after each optimizer step
        self.mid_epoch_saves: list[tuple[int, int]] = []  # (epoch, next batch) of each mid-epoch last.pt written
        self.skipped_steps: list[tuple[int, int]] = []  # (epoch, batch) of each batch skipped for a non-finite loss
        resume_ckpt = None
        if opt.resume:
            resume_ckpt = self._resume_opt()
            opt = self.opt
        set_seed(opt.seed)
        self.hyp = load_hyp(opt.hyp) if isinstance(opt.hyp, (str, Path)) else dict(opt.hyp)
        save_dir = Path(opt.save_dir) if opt.resume else increment_path(Path(opt.project) / opt.name, opt.exist_ok)
        self.save_dir = broadcast_object(save_dir, self.dist)  # one folder, decided by rank 0
        self.wdir = self.save_dir / "weights"
        if self.dist.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
        if not self.dist.main:  # let rank 0 generate the dataset and write the label caches first
            barrier(self.dist)
        self.data: DataConfig = load_data_config(opt.data)
        tasks = self._tasks()
        cap_view = self.hyp.get("cap_view", 0.5) if "cap" in tasks else 0.0
        self.train_set = CocoDataset(self.data, self.data.train, opt.img, augment=True, hyp=self.hyp, seed=opt.seed,
                                     caption_view=cap_view)
        if self.dist.main and "sem" in tasks:  # a listed class no training map has a pixel of: said once
            self.train_set.warn_absent_semantic_classes()
        self.val_set = CocoDataset(self.data, self.data.val, opt.img, augment=False, hyp=self.hyp, seed=opt.seed)
        if self.dist.main:
            barrier(self.dist)
        self.vocab = None
        if "cap" in tasks:
            if resume_ckpt is not None:
                self.vocab = Vocabulary.from_list(resume_ckpt["meta"]["vocab"])
            else:
                captions = (c for _, rec in self.train_set.items for c in rec.captions)
                self.vocab = Vocabulary.build(captions, min_count=int(self.hyp.get("cap_min_count", 2)))
        self.model = Model(opt.cfg, nc=max(self.data.nc, 1), tasks=tasks, head_kwargs=self._head_kwargs(tasks)).to(self.device)
        if opt.weights and not opt.resume:
            self._load_pretrained(opt.weights)
        self.log(f"train: {len(self.train_set)} images ({self.train_set.labels_summary()})")
        self.log(f"val:   {len(self.val_set)} images ({self.val_set.labels_summary()})")
        if opt.batch_size % self.dist.world:
            raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of the {self.dist.world} processes")
        per_rank = opt.batch_size // self.dist.world  # --batch-size is the total over all processes, as YOLOv5
        self.train_loader = create_dataloader(self.train_set, per_rank, True, opt.workers, opt.seed, self.dist.enabled)
        self.val_loader = create_dataloader(self.val_set, per_rank, False, opt.workers, opt.seed)
        self.accumulate = max(round(NOMINAL_BATCH / opt.batch_size), 1)
        decay = self.hyp.get("weight_decay", 5e-4) * opt.batch_size * self.accumulate / NOMINAL_BATCH
        iterations = opt.epochs * math.ceil(len(self.train_set) / opt.batch_size)
        name = opt.optimizer
        if name == "auto":  # Ultralytics' rule: AdamW for short schedules, SGD for long ones
            name = "AdamW" if iterations < 10000 else "SGD"
        self.lr0 = self.hyp.get("lr0_adamw", 0.002) if name in ("Adam", "AdamW") and opt.optimizer == "auto" else self.hyp["lr0"]
        # a high starting bias LR suits SGD only: Adam's step is ~lr per parameter, so 0.1 would throw every
        # head's prior bias (e.g. the class prior) far off in the first steps (Ultralytics does the same)
        self.warmup_bias_lr = self.hyp.get("warmup_bias_lr", 0.1) if name == "SGD" else 0.0
        self.optimizer = build_optimizer(self.model, name, self.lr0, self.hyp["momentum"], decay)
        lrf = self.hyp.get("lrf", 0.01)
        if opt.cos_lr:
            self.lf = lambda x: ((1 - math.cos(x * math.pi / opt.epochs)) / 2) * (lrf - 1) + 1
        else:
            self.lf = lambda x: (1 - x / opt.epochs) * (1.0 - lrf) + lrf
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        if getattr(opt, "sync_bn", False) and self.dist.enabled:
            if self.cuda:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                self.log("--sync-bn ignored: SyncBatchNorm needs CUDA")
        self.ema = ModelEMA(self.model)
        self.loss = MultiTaskLoss(self.model, self.hyp, self.vocab, opt.balance)
        self.loss.balancer.to(self.device)
        if any(True for _ in self.loss.balancer.parameters()):  # learned task weights (uncertainty)
            self.optimizer.add_param_group({"params": list(self.loss.balancer.parameters()), "weight_decay": 0.0,
                                            "lr": self.lr0, "initial_lr": self.lr0})
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.start_epoch, self.best_fitness, self.best_epoch = 0, -1.0, 0
        self.resume_progress: EpochProgress | None = None  # set when resuming a mid-epoch checkpoint
        self.nonfinite_run = 0  # non-finite losses in a row (across epochs)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.net = self.model  # what the loop calls: under torchrun, the DDP wrapper
        if self.dist.enabled:
            # unused: the caption decoder in batches without captions (its loss is masked out)
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.cuda else None, find_unused_parameters=True)
        self.last_eval = None  # the latest validation (its predictions feed the curves drawn at the end)
        self.logger = RunLogger(self.save_dir, self.data.names, self.data.semantic_names, enabled=self.dist.main,
                                plots=getattr(opt, "plots", True))  # checkpoints from before --plots: on
        if self.dist.main:
            with open(self.save_dir / "opt.yaml", "w") as f:
                yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in vars(opt).items()}, f, sort_keys=False)
            with open(self.save_dir / "hyp.yaml", "w") as f:
                yaml.safe_dump(self.hyp, f, sort_keys=False)
        self.log(f"model: {self.model.info()}; optimizer {name} lr0={self.lr0}; accumulate {self.accumulate}; device {self.device}")

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
            kw["cap"] = {"vocab_size": len(self.vocab), "max_len": int(self.hyp.get("cap_max_len", 24))}
        return kw

    def _load_pretrained(self, weights: str) -> None:
        ckpt = load_checkpoint(weights)
        state = ckpt.get("ema") or ckpt["model"]
        own = self.model.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(v.dim() > 0 for v in matched.values()):  # BN step counters (0-dim) always "match"
            raise ValueError(f"--weights {weights}: no tensor matches --cfg {self.opt.cfg}; is it the same network?")
        self.model.load_state_dict(matched, strict=False)
        self.log(f"weights: transferred {len(matched)}/{len(own)} tensors from {weights}")

    def _resume_opt(self) -> dict:
        path = self.opt.resume if isinstance(self.opt.resume, str) and self.opt.resume not in ("", "True") else latest_run()
        if path is None:
            raise FileNotFoundError("--resume: no runs/train/exp*/weights/last.pt found; give the path to last.pt")
        ckpt = load_checkpoint(path)
        if "optimizer" not in ckpt:
            raise ValueError(f"--resume {path}: this checkpoint has finished training (no optimizer state)")
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
        opt, hyp = self.opt, self.hyp
        nb = len(self.train_loader)
        warmup = max(round(hyp.get("warmup_epochs", 3) * nb), 100) if hyp.get("warmup_epochs", 3) > 0 else 0
        results_csv = self.save_dir / "results.csv"
        max_nonfinite = int(hyp.get("max_nonfinite", 10))
        if not (self.save_dir / "labels.jpg").is_file():
            cap_words = int(hyp.get("cap_max_len", 24)) - 2 if self.vocab is not None else None  # <bos>, <eos>
            self.logger.labels(self.train_set, self.vocab, cap_words)
        for epoch in range(self.start_epoch, opt.epochs):
            # DataLoader workers are forked below: not while a picture is being drawn (a forked worker would
            # inherit a lock the plotting thread holds, and hang); see RunLogger._background
            self.logger.join()
            progress = self._begin_epoch(epoch)
            # i stays the true batch index after a mid-epoch resume (warmup and caption rotation use it)
            pbar = tqdm(enumerate(stall_guard(self.train_loader), progress.batch), total=nb, initial=progress.batch,
                        desc=f"epoch {epoch + 1}/{opt.epochs}", disable=not (opt.progress and self.dist.main))
            for i, batch in pbar:
                ni = i + nb * epoch
                if ni <= warmup:  # linear warmup of lr (bias lr from warmup_bias_lr) and momentum
                    for j, g in enumerate(self.optimizer.param_groups):
                        start = self.warmup_bias_lr if j == 0 else 0.0
                        g["lr"] = float(np.interp(ni, [0, warmup], [start, g["initial_lr"] * self.lf(epoch)]))
                        if "momentum" in g:
                            g["momentum"] = float(np.interp(ni, [0, warmup], [hyp.get("warmup_momentum", 0.8), hyp["momentum"]]))
                x = to_float(batch.images, self.device)
                inputs = self.loss.head_inputs(batch, ni)
                head_inputs = {k: v.to(self.device) for k, v in inputs.items()}
                if epoch == 0 and i < 3:  # label check: drawn in a background thread from this very batch
                    self.logger.train_batch(i, batch, inputs.get("captions"), self.vocab, "cap" in self.model.tasks)
                with torch.autocast(device_type=self.device.type, enabled=self.cuda):
                    out = self.net(x, **head_inputs)
                    loss, parts = self.loss(out, batch, head_inputs, self.dist)
                    if self.dist.enabled:  # DDP needs every output in the graph, even a masked-out task's
                        loss = loss + 0.0 * sum(t.float().sum() for t in output_tensors(out))
                # every rank skips together: one rank skipping backward() alone would leave the others
                # waiting in DDP's gradient all-reduce for ever
                if not self.dist.all_true(bool(torch.isfinite(loss))):
                    self.nonfinite_run += 1
                    self.skipped_steps.append((epoch, i))
                    bad = [k for k, v in parts.items() if not math.isfinite(v)]
                    where = (bad or "total") if not torch.isfinite(loss) else "another rank's batch"
                    warnings.warn(f"non-finite loss at epoch {epoch} batch {i} in {where}; step skipped")
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.nonfinite_run >= max_nonfinite:
                        tasks = sorted({k.split("_")[0] for k in bad}) or ["total"]
                        raise NonFiniteLossError(f"{self.nonfinite_run} non-finite losses in a row (last in {bad}) in task(s) "
                                                 f"{tasks}; stopping: lower lr0 or check that task's labels")
                    continue
                self.nonfinite_run = 0
                self.scaler.scale(loss).backward()
                progress.add(parts)  # before the step: a checkpoint written there includes this batch
                if i - progress.last_step >= self.accumulate or i == nb - 1:
                    self.dist.average_gradients(self.loss.balancer.parameters())  # not inside DDP's module
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=hyp.get("grad_clip", 10.0))
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.ema.update(self.model)
                    self._after_step(epoch, i, nb, progress)
                pbar.set_postfix({k: f"{v:.3f}" for k, v in progress.means().items() if k.endswith("_loss")})
            self.scheduler.step()
            train_time = progress.elapsed()
            means = progress.global_means(self.dist)
            row = {"epoch": epoch + 1} | {f"train/{k}": v for k, v in means.items()}
            row |= {f"weight/{t}": w for t, w in self.loss.balancer.weights().items()}
            self.loss.balancer.end_epoch({t: means[f"{t}_loss"] for t in self.model.tasks if f"{t}_loss" in means})
            row |= {"time/train_s": train_time, "time/img_per_s": len(self.train_set) / max(train_time, 1e-9)}
            # ranks' RNG streams differ (dropout), so each rank's goes into the checkpoints; validation,
            # checkpoints and logs happen once, on rank 0; every rank learns whether to stop
            rank_rng = gather_objects(rng_state(self.cuda), self.dist) if self.dist.enabled else None
            stop = self.finish_epoch(epoch, row, results_csv, rank_rng) if self.dist.main else False
            if broadcast_object(stop, self.dist):
                break
        if not self.dist.main:
            cleanup(self.dist)
            return self.save_dir
        for name in ("best.pt", "last.pt"):  # finished: drop optimizer state, as YOLOv5's strip_optimizer
            f = self.wdir / name
            if f.is_file():
                ckpt = load_checkpoint(f)
                for k in ("optimizer", "scheduler", "scaler", "rng", "rank_rng"):
                    ckpt.pop(k, None)
                save_checkpoint(ckpt, f)
        # pictures that need the trained model or the whole run: once, after training, off the hot path
        self.logger.finish(model=self.ema.ema, val_loader=self.val_loader, eval_result=self.last_eval,
                           tasks=self.model.tasks, vocab=self.vocab, category_ids=self.data.category_ids,
                           results_csv=results_csv, balance=opt.balance, epoch=opt.epochs - 1)
        print(f"results saved to {self.save_dir}")
        cleanup(self.dist)
        return self.save_dir

    def _begin_epoch(self, epoch: int) -> EpochProgress:
        """Seeds the epoch's data and returns where it starts: batch 0, or where a mid-epoch checkpoint
        stopped (the batches before are dropped by the sampler, so their images are never loaded)."""
        self.model.train()
        self.train_set.epoch = epoch
        # shuffle order and augmentation depend only on (seed, epoch): a resumed run sees the same data
        self.train_loader.generator.manual_seed(self.opt.seed + epoch)
        progress, self.resume_progress = self.resume_progress or EpochProgress(), None
        sampler = self.train_loader.sampler  # a SkipSampler
        sampler.set_epoch(epoch)
        sampler.skip = progress.batch * self.train_loader.batch_size
        self.optimizer.zero_grad(set_to_none=True)
        return progress

    def _after_step(self, epoch: int, i: int, nb: int, progress: EpochProgress) -> None:
        """After the optimizer step at batch ``i``: a mid-epoch checkpoint at the first step at or after each
        multiple of ``--save-period`` batches (counted over the run), then the ``on_step`` callbacks."""
        period = getattr(self.opt, "save_period", -1)
        before, done = nb * epoch + progress.last_step + 1, nb * epoch + i + 1  # batches trained so far
        progress.last_step = i
        if period > 0 and done // period > before // period:
            self._save_mid_epoch(epoch, i + 1, progress)
        for callback in self.on_step:
            callback(self)

    def _save_mid_epoch(self, epoch: int, batch: int, progress: EpochProgress) -> None:
        """Refreshes last.pt with a checkpoint that continues ``epoch`` at ``batch``. Taken right after an
        optimizer step, so there is no accumulated gradient to keep. Every rank sends its loss sums and RNG
        state (a collective, so every rank calls this); rank 0 writes, atomically."""
        ranks = gather_objects(progress.rank_state() | {"rng": rng_state(self.cuda)}, self.dist)
        if self.dist.main:
            mid = {"batch": batch, "progress": progress.state(ranks, self.nonfinite_run)}
            save_checkpoint(self.checkpoint(epoch, rank_rng=[r["rng"] for r in ranks]) | mid, self.wdir / "last.pt")
            self.mid_epoch_saves.append((epoch, batch))

    def finish_epoch(self, epoch: int, row: dict, results_csv: Path, rank_rng: list[dict] | None = None) -> bool:
        """Validates (unless --noval), saves last/best checkpoints and results.csv; True to stop early.
        ``rank_rng``: every rank's RNG state under DDP, for the checkpoints."""
        opt = self.opt
        final = epoch + 1 == opt.epochs
        if not getattr(opt, "noval", False) or final:
            self.logger.join()  # the val loader forks its workers: no picture mid-draw (see run())
            res = evaluate(self.ema.ema, self.val_loader, self.val_set, self.data.category_ids, self.device,
                           loss_fn=self.loss, progress=opt.progress, vocab=self.vocab,
                           num_semantic=len(self.data.semantic_ids))
            row |= res.metrics
            self.last_eval = res
        row |= {f"lr/pg{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)}
        fit = fitness(row)
        best = fit > self.best_fitness or self.best_fitness < 0
        if best:
            self.best_fitness, self.best_epoch = fit, epoch
        ckpt = self.checkpoint(epoch, rank_rng=rank_rng)  # one state for both files
        if best:
            save_checkpoint(ckpt, self.wdir / "best.pt")
        save_checkpoint(ckpt, self.wdir / "last.pt")
        write_results(results_csv, row)
        self.logger.epoch(row, epoch)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if not k.startswith("lr/")))
        patience = getattr(opt, "patience", 0)
        if patience and epoch - self.best_epoch >= patience and not final:
            print(f"early stop: no improvement for {patience} epochs (best epoch {self.best_epoch + 1})")
            return True
        return False


def output_tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dataclasses / lists / tuples of model outputs."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in output_tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in output_tensors(o)]
    return []


def write_results(path: Path, row: dict) -> None:
    """Appends one epoch to results.csv (header from the first row; new keys extend it)."""
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
