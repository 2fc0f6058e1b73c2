"""Backends behind one interface for detect.py, export.py's checks and the benchmarks: a ``.pt`` checkpoint or an
exported ``.onnx`` maps a float batch ``(B, 3, H, W)`` (RGB, 0..1) to a dict of numpy arrays named as the vision
graph's outputs (:func:`utils.deploy.interface.output_names`), and decodes captions from ``cap_memory``.

Captions: :class:`PyTorchBackend` decodes with the head's own ``greedy`` / ``beam_search``; :class:`OnnxBackend`
runs the decoder-step graph inside :mod:`utils.deploy.caption_decode`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.model import format_counts, module_counts
from utils.deploy.caption_decode import beam_search_decode, greedy_decode
from utils.deploy.interface import DeployModel, ModelInfo, read_onnx_metadata
from utils.engine.checkpoint import build_from_checkpoint, load_checkpoint
from utils.engine.torch_utils import select_device


class PyTorchBackend:
    """A ``.pt`` checkpoint (EMA weights), fused, behind the backend interface."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", half: bool = False,
                 fuse: bool = True, verbose: bool = False):
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
    import onnxruntime as ort  # optional dependency (requirements: export), imported only when a graph runs

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
