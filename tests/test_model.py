"""The cfg parser, the Model's named outputs, and exact fusing of BatchNorm and every implicit layer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.gelan import RepConvN
from models.implicit import Implicit
from models.model import Model, module_counts
from models.parser import CfgError
from tests.conftest import HEAD_KW, randomize_bn_and_implicits, tiny_cfg


def test_nano_scale_resolves_from_filename():
    n = Model("cfg/yolor-mt-n.yaml", nc=3, tasks=["det"])
    full = Model("cfg/yolor-mt-l.yaml", nc=3, tasks=["det"])
    pn = sum(p.numel() for p in n.parameters())
    pf = sum(p.numel() for p in full.parameters())
    assert pn < pf / 10
    assert n.stride == 32 and n.tasks == ["det"]


def test_forward_outputs_named_structure(cfg_dict):
    model = Model(cfg_dict, nc=4, head_kwargs=HEAD_KW).eval()
    assert model.tasks == ["det", "inst", "sem", "cap"]
    out = model(torch.rand(2, 3, 96, 128))
    assert [f.shape[-2:] for f in out.det.feats] == [(12, 16), (6, 8), (3, 4)]
    a = 12 * 16 + 6 * 8 + 3 * 4
    assert out.det.pred.shape == (2, a, 4 + 4)
    assert out.det.pred[..., 4:].min() >= 0 and out.det.pred[..., 4:].max() <= 1
    assert out.inst.coeffs.shape[:2] == (2, a) and out.inst.protos.shape[-2:] == (24, 32)
    assert out.sem.logits.shape == (2, 6, 12, 16) and out.sem.stride == 8  # the cfg: SemanticHead [64, 8]
    assert out.cap.tokens.shape[0] == 2 and out.cap.tokens.shape[1] <= 12
    model.train()
    assert model(torch.rand(1, 3, 64, 64)).det.pred is None


def _all_outputs(model: Model, x: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x, captions=tokens)
    res = {"det_feats": torch.cat([f.flatten() for f in out.det.feats]), "det_pred_scores": out.det.pred[..., 4:],
           "sem": out.sem.logits, "cap_memory": out.cap.memory, "cap_logits": out.cap.logits}
    if out.inst is not None:
        res |= {"inst_coeffs": out.inst.coeffs, "inst_protos": out.inst.protos}
    return res


@pytest.mark.parametrize("form, det_head, base", [
    ("vector", "Detect", "yolor-mt.yaml"), ("nn", "Detect", "yolor-mt.yaml"), ("mf", "Detect", "yolor-mt.yaml"),
    ("vector", "DetectAnchor", "yolor-mt.yaml"), ("nn", "DetectAnchor", "yolor-mt.yaml"),
    ("mf", "DetectAnchor", "yolor-mt.yaml"), ("vector", "Detect", "yolor-mt-bcsp.yaml"),
    ("mf", "Detect", "yolor-mt-bcsp.yaml"), ("vector", "Detect", "yolor-mt-csp.yaml"),
    ("vector", "Detect", "yolor-mt-c2f.yaml"), ("mf", "Detect", "yolor-mt-c2f.yaml")])
def test_fuse_is_exact_and_complete(form, det_head, base):
    torch.manual_seed(0)
    d = tiny_cfg(base, implicit=form)
    tasks = None
    if det_head == "DetectAnchor":  # default anchors; the instance head needs the anchor-free one
        d["heads"][0][2], tasks = det_head, ["det", "sem", "cap"]
    model = Model(d, nc=5, tasks=tasks, head_kwargs=HEAD_KW).eval()
    assert type(model.head("det")).__name__ == det_head
    randomize_bn_and_implicits(model)
    x = torch.rand(2, 3, 96, 96)
    tokens = torch.randint(4, 40, (2, 7))
    with torch.no_grad():
        ref = _all_outputs(model, x, tokens)
        ref_boxes = model(x).det.pred[..., :4]
        before = module_counts(model)
        model.fuse()
        got = _all_outputs(model, x, tokens)
        got_boxes = model(x).det.pred[..., :4]
    after = module_counts(model)
    assert before["BatchNorm2d"] > 0 and before["Implicit"] > 0
    assert after["BatchNorm2d"] == 0 and after["Implicit"] == 0
    assert not any(isinstance(m, (nn.BatchNorm2d, Implicit)) for m in model.modules())
    assert all(m.conv1 is None and m.conv2 is None for m in model.modules() if isinstance(m, RepConvN))
    for k in ref:  # every head's every output
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=0, msg=k)
    # decoded boxes are in pixels (up to ~100 here), so compare them relative to their scale
    torch.testing.assert_close(got_boxes, ref_boxes, atol=1e-4 * 96, rtol=1e-5)


def _with_rows(extra_neck_rows: list, base: dict | None = None) -> dict:
    d = copy.deepcopy(base or tiny_cfg())
    d["neck"] = d["neck"] + extra_neck_rows
    return d


def test_every_accepted_placement_folds():
    """ImplicitA / ImplicitM / ImplicitC before 1x1 convs and ImplicitM before a padded 3x3 conv."""
    d = tiny_cfg()
    p3 = d["heads"][0][0][0]  # row index of the P3 output: the detection head's first input
    rows = [
        [p3, 1, "ImplicitM", ["mf"]],   # mul before a 3x3 padded conv: exact (m * 0 == 0)
        [-1, 1, "Conv", [64, 3, 1]],
        [-1, 1, "ImplicitC", [16, "nn"]],  # concat before a 1x1 conv
        [-1, 1, "Conv", [64, 1, 1]],
        [-1, 1, "ImplicitA", ["vector"]],
        [-1, 1, "Conv", [128, 1, 1]],
    ]
    d = _with_rows(rows, d)
    heads_from = d["heads"][0][0]
    total = len(d["backbone"]) + len(d["neck"])
    d["heads"] = [[[total - 1, heads_from[1], heads_from[2]], 1, "Detect", []]]
    model = Model(d, nc=3).eval()
    randomize_bn_and_implicits(model, seed=3)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).det.feats
        model.fuse()
        got = model(x).det.feats
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("row, match", [
    ([-1, 1, "Frobnicate", [16]], "unknown module 'Frobnicate'"),
    ([-1, 1, "Conv", [16, 3, 1, None, 1, True, 7]], "takes 1..6 args"),
    ([99, 1, "Conv", [16]], "does not point at an earlier row"),
    ([-1, 1, "ImplicitA", []], "never used"),
])
def test_bad_rows_are_clear_errors_naming_the_row(row, match):
    d = tiny_cfg()
    d["neck"] = d["neck"] + [row]  # after the last neck row: nothing else refers to it
    with pytest.raises(CfgError, match=match) as e:
        Model(d, nc=2, head_kwargs=HEAD_KW)
    assert f"row {len(d['backbone']) + len(d['neck']) - 1} (neck)" in str(e.value)


def test_unfoldable_implicit_placement_is_refused():
    d = tiny_cfg()
    d["backbone"] = d["backbone"][:1] + [[-1, 1, "ImplicitA", []], [-1, 1, "Conv", [64, 3, 2]]] + d["backbone"][2:]
    with pytest.raises(CfgError, match=r"row 1 \(backbone\): ImplicitA before a 3x3 conv.*cannot be folded exactly"):
        Model(d, nc=2, head_kwargs=HEAD_KW)


def test_implicit_feeding_concat_is_refused():
    d = tiny_cfg()
    d["neck"][3] = [6, 1, "ImplicitA", []]
    d["neck"][4] = [[-1, -2], 1, "Concat", [1]]  # implicit -> Concat cannot be folded
    with pytest.raises(CfgError, match="may feed only single-input Conv rows"):
        Model(d, nc=2, head_kwargs=HEAD_KW)


def test_unknown_top_level_key_and_scale():
    with pytest.raises(CfgError, match="unknown key"):
        Model(tiny_cfg(depth_multipel=1.0), nc=2)
    with pytest.raises(CfgError, match="no scale 'q'"):
        Model("cfg/yolor-mt-q.yaml", nc=2)


def test_tasks_subset_skips_heads():
    model = Model(tiny_cfg(), nc=2, tasks=["det", "sem"], head_kwargs=HEAD_KW)
    assert model.tasks == ["det", "sem"]
    out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out.inst is None and out.cap is None and out.sem is not None
    with pytest.raises(CfgError, match="no head is built"):
        Model(tiny_cfg(), nc=2, tasks=[])


def test_implicit_parameters_have_no_weight_decay():
    from utils.engine.optim import build_optimizer

    model = Model(tiny_cfg(), nc=2, head_kwargs=HEAD_KW)
    opt = build_optimizer(model, "SGD", 0.01, 0.9, 5e-4)
    implicit_ids = {id(p) for m in model.modules() if isinstance(m, Implicit) for p in m.parameters()}
    assert implicit_ids
    for g in opt.param_groups:
        if any(id(p) in implicit_ids for p in g["params"]):
            assert g["weight_decay"] == 0.0
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(list(model.parameters()))


@pytest.mark.parametrize("det_head", ["Detect", "DetectAnchor"])
def test_caption_memory_reads_the_detector_without_training_it(det_head):
    """The default cfg's caption head reads the detection head's class maps (its object tokens): the caption loss
    trains their embedding, and no gradient of it reaches the detector's class branch (the maps are detached),
    while the shared body still gets one. The maps are the detector's own decoded class probabilities."""
    torch.manual_seed(0)
    d = tiny_cfg()
    tasks = None
    if det_head == "DetectAnchor":
        d["heads"][0][2], tasks = det_head, ["det", "sem", "cap"]
    model = Model(d, nc=5, tasks=tasks, head_kwargs=HEAD_KW)
    cap, det = model.head("cap"), model.head("det")
    assert cap.objects > 0
    cls_branch = det.cls_out if det_head == "Detect" else det.out
    with torch.no_grad():  # confident classes, so the maps have peaks over OBJECT_MIN_SCORE
        for conv in cls_branch:
            conv.conv.bias.fill_(2.0)
    out = model(torch.rand(2, 3, 64, 64), captions=torch.randint(4, 40, (2, 7)))
    out.cap.logits.float().pow(2).mean().backward()
    assert cap.class_embed.weight.grad is not None and cap.class_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cls_branch.parameters())
    assert model.layers[4].cv1.conv.weight.grad.abs().sum() > 0  # backbone P3, which the memory reads
    model.eval()
    with torch.no_grad():
        pred = model(torch.rand(1, 3, 64, 64)).det
        maps = det.class_maps(pred)
    per_anchor = 1 if det_head == "Detect" else det.na
    start = 0
    for m in maps:
        h, w = m.shape[2:]
        level = pred.pred[0, start:start + per_anchor * h * w, 4:].view(per_anchor, h * w, -1).amax(0)
        torch.testing.assert_close(m[0].flatten(1).T, level)
        start += per_anchor * h * w
