"""export.py --include openvino: the folder layout and metadata, OpenVINO (CPU, f32) vs PyTorch parity,
detect.py on the folder giving the ONNX graph's results, and the Python API giving the .pt model's.

Run in a process of their own by ``tests/test_openvino.py`` (not collected with the rest of the suite): once
OpenVINO's runtime is loaded, the pytest process that also forks DataLoader workers and spawns gloo ranks
later died with a segfault (twice, at different tests), so OpenVINO never loads in the suite's process.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export as export_script
from tests.test_api import OPTS, _same_boxes
from tests.test_detect import CONF, assets, run_detect  # noqa: F401 (assets: a fixture)
from tests.test_export import ALL_OUTPUTS, IMG, copy_weights, fused, run_export, weights  # noqa: F401 (fixtures)
from utils.deploy.api import YOLOR
from utils.deploy.backends import OnnxBackend, OpenVINOBackend, load_backend
from utils.deploy.caption_decode import beam_search_decode
from utils.deploy.export import (
    RUNTIME_TOL,
    compare_outputs,
    run_deploy,
    verification_images,
)
from utils.deploy.interface import DeployModel

ov = pytest.importorskip("openvino")  # optional export dependency: the rest of the suite runs without it


@pytest.fixture(scope="module")
def ov_export(weights, tmp_path_factory) -> tuple[Path, str]:
    """A dynamic OpenVINO export (``--include openvino`` alone: the ONNX it converts is written too)."""
    w = copy_weights(weights, tmp_path_factory.mktemp("openvino"))
    rc, out = run_export(["--weights", str(w), "--img", str(IMG), "--dynamic", "--include", "openvino"])
    assert rc == 0, out
    return w, out


def test_folder_layout_and_metadata(ov_export, fused):
    w, out = ov_export
    folder = w.with_name(f"{w.stem}_openvino_model")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{w.stem}.xml", f"{w.stem}.bin", f"{w.stem}_cap_decoder.xml", f"{w.stem}_cap_decoder.bin", "metadata.yaml"])
    md = yaml.safe_load((folder / "metadata.yaml").read_text())
    onnx_md = OnnxBackend(w.with_suffix(".onnx")).metadata
    for key in ("names", "category_ids", "semantic_ids", "stride", "img_size", "tasks", "vocab", "nms", "outputs"):
        assert md[key] == onnx_md[key], key
    assert md["cap_decoder"] == f"{w.stem}_cap_decoder.xml" and md["model"] == f"{w.stem}.xml"
    backend = OpenVINOBackend(folder)
    assert backend.output_names == ALL_OUTPUTS and backend.fixed_hw is None  # --dynamic
    assert backend.info.tasks == ["det", "inst", "sem", "cap"] and "f32" in backend.name
    # pinned: OpenVINO's CPU plugin would otherwise pick bf16 where the CPU has it (this test machine's does)
    assert backend.model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert isinstance(load_backend(folder), OpenVINOBackend)
    assert isinstance(load_backend(folder / f"{w.stem}.xml"), OpenVINOBackend)
    # FP32 weights in the .bin (save_model would halve them by default): as large as the ONNX initializers
    assert (folder / f"{w.stem}.bin").stat().st_size > 0.9 * w.with_suffix(".onnx").stat().st_size
    model, _ = fused
    assert backend.info.vocab == model.meta["vocab"]


def test_export_prints_openvino_parity(ov_export):
    out = ov_export[1]
    assert re.search(r"OpenVINO: \S+_openvino_model/ .*OpenVINO 20\d\d\.\d+\.\d+ \(CPU, f32\)", out)
    assert re.search(r"openvino-torch", out) and "captions: torch greedy == OpenVINO greedy for 1/1 image(s)" in out
    assert "dynamic: also checked at (2, 3, 96, 64) (OpenVINO)" in out
    assert "_openvino_model --source" in out and "export success" in out


def test_openvino_parity_and_captions(ov_export, fused):
    """Another size and batch than the export's, every output within the runtime tolerance; captions (greedy
    and beam) token for token as PyTorch's."""
    w, _ = ov_export
    model, data = fused
    hw = (IMG + 32, IMG)
    x = verification_images(data, hw, 3).float() / 255.0
    deploy = DeployModel(model)
    ref = run_deploy(deploy, deploy.output_names, x)
    backend = OpenVINOBackend(w.with_name(f"{w.stem}_openvino_model"))
    out = backend(x.numpy())
    diffs = compare_outputs(ref, out, hw)
    assert [d.name for d in diffs] == ALL_OUTPUTS and all(d.normalized <= RUNTIME_TOL for d in diffs), diffs
    assert max(d.max_abs for d in diffs) > 0  # really another runtime, not the PyTorch outputs handed back
    head = model.head("cap")
    mem = torch.from_numpy(ref["cap_memory"])
    with torch.inference_mode():
        want, want_beam = head.greedy(mem).numpy(), head.beam_search(mem, beam=3).numpy()
    got = backend.caption_tokens(out["cap_memory"])
    assert got.shape == want.shape and (got == want).all()
    assert (beam_search_decode(backend.decode_step, out["cap_memory"], 3, backend.info.cap_max_len) == want_beam).all()


def test_detect_on_openvino_folder_matches_onnx(ov_export, tiny_data, tmp_path):
    w, _ = ov_export
    images = tiny_data.parent / "images/val2017"
    got = {}
    for fmt, model_path in (("onnx", w.with_suffix(".onnx")), ("openvino", w.with_name(f"{w.stem}_openvino_model"))):
        rc, out, save = run_detect(["--weights", str(model_path), "--source", str(images), "--conf-thres", CONF,
                                    "--save-json", "--nosave", "--name", fmt], tmp_path)
        assert rc == 0, out
        preds = json.loads((save / "predictions.json").read_text())
        got[fmt] = (sorted(preds, key=lambda d: (str(d["image_id"]), -d["score"])),
                    json.loads((save / "captions.json").read_text()), out)
    (ox, ox_caps, _), (ov, ov_caps, ov_out) = got["onnx"], got["openvino"]
    assert "OpenVINO" in ov_out
    assert len(ox) == len(ov) > 0
    for a, b in zip(ox, ov):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 0.1 and abs(a["score"] - b["score"]) <= 1e-4
    assert ox_caps == ov_caps and len(ov_caps) == len(list(images.glob("*.jpg")))


def test_openvino_errors_are_one_line(weights, tmp_path, capsys):
    assert export_script.main(["--weights", str(weights), "--include", "openvino", "--half", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --half with --include openvino")
    empty = tmp_path / "empty_openvino_model"
    empty.mkdir()
    with pytest.raises(ValueError, match="no metadata.yaml"):
        load_backend(empty)


def test_api_gives_the_pt_models_boxes_from_its_openvino_export(assets):  # noqa: F811
    """YOLOR on an OpenVINO folder: an image, a folder and a video give the .pt model's boxes and captions."""
    w = Path(shutil.copytree(assets["pt"].parent, assets["root"] / "ov_weights")) / assets["pt"].name
    rc, out = run_export(["--weights", str(w), "--img", str(IMG), "--dynamic", "--include", "openvino"])
    assert rc == 0, out
    pt, ov_model = YOLOR(assets["pt"], device="cpu"), YOLOR(w.with_name(f"{w.stem}_openvino_model"), device="cpu")
    image = str(min(assets["images"].iterdir()))
    compared = 0
    for source in (image, assets["images"], assets["video"]):
        a, b = pt(source, **OPTS), ov_model(source, **OPTS)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            _same_boxes(ra, rb)
            assert ra.caption == rb.caption and ra.caption is not None
            compared += len(ra)
    assert compared > 0 and "OpenVINO" in ov_model.backend.name
