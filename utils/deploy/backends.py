"""Backends behind one interface for detect.py, export.py's checks and the benchmarks: a ``.pt`` checkpoint, an
exported ``.onnx`` or an OpenVINO folder ``<stem>_openvino_model/`` maps a float batch ``(B, 3, H, W)`` (RGB, 0..1)
to a dict of numpy arrays named as the vision graph's outputs (:func:`utils.deploy.interface.output_names`), and
decodes captions from ``cap_memory``.

Captions: :class:`PyTorchBackend` decodes with the head's own ``greedy`` / ``beam_search``; the graph backends
(:class:`OnnxBackend`, :class:`OpenVINOBackend`) run the decoder-step graph inside
:mod:`utils.deploy.caption_decode`.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models.model import format_counts, module_counts
from utils.deploy.caption_decode import beam_search_decode, greedy_decode
from utils.deploy.interface import (
    OPENVINO_METADATA,
    DeployModel,
    ModelInfo,
    read_onnx_metadata,
)
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint
from utils.runtime.device import select_device


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


def ort_session(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None,
                profile: str | Path | None = None):
    """An onnxruntime session: CUDA when asked for and available, else CPU; ``threads`` defaults to torch's.
    ``profile``: a file prefix, and the session records onnxruntime's profile (``end_profiling()`` writes it)."""
    import onnxruntime as ort  # optional dependency (requirements: export), imported only when a graph runs

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers etc. are noise here
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile)
    providers = ["CPUExecutionProvider"]
    if str(device) != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=providers)


class GraphBackend:
    """What the exported-graph backends share: the interface read from the graph's metadata and input, the
    outputs as float32 / int64 numpy, and caption decoding through the decoder-step graph. Subclasses set the
    runtime up, then call :meth:`_set_interface`, and implement :meth:`_run` and :meth:`decode_step`."""

    output_names: list[str]
    name: str

    def _set_interface(self, source: Path, md: dict, dims: list[int | None], fp16: bool) -> None:
        """``md``: the export metadata; ``dims``: the input shape (``None`` for a dynamic axis)."""
        if "tasks" not in md:
            raise ValueError(f"{source}: no yolor-mt metadata (export it with export.py)")
        self.metadata = md
        self.info = ModelInfo.from_metadata(md)
        self.fp16 = fp16
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        self.fixed_hw = (dims[2], dims[3]) if all(isinstance(d, int) for d in dims[2:]) else None
        self.nms = md.get("nms") or None

    def _decoder_file(self, model: Path, name: str) -> Path | None:
        """The caption decoder graph ``name`` beside ``model`` (``None`` without a caption head); a missing one
        is an error (a caption model is exported as two graphs)."""
        if "cap" not in self.info.tasks:
            return None
        dec = model.with_name(name)
        if not dec.is_file():
            raise FileNotFoundError(f"{model}: its caption decoder graph {dec.name} is missing (export both with export.py)")
        return dec

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """``(B, 3, H, W)`` float RGB 0..1 -> named outputs as numpy (float32 / int64)."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        outs = self._run(images.astype(np.float16 if self.fp16 else np.float32, copy=False))
        return {n: _canonical(o) for n, o in zip(self.output_names, outs)}

    def decode_step(self, memory: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Next-token logits ``(B, V)`` from the decoder graph (``CaptionHead.decode_step``)."""
        raise NotImplementedError

    def caption_tokens(self, memory: np.ndarray, beam: int = 1) -> np.ndarray:
        if beam <= 1:
            return greedy_decode(self.decode_step, memory, self.info.cap_max_len)
        return beam_search_decode(self.decode_step, memory, beam, self.info.cap_max_len)


def _load(load: Callable[[], Any], path: Path, kind: str, errors: tuple[type[Exception], ...]) -> Any:
    """``load()``, its runtime's own exception types (``errors``) turned into one line naming the file."""
    try:
        return load()
    except errors as e:
        raise ValueError(f"{path}: not a loadable {kind} model ({str(e).strip().splitlines()[0][:200]})") from None


def _canonical(o: np.ndarray) -> np.ndarray:
    """float32 for floats, int64 for integers: the dtypes post-processing expects from every backend (an FP16
    graph returns float16; OpenVINO may return its integer outputs as int32)."""
    if np.issubdtype(o.dtype, np.floating):
        return o.astype(np.float32, copy=False)
    return o.astype(np.int64, copy=False)


class OnnxBackend(GraphBackend):
    """An exported ``.onnx`` vision graph (+ its caption decoder graph) behind the backend interface."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"weights not found: {weights}")
        # onnxruntime raises its own exception types for unreadable files
        self.session = _load(lambda: ort_session(weights, device, threads), weights, "ONNX", (Exception,))
        md = read_onnx_metadata(self.session)
        inp = self.session.get_inputs()[0]
        self._set_interface(weights, md, list(inp.shape), "float16" in inp.type)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_name = inp.name
        dec = self._decoder_file(weights, md.get("cap_decoder", f"{weights.stem}_cap_decoder.onnx"))
        self.decoder = None if dec is None else ort_session(dec, device, threads)
        self.memory_fp16 = dec is not None and "float16" in self.decoder.get_inputs()[0].type
        self.name = f"ONNX Runtime ({self.session.get_providers()[0]})"

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: x})

    def decode_step(self, memory: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        mem = memory.astype(np.float16 if self.memory_fp16 else np.float32, copy=False)
        return self.decoder.run(["logits"], {"memory": mem, "tokens": tokens.astype(np.int64, copy=False)})[0]


def openvino_model(path: str | Path, threads: int | None = None, precision: str = "f32"):
    """An OpenVINO ``.xml`` compiled for the CPU; ``threads`` defaults to torch's.

    ``precision`` is the CPU plugin's inference precision hint: left alone, OpenVINO runs bf16 (or f16) inside
    on CPUs that have it (AMX / AVX512-BF16), which would not meet the FP32 parity tolerance; ``f32`` pins it.
    """
    try:
        import openvino as ov  # optional dependency (requirements: export), imported only when a model runs
    except ImportError:
        raise ValueError(f"{path}: an OpenVINO model needs the openvino package (pip install openvino)") from None

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OpenVINOBackend(GraphBackend):
    """An OpenVINO export folder ``<stem>_openvino_model/`` (or its vision ``.xml``) behind the backend interface:
    the vision model, the caption decoder model and ``metadata.yaml``, run by OpenVINO's CPU plugin.

    ``precision``: see :func:`openvino_model` (``f32`` by default, as export.py verifies it).
    """

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", threads: int | None = None,
                 precision: str = "f32"):
        path = Path(weights)
        folder = path.parent if path.suffix.lower() == ".xml" else path
        md_file = folder / OPENVINO_METADATA
        if not path.exists():
            raise FileNotFoundError(f"weights not found: {path}")
        if not md_file.is_file():
            raise ValueError(f"{folder}: no {OPENVINO_METADATA} (export the OpenVINO model with export.py --include openvino)")
        md = yaml.safe_load(md_file.read_text()) or {}
        xml = path if path.suffix.lower() == ".xml" else folder / md.get("model", f"{folder.name}.xml")
        if not xml.is_file():
            raise FileNotFoundError(f"{folder}: its model {xml.name} is missing")
        # OpenVINO reports unreadable or truncated IR files as RuntimeError
        self.model = _load(lambda: openvino_model(xml, threads, precision), xml, "OpenVINO", (RuntimeError,))
        inp = self.model.input(0)
        dims = [d.get_length() if d.is_static else None for d in inp.get_partial_shape()]
        self._set_interface(folder, md, dims, inp.get_element_type().get_type_name() == "f16")
        self.output_names = [o.get_any_name() for o in self.model.outputs]
        dec = self._decoder_file(xml, md.get("cap_decoder", ""))
        self.decoder = None if dec is None else openvino_model(dec, threads, precision)
        if str(device) not in ("", "cpu"):
            print(f"note: OpenVINO runs on the CPU here (--device {device} is a CUDA device)")
        self.name = f"OpenVINO {importlib.metadata.version('openvino')} (CPU, {precision})"

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        res = self.model([x])
        return [res[o] for o in self.model.outputs]

    def decode_step(self, memory: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        res = self.decoder({"memory": memory.astype(np.float32, copy=False), "tokens": tokens.astype(np.int64, copy=False)})
        return res[self.decoder.output(0)]


Backend = PyTorchBackend | OnnxBackend | OpenVINOBackend


def load_backend(weights: str | Path, device: str = "", half: bool = False) -> Backend:
    """``.pt`` -> :class:`PyTorchBackend`, ``.onnx`` -> :class:`OnnxBackend`, a folder (``<stem>_openvino_model/``)
    or ``.xml`` -> :class:`OpenVINOBackend`."""
    path = Path(weights)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return PyTorchBackend(weights, device, half)
    if suffix == ".onnx":
        return OnnxBackend(weights, device)
    if suffix == ".xml" or path.is_dir():
        return OpenVINOBackend(weights, device)
    raise ValueError(f"--weights {weights}: unsupported format '{suffix}' (use a .pt checkpoint, an exported .onnx "
                     f"or an OpenVINO folder <stem>_openvino_model/)")
