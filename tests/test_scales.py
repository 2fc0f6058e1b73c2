"""Heads sized by the cfg's scale: the parser's lookup, the rule's shape (n as before, growing with the scale, the
GeneralistYOLO-class scale under 30M at COCO's counts), the tied caption embedding, and benchmarks.scales' table."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from benchmarks import scales
from models.heads.caption import CaptionHead
from models.model import Model
from models.parser import CFG_DIR, CfgError, load_cfg
from utils.engine.ema import ModelEMA
from utils.engine.optim import build_optimizer

ORDER = ("n", "s", "m", "l", "x")
COCO_HEADS = {"sem": {"num_classes": 171}, "cap": {"vocab_size": 10000, "max_len": 24}}
# Scale n's head args and parameter count (COCO's counts) before heads followed the scale: the nano results and
# the peer table were measured with exactly these.
N_ARGS = {"InstanceHead": [32, 32], "SemanticHead": [64, 8], "CaptionHead": [128, 2, 4, False, 20]}
# The caption memory then gained the backbone's P3 level: its 64 -> 128 projection, implicit gate and level embedding;
# then 20 object tokens: the embeddings of their 80 class probabilities (80 x 128, no bias), score and kind.
N_PARAMS = 6_217_126 + 8_320 + 64 + 128 + 80 * 128 + 128 + 128


def head_args(scale: str) -> dict[str, list]:
    """The head rows' args of cfg/yolor-mt.yaml at ``scale``."""
    d = load_cfg(f"cfg/yolor-mt-{scale}.yaml")
    return {r[2]: list(r[3]) for r in d["heads"] if r[2] in N_ARGS}


def test_scale_n_heads_are_unchanged():
    assert head_args("n") == N_ARGS
    model = Model("cfg/yolor-mt-c2f-n.yaml", nc=80, head_kwargs=COCO_HEADS)  # the body they were measured on
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert not model.head("cap").tie


def test_both_bodies_size_their_heads_alike():
    """The C2f cfg's head table is the default's (the GELAN cfg's comment states the rules for both)."""
    tables = [yaml.safe_load((CFG_DIR / name).read_text())["head_scales"] for name in ("yolor-mt.yaml", "yolor-mt-c2f.yaml")]
    assert tables[0] == tables[1] and set(tables[0]) == set(ORDER)


def test_head_sizes_grow_with_the_scale():
    """Every size argument is non-decreasing from n to x, and each head's total width grows somewhere."""
    args = {s: head_args(s) for s in ORDER}
    for head in N_ARGS:
        widths = [args[s][head][1 if head == "InstanceHead" else 0] for s in ORDER]
        assert widths == sorted(widths) and widths[-1] > widths[0], (head, widths)
    layers = [args[s]["CaptionHead"][1] for s in ORDER]
    heads = [args[s]["CaptionHead"][2] for s in ORDER]
    assert layers == sorted(layers) and heads == sorted(heads)
    for s in ORDER:  # 32-wide attention heads at every scale (n's and GRIT's)
        d_model, _, n_heads = args[s]["CaptionHead"][:3]
        assert d_model == 32 * n_heads


def test_generalist_scale_is_under_30m_at_coco_counts():
    d = load_cfg("cfg/yolor-mt.yaml")
    assert d["scale"] == "m"  # the scale the cfg says meets GeneralistYOLO (32.5M) is the default
    model = Model("cfg/yolor-mt.yaml", nc=80, head_kwargs=COCO_HEADS)
    assert sum(p.numel() for p in model.parameters()) <= 30e6
    assert model.head("cap").tie


def test_rows_keep_their_args_without_a_scale_name():
    """A cfg at explicit multiples (the suite's tiny one) has no head_scales row to pick: the rows' args stand."""
    d = yaml.safe_load((CFG_DIR / "yolor-mt.yaml").read_text())  # as tests/conftest.py's tiny_cfg reads it
    d.pop("scales"), d.pop("scale")
    d.update(depth_multiple=0.33, width_multiple=0.125)
    rows = {r[2]: list(r[3]) for r in load_cfg(d)["heads"]}
    assert rows["InstanceHead"] == [32, 32] and rows["CaptionHead"] == [128, 2, 4, False, 20]


@pytest.mark.parametrize("change, match", [
    (lambda d: d["head_scales"].pop("s"), "give every scale its head sizes"),
    (lambda d: d["head_scales"]["m"].update(Conv=[8]), "not heads"),
    (lambda d: d.update(head_scales=[1, 2]), "must map each scale"),
])
def test_bad_head_scales_name_the_problem(change, match):
    d = copy.deepcopy(load_cfg("cfg/yolor-mt.yaml"))
    change(d)
    with pytest.raises(CfgError, match=match):
        load_cfg(d)


def tied_head(tie: bool) -> CaptionHead:
    torch.manual_seed(0)
    return CaptionHead(80, [16, 32], [16, 32], 32, 1, 4, tie, vocab_size=50, max_len=8, dropout=0.0)


def test_tied_caption_head_shares_one_weight():
    tied, untied = tied_head(True), tied_head(False)
    assert tied.out.weight is tied.embed.weight
    n_tied, n_untied = (sum(p.numel() for p in h.parameters()) for h in (tied, untied))
    assert n_untied - n_tied == 50 * 32
    assert tied.embed.weight[0].abs().sum() == 0  # <pad>'s embedding is zero, as untied
    # one parameter in the optimizer, and a state_dict round trip keeps it one
    opt = build_optimizer(tied, "AdamW", 1e-3, 0.9, 5e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tied.parameters()))
    copy_ = tied_head(True)
    copy_.load_state_dict(tied.state_dict())
    assert copy_.out.weight is copy_.embed.weight and torch.equal(copy_.out.weight, tied.out.weight)


def test_ema_decays_a_tied_weight_once():
    """The shared weight appears under two state_dict names; the average must still be d * ema + (1 - d) * model."""
    head = tied_head(True)
    ema = ModelEMA(head, decay=0.5, tau=1e-9)  # d = 0.5 from the first update
    before = ema.ema.embed.weight.clone()
    with torch.no_grad():
        head.embed.weight.add_(1.0)
    ema.update(head)
    assert torch.allclose(ema.ema.embed.weight, 0.5 * before + 0.5 * head.embed.weight)
    assert ema.ema.out.weight is ema.ema.embed.weight


def test_scales_benchmark_prints_a_row_per_scale(capsys):
    assert scales.main(["--scales", "n,s", "--img", "64", "--vocab", "60", "--sem-classes", "7", "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| n ") or line.startswith("| s ")]
    assert len(rows) == 2
    totals = [float(r.split("|")[7].split("/")[0]) for r in rows]  # the total column's params (M)
    assert totals[1] > totals[0]
    assert "s: inst[32, 64] sem[128, 8] cap[256, 2, 8, True, 20]" in out
    assert "| 3.4 / 12.6 | 2.7 / 9.1 |" in rows[0]  # the published peers of the same letter


def test_tied_caption_decoder_exports_with_parity(tmp_path):
    """The exported decoder step (ONNX) of a tied head gives the PyTorch logits, at a length other than traced."""
    pytest.importorskip("onnxruntime")
    from utils.deploy.backends import ort_session
    from utils.deploy.export import export_caption_decoder

    head = tied_head(True).eval()
    memory = torch.randn(2, 10, 32)
    path = export_caption_decoder(head, memory, tmp_path / "dec.onnx", 17, {})
    tokens = torch.tensor([[1, 5, 7, 9], [1, 3, 3, 4]])
    with torch.no_grad():
        want = head.decode_step(memory, tokens).numpy()
    got = ort_session(path).run(None, {"memory": memory.numpy(), "tokens": tokens.numpy()})[0]
    assert got.shape == want.shape and abs(got - want).max() < 1e-4
