"""The interface that export and inference share, below both so neither imports the other: the vision
graph's input and output names, the deployable wrapper around a ``Model`` (:class:`DeployModel`), what a
model tells post-processing (:class:`ModelInfo`) and the metadata an exported graph carries."""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from models.heads.caption import CaptionHead, CaptionOutput
from models.model import Model
from utils.ops.nms import BatchedNMS
from utils.ops.options import PredictOptions
from utils.ops.postprocess import head_outputs

EXPORT_VERSION = 1  # bump when the graph interface (names, layouts, metadata keys) changes
INPUT_NAME = "images"
NMS_OUTPUTS = ("det_boxes", "det_scores", "det_classes", "det_anchor_index", "det_count")
INT_OUTPUTS = frozenset({"det_classes", "det_anchor_index", "det_count"})
DECODER_SUFFIX = "_cap_decoder"
OPENVINO_SUFFIX = "_openvino_model"  # the export folder <stem>_openvino_model/ (the Ultralytics layout)
OPENVINO_METADATA = "metadata.yaml"  # in that folder: the ONNX metadata, plus the .xml file names


@dataclass
class ModelInfo:
    """What post-processing needs to know about a model, from a checkpoint or from ONNX metadata."""

    names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    semantic_names: list[str] = field(default_factory=list)
    semantic_ids: list[int] = field(default_factory=list)
    stride: float = 32.0
    tasks: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)
    cap_max_len: int = 0

    @classmethod
    def from_model(cls, model) -> ModelInfo:
        """From a built ``Model`` carrying ``.meta`` (``utils.runtime.checkpoint.build_from_checkpoint``)."""
        meta = getattr(model, "meta", {}) or {}
        nc = getattr(model, "nc", 0)
        return cls(names=list(meta.get("names") or [str(i) for i in range(nc)]),
                   category_ids=[int(i) for i in meta.get("category_ids") or range(1, nc + 1)],
                   semantic_names=list(meta.get("semantic_names", [])),
                   semantic_ids=[int(i) for i in meta.get("semantic_ids", [])],
                   stride=float(model.stride), tasks=list(model.tasks), vocab=list(meta.get("vocab", [])),
                   cap_max_len=int(model.head("cap").max_len) if "cap" in model.tasks else 0)

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ModelInfo:
        return cls(**{f.name: md[f.name] for f in fields(cls) if f.name in md})


def read_onnx_metadata(session) -> dict[str, Any]:
    """An onnxruntime session's ``metadata_props``, JSON-decoded."""
    raw = session.get_modelmeta().custom_metadata_map
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class CaptionEncoder(nn.Module):
    """Stands in for the caption head inside the vision graph: memory only, no decoding.

    An eval-mode ``CaptionHead`` greedy-decodes with a data-dependent loop (stop when every caption ended),
    which a traced graph cannot express; decoding runs outside the graph with :class:`CaptionDecoderStep`.
    """

    def __init__(self, head: CaptionHead):
        super().__init__()
        self.head = head

    def forward(self, xs: list[torch.Tensor]) -> CaptionOutput:
        return CaptionOutput(memory=self.head.encode(xs))


def output_names(tasks: Sequence[str], nms: bool = False) -> list[str]:
    """Names of the vision graph's outputs, in the fixed order :class:`DeployModel` returns them."""
    names: list[str] = []
    if "det" in tasks:
        names += list(NMS_OUTPUTS) if nms else ["det_pred"]
    if "inst" in tasks:
        names += ["inst_coeffs", "inst_protos"]
    if "sem" in tasks:
        names.append("sem_logits")
    if "cap" in tasks:
        names.append("cap_memory")
    return names


class DeployModel(nn.Module):
    """A ``Model`` as a deployable function: ``images -> tuple`` of plain tensors named :attr:`output_names`.

    The model is deep-copied (the caller's model keeps its caption head); in the copy the caption head is
    replaced by :class:`CaptionEncoder`. Put the model in eval mode (and fuse it) before wrapping.
    """

    def __init__(self, model: Model, nms: PredictOptions | None = None):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.tasks = list(model.tasks)
        if "cap" in self.tasks:
            i = self.model.head_index["cap"]
            self.model.layers[i] = CaptionEncoder(self.model.layers[i])
        self.nms = BatchedNMS(nms) if nms is not None and "det" in self.tasks else None
        self.output_names = output_names(self.tasks, self.nms is not None)
        # The wrapper itself in eval mode too: exporters restore the top module's mode recursively afterwards.
        self.eval()

    @property
    def caption_head(self) -> CaptionHead | None:
        """The caption head inside the copy (for greedy / beam decoding on the graph's ``cap_memory``)."""
        return self.model.layers[self.model.head_index["cap"]].head if "cap" in self.tasks else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the same names post-processing reads (utils.ops.postprocess), in the graph's output order
        named = head_outputs(self.model(images))
        if self.nms is not None:
            named.update(zip(NMS_OUTPUTS, self.nms(named.pop("det_pred"))))
        return tuple(named[n] for n in self.output_names)


def export_metadata(model: Model, img_hw: tuple[int, int], batch: int, nms: PredictOptions | None, dynamic: bool,
                    half: bool, stem: str) -> dict[str, Any]:
    """Everything detect.py needs to run a graph without the checkpoint (stored as JSON strings)."""
    info = ModelInfo.from_model(model)
    md = asdict(info) | {
        "img_size": [int(img_hw[0]), int(img_hw[1])],
        "batch": int(batch),
        "train_img_size": int(getattr(model, "meta", {}).get("img_size", img_hw[0])),
        "version": EXPORT_VERSION,
        "nms": nms.graph_metadata() if nms is not None and "det" in model.tasks else False,
        "outputs": output_names(model.tasks, nms is not None),
        "dynamic": bool(dynamic),
        "half": bool(half),
        "producer": f"yolor-mt export.py, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "cap" in model.tasks:
        md["cap_decoder"] = f"{stem}{DECODER_SUFFIX}.onnx"
    return md
