"""Shared fixtures: a tiny synthetic COCO-layout dataset and a tiny model cfg, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

# Tests use the nano network at an even smaller width so the suite stays fast as heads are added.
TINY_SCALE = {"depth_multiple": 0.33, "width_multiple": 0.125}
# Sizes the trainer takes from the data (semantic classes, vocabulary); fixed small values in unit tests.
HEAD_KW = {"sem": {"num_classes": 6}, "cap": {"vocab_size": 40, "max_len": 12}}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data yaml over 24 train / 8 val synthetic images of ~96 px."""
    from utils.data.synthetic import generate, write_data_yaml

    root = tmp_path_factory.mktemp("shapes")
    generate(root, {"train2017": 24, "val2017": 8}, img_size=96, seed=1)
    yaml_path = root / "data.yaml"
    write_data_yaml(root, yaml_path)
    return yaml_path


def tiny_cfg(base: str = "yolor-mt.yaml", **overrides) -> dict:
    """A cfg of cfg/ (the default one unless ``base`` names another) at a test width, as a dict (``Model``
    accepts dicts)."""
    from models.parser import CFG_DIR

    d = yaml.safe_load((CFG_DIR / base).read_text())
    d.pop("scales"), d.pop("scale")
    d.update(TINY_SCALE)
    for row in d["heads"]:  # a small caption decoder: d_model 32, one layer, 4 attention heads; the row's flags kept
        if row[2] == "CaptionHead":
            row[3] = [32, 1, 4] + list(row[3][3:])
    d.update(overrides)
    return d


@pytest.fixture
def cfg_dict() -> dict:
    return tiny_cfg()


@pytest.fixture(scope="session")
def tiny_cfg_file(tmp_path_factory) -> Path:
    """``tiny_cfg()`` written to a yaml file, for train.py's ``--cfg``."""
    f = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    f.write_text(yaml.safe_dump(tiny_cfg()))
    return f


def train_args(cfg: Path, data: Path, project: Path, epochs: int, name: str = "exp", *extra: str) -> list[str]:
    """train.py arguments for a tiny CPU run (64 px, batch 8, no workers, no progress bars); ``extra`` last,
    so it may override any of them."""
    return ["--cfg", str(cfg), "--data", str(data), "--epochs", str(epochs), "--img", "64", "--batch-size", "8",
            "--workers", "0", "--project", str(project), "--name", name, "--no-progress", "--device", "cpu", *extra]


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints' model and EMA state_dicts are bit-identical (a finished run's stripped checkpoint has
    only ``model``, its FP16 EMA: both must be of the same kind)."""
    import torch

    parts = [p for p in ("model", "ema") if p in a]
    assert parts == [p for p in ("model", "ema") if p in b]
    for part in parts:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"


def results_rows(run: Path) -> list[dict[str, str]]:
    """A run's results.csv rows without the timing columns (the only ones two identical runs differ in)."""
    import csv

    with open(run / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def subprocess_env() -> dict[str, str]:
    """Environment for a training subprocess: the repository importable, one OpenMP thread (like in-process
    tests, see ``one_torch_thread``)."""
    import os

    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


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


@pytest.fixture(scope="session")
def coco_published(tmp_path_factory) -> Path:
    """A data yaml over a tiny dataset with the real COCO files' quirks (see ``tests/coco_published.py``):
    8 train images, and a val list of a full 4-image split and a 4-image caption-only split."""
    from tests.coco_published import write_coco_published

    return write_coco_published(tmp_path_factory.mktemp("coco_published"))
