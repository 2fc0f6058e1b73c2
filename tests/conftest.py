"""Shared fixtures: a tiny synthetic COCO-layout dataset and a tiny model cfg, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

# Tests use the nano network at an even smaller width so the suite stays fast as heads are added.
TINY_SCALE = {"depth_multiple": 0.33, "width_multiple": 0.125}
# Sizes the trainer takes from the data (semantic classes, vocabulary); fixed small values in unit tests.
HEAD_KW = {"sem": {"num_classes": 6}, "cap": {"vocab_size": 40, "max_len": 12}}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data yaml over 24 train / 8 val synthetic images of ~96 px."""
    from utils.data.synthetic import generate, write_data_yaml

    root = tmp_path_factory.mktemp("shapes")
    generate(root, {"train2017": 24, "val2017": 8}, img_size=96, seed=1)
    yaml_path = root / "data.yaml"
    write_data_yaml(root, yaml_path)
    return yaml_path


def tiny_cfg(**overrides) -> dict:
    """The default cfg at a test width, as a dict (``Model`` accepts dicts)."""
    from models.parser import CFG_DIR

    d = yaml.safe_load((CFG_DIR / "yolor-mt.yaml").read_text())
    d.pop("scales"), d.pop("scale")
    d.update(TINY_SCALE)
    for row in d["heads"]:  # a small caption decoder: d_model 32, one layer, 4 attention heads
        if row[2] == "CaptionHead":
            row[3] = [32, 1, 4]
    d.update(overrides)
    return d


@pytest.fixture
def cfg_dict() -> dict:
    return tiny_cfg()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP spinning
    makes them 10-100x slower; one thread keeps the suite's time stable."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randomize_bn_and_implicits(model, seed: int = 0) -> None:
    """Non-trivial BN statistics and implicit values, so a wrong fold cannot pass by luck."""
    import torch
    from torch import nn

    from models.implicit import Implicit

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            if isinstance(m, Implicit):
                for p in m.parameters(recurse=True):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
