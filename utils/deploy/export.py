"""Deployment graphs of a yolor-mt model (ONNX, TorchScript) and the parity checks every export runs.

Two graphs are written per model:

* the **vision graph** ``<stem>.onnx``: ``images (B, 3, H, W)`` float 0..1 RGB -> one named output per head
  output (:func:`output_names`), optionally with NMS inside the graph (:class:`BatchedNMS`);
* the **caption decoder** ``<stem>_cap_decoder.onnx`` (caption models only): ``memory (B, S, d)`` and
  ``tokens (B, T)`` int64 -> ``logits (B, V)`` of the next token, so the greedy / beam loops of
  :mod:`utils.deploy.inference` can decode with onnxruntime alone.

Why the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) and not the dynamo one: it
needs no extra dependency (``onnxscript``), our graphs are free of data-dependent Python control flow once
the caption head is split into encoder and decoder step (see :class:`CaptionEncoder`), and every export is
checked numerically against PyTorch (:func:`compare_outputs`), which the tests exercise for every head.
"""
from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from models.heads.caption import CaptionHead, CaptionOutput
from models.model import Model

EXPORT_VERSION = 1  # bump when the graph interface (names, layouts, metadata keys) changes
INPUT_NAME = "images"
NMS_OUTPUTS = ("det_boxes", "det_scores", "det_classes", "det_anchor_index", "det_count")
INT_OUTPUTS = frozenset({"det_classes", "det_anchor_index", "det_count"})
DECODER_SUFFIX = "_cap_decoder"
# Parity tolerances on the normalized difference (see compare_outputs): fusing BN/implicit layers changes
# only float rounding, so it is held to 1e-4; another runtime (onnxruntime) may reorder sums, so 1e-3.
FUSE_TOL = 1e-4
RUNTIME_TOL = 1e-3


# --------------------------------------------------------------------------------------------------
# NMS inside the graph
# --------------------------------------------------------------------------------------------------
@dataclass
class NMSConfig:
    """Thresholds baked into a graph with NMS (stored in its metadata as ``nms``)."""

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 300
    agnostic: bool = False


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (multi-class, batched) with a torchvision implementation for eager mode.

    ``boxes (B, N, 4)`` corners, ``scores (B, C, N)`` -> ``(K, 3)`` int64 ``[batch, class, box]`` rows in ONNX
    order: by batch, then class, then score descending; at most ``max_out`` per (batch, class); a box needs
    ``score > score_thr`` and is suppressed by a better box of its class with ``IoU > iou_thr``.

    ONNX's native op is used instead of tracing ``torchvision.ops.batched_nms`` because the latter separates
    classes (and, to batch images, batches) by offsetting coordinates, which costs float precision at large
    offsets; the native op keeps batches and classes apart exactly, with a dynamic batch size.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_out: int, iou_thr: float,
                score_thr: float) -> torch.Tensor:
        rows = []
        for b in range(scores.shape[0]):
            cls, idx = (scores[b] > score_thr).nonzero(as_tuple=True)
            keep = batched_nms(boxes[b, idx], scores[b, cls, idx], cls, iou_thr)  # score-descending
            cls, idx = cls[keep], idx[keep]
            for c in cls.unique().tolist():  # ascending class order, like onnxruntime
                sel = idx[cls == c][:max_out]
                rows.append(torch.stack((torch.full_like(sel, b), torch.full_like(sel, c), sel), 1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=boxes.device)

    @staticmethod
    def symbolic(g, boxes, scores, max_out: int, iou_thr: float, score_thr: float):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou_thr], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_thr], dtype=torch.float32)))


class BatchedNMS(nn.Module):
    """``det_pred (B, A, 4 + nc)`` -> fixed-size, score-sorted detections per image (traceable, dynamic batch).

    Same selection as :func:`utils.ops.nms.non_max_suppression` with ``multi_label=False``: each anchor competes
    with its best class only (``agnostic``: across classes). Returns ``det_boxes (B, max_det, 4)`` in input
    pixels, ``det_scores (B, max_det)``, ``det_classes`` and ``det_anchor_index (B, max_det)`` int64 (the
    anchor row of each detection, to gather instance coefficients) and ``det_count (B,)``; rows past
    ``det_count`` are padding (boxes/scores 0, classes/indices -1).
    """

    def __init__(self, cfg: NMSConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.cfg
        boxes, probs = pred[..., :4].float(), pred[..., 4:].float()  # ONNX NMS takes float32 only
        conf, cls = probs.max(-1)  # (B, A)
        if c.agnostic:
            scores = conf.unsqueeze(1)  # (B, 1, A): one group
        else:  # only the best class of an anchor competes: zero every other class score
            scores = torch.zeros_like(probs).scatter(2, cls.unsqueeze(-1), conf.unsqueeze(-1)).transpose(1, 2)
        sel = _NonMaxSuppression.apply(boxes, scores, int(c.max_det), float(c.iou_thres), float(c.conf_thres))
        b, a = sel[:, 0], sel[:, 2]
        score = conf[b, a]
        # Rank every image's selections by score: a (B, K) table holding each selection's score in its own
        # image's row and -1 elsewhere, padded with max_det columns of -1 so top-k always has max_det entries.
        # Built by broadcasting, not allocated from sizes; sizes that are read (K) become Shape ops, i.e. dynamic.
        own = b.unsqueeze(0) == torch.arange(pred.shape[0], device=pred.device).unsqueeze(1)  # (B, K)
        table = torch.where(own, score.unsqueeze(0), torch.full_like(score.unsqueeze(0), -1.0))
        table = torch.cat((table, (conf[:, :1] * 0 - 1).repeat(1, c.max_det)), 1)
        top, order = table.topk(c.max_det, dim=1)  # (B, max_det)
        valid = top >= 0
        k = sel.shape[0]
        order = torch.where(order < k, order, torch.full_like(order, k))  # padding -> the dummy row k
        pad_i = cls[:1, 0] * 0 - 1  # (1,) int64 -1, also when nothing was selected (k == 0)
        det_boxes = torch.cat((boxes[b, a], boxes[:1, 0] * 0))[order] * valid.unsqueeze(-1)
        det_scores = torch.where(valid, top, torch.zeros_like(top))
        det_classes = torch.where(valid, torch.cat((cls[b, a], pad_i))[order], pad_i)
        det_anchor = torch.where(valid, torch.cat((a, pad_i))[order], pad_i)
        return det_boxes, det_scores, det_classes, det_anchor, valid.sum(1)


# --------------------------------------------------------------------------------------------------
# Graph wrappers
# --------------------------------------------------------------------------------------------------
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

    def __init__(self, model: Model, nms: NMSConfig | None = None):
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
        out = self.model(images)
        res: list[torch.Tensor] = []
        if out.det is not None:
            res += list(self.nms(out.det.pred)) if self.nms is not None else [out.det.pred]
        if out.inst is not None:
            res += [out.inst.coeffs, out.inst.protos]
        if out.sem is not None:
            res.append(out.sem.logits)
        if out.cap is not None:
            res.append(out.cap.memory)
        return tuple(res)


def _split_in_projection(mha: nn.MultiheadAttention) -> None:
    """Rewrites ``mha`` to hold separate q/k/v projection weights (the same numbers, split in three).

    Why: for packed weights ``multi_head_attention_forward`` reshapes through ``unflatten``, after which the
    TorchScript ONNX exporter records the traced sequence lengths as constants, so the graph fails for any
    other caption length or memory size (pytorch/pytorch#122321, #135691). The separate-weights path has no
    ``unflatten`` and stays dynamic; the output is bit-identical.
    """
    if not mha._qkv_same_embed_dim:
        return
    e = mha.embed_dim
    w = mha.in_proj_weight.detach()
    mha.q_proj_weight = nn.Parameter(w[:e].clone(), requires_grad=False)
    mha.k_proj_weight = nn.Parameter(w[e:2 * e].clone(), requires_grad=False)
    mha.v_proj_weight = nn.Parameter(w[2 * e:].clone(), requires_grad=False)
    mha.in_proj_weight = None
    mha._qkv_same_embed_dim = False


class CaptionDecoderStep(nn.Module):
    """``(memory (B, S, d), tokens (B, T)) -> (B, V)`` next-token logits: ``CaptionHead.decode_step`` as a graph.

    Works on a copy of the head whose attention layers are rewritten by :func:`_split_in_projection`.
    """

    def __init__(self, head: CaptionHead):
        super().__init__()
        self.head = copy.deepcopy(head)
        for m in self.head.modules():
            if isinstance(m, nn.MultiheadAttention):
                _split_in_projection(m)
        self.eval()

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head.decode_step(memory, tokens)


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------
def export_metadata(model: Model, img_hw: tuple[int, int], batch: int, nms: NMSConfig | None, dynamic: bool,
                    half: bool, stem: str) -> dict[str, Any]:
    """Everything detect.py needs to run a graph without the checkpoint (stored as JSON strings)."""
    from utils.deploy.inference import ModelInfo

    info = ModelInfo.from_model(model)
    md = asdict(info) | {
        "img_size": [int(img_hw[0]), int(img_hw[1])],
        "batch": int(batch),
        "train_img_size": int(getattr(model, "meta", {}).get("img_size", img_hw[0])),
        "version": EXPORT_VERSION,
        "nms": asdict(nms) if nms is not None and "det" in model.tasks else False,
        "outputs": output_names(model.tasks, nms is not None),
        "dynamic": bool(dynamic),
        "half": bool(half),
        "producer": f"yolor-mt export.py, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if "cap" in model.tasks:
        md["cap_decoder"] = f"{stem}{DECODER_SUFFIX}.onnx"
    return md


def set_metadata(onnx_model, metadata: dict[str, Any]) -> None:
    """Writes ``metadata`` into ``onnx_model.metadata_props``, every value JSON-encoded."""
    del onnx_model.metadata_props[:]
    for k, v in metadata.items():
        p = onnx_model.metadata_props.add()
        p.key, p.value = k, json.dumps(v)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Drops warnings the TorchScript exporter always emits and that are handled elsewhere: its deprecation
    notices (we use it on purpose, see the module docstring) and TracerWarnings about shape checks frozen
    into the trace (the numerical parity checks catch any that would matter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # "advanced indexing ... incorrect with negative indices": BatchedNMS only indexes with indices >= 0
        warnings.filterwarnings("ignore", message=".*advanced indexing.*", category=UserWarning)
        yield


def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: str | Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None, opset: int,
                metadata: dict[str, Any]) -> Path:
    """Exports ``module(*args)`` with the TorchScript-based exporter, adds metadata, runs the ONNX checker."""
    import onnx

    path = Path(path)
    try:
        with quiet_export():
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types; one line with the cause is what a user needs
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"ONNX export failed at opset {opset}: {type(e).__name__}: {msg}") from e
    model = onnx.load(str(path))
    set_metadata(model, metadata)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def vision_dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    """Dynamic batch / height / width on the input and the matching axes of every output."""
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for n in names:
        if n in ("det_pred", "inst_coeffs", "cap_memory"):
            axes[n] = {0: "batch", 1: "anchors" if n != "cap_memory" else "tokens"}
        elif n in ("inst_protos", "sem_logits"):
            axes[n] = {0: "batch", 2: "height_4", 3: "width_4"}
        else:  # NMS outputs: fixed max_det
            axes[n] = {0: "batch"}
    return axes


def export_vision(deploy: DeployModel, images: torch.Tensor, path: str | Path, opset: int, dynamic: bool,
                  metadata: dict[str, Any]) -> Path:
    """The vision graph ``images -> deploy.output_names``."""
    axes = vision_dynamic_axes(deploy.output_names) if dynamic else None
    return export_onnx(deploy, (images,), path, [INPUT_NAME], deploy.output_names, axes, opset, metadata)


def export_caption_decoder(head: CaptionHead, memory: torch.Tensor, path: str | Path, opset: int,
                           metadata: dict[str, Any]) -> Path:
    """The decoder-step graph; batch, memory length and token count are always dynamic."""
    step = CaptionDecoderStep(head)
    tokens = torch.full((memory.shape[0], 2), 1, dtype=torch.long, device=memory.device)  # <bos> + one token
    axes = {"memory": {0: "batch", 1: "memory_len"}, "tokens": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    return export_onnx(step, (memory, tokens), path, ["memory", "tokens"], ["logits"], axes, opset,
                       metadata | {"role": "cap_decoder"})


def export_torchscript(deploy: DeployModel, images: torch.Tensor, path: str | Path,
                       metadata: dict[str, Any]) -> Path:
    """``torch.jit.trace`` of the vision wrapper, metadata in the ``config.txt`` extra file."""
    path = Path(path)
    with quiet_export():
        traced = torch.jit.trace(deploy, (images,), check_trace=False, strict=False)
        torch.jit.save(traced, str(path), _extra_files={"config.txt": json.dumps(metadata)})
    return path


def load_torchscript(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """A saved ``.torchscript`` and its metadata (TorchScript's own deprecation notice silenced)."""
    extra = {"config.txt": ""}
    with quiet_export():
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module, json.loads(extra["config.txt"] or "{}")


def simplify_onnx(path: str | Path, out: str | Path) -> Path:
    """onnxslim of ``path`` written to ``out`` (metadata kept)."""
    import onnx
    import onnxslim

    model = onnx.load(str(path))
    slim = onnxslim.slim(model)
    if slim is None:
        raise ValueError("onnxslim returned no model")
    set_metadata(slim, {p.key: json.loads(p.value) for p in model.metadata_props})
    onnx.save(slim, str(out))
    onnx.checker.check_model(str(out))
    return Path(out)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
def verification_images(data_yaml: str | Path, img_hw: tuple[int, int], n: int) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 RGB: the first val images of ``data_yaml``, letterboxed as in validation.

    Real images rather than noise, so activations have realistic ranges (noise hides overflow or
    saturation differences). Fewer val images than ``n`` are repeated.
    """
    from utils.data.config import load_data_config
    from utils.data.dataset import CocoDataset

    data = load_data_config(data_yaml)
    size = img_hw[0] if img_hw[0] == img_hw[1] else tuple(img_hw)
    ds = CocoDataset(data, data.val, size, augment=False)
    return torch.stack([ds[i % len(ds)]["image"] for i in range(n)])


@dataclass
class Diff:
    """One output's parity: the raw max abs difference and the normalized one the tolerance applies to."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    normalized: float
    unit: str


def compare_outputs(ref: dict[str, np.ndarray], out: dict[str, np.ndarray], img_hw: tuple[int, int]) -> list[Diff]:
    """Per output, how far ``out`` is from ``ref``.

    Normalization (what the tolerances apply to): box coordinates (``det_pred[..., :4]``, ``det_boxes``) are
    divided by the image size (a 1e-3 tolerance then means 0.64 px at 640); integer outputs count mismatching
    elements (must be 0); every other output is divided by ``max(1, max |ref|)``, i.e. absolute for values
    of unit scale (probabilities, normalized memory) and relative for larger logits.
    """
    diffs = []
    size = float(max(img_hw))
    for name, r in ref.items():
        o = out[name]
        if r.shape != o.shape:
            diffs.append(Diff(name, tuple(r.shape), float("inf"), float("inf"), f"shape {o.shape}"))
            continue
        if name in INT_OUTPUTS:
            n_bad = float((r != o).sum())
            diffs.append(Diff(name, tuple(r.shape), n_bad, n_bad, "mismatches"))
            continue
        d = np.abs(r.astype(np.float64) - o.astype(np.float64))
        raw = float(d.max()) if d.size else 0.0
        if name == "det_pred":
            norm = max(float(d[..., :4].max(initial=0.0)) / size, float(d[..., 4:].max(initial=0.0)))
            unit = f"boxes/{size:g}px"
        elif name == "det_boxes":
            norm, unit = raw / size, f"/{size:g}px"
        else:
            scale = max(1.0, float(np.abs(r).max(initial=0.0)))
            norm, unit = raw / scale, "abs" if scale == 1.0 else f"/{scale:.3g}"
        diffs.append(Diff(name, tuple(r.shape), raw, norm, unit))
    return diffs


def run_deploy(deploy: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, np.ndarray]:
    """Runs a wrapper (eager or TorchScript) on ``images`` and names its outputs (float32 / int64 numpy)."""
    with torch.inference_mode():
        outs = deploy(images)
    return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(names, outs)}


def format_parity(columns: dict[str, list[Diff]], tolerances: dict[str, float]) -> str:
    """A table: one row per output, one (max abs, normalized) column pair per comparison ('-': not compared)."""
    rows: dict[str, Diff] = {}
    for diffs in columns.values():
        for d in diffs:
            rows.setdefault(d.name, d)
    by_name = {k: {d.name: d for d in diffs} for k, diffs in columns.items()}
    head = f"{'output':<20}{'shape':<18}" + "".join(f"{k:>30}" for k in columns)
    sub = f"{'':<38}" + "".join(f"{'max|d|':>19}{'norm':>11}" for _ in columns)
    lines = [head, sub, "-" * len(head)]
    for name, d0 in rows.items():
        row = f"{name:<20}{str(d0.shape):<18}"
        for k in columns:
            d = by_name[k].get(name)
            row += f"{d.max_abs:>19.3e}{d.normalized:>11.2e}" if d else f"{'-':>19}{'-':>11}"
        lines.append(f"{row}   ({d0.unit})")
    lines.append("tolerances on norm: " + ", ".join(f"{k} <= {v:g}" for k, v in tolerances.items())
                 + "; integer outputs must match exactly")
    return "\n".join(lines)


def failures(diffs: list[Diff], tol: float) -> list[str]:
    """Outputs whose normalized difference exceeds ``tol`` (integer outputs: any mismatch)."""
    return [f"{d.name} ({d.normalized:.3g} > {0 if d.name in INT_OUTPUTS else tol:g})" for d in diffs
            if (d.normalized > 0 if d.name in INT_OUTPUTS else not d.normalized <= tol)]
