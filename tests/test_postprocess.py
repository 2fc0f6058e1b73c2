"""One post-processing path: evaluation, detect.py's Predictor and the validation pictures all go through
``utils.ops.postprocess.postprocess`` and, for the same image and weights, produce the same Results."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils.deploy.predictor as predictor_mod
import utils.eval.evaluate as evaluate_mod
import utils.viz.plots as plots_mod
from models.model import Model
from tests.conftest import tiny_cfg
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.deploy.interface import DeployModel, ModelInfo
from utils.deploy.predictor import Predictor
from utils.eval.evaluate import EvalSettings, LabelSpace
from utils.ops.letterbox import Letterbox
from utils.ops.options import PredictOptions
from utils.ops.postprocess import postprocess
from utils.tasks import IGNORE_INDEX

IMG = 64
CONF = 0.001  # low enough that an untrained model keeps boxes to compare


class EagerBackend:
    """The backend interface over an unfused model, so Predictor and evaluation run the very same weights."""

    fixed_batch = None
    fixed_hw = None
    nms = None

    def __init__(self, model: Model):
        self.info = ModelInfo.from_model(model)
        self.deploy = DeployModel(model)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = self.deploy(torch.from_numpy(images))
        return {n: o.numpy() for n, o in zip(self.deploy.output_names, outs)}


def spy(monkeypatch, module) -> list:
    """Replaces ``module.postprocess`` by a recording wrapper; returns the list of Results lists it produced."""
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(postprocess(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, "postprocess", wrapped)
    return calls


@pytest.fixture(scope="module")
def setup(tiny_data):
    data = load_data_config(tiny_data)
    torch.manual_seed(0)
    model = Model(tiny_cfg(), nc=data.nc, tasks=["det", "inst", "sem"],
                  head_kwargs={"sem": {"num_classes": len(data.semantic_ids)}}).eval()
    ds = CocoDataset(data, data.val, IMG)
    return data, model, ds


def test_evaluation_predictor_and_plots_share_postprocess(setup, monkeypatch):
    data, model, ds = setup
    loader = create_dataloader(ds, 8, False, 0)
    batch = next(iter(loader))
    ev_calls, pr_calls, pl_calls = (spy(monkeypatch, m) for m in (evaluate_mod, predictor_mod, plots_mod))

    evaluate_mod.evaluate(model, loader, ds, LabelSpace(data.category_ids, len(data.semantic_ids)),
                          torch.device("cpu"), settings=EvalSettings(progress=False))
    options = PredictOptions(conf_thres=CONF, max_det=100)
    preds = plots_mod.predict_batch(model, batch, options=options)
    predictor = Predictor(EagerBackend(model), IMG, options)
    frames = [cv2.imread(p) for p in batch.paths]
    detected, _ = predictor(frames)
    assert ev_calls and len(pr_calls) == 1 and len(pl_calls) == 1

    evaluated = ev_calls[0]
    assert any(len(r) for r in detected), "an untrained model at conf 0.001 should keep boxes"
    for b, (ev, det, pic) in enumerate(zip(evaluated, detected, preds.results)):
        lb = batch.letterboxes[b]
        assert det.letterbox == lb and ev.letterbox == lb  # one Letterbox record from loader and preprocessing
        # semantic: evaluation's protocol (bilinear logits, crop, bilinear to original, argmax) in detect too
        assert ev.semantic is not None and np.array_equal(ev.semantic, det.semantic)
        # the pictures' map is the same network map in input pixels, the padding left uncoloured
        valid = np.zeros(pic.semantic.shape, bool)
        valid[lb.inner()] = True
        assert (pic.semantic[~valid] == IGNORE_INDEX).all()
        # boxes and masks: same NMS settings in the pictures and detect.py; mapped back they are the same
        assert np.array_equal(det.scores, pic.scores) and np.array_equal(det.classes, pic.classes)
        back = lb.boxes_to_original(torch.from_numpy(pic.boxes)).numpy()
        assert np.array_equal(det.boxes, back)
        assert np.array_equal(det.masks, lb.masks_to_original(torch.from_numpy(pic.masks)).numpy())
        assert det.shape == lb.orig_shape and pic.shape == lb.input_shape


def test_letterbox_identity_and_inner():
    lb = Letterbox(0.5, (0.0, 2.0), (8, 16), (8, 8))
    assert lb.inner() == (slice(2, 6), slice(0, 8))
    ident = Letterbox.identity((8, 8))
    assert ident.inner() == (slice(0, 8), slice(0, 8))
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(ident.boxes_to_original(boxes), boxes)


def test_evaluators_report_their_fitness_terms(setup):
    from utils.eval.evaluate import build_evaluators, image_splits
    from utils.tasks import FITNESS_TERMS

    data, model, ds = setup
    evaluators = build_evaluators(model, ds, image_splits(ds), data.category_ids, None, len(data.semantic_ids),
                                  "original")
    assert [e.task for e in evaluators] == ["det", "inst", "sem"]
    loader = create_dataloader(ds, 8, False, 0)
    out = evaluate_mod.evaluate(model, loader, ds, LabelSpace(data.category_ids, len(data.semantic_ids)),
                                torch.device("cpu"), settings=EvalSettings(progress=False))
    for e in evaluators:
        assert set(FITNESS_TERMS[e.task]) <= set(out.metrics), e.task


def test_semantic_labels_in_class_chunks_equal_one_full_resize():
    """The chunked running argmax (bounded memory on big frames) gives the labels of resizing all K planes at
    once, ties included (integer logits tie often: the first class wins, as argmax)."""
    g = torch.Generator().manual_seed(0)
    lb = Letterbox(ratio=64 / 100, pad=(0.0, 12.0), orig_shape=(63, 100), input_shape=(64, 64))
    for k, logits in ((40, torch.randn(40, 64, 64, generator=g)),
                      (37, torch.randint(0, 3, (37, 64, 64), generator=g).float())):
        rows, cols = lb.inner(logits.shape)
        full = F.interpolate(logits[None, :, rows, cols], size=(63, 100), mode="bilinear", align_corners=False)[0]
        for chunk in (1, 16, k):
            assert torch.equal(lb.labels_to_original(logits, chunk=chunk), full.argmax(0)), (k, chunk)
