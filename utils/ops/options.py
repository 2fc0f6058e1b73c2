"""The thresholds and limits that turn a model's outputs into results, as one object: :class:`PredictOptions`.

It travels through :func:`~utils.ops.postprocess.postprocess`, :func:`~utils.ops.nms.non_max_suppression`,
:func:`~utils.eval.evaluate.evaluate`, :class:`~utils.deploy.predictor.Predictor`, the Python API
(:class:`~utils.deploy.api.YOLOR`) and export (a graph with NMS inside bakes in part of it). Callers that change
one field use :func:`dataclasses.replace`::

    opts = replace(PredictOptions(), conf_thres=0.5)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from utils.ops.panoptic import PanopticSpec

__all__ = ["PredictOptions"]

# command-line flag (argparse dest) -> field, where the two names differ
_FLAG_NAMES = {"agnostic_nms": "agnostic"}


@dataclass(frozen=True)
class PredictOptions:
    """Thresholds and limits of post-processing (frozen: share it, change it with :func:`dataclasses.replace`).

    Attributes:
        conf_thres: minimum class probability a detection needs (within [0, 1]).
        iou_thres: NMS IoU threshold (within [0, 1]).
        max_det: detections kept per image, best first.
        classes: keep only these contiguous class indices (``None``: all); any sequence is stored as a tuple.
        agnostic: NMS across classes (one group) instead of per class.
        multi_label: one box may be kept for several classes (evaluation's choice at a low ``conf_thres``).
        panoptic: the panoptic merge rule (:class:`~utils.ops.panoptic.PanopticSpec`). In
            :func:`~utils.ops.postprocess.postprocess` ``None`` means no merge; :class:`~utils.deploy.predictor.
            Predictor` and :func:`~utils.eval.evaluate.evaluate`, which know the model's metadata, take ``None``
            as the default rule built from it.
    """

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 300
    classes: tuple[int, ...] | None = None
    agnostic: bool = False
    multi_label: bool = False
    panoptic: PanopticSpec | None = None

    def __post_init__(self):
        if self.classes is not None:  # a list from argparse or a caller: immutable and hashable like the rest
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))

    @classmethod
    def from_flags(cls, opt: Any, **overrides) -> PredictOptions:
        """From the parsed flags of detect.py / test.py / export.py (``--conf-thres``, ``--iou-thres``,
        ``--max-det``, ``--classes``, ``--agnostic-nms``, whichever the script has; a flag left ``None`` keeps the
        default); ``overrides`` set fields directly (``multi_label=True``, ``panoptic=spec``, ...)."""
        names = {f.name for f in fields(cls)}
        values = {}
        for dest, value in vars(opt).items():
            name = _FLAG_NAMES.get(dest, dest)
            if name in names and name != "panoptic" and value is not None:
                values[name] = value
        return cls(**(values | overrides))

    def graph_metadata(self) -> dict[str, Any]:
        """What a graph with NMS inside bakes in: its metadata's ``nms`` (the keys exported models store)."""
        return {"conf_thres": self.conf_thres, "iou_thres": self.iou_thres, "max_det": self.max_det,
                "agnostic": self.agnostic}
