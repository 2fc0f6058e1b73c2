"""Deployment graphs of a yolor-mt model (ONNX, TorchScript) and the parity checks every export runs.

Two graphs are written per model:

* the **vision graph** ``<stem>.onnx``: ``images (B, 3, H, W)`` float 0..1 RGB -> one named output per head
  output (:func:`output_names`), optionally with NMS inside the graph (:class:`BatchedNMS`);
* the **caption decoder** ``<stem>_cap_decoder.onnx`` (caption models only): ``memory (B, S, d)`` and
  ``tokens (B, T)`` int64 -> ``logits (B, V)`` of the next token, so the greedy / beam loops of
  :mod:`utils.deploy.caption_decode` can decode with onnxruntime alone.

OpenVINO (:func:`export_openvino`) converts those verified ONNX graphs into ``<stem>_openvino_model/``
(``.xml`` + ``.bin`` per graph, FP32 weights, and ``metadata.yaml`` with the ONNX metadata).

Why the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) and not the dynamo one: it
needs no extra dependency (``onnxscript``), our graphs are free of data-dependent Python control flow once
the caption head is split into encoder and decoder step (see :class:`CaptionEncoder`), and every export is
checked numerically against PyTorch (:func:`compare_outputs`), which the tests exercise for every head.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from models.heads.caption import CaptionHead
from models.model import Model
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset
from utils.data.vocab import Vocabulary
from utils.deploy.backends import GraphBackend, OnnxBackend, OpenVINOBackend
from utils.deploy.interface import (
    INPUT_NAME,
    INT_OUTPUTS,
    OPENVINO_METADATA,
    OPENVINO_SUFFIX,
    DeployModel,
)
from utils.ops.options import PredictOptions

# Parity tolerances on the normalized difference (see compare_outputs): fusing BN/implicit layers changes
# only float rounding, so it is held to 1e-4; another runtime (onnxruntime) may reorder sums, so 1e-3.
FUSE_TOL = 1e-4
RUNTIME_TOL = 1e-3


# --------------------------------------------------------------------------------------------------
# Graph wrappers
# --------------------------------------------------------------------------------------------------
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


def graph_nodes(path: str | Path) -> int:
    """Number of nodes of an ONNX graph's top level (what a smaller export, e.g. ``--tasks det,inst``, saves)."""
    import onnx

    return len(onnx.load(str(path)).graph.node)


def export_openvino(vision: str | Path, decoder: str | Path | None, metadata: dict[str, Any]) -> Path:
    """Converts the ONNX vision graph (and the caption decoder graph) with OpenVINO into the folder
    ``<stem>_openvino_model/`` next to it: ``<stem>.xml/.bin``, ``<stem>_cap_decoder.xml/.bin`` and
    ``metadata.yaml`` (``metadata`` plus the file names). Returns the folder.

    Weights stay FP32 (``compress_to_fp16=False``: ``save_model`` halves them by default, which would make
    the OpenVINO model differ from the verified ONNX one).
    """
    import openvino as ov  # optional dependency (requirements: export), imported only when converting

    vision = Path(vision)
    folder = vision.with_name(f"{vision.stem}{OPENVINO_SUFFIX}")
    if folder.is_dir():  # a re-export starts clean: no stale decoder of an earlier export stays beside it
        for old in folder.iterdir():
            if old.is_file() and (old.suffix in (".xml", ".bin") or old.name == OPENVINO_METADATA):
                old.unlink()
    folder.mkdir(exist_ok=True)
    md = dict(metadata) | {"format": "openvino", "model": f"{vision.stem}.xml", "openvino": ov.__version__}
    graphs = [vision]
    if decoder is not None:
        graphs.append(Path(decoder))
        md["cap_decoder"] = f"{Path(decoder).stem}.xml"
    try:
        for src in graphs:
            ov.save_model(ov.convert_model(str(src)), str(folder / f"{src.stem}.xml"), compress_to_fp16=False)
    except Exception as e:  # OpenVINO raises its own types for unsupported operators; one line with the cause
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"OpenVINO conversion of {src.name} failed: {type(e).__name__}: {msg}") from e
    (folder / OPENVINO_METADATA).write_text(yaml.safe_dump(md, sort_keys=False))
    return folder


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------
def verification_images(data_yaml: str | Path, img_hw: tuple[int, int], n: int) -> torch.Tensor:
    """``(n, 3, H, W)`` uint8 RGB: the first val images of ``data_yaml``, letterboxed as in validation.

    Real images rather than noise, so activations have realistic ranges (noise hides overflow or
    saturation differences). Fewer val images than ``n`` are repeated.
    """

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


# --------------------------------------------------------------------------------------------------
# One function per format: write it, verify it against PyTorch, record the findings in the job
# --------------------------------------------------------------------------------------------------
@dataclass
class ExportJob:
    """What every format of one export shares: the fused model, the PyTorch reference on the verification
    images, where the files go, and the findings each format adds (parity columns, caption lines, problems)."""

    model: Model  # fused, FP32: the reference
    deploy: DeployModel  # ``model`` behind the graph interface (with in-graph NMS when asked)
    x: torch.Tensor  # verification images, float 0..1
    ref: dict[str, np.ndarray]  # ``deploy``'s outputs on ``x``
    img_hw: tuple[int, int]
    metadata: dict[str, Any]
    out_dir: Path
    stem: str
    nms: PredictOptions | None = None
    opset: int = 17
    dynamic: bool = False
    half: bool = False
    # with ``dynamic``: another batch size and image shape through the same graph (images, reference, (h, w))
    second: tuple[torch.Tensor, dict[str, np.ndarray], tuple[int, int]] | None = None
    columns: dict[str, list[Diff]] = field(default_factory=dict)
    caption_lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def tol(self) -> float:
        """Parity tolerance of an exported graph: FP16 is held to 1e-2 against the FP32 reference."""
        return 1e-2 if self.half else RUNTIME_TOL

    @property
    def written_model(self) -> Model:
        """The model traced into files: an FP16 copy with ``half``."""
        return copy.deepcopy(self.model).half() if self.half else self.model

    @property
    def written(self) -> tuple[DeployModel, torch.Tensor]:
        """The graph module traced into files and its example input."""
        if self.half:
            return DeployModel(self.written_model, self.nms), self.x.half()
        return self.deploy, self.x


def verify_graph(backend: GraphBackend, model: Model, ref: dict[str, np.ndarray], x: torch.Tensor,
                 img_hw: tuple[int, int], label: str) -> tuple[list[Diff], str, list[str]]:
    """An exported backend on ``x`` vs the PyTorch outputs ``ref``; captions: its greedy decoding vs
    ``CaptionHead.greedy`` (``label`` names the runtime in the summary line).

    Returns (per-output diffs incl. the decoder's logits, a caption summary line, caption problems).
    """
    out = backend(x.cpu().numpy())
    diffs = compare_outputs(ref, out, img_hw)
    if "cap" not in model.tasks:
        return diffs, "", []
    head = model.head("cap")
    mem = torch.from_numpy(ref["cap_memory"]).to(x.device)
    with torch.inference_mode():
        torch_tokens = head.greedy(mem).cpu().numpy()
        logits_t = head.decode_step(mem, torch.from_numpy(torch_tokens).to(x.device)).float().cpu().numpy()
    logits_o = backend.decode_step(out["cap_memory"], torch_tokens)
    diffs += compare_outputs({"cap_decoder.logits": logits_t}, {"cap_decoder.logits": logits_o}, img_hw)
    got_tokens = backend.caption_tokens(out["cap_memory"])
    vocab = Vocabulary.from_list(model.meta["vocab"]) if model.meta.get("vocab") else None
    words_t = vocab.decode_batch(torch.from_numpy(torch_tokens)) if vocab else [str(r) for r in torch_tokens.tolist()]
    words_g = vocab.decode_batch(torch.from_numpy(got_tokens)) if vocab else [str(r) for r in got_tokens.tolist()]
    same = sum(a == b for a, b in zip(words_t, words_g))
    identical = torch_tokens.shape == got_tokens.shape and bool(np.array_equal(torch_tokens, got_tokens))
    msg = (f"captions: torch greedy == {label} greedy for {same}/{len(words_t)} image(s)"
           f"{' (token ids identical)' if identical else ''}; e.g. '{words_g[0]}'")
    return diffs, msg, ([] if same == len(words_t) else [f"captions differ: '{words_t[0]}' vs '{words_g[0]}'"])


def caption_problems(problems: list[str], half: bool) -> list[str]:
    """Caption mismatches fail an FP32 export; for FP16 they are a warning (half-precision logits can flip a
    near-tie argmax against the FP32 reference)."""
    if half and problems:
        print(f"warning: FP16 graph: {problems[0]}")
        return []
    return problems


def verify_backend(job: ExportJob, backend: GraphBackend, label: str, column: str) -> list[str]:
    """Parity of one exported backend (and, with ``job.second``, at the second shape); adds its table column and
    caption line to ``job``; returns what failed."""
    diffs, msg, cap_problem = verify_graph(backend, job.model, job.ref, job.x, job.img_hw, label)
    job.columns[column] = diffs
    job.caption_lines.append(msg)
    bad = failures(diffs, job.tol) + caption_problems(cap_problem, job.half)
    if job.second is not None:
        x2, ref2, hw2 = job.second
        d2, _, cap2 = verify_graph(backend, job.model, ref2, x2, hw2, label)
        bad += [f"at {tuple(x2.shape)}: {b}" for b in failures(d2, job.tol) + caption_problems(cap2, job.half)]
        print(f"dynamic: also checked at {tuple(x2.shape)} ({label}): max normalized diff "
              f"{max(d.normalized for d in d2):.2e}")
    return bad


def simplify_verified(job: ExportJob) -> list[str]:
    """onnxslim every written ONNX graph into a temporary folder, verify, and move over the originals if parity
    holds. Returns the problems (empty = the simplified graphs were kept)."""
    files = job.files
    with tempfile.TemporaryDirectory(dir=files["onnx"].parent) as tmp:
        slim = {}
        try:
            for k in ("onnx", "cap_decoder"):
                if k in files:
                    slim[k] = simplify_onnx(files[k], Path(tmp) / files[k].name)
            diffs, _, cap_problem = verify_graph(OnnxBackend(slim["onnx"], job.x.device), job.model, job.ref, job.x,
                                                 job.img_hw, "ORT")
        except Exception as e:  # onnxslim or onnxruntime failing on the simplified graph: keep the original
            return [f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"]
        bad = failures(diffs, job.tol) + caption_problems(cap_problem, job.half)
        if bad:
            return bad
        for k, p in slim.items():
            shutil.move(str(p), str(files[k]))
    print(f"simplified with onnxslim: {', '.join(f'{files[k].name} ({files[k].stat().st_size / 1e6:.1f} MB)' for k in slim)}"
          f", parity max normalized diff {max(d.normalized for d in diffs):.2e}")
    return []


def write_onnx(job: ExportJob, simplify: bool = False) -> bool:
    """``<stem>.onnx`` (+ ``<stem>_cap_decoder.onnx``), verified with onnxruntime, simplified when asked (kept
    only if parity holds). Returns whether the graphs passed (OpenVINO converts only verified graphs)."""
    t0 = time.time()
    deploy, x = job.written
    job.files["onnx"] = export_vision(deploy, x, job.out_dir / f"{job.stem}.onnx", job.opset, job.dynamic,
                                      job.metadata)
    if "cap" in job.model.tasks:
        memory = torch.from_numpy(job.ref["cap_memory"]).to(x.device, x.dtype)
        job.files["cap_decoder"] = export_caption_decoder(deploy.caption_head, memory,
                                                          job.out_dir / f"{job.stem}_cap_decoder.onnx", job.opset,
                                                          job.metadata)
    print(f"ONNX: {', '.join(f'{p.name} ({p.stat().st_size / 1e6:.1f} MB)' for p in job.files.values())} "
          f"in {time.time() - t0:.1f}s, opset {job.opset}, tasks {','.join(job.model.tasks)}, "
          f"{graph_nodes(job.files['onnx'])} nodes, outputs {', '.join(job.deploy.output_names)}")
    bad = verify_backend(job, OnnxBackend(job.files["onnx"], job.x.device), "ORT", "onnxruntime-torch")
    if simplify:
        bad_slim = simplify_verified(job) if not bad else ["skipped"]
        if bad_slim:
            print(f"warning: --simplify: keeping the unsimplified model ({'; '.join(bad_slim)})")
    if bad:
        job.problems.append(f"onnxruntime vs PyTorch: {', '.join(bad)}")
    return not bad


def write_openvino(job: ExportJob) -> None:
    """``<stem>_openvino_model/`` converted from the verified ONNX graphs, verified on OpenVINO's CPU plugin (f32
    inference precision, its default)."""
    t0 = time.time()
    job.files["openvino"] = export_openvino(job.files["onnx"], job.files.get("cap_decoder"), job.metadata)
    backend = OpenVINOBackend(job.files["openvino"], job.x.device)
    size = sum(f.stat().st_size for f in job.files["openvino"].iterdir()) / 1e6
    print(f"OpenVINO: {job.files['openvino'].name}/ ({size:.1f} MB) in {time.time() - t0:.1f}s, {backend.name}")
    bad = verify_backend(job, backend, "OpenVINO", "openvino-torch")
    if bad:
        job.problems.append(f"OpenVINO vs PyTorch: {', '.join(bad)}")


def write_torchscript(job: ExportJob) -> None:
    """``<stem>.torchscript`` without NMS (a Python autograd op cannot be serialized by TorchScript), verified
    against PyTorch; its column joins the parity table unless the other graphs carry NMS (other outputs)."""
    ts_deploy = DeployModel(job.written_model)
    x = job.x.half() if job.half else job.x
    nms = job.nms is not None
    if nms:
        print("note: the TorchScript file returns det_pred (NMS in the graph is ONNX only)")
    names = ts_deploy.output_names
    t0 = time.time()
    path = export_torchscript(ts_deploy, x, job.out_dir / f"{job.stem}.torchscript", job.metadata | {
        "nms": False, "outputs": names})
    job.files["torchscript"] = path
    loaded, _ = load_torchscript(path, job.x.device)
    ref = run_deploy(DeployModel(job.model), names, job.x) if nms else job.ref
    diffs = compare_outputs(ref, run_deploy(loaded, names, x), job.img_hw)
    print(f"TorchScript: {path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    if nms:
        print(format_parity({"torchscript-torch": diffs}, {"torchscript-torch": job.tol}))
    else:
        job.columns["torchscript-torch"] = diffs
    bad = failures(diffs, job.tol)
    if bad:
        job.problems.append(f"TorchScript vs PyTorch: {', '.join(bad)}")


def report(job: ExportJob) -> None:
    """Prints the parity table and caption lines; raises ValueError naming every problem (files kept)."""
    tolerances = {k: FUSE_TOL if k == "fused-unfused" else job.tol for k in job.columns}
    print(format_parity(job.columns, tolerances))
    for msg in job.caption_lines:
        if msg:
            print(msg)
    if job.problems:
        kept = f" (files kept for inspection: {', '.join(p.name for p in job.files.values())})" if job.files else ""
        raise ValueError("verification failed: " + "; ".join(job.problems) + kept)
