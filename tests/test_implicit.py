"""Tests for models/implicit.py: implicit layers, their init, and exact conv folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.implicit import (
    FORMS,
    Implicit,
    ImplicitA,
    ImplicitC,
    ImplicitM,
    fold_error,
    fold_into_next_conv,
    fold_into_prev_conv,
)

OPS = {"add": ImplicitA, "mul": ImplicitM, "concat": ImplicitC}
B, C_IN, C_CAT, HW = 2, 8, 5, 9  # odd spatial size so strided/padded borders are exercised
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_implicit(op: str, form: str, channels: int, dtype: torch.dtype = torch.float32) -> Implicit:
    layer = OPS[op](channels, form=form).to(dtype)
    # Randomise to O(1) values: at init the value is ~constant, which would hide a wrong fold.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def make_conv(cin: int, cout: int, k: int, dtype: torch.dtype, **kw) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, **kw).to(dtype)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def snapshot(*modules: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def assert_untouched(before: list[torch.Tensor], *modules: nn.Module) -> None:
    after = snapshot(*modules)
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def assert_conv_like(new: nn.Conv2d, old: nn.Conv2d) -> None:
    assert type(new) is nn.Conv2d and new is not old
    assert new.bias is not None
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(new, attr) == getattr(old, attr), attr
    assert new.weight.dtype == old.weight.dtype and new.weight.device == old.weight.device
    assert new.bias.dtype == old.weight.dtype


# ------------------------------------------------------------------------------ forward / init


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_definition(op: str, form: str) -> None:
    c = C_CAT if op == "concat" else C_IN
    layer = make_implicit(op, form, c)
    x = torch.randn(B, C_IN, HW, HW)
    v = layer.value()
    assert v.shape == (c,)
    vv = v.view(1, c, 1, 1)
    expected = {"add": lambda: x + vv, "mul": lambda: x * vv,
                "concat": lambda: torch.cat([x, vv.expand(B, c, HW, HW)], 1)}[op]()
    y = layer(x)
    assert torch.equal(y, expected)
    if op == "concat":
        assert y.shape == (B, C_IN + C_CAT, HW, HW)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("op", OPS)
def test_init_statistics(op: str, form: str) -> None:
    v = OPS[op](4096, form=form).value().detach()
    target = 1.0 if op == "mul" else 0.0
    assert abs(v.mean().item() - target) < 0.01
    assert abs(v.std().item() - 0.02) < 0.01


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("op", OPS)
def test_parameters_receive_gradients(op: str, form: str) -> None:
    c = C_CAT if op == "concat" else C_IN
    layer = OPS[op](c, form=form)
    y = layer(torch.randn(B, C_IN, HW, HW))
    (y * torch.randn_like(y)).sum().backward()
    params = list(layer.named_parameters())
    assert params
    for name, p in params:
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_forms_and_validation() -> None:
    assert {n for n, _ in ImplicitA(4, "vector").named_parameters()} == {"implicit"}
    assert dict((n, p.shape) for n, p in ImplicitM(4, "nn", dim=3).named_parameters()) == {
        "z": (3,), "linear.weight": (4, 3)}
    assert dict((n, p.shape) for n, p in ImplicitC(4, "mf").named_parameters()) == {"Z": (16, 4), "c": (16,)}
    assert ImplicitA(4, " NN ").form == "nn"  # cfg strings are forgiving about case/space
    with pytest.raises(ValueError, match="unknown implicit form 'bogus'.*vector, nn, mf"):
        ImplicitA(4, "bogus")
    with pytest.raises(ValueError, match="channels"):
        ImplicitM(0)
    with pytest.raises(ValueError, match="dim"):
        ImplicitC(4, "mf", dim=0)
    with pytest.raises(TypeError):
        Implicit(4)


@pytest.mark.parametrize("op", OPS)
def test_nn_form_is_w_z_plus_fixed_mean(op: str) -> None:
    layer = make_implicit(op, "nn", C_IN)
    mean = 1.0 if op == "mul" else 0.0
    assert layer.linear.bias is None
    assert "bias" not in " ".join(layer.state_dict())  # the mean is a fixed offset, not a tensor
    with torch.no_grad():
        torch.testing.assert_close(layer.value(), layer.linear.weight @ layer.z + mean, rtol=0, atol=1e-6)
        # A learned bias would make the form a plain vector; without one it depends on z ...
        v = layer.value().clone()
        layer.z.add_(1.0)
        assert (layer.value() - v).abs().min() > 1e-3
        # ... and W z alone carries everything learned: W = 0 leaves exactly the mean.
        layer.linear.weight.zero_()
        assert torch.equal(layer.value(), torch.full((C_IN,), mean))


def test_old_nn_checkpoint_with_bias_is_refused() -> None:
    layer = ImplicitM(C_IN, "nn")
    old = layer.state_dict() | {"linear.bias": torch.ones(C_IN)}  # the pre-fix nn form's extra tensor
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"linear\.bias from the old 'nn' implicit form.*retrain"):
            layer.load_state_dict(old, strict=strict)
    nested = nn.Sequential(nn.Identity(), ImplicitA(C_IN, "nn"))
    old = {f"1.{k}": t for k, t in nested[1].state_dict().items()} | {"1.linear.bias": torch.zeros(C_IN)}
    with pytest.raises(RuntimeError, match=r"ImplicitA at '1'"):
        nested.load_state_dict(old, strict=False)
    layer.load_state_dict(ImplicitM(C_IN, "nn").state_dict())  # a current one still loads


# ------------------------------------------------------------------------------ weight decay


def _decay_by_param(opt: torch.optim.Optimizer, model: nn.Module) -> dict[int, float]:
    """id(param) -> its group's weight decay, after checking every model parameter is in exactly one group."""
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in more than one group"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is missing from the optimizer"
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def _assert_decay_rules(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    wd = _decay_by_param(opt, model)
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    implicit = {id(p) for m in model.modules() if isinstance(m, Implicit) for p in m.parameters()}
    assert implicit
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            where = f"{mname}.{pname}"
            if id(p) in implicit or isinstance(m, norms) or "bias" in pname.split("_"):
                assert wd[id(p)] == 0.0, where
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and pname == "weight":
                assert wd[id(p)] > 0.0, where
    assert opt.param_groups[0]["weight_decay"] == 0.0  # the warmup treats group 0 as the bias group
    assert all(id(p) not in implicit for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("form", FORMS)
def test_no_weight_decay_on_implicits_biases_and_norms(form: str) -> None:
    from models.model import Model
    from tests.conftest import HEAD_KW, tiny_cfg
    from utils.engine.optim import build_optimizer

    model = Model(tiny_cfg(implicit=form), nc=2, head_kwargs=HEAD_KW)
    assert model.tasks == ["det", "inst", "sem", "cap"]
    names = dict(model.named_parameters())
    assert any(n.endswith("in_proj_bias") for n in names)  # the caption decoder's attention
    if form == "nn":
        assert any(n.endswith("linear.weight") for n in names)  # W, reached as an nn.Linear
    _assert_decay_rules(model, build_optimizer(model, "SGD", 0.01, 0.9, 5e-4))


def test_weight_decay_groups_cover_every_norm_and_bias_kind() -> None:
    from utils.engine.optim import build_optimizer

    conv = nn.Conv2d(4, 4, 1)
    model = nn.ModuleDict({
        "conv": conv, "gn": nn.GroupNorm(2, 4), "sync": nn.SyncBatchNorm(4), "inorm": nn.InstanceNorm2d(4, affine=True),
        "attn": nn.MultiheadAttention(4, 2, add_bias_kv=True),
        "wrapped": nn.Sequential(ImplicitM(4, "nn")), "mf": ImplicitA(4, "mf"),
        "tied": nn.ModuleList([conv]),  # a module reached twice must not give its parameters twice
    })
    for name in ("Adam", "AdamW", "SGD"):
        opt = build_optimizer(model, name, 0.01, 0.9, 5e-4)
        _assert_decay_rules(model, opt)
        biases = {id(p) for p in opt.param_groups[0]["params"]}
        attn = model["attn"]
        assert {id(attn.in_proj_bias), id(attn.bias_k), id(attn.bias_v), id(conv.bias)} <= biases


# ------------------------------------------------------------------------------ fold: next conv

# (kernel, conv kwargs) where the fold into the NEXT conv must be exact, per op.
NEXT_CASES = {
    "add": [(1, {}), (1, {"bias": False}), (3, {"stride": 2}), (3, {"padding": 1, "padding_mode": "reflect"}),
            (1, {"groups": 4}), (3, {"stride": 2, "groups": 2})],
    "mul": [(1, {}), (1, {"bias": False}), (3, {"padding": 1, "stride": 2}),
            (3, {"padding": 2, "dilation": 2, "bias": False}), (3, {"padding": 1, "groups": 4}),
            (3, {"padding": 1, "padding_mode": "circular"})],
    "concat": [(1, {}), (1, {"bias": False}), (3, {"stride": 2}), (3, {"padding": 1, "padding_mode": "replicate"})],
}
NEXT_PARAMS = [(op, k, kw) for op, cases in NEXT_CASES.items() for k, kw in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("op", "k", "kw"), NEXT_PARAMS, ids=lambda p: str(p))
def test_fold_into_next_conv_parity(op: str, k: int, kw: dict, form: str, dtype: torch.dtype) -> None:
    c = C_CAT if op == "concat" else C_IN
    layer = make_implicit(op, form, c, dtype)
    conv = make_conv(C_IN + (c if op == "concat" else 0), 6 if kw.get("groups", 1) == 1 else 8, k, dtype, **kw)
    assert fold_error(layer, conv, "next") is None
    before = snapshot(layer, conv)

    folded = fold_into_next_conv(layer, conv)

    assert_untouched(before, layer, conv)
    assert_conv_like(folded, conv)
    assert folded.in_channels == C_IN and folded.out_channels == conv.out_channels
    x = torch.randn(B, C_IN, HW, HW, dtype=dtype)
    with torch.no_grad():
        ref, got = conv(layer(x)), folded(x)
    assert torch.allclose(got, ref, rtol=0, atol=TOL[dtype]), (got - ref).abs().max()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("op", "kw"), [("add", {"padding": 1}), ("concat", {"padding": 1}),
                                        ("add", {"padding": (0, 1)}), ("concat", {"padding": "same"})])
def test_fold_into_next_conv_refuses_zero_padding(op: str, kw: dict, form: str) -> None:
    c = C_CAT if op == "concat" else C_IN
    layer = make_implicit(op, form, c)
    conv = make_conv(C_IN + (c if op == "concat" else 0), 6, 3, torch.float32, **kw)
    reason = fold_error(layer, conv, "next")
    name = type(layer).__name__
    assert isinstance(reason, str) and "\n" not in reason
    assert name in reason and "3x3" in reason and "padding" in reason and "border" in reason
    if kw["padding"] == 1:
        assert "padding 1" in reason
    with pytest.raises(ValueError, match=name):
        fold_into_next_conv(layer, conv)
    # The refusal is justified: the conv of the constant implicit map is not spatially constant.
    with torch.no_grad():
        const = conv(layer(torch.zeros(1, C_IN, HW, HW)))
    assert (const.amax((2, 3)) - const.amin((2, 3))).max() > 1e-3


def test_fold_into_next_conv_refuses_padded_1x1_and_suggests() -> None:
    reason = fold_error(ImplicitA(C_IN), nn.Conv2d(C_IN, 4, 1, padding=1), "next")
    assert reason is not None and "ImplicitA before a 1x1 conv with padding 1" in reason
    assert "ImplicitM" in reason
    assert "ImplicitM" not in fold_error(ImplicitC(2), nn.Conv2d(C_IN, 4, 3, padding=1), "next")


def test_fold_error_other_refusals() -> None:
    assert "expects 6 input channels" in fold_error(ImplicitM(C_IN), nn.Conv2d(6, 4, 1), "next")
    assert "outputs 6" in fold_error(ImplicitA(C_IN), nn.Conv2d(3, 6, 1), "prev")
    assert "no input channels" in fold_error(ImplicitC(4), nn.Conv2d(4, 4, 1), "next")
    assert "groups=2" in fold_error(ImplicitC(2), nn.Conv2d(6, 4, 1, groups=2), "next")
    assert "groups=2" in fold_error(ImplicitC(2), nn.Conv2d(6, 4, 1, groups=2), "prev")
    assert "nn.Conv2d" in fold_error(ImplicitA(4), nn.Linear(4, 4), "next")
    with pytest.raises(ValueError, match="where"):
        fold_error(ImplicitA(4), nn.Conv2d(4, 4, 1), "after")


# ------------------------------------------------------------------------------ fold: prev conv

PREV_CASES = [(1, {}), (1, {"bias": False}), (3, {"padding": 1}), (3, {"padding": 1, "bias": False}),
              (3, {"stride": 2, "padding": 1, "padding_mode": "reflect"})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("k", "kw"), PREV_CASES, ids=lambda p: str(p))
@pytest.mark.parametrize("op", OPS)
def test_fold_into_prev_conv_parity(op: str, k: int, kw: dict, form: str, dtype: torch.dtype) -> None:
    c = C_CAT if op == "concat" else 6
    layer = make_implicit(op, form, c, dtype)
    conv = make_conv(C_IN, 6, k, dtype, **kw)
    assert fold_error(layer, conv, "prev") is None
    before = snapshot(layer, conv)

    folded = fold_into_prev_conv(conv, layer)

    assert_untouched(before, layer, conv)
    assert_conv_like(folded, conv)
    assert folded.out_channels == 6 + (c if op == "concat" else 0)
    x = torch.randn(B, C_IN, HW, HW, dtype=dtype)
    with torch.no_grad():
        ref, got = layer(conv(x)), folded(x)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=0, atol=TOL[dtype]), (got - ref).abs().max()


@pytest.mark.parametrize("op", ["add", "mul"])
def test_fold_into_prev_grouped_conv(op: str) -> None:
    layer = make_implicit(op, "vector", 8)
    conv = make_conv(C_IN, 8, 3, torch.float32, padding=1, groups=4)
    folded = fold_into_prev_conv(conv, layer)
    x = torch.randn(B, C_IN, HW, HW)
    with torch.no_grad():
        assert torch.allclose(folded(x), layer(conv(x)), rtol=0, atol=1e-4)


def test_folded_conv_gradients_not_needed_through_implicit() -> None:
    layer = make_implicit("add", "nn", C_IN)
    folded = fold_into_next_conv(layer, make_conv(C_IN, 4, 1, torch.float32))
    assert folded.weight.grad_fn is None and folded.bias.grad_fn is None
    assert all(p.grad is None for p in layer.parameters())
