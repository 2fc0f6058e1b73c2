"""evaluate() on a val list of splits with different tasks: each task scored on the images with its labels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from models.model import Model
from tests.conftest import tiny_cfg
from utils.data.config import DataError, load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.vocab import Vocabulary
from utils.eval.evaluate import EvalSettings, LabelSpace, evaluate

IMG = 64
ID_SHIFT = 100_000


def caption_only_split(data_yaml: Path, name: str, shift: int) -> dict:
    """A copy of the tiny val split's images and captions (image ids + ``shift``), no other labels."""
    d = yaml.safe_load(data_yaml.read_text())
    root = Path(d["path"])
    if not (root / "images" / name).exists():
        shutil.copytree(root / d["val"]["images"], root / "images" / name)
        caps = json.loads((root / d["val"]["captions"]).read_text())
        for im in caps["images"]:
            im["id"] += shift
        for a in caps["annotations"]:
            a["image_id"] += shift
        (root / "annotations" / f"captions_{name}.json").write_text(json.dumps(caps))
    return {"images": f"images/{name}", "captions": f"annotations/captions_{name}.json"}


def with_val(data_yaml: Path, val, name: str) -> Path:
    d = yaml.safe_load(data_yaml.read_text())
    d["val"] = val
    out = data_yaml.parent / f"{name}.yaml"
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def run_eval(yaml_file: Path, model: Model, vocab: Vocabulary):
    data = load_data_config(yaml_file)
    ds = CocoDataset(data, data.val, IMG)
    loader = create_dataloader(ds, 8, False, 0)
    return evaluate(model, loader, ds, LabelSpace(data.category_ids, len(data.semantic_ids), vocab=vocab),
                    torch.device("cpu"), settings=EvalSettings(progress=False))


@pytest.fixture(scope="module")
def model_and_vocab(tiny_data):
    data = load_data_config(tiny_data)
    caps = [c for _, rec in CocoDataset(data, data.train, IMG).items for c in rec.captions]
    vocab = Vocabulary.build(caps, min_count=1)
    torch.manual_seed(0)
    model = Model(tiny_cfg(), nc=data.nc, head_kwargs={"sem": {"num_classes": len(data.semantic_ids)},
                                                      "cap": {"vocab_size": len(vocab), "max_len": 12}})
    return model.eval(), vocab


def test_val_list_with_a_caption_only_split(tiny_data, model_and_vocab):
    model, vocab = model_and_vocab
    full = yaml.safe_load(tiny_data.read_text())["val"]
    alone = run_eval(with_val(tiny_data, full, "val_alone"), model, vocab)
    both = run_eval(with_val(tiny_data, [full, caption_only_split(tiny_data, "capval", ID_SHIFT)], "val_both"),
                    model, vocab)
    assert both.images == 2 * alone.images == 16
    # boxes and masks: the full split's images only, exactly as if it were evaluated alone
    assert both.scored_images["box"] == alone.scored_images["box"] == 8
    assert alone.detections and all(d["image_id"] < ID_SHIFT for d in both.detections + both.masks)
    assert both.detections == alone.detections
    for k in ("box_map", "box_map50", "box_map75", "mask_map", "mask_map50", "sem_miou", "sem_pixacc"):
        assert both.metrics[k] == alone.metrics[k], k
    assert both.scored_images["sem"] == 8
    # captions: both splits' images (the copies caption the same pixels: same corpus BLEU, CIDEr's
    # document frequencies change with the number of scored images)
    assert both.scored_images["cap"] == 16 and alone.scored_images["cap"] == 8
    assert both.metrics["cap_bleu1"] == pytest.approx(alone.metrics["cap_bleu1"])


def test_colliding_image_ids_across_splits_are_refused(tiny_data, model_and_vocab):
    model, vocab = model_and_vocab
    full = yaml.safe_load(tiny_data.read_text())["val"]
    dup = caption_only_split(tiny_data, "capdup", 0)  # the same ids as the full split
    with pytest.raises(DataError) as e:
        run_eval(with_val(tiny_data, [full, dup], "val_dup"), model, vocab)
    msg = str(e.value)
    assert "val2017" in msg and "capdup" in msg
    first_id = json.loads((Path(yaml.safe_load(tiny_data.read_text())["path"]) / full["captions"]).read_text())
    assert str(first_id["images"][0]["id"]) in msg
