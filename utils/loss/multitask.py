"""Every head's loss, each masked to the images that carry that task's labels, combined by a balancer."""
from __future__ import annotations

import torch

from models.heads.detect import Detect
from models.heads.detect_anchor import DetectAnchor
from models.model import Model, Outputs
from utils.data.dataset import Batch
from utils.data.vocab import Vocabulary
from utils.loss.balance import DEFAULT_BALANCE, build_balancer
from utils.loss.caption import CaptionLoss, SelfCriticalLoss
from utils.loss.detection import DetectionLoss
from utils.loss.detection_anchor import AnchorDetectionLoss
from utils.loss.instance import InstanceLoss, gt_masks_from_batch
from utils.loss.semantic import SemanticLoss
from utils.runtime.distributed import LOCAL, DistInfo
from utils.tasks import IGNORE_INDEX

DET_LOSSES = {Detect: DetectionLoss, DetectAnchor: AnchorDetectionLoss}  # detection head type -> its loss


class MultiTaskLoss:
    """``loss(outputs, batch, head_inputs) -> (total, parts)``; ``parts`` are floats keyed ``<task>_<part>``.

    Args:
        model: the network (its heads decide which losses exist).
        hyp: gains and options of every loss.
        vocab: caption vocabulary (needed when the model has a caption head).
        balance: task balancing rule (``dwa`` by default, ``fixed``, ``uncertainty``, ``mtcp``).
        caption_corpus: every training image's reference captions; with hyp ``scst_epochs > 0`` they give the
            self-critical reward's document frequencies. ``scst`` (set per epoch by the trainer's
            ``SelfCritical`` hook) switches the caption loss from cross-entropy to :class:`SelfCriticalLoss` (plus
            hyp ``scst_xe`` times the cross-entropy, the mixed objective).
    """

    def __init__(self, model: Model, hyp: dict, vocab: Vocabulary | None = None, balance: str = DEFAULT_BALANCE,
                 caption_corpus: list[list[str]] | None = None):
        self.tasks = model.tasks
        if "inst" in self.tasks and "det" not in self.tasks:
            raise ValueError("--tasks inst needs det too: masks are predicted for detected objects")
        self.det = DET_LOSSES[type(model.head("det"))](model.head("det"), hyp) if "det" in self.tasks else None
        self.inst = InstanceLoss(hyp, model.head("inst").nm) if "inst" in self.tasks else None
        self.proto_stride = float(getattr(model.head("inst"), "proto_stride", 4)) if self.inst else 4.0
        self.sem = SemanticLoss(hyp) if "sem" in self.tasks else None
        if "cap" in self.tasks and vocab is None:
            raise ValueError("a caption head needs a vocabulary")
        self.cap = CaptionLoss(vocab, hyp) if "cap" in self.tasks else None
        self.cap_head = model.head("cap") if self.cap is not None else None
        self.scst_loss = None
        if self.cap is not None and int(hyp.get("scst_epochs", 0)) > 0:
            if not caption_corpus:
                raise ValueError("hyp scst_epochs > 0 needs the training captions (caption_corpus)")
            self.scst_loss = SelfCriticalLoss(vocab, caption_corpus, hyp)
        self.scst = False
        self.scst_xe = float(hyp.get("scst_xe", 0.0))
        self.balancer = build_balancer(self.tasks, balance, hyp)

    @property
    def self_critical(self) -> bool:
        """Whether this step's caption loss is the self-critical one (``scst`` set and an SCST loss built)."""
        return self.scst and self.scst_loss is not None

    def head_inputs(self, batch: Batch, step: int) -> dict:
        """Extra model inputs for this batch: the caption tokens for teacher forcing (``cap_refs`` references
        per image, rotating with ``step`` so every reference gets used) and ``caption_index``, the images that
        have captions: only those are decoded (in training about half the images are strong views without
        captions, and decoding their references only to mask them out was half the caption head's time)."""
        if self.cap is None:
            return {}
        tokens = self.cap.targets(batch.captions, step, keys=[int(i) for i in batch.image_ids])
        index = batch.task_present("cap").nonzero().view(-1)
        if self.self_critical and self.scst_xe <= 0:  # self-critical alone: no teacher forcing at all
            return {"captions": tokens, "caption_index": index[:0]}
        # one (masked) image when none has captions: the loss is then an exact zero that still reaches the
        # decoder, so every batch has a loss
        return {"captions": tokens, "caption_index": index if len(index) else index.new_zeros(1)}

    def task_losses(self, out: Outputs, batch: Batch, head_inputs: dict | None = None, sync: DistInfo = LOCAL
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Unweighted loss per task (only tasks with labels in this batch) plus the logged parts.

        ``sync``: under DDP (training only), every loss normalises by the mean over ranks of its normaliser,
        so each rank's loss is its share of the loss of the whole batch; every rank calls every loss, in the
        same order, whatever labels its own images have (the normalisers are collectives).
        """
        losses, parts = {}, {}
        assignment = None
        if self.det is not None:
            losses["det"], p, assignment = self.det(out.det.feats, batch.targets, batch.task_present("det"), sync)
            parts |= {f"det_{k}": v for k, v in p.items()}
        if self.inst is not None and assignment is not None:
            h, w = batch.images.shape[2:]
            masks = gt_masks_from_batch(batch.segments, batch.targets, len(batch), (h, w), int(self.proto_stride),
                                        device=out.inst.protos.device)
            losses["inst"], p = self.inst(out.inst, assignment.fg, assignment.target_gt, assignment.target_boxes,
                                          masks, batch.task_present("inst").to(out.inst.protos.device), self.proto_stride,
                                          sync)
            parts |= {f"inst_{k}": v for k, v in p.items()}
        if self.sem is not None and (batch.semantic is not None or sync.enabled):
            logits = out.sem.logits
            target = batch.semantic
            if target is None:  # only under DDP: this rank has no map, others may (the normaliser is shared)
                target = torch.full((len(batch), *batch.images.shape[2:]), IGNORE_INDEX, dtype=torch.uint8)
            loss, p = self.sem(logits, target.to(logits.device), batch.task_present("sem").to(logits.device), sync)
            if batch.semantic is not None:
                losses["sem"] = loss * len(batch)  # same batch-size scaling as the box and mask losses
                parts |= {f"sem_{k}": v for k, v in p.items()}
        tokens = (head_inputs or {}).get("captions")
        scst = self.self_critical
        if self.cap is not None and tokens is not None and (out.cap.logits is not None or scst):
            present = batch.task_present("cap").to(out.cap.memory.device)
            rows = out.cap.index  # the teacher-forced images (all when None)
            forced = (tokens, present) if rows is None else (tokens[rows.to(tokens.device)], present[rows])
            if scst:
                losses["cap"], p = self.scst_loss(self.cap_head, out.cap.memory, batch.captions, present,
                                                  [int(i) for i in batch.image_ids], sync)
                if self.scst_xe > 0:  # the mixed objective: cross-entropy keeps the references' wording
                    ce, p_ce = self.cap(out.cap.logits, *forced, sync)
                    losses["cap"], p = losses["cap"] + self.scst_xe * ce, p | p_ce
            else:
                losses["cap"], p = self.cap(out.cap.logits, *forced, sync)
            losses["cap"] = losses["cap"] * len(batch)
            if p and batch.task_present("cap").any():  # an all-masked batch's zero is not a caption loss value
                parts |= {f"cap_{k}": v for k, v in p.items()}
        return losses, parts

    def __call__(self, out: Outputs, batch: Batch, head_inputs: dict | None = None, sync: DistInfo = LOCAL
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate and the logged parts. ``sync`` (training under DDP only; validation
        runs on one rank): the task losses are scaled by the world size, because DDP *averages* gradients
        over ranks while each rank's loss is its share of the whole batch's; with the normalisers shared
        (see :meth:`task_losses`) N processes x B/N images then give one process x B images' gradient.
        The scale is applied before balancing, so the uncertainty rule's regulariser is not multiplied."""
        losses, parts = self.task_losses(out, batch, head_inputs, sync)
        parts |= {f"{t}_loss": float(v.detach()) / len(batch) for t, v in losses.items()
                  if t != "cap" or any(k.startswith("cap_") for k in parts)}
        if not losses:  # no head has labels in this batch: nothing to learn, an explicit zero step
            return batch.images.new_zeros((), dtype=torch.float32, requires_grad=True), parts
        return self.balancer({t: v * sync.world for t, v in losses.items()}), parts
