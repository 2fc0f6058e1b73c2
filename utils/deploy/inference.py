"""Inference shared by detect.py, export.py and the benchmarks: one backend interface for ``.pt`` and ``.onnx``.

A backend maps a float batch ``(B, 3, H, W)`` (RGB, 0..1) to a dict of numpy arrays named as the vision graph's
outputs (:func:`utils.deploy.export.output_names`); everything after that (NMS, masks, semantic maps, captions) is
the same code for both backends, so a ``.pt`` and its ``.onnx`` give the same results up to float rounding.

Captions: :class:`PyTorchBackend` decodes with the head's own ``greedy`` / ``beam_search``; :class:`OnnxBackend`
runs the decoder-step graph inside :func:`greedy_decode` / :func:`beam_search_decode`, numpy mirrors of those
two methods (same start token, same ``<pad>``/``<bos>`` masking, same stopping rule, same ``max_len``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from utils.data.augment import letterbox
from utils.data.sample import Sample
from utils.data.vocab import Vocabulary
from utils.deploy.interface import DeployModel, ModelInfo, read_onnx_metadata
from utils.ops.boxes import scale_boxes
from utils.ops.masks import masks_to_original, process_masks
from utils.ops.nms import non_max_suppression
from utils.tasks import BOS, EOS, IGNORE_INDEX, PAD

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (memory, tokens) -> next-token logits




# --------------------------------------------------------------------------------------------------
# caption decoding (numpy mirrors of CaptionHead.greedy / beam_search)
# --------------------------------------------------------------------------------------------------
def _next_logprobs(logits: np.ndarray) -> np.ndarray:
    """As ``CaptionHead._next_logprobs``: float32, never ``<pad>`` or ``<bos>``, log-softmax."""
    x = logits.astype(np.float32, copy=True)
    x[:, PAD] = -np.inf
    x[:, BOS] = -np.inf
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def greedy_decode(step: StepFn, memory: np.ndarray, max_len: int) -> np.ndarray:
    """``(B, L)`` int64 ids, ``<bos>`` first, ``<pad>`` after ``<eos>``, ``L <= max_len``: ``CaptionHead.greedy``."""
    b = memory.shape[0]
    tokens = np.full((b, 1), BOS, np.int64)
    done = np.zeros(b, bool)
    for _ in range(max_len - 1):
        nxt = _next_logprobs(step(memory, tokens)).argmax(-1).astype(np.int64)
        nxt = np.where(done, PAD, nxt)
        tokens = np.concatenate((tokens, nxt[:, None]), 1)
        done |= nxt == EOS
        if done.all():
            break
    return tokens


def beam_search_decode(step: StepFn, memory: np.ndarray, beam: int, max_len: int,
                       length_penalty: float = 1.0) -> np.ndarray:
    """``CaptionHead.beam_search`` in numpy: ``(B, L)`` ids of the best beam per image (``beam=1`` = greedy)."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    b, k = memory.shape[0], beam
    mem = np.repeat(memory, k, axis=0)  # beams of an image adjacent
    tokens = np.full((b * k, 1), BOS, np.int64)
    score = np.full((b, k), -np.inf, np.float32)
    score[:, 0] = 0.0
    length = np.zeros((b, k), np.float32)
    done = np.zeros((b, k), bool)
    for _ in range(max_len - 1):
        logp = _next_logprobs(step(mem, tokens)).reshape(b, k, -1)
        v = logp.shape[-1]
        finished = np.full(v, -np.inf, np.float32)
        finished[PAD] = 0.0
        logp = np.where(done[..., None], finished, logp)
        raw = score[..., None] + logp
        new_len = np.broadcast_to((length + (~done).astype(np.float32))[..., None], (b, k, v))
        norm = raw / np.power(np.maximum(new_len, 1), np.float32(length_penalty))
        top = np.argsort(-norm.reshape(b, k * v), axis=1, kind="stable")[:, :k]
        src, tok = top // v, top % v
        score = np.take_along_axis(raw.reshape(b, k * v), top, 1)
        length = np.take_along_axis(new_len.reshape(b, k * v), top, 1)
        done = np.take_along_axis(done, src, 1) | (tok == EOS)
        rows = (src + np.arange(b)[:, None] * k).reshape(-1)
        tokens = np.concatenate((tokens[rows], tok.reshape(-1, 1)), 1)
        if done.all():
            break
    best = (score / np.power(np.maximum(length, 1), np.float32(length_penalty))).argmax(1)
    return tokens.reshape(b, k, -1)[np.arange(b), best]


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
class PyTorchBackend:
    """A ``.pt`` checkpoint (EMA weights), fused, behind the backend interface."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", half: bool = False,
                 fuse: bool = True, verbose: bool = False):
        from models.model import format_counts, module_counts
        from utils.engine.checkpoint import build_from_checkpoint, load_checkpoint
        from utils.engine.torch_utils import select_device

        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        model = build_from_checkpoint(load_checkpoint(weights)).to(self.device).eval()
        if fuse:
            before = module_counts(model)
            model.fuse()
            if verbose:
                print(f"fuse: {format_counts(before)} -> {format_counts(module_counts(model))}")
        self.fp16 = bool(half and self.device.type == "cuda")
        if self.fp16:
            model.half()
        self.info = ModelInfo.from_model(model)
        self.deploy = DeployModel(model)
        self.output_names = self.deploy.output_names
        self.fixed_batch: int | None = None
        self.fixed_hw: tuple[int, int] | None = None
        self.nms: dict | None = None
        self.name = f"PyTorch ({self.device}{', fp16' if self.fp16 else ''})"

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """``(B, 3, H, W)`` float RGB 0..1 -> named outputs as numpy (float32 / int64)."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
        x = x.to(self.device, torch.float16 if self.fp16 else torch.float32)
        with torch.inference_mode():
            outs = self.deploy(x)
        return {n: (o.float() if o.is_floating_point() else o).cpu().numpy() for n, o in zip(self.output_names, outs)}

    def caption_tokens(self, memory: np.ndarray, beam: int = 1) -> np.ndarray:
        head = self.deploy.caption_head
        mem = torch.from_numpy(memory).to(self.device, torch.float16 if self.fp16 else torch.float32)
        with torch.inference_mode():
            tokens = head.greedy(mem) if beam <= 1 else head.beam_search(mem, beam=beam)
        return tokens.cpu().numpy()


def ort_session(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
    """An onnxruntime session: CUDA when asked for and available, else CPU; ``threads`` defaults to torch's."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers etc. are noise here
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if str(device) != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=providers)


class OnnxBackend:
    """An exported ``.onnx`` vision graph (+ its caption decoder graph) behind the backend interface."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"weights not found: {weights}")
        try:
            self.session = ort_session(weights, device, threads)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{weights}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        md = read_onnx_metadata(self.session)
        if "tasks" not in md:
            raise ValueError(f"{weights}: no yolor-mt metadata (export it with export.py)")
        self.metadata = md
        self.info = ModelInfo.from_metadata(md)
        self.output_names = [o.name for o in self.session.get_outputs()]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fp16 = "float16" in inp.type
        dims = list(inp.shape)
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        self.fixed_hw = (dims[2], dims[3]) if all(isinstance(d, int) for d in dims[2:]) else None
        self.nms = md.get("nms") or None
        self.decoder = None
        if "cap" in self.info.tasks:
            dec = weights.with_name(md.get("cap_decoder", f"{weights.stem}_cap_decoder.onnx"))
            if not dec.is_file():
                raise FileNotFoundError(f"{weights}: its caption decoder graph {dec.name} is missing (export both with export.py)")
            self.decoder = ort_session(dec, device, threads)
            self.memory_fp16 = "float16" in self.decoder.get_inputs()[0].type
        self.name = f"ONNX Runtime ({self.session.get_providers()[0]})"

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """``(B, 3, H, W)`` float RGB 0..1 -> named outputs as numpy (float32 / int64)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = images.astype(np.float16 if self.fp16 else np.float32, copy=False)
        outs = self.session.run(self.output_names, {self.input_name: x})
        return {n: o.astype(np.float32) if o.dtype == np.float16 else o for n, o in zip(self.output_names, outs)}

    def decode_step(self, memory: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Next-token logits ``(B, V)`` from the decoder graph (``CaptionHead.decode_step``)."""
        mem = memory.astype(np.float16 if self.memory_fp16 else np.float32, copy=False)
        return self.decoder.run(["logits"], {"memory": mem, "tokens": tokens.astype(np.int64, copy=False)})[0]

    def caption_tokens(self, memory: np.ndarray, beam: int = 1) -> np.ndarray:
        if beam <= 1:
            return greedy_decode(self.decode_step, memory, self.info.cap_max_len)
        return beam_search_decode(self.decode_step, memory, beam, self.info.cap_max_len)


Backend = PyTorchBackend | OnnxBackend


def load_backend(weights: str | Path, device: str = "", half: bool = False) -> Backend:
    """``.pt`` -> :class:`PyTorchBackend`, ``.onnx`` -> :class:`OnnxBackend`."""
    suffix = Path(weights).suffix.lower()
    if suffix == ".pt":
        return PyTorchBackend(weights, device, half)
    if suffix == ".onnx":
        return OnnxBackend(weights, device)
    raise ValueError(f"--weights {weights}: unsupported format '{suffix}' (use a .pt checkpoint or an exported .onnx)")


# --------------------------------------------------------------------------------------------------
# pre- and post-processing
# --------------------------------------------------------------------------------------------------
def check_img_size(img: int | tuple[int, int] | list[int], stride: float) -> tuple[int, int]:
    """``(h, w)`` from ``img`` (one size = square, or ``[h, w]``), rounded up to multiples of ``stride`` so
    every pyramid level has whole cells."""
    if isinstance(img, int):
        hw = (img, img)
    else:
        img = [int(v) for v in img]
        hw = (img[0], img[0]) if len(img) == 1 else (img[0], img[1])
    s = int(stride)
    out = (int(np.ceil(hw[0] / s) * s), int(np.ceil(hw[1] / s) * s))
    if out != hw:
        print(f"note: image size {hw[0]}x{hw[1]} is not a multiple of the stride {s}; using {out[0]}x{out[1]}")
    return out


@dataclass
class Letterbox:
    """How a frame was mapped to the network input: ``x' = x * ratio + pad`` (see ``utils.data.augment``)."""

    ratio: float
    pad: tuple[float, float]
    orig_shape: tuple[int, int]
    input_shape: tuple[int, int]


def preprocess(frames: list[np.ndarray], img_hw: tuple[int, int]) -> tuple[np.ndarray, list[Letterbox]]:
    """BGR frames -> ``(B, 3, H, W)`` float32 RGB in 0..1, letterboxed exactly as the validation loader does."""
    batch, boxes = [], []
    for f in frames:
        s, ratio, pad = letterbox(Sample(image=f), tuple(img_hw))
        batch.append(s.image[..., ::-1].transpose(2, 0, 1))
        boxes.append(Letterbox(ratio, pad, tuple(f.shape[:2]), tuple(img_hw)))
    return np.ascontiguousarray(np.stack(batch)).astype(np.float32) / 255.0, boxes


@dataclass
class FrameResult:
    """Everything predicted for one frame, in the frame's own pixels.

    ``boxes`` ``(n, 4)`` xyxy, ``scores`` ``(n,)``, ``classes`` ``(n,)`` contiguous indices, ``masks`` ``(n, h, w)``
    bool or ``None``, ``semantic`` ``(h, w)`` uint8 semantic indices or ``None``, ``caption`` or ``None``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    orig_shape: tuple[int, int]
    masks: np.ndarray | None = None
    semantic: np.ndarray | None = None
    caption: str | None = None

    def __len__(self) -> int:
        return len(self.boxes)


def _nms_graph_detections(outputs: dict[str, np.ndarray], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``i`` of an in-graph NMS result as ``(n, 6)`` ``x1 y1 x2 y2 score class`` and anchor indices."""
    n = int(outputs["det_count"][i])
    det = torch.cat((torch.from_numpy(outputs["det_boxes"][i, :n]).float(),
                     torch.from_numpy(outputs["det_scores"][i, :n]).float()[:, None],
                     torch.from_numpy(outputs["det_classes"][i, :n]).float()[:, None]), 1)
    return det, torch.from_numpy(outputs["det_anchor_index"][i, :n]).long()


def semantic_to_original(logits: np.ndarray, lb: Letterbox) -> np.ndarray:
    """``(K, h, w)`` logits of one image -> ``(h0, w0)`` uint8 semantic indices of the original frame.

    Logits are upsampled bilinearly to the input size (as evaluation does), the argmax is taken there, the
    letterbox padding cropped off and the label map resized to the frame with nearest neighbour.
    """
    from models.heads.semantic import upsample_logits

    label = upsample_logits(torch.from_numpy(logits[None]).float(), lb.input_shape).argmax(1)[0]
    label = label.to(torch.uint8).numpy()
    h0, w0 = lb.orig_shape
    left, top = int(round(lb.pad[0])), int(round(lb.pad[1]))
    uw = min(max(1, int(round(w0 * lb.ratio))), label.shape[1] - left)
    uh = min(max(1, int(round(h0 * lb.ratio))), label.shape[0] - top)
    inner = label[top:top + uh, left:left + uw]
    return cv2.resize(inner, (w0, h0), interpolation=getattr(cv2, "INTER_NEAREST_EXACT", cv2.INTER_NEAREST))


def postprocess(outputs: dict[str, np.ndarray], info: ModelInfo, boxes: list[Letterbox], conf_thres: float = 0.25,
                iou_thres: float = 0.45, max_det: int = 300, classes: list[int] | None = None,
                agnostic: bool = False, tasks: list[str] | None = None,
                captions: list[str] | None = None) -> list[FrameResult]:
    """Backend outputs of a batch -> one :class:`FrameResult` per image, in original frame coordinates.

    Graphs with NMS inside: their (thresholded) detections are filtered further by ``conf_thres`` and
    ``classes``; raw ``det_pred``: :func:`utils.ops.nms.non_max_suppression` (single label per box).
    """
    tasks = info.tasks if tasks is None else tasks
    results = []
    dets, idx = [], []
    if "det" not in tasks and "inst" not in tasks:  # no detection results asked for (masks need the boxes)
        pass
    elif "det_pred" in outputs:
        dets, idx = non_max_suppression(torch.from_numpy(outputs["det_pred"]).float(), conf_thres, iou_thres,
                                        classes, agnostic, max_det, return_indices=True)
    elif "det_count" in outputs:
        for i in range(len(boxes)):
            d, k = _nms_graph_detections(outputs, i)
            keep = d[:, 4] > conf_thres
            if classes is not None:
                keep &= (d[:, 5:6] == torch.tensor(classes, dtype=d.dtype)).any(1)
            dets.append(d[keep][:max_det])
            idx.append(k[keep][:max_det])
    for i, lb in enumerate(boxes):
        r = FrameResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), lb.orig_shape)
        if dets:
            det = dets[i]
            if "inst" in tasks and "inst_coeffs" in outputs and len(det):
                masks = process_masks(torch.from_numpy(outputs["inst_protos"][i]).float(),
                                      torch.from_numpy(outputs["inst_coeffs"][i])[idx[i]], det[:, :4], lb.input_shape)
                r.masks = masks_to_original(masks, lb.ratio, lb.pad, lb.orig_shape).numpy()
            elif "inst" in tasks and "inst_coeffs" in outputs:
                r.masks = np.zeros((0, *lb.orig_shape), bool)
            r.boxes = scale_boxes(det[:, :4].clone(), lb.ratio, lb.pad, lb.orig_shape).numpy()
            r.scores = det[:, 4].numpy()
            r.classes = det[:, 5].long().numpy()
        if "sem" in tasks and "sem_logits" in outputs:
            r.semantic = semantic_to_original(outputs["sem_logits"][i], lb)
        if captions is not None:
            r.caption = captions[i]
        results.append(r)
    return results


def semantic_png(semantic: np.ndarray, semantic_ids: list[int]) -> np.ndarray:
    """Semantic indices -> COCO-Stuff PNG values: ``category_id - 1``, 255 where unlabeled / not representable."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for i, cid in enumerate(semantic_ids[:256]):
        if 0 <= cid - 1 < IGNORE_INDEX:
            lut[i] = cid - 1
    return lut[semantic]


class Predictor:
    """Frames in, :class:`FrameResult` out: preprocess, backend, captions and postprocess, with timings.

    ``tasks``: which heads' results to produce (default: every head of the model); instance masks need the
    detections, so they are computed whenever ``inst`` is asked for.
    """

    def __init__(self, backend: Backend, img_size: int | tuple[int, int] | list[int] = 640, conf_thres: float = 0.25,
                 iou_thres: float = 0.45, max_det: int = 300, classes: list[int] | None = None,
                 agnostic: bool = False, tasks: list[str] | None = None, beam: int = 1):
        self.backend, self.info = backend, backend.info
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.classes, self.agnostic, self.beam = classes, agnostic, beam
        self.tasks = list(tasks) if tasks else list(self.info.tasks)
        missing = [t for t in self.tasks if t not in self.info.tasks]
        if missing:
            raise ValueError(f"--tasks {','.join(missing)}: the model has no such head (it has {','.join(self.info.tasks)})")
        self.vocab = Vocabulary.from_list(self.info.vocab) if "cap" in self.tasks and self.info.vocab else None
        if "cap" in self.tasks and self.vocab is None:
            raise ValueError("the model has a caption head but no vocabulary in its metadata")
        if backend.fixed_hw is not None:
            hw = check_img_size(img_size, self.info.stride) if img_size else backend.fixed_hw
            if tuple(hw) != tuple(backend.fixed_hw):
                print(f"note: this ONNX model has a fixed input size {backend.fixed_hw[0]}x{backend.fixed_hw[1]}; "
                      f"using it instead of {hw[0]}x{hw[1]} (export with --dynamic for any size)")
            self.img_hw = tuple(backend.fixed_hw)
        else:
            self.img_hw = check_img_size(img_size or 640, self.info.stride)
        self.notes = self._nms_notes()

    def _nms_notes(self) -> list[str]:
        """Why results may differ from the CLI thresholds when NMS is baked into the graph."""
        nms = self.backend.nms
        if not nms:
            return []
        notes = []
        if self.conf_thres < nms["conf_thres"]:
            notes.append(f"--conf-thres {self.conf_thres} is below the exported {nms['conf_thres']}, which applies")
        if abs(self.iou_thres - nms["iou_thres"]) > 1e-9:
            notes.append(f"--iou-thres is fixed to the exported {nms['iou_thres']}")
        if self.agnostic != nms["agnostic"]:
            notes.append(f"--agnostic-nms is fixed to the exported {nms['agnostic']}")
        if self.max_det > nms["max_det"]:
            notes.append(f"--max-det is capped by the exported {nms['max_det']}")
        return notes

    def __call__(self, frames: list[np.ndarray]) -> tuple[list[FrameResult], dict[str, float]]:
        """Results for a batch of BGR frames and the ``pre`` / ``infer`` / ``post`` times in ms (whole batch)."""
        t0 = time.perf_counter()
        x, boxes = preprocess(frames, self.img_hw)
        t1 = time.perf_counter()
        outputs = self._run(x)
        captions = None
        if "cap" in self.tasks:
            tokens = self.backend.caption_tokens(outputs["cap_memory"], self.beam)
            captions = [self.vocab.decode(row) for row in tokens.tolist()]
        t2 = time.perf_counter()
        results = postprocess(outputs, self.info, boxes, self.conf_thres, self.iou_thres, self.max_det, self.classes,
                              self.agnostic, self.tasks, captions)
        t3 = time.perf_counter()
        return results, {"pre": 1e3 * (t1 - t0), "infer": 1e3 * (t2 - t1), "post": 1e3 * (t3 - t2)}

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Backend call; a graph exported for a fixed batch gets the batch padded (and the outputs cut)."""
        fb = self.backend.fixed_batch
        if fb is None or fb == len(x):
            return self.backend(x)
        outs: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(x), fb):
            chunk = x[s:s + fb]
            n = len(chunk)
            if n < fb:
                chunk = np.concatenate((chunk, np.zeros((fb - n, *chunk.shape[1:]), chunk.dtype)))
            for k, v in self.backend(chunk).items():
                outs.setdefault(k, []).append(v[:n])
        return {k: np.concatenate(v) for k, v in outs.items()}


# --------------------------------------------------------------------------------------------------
# result formats
# --------------------------------------------------------------------------------------------------
def coco_results(result: FrameResult, image_id: int | str, category_ids: list[int]) -> list[dict]:
    """COCO result dicts of one frame: original category ids, ``bbox`` ``x y w h`` in frame pixels, ``score``,
    and an RLE ``segmentation`` when the frame has instance masks."""
    from utils.ops.masks import encode_rle

    rles = encode_rle(result.masks) if result.masks is not None and len(result.masks) else [None] * len(result)
    out = []
    for (x1, y1, x2, y2), s, c, rle in zip(result.boxes.tolist(), result.scores.tolist(), result.classes.tolist(), rles):
        d = {"image_id": image_id, "category_id": int(category_ids[c]) if c < len(category_ids) else int(c),
             "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": round(float(s), 5)}
        if rle is not None:
            d["segmentation"] = rle
        out.append(d)
    return out


def yolo_lines(result: FrameResult, with_conf: bool = False) -> list[str]:
    """YOLO label lines ``class xc yc w h [conf]``, coordinates normalized by the frame size."""
    h, w = result.orig_shape
    lines = []
    for (x1, y1, x2, y2), s, c in zip(result.boxes.tolist(), result.scores.tolist(), result.classes.tolist()):
        line = f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
        lines.append(line + (f" {s:.6f}" if with_conf else ""))
    return lines


def summarize(result: FrameResult, names: list[str]) -> str:
    """``2 circles, 1 square`` (or ``no detections``) for the per-frame log line."""
    if not len(result):
        return "no detections"
    cls, n = np.unique(result.classes, return_counts=True)
    return ", ".join(f"{k} {names[c] if c < len(names) else c}{'s' * (k > 1)}" for c, k in zip(cls.tolist(), n.tolist()))
