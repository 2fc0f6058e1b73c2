"""YOLOv9's GELAN blocks (models/gelan.py) and the default cfg, GELAN's: RepConvN's fold is exact, the blocks chain as the
parser says, and the cfg builds at every scale with scale l at GELAN-C's widths. The whole model's fuse parity is
tests/test_model.py's test_fuse_is_exact_and_complete (the default cfg is GELAN's)."""
from __future__ import annotations

import pytest
import torch

from models.gelan import SPPELAN, ADown, RepConvN, RepNCSPELAN4
from models.model import Model
from tests.conftest import randomize_bn_and_implicits


@pytest.mark.parametrize("stride", [1, 2])
def test_repconvn_fuses_into_one_exact_3x3(stride):
    torch.manual_seed(0)
    m = RepConvN(6, 10, stride).eval()
    randomize_bn_and_implicits(m)
    x = torch.randn(2, 6, 11, 13)
    with torch.no_grad():
        ref = m(x)
        m.fuse()
        got = m(x)
    assert m.conv1 is None and m.conv2 is None and m.conv.kernel_size == (3, 3)
    assert got.shape == ref.shape == (2, 10, (11 - 1) // stride + 1, (13 - 1) // stride + 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    m.fuse()  # idempotent
    torch.testing.assert_close(m(x), got, atol=0, rtol=0)


def test_blocks_give_the_channels_and_strides_the_parser_chains():
    x = torch.randn(1, 32, 16, 16)
    assert RepNCSPELAN4(32, 48, 32, 16, n=2)(x).shape == (1, 48, 16, 16)
    assert ADown(32, 64)(x).shape == (1, 64, 8, 8)
    assert SPPELAN(32, 40, 16)(x).shape == (1, 40, 16, 16)
    with pytest.raises(ValueError, match="even"):
        ADown(31, 64)


def test_gelan_cfg_builds_at_every_scale_with_gelan_c_at_l():
    kw = {"sem": {"num_classes": 171}, "cap": {"vocab_size": 10000, "max_len": 24}}
    sizes = {}
    for scale in "nsmlx":
        model = Model(f"cfg/yolor-mt-{scale}.yaml", nc=80, head_kwargs=kw)
        sizes[scale] = sum(p.numel() for p in model.parameters())
        assert model.stride == 32 and model.tasks == ["det", "inst", "sem", "cap"]
    assert list(sizes.values()) == sorted(sizes.values())
    large = Model("cfg/yolor-mt-l.yaml", nc=80, tasks=["det"])
    widths = [c for name, c, _ in large.rows_meta if name in ("RepNCSPELAN4", "SPPELAN")]
    # GELAN-C's block outputs (yolov9 models/detect/gelan-c.yaml), neck included
    assert widths == [256, 512, 512, 512, 512, 512, 256, 512, 512]
    assert sizes["m"] <= 30e6


@pytest.mark.parametrize("base", ["yolor-mt.yaml", "yolor-mt-c2f.yaml"])
def test_fused_model_of_each_body_exports_to_onnx_with_parity(base, tmp_path):
    """GELAN's (the default) ADown pools and chunks and folded RepConvNs, and the C2f body beside it, survive the ONNX
    export with random BatchNorm statistics and implicit tensors: every output as PyTorch's."""
    pytest.importorskip("onnxruntime")
    from tests.conftest import HEAD_KW, tiny_cfg
    from utils.deploy.backends import ort_session
    from utils.deploy.export import export_vision
    from utils.deploy.interface import DeployModel

    torch.manual_seed(0)
    model = Model(tiny_cfg(base), nc=5, head_kwargs=HEAD_KW).eval()
    randomize_bn_and_implicits(model)
    deploy = DeployModel(model.fuse())
    x = torch.rand(2, 3, 64, 96)
    path = export_vision(deploy, x, tmp_path / "model.onnx", 17, True, {})
    with torch.no_grad():
        want = [t.numpy() for t in deploy(x)]
    got = ort_session(path).run(None, {ort_session(path).get_inputs()[0].name: x.numpy()})
    assert len(got) == len(want) == len(deploy.output_names)
    for name, g, w in zip(deploy.output_names, got, want):
        assert g.shape == w.shape and abs(g - w).max() <= 1e-4 * max(1.0, abs(w).max()), name
