"""benchmarks.caption_frozen: a caption head trained on a checkpoint's frozen features, read as caption_content reads."""
from __future__ import annotations

import contextlib
import io

import torch
import yaml

import train as train_script
from benchmarks import caption_frozen
from benchmarks.caption_content import memories, val_captions
from models.heads.caption import CaptionHead
from tests.conftest import tiny_cfg, train_args
from utils.data.config import load_data_config
from utils.data.dataset import CocoDataset, create_dataloader
from utils.data.vocab import Vocabulary
from utils.eval.metrics.caption_content import ContentReader
from utils.loss.caption import CaptionLoss
from utils.ops.letterbox import to_float
from utils.runtime.checkpoint import build_from_checkpoint, load_checkpoint


def test_single_object_reads_count_kind_and_colour_on_one_object_images():
    reader = ContentReader(["circle", "star"], ["red", "blue"])
    truths = {1: (("red", "circle"),), 2: (("blue", "star"),), 3: (("red", "circle"), ("blue", "star"))}
    captions = {1: "a red circle on sand", 2: "a red circle", 3: "a red circle and a blue star"}
    assert caption_frozen.single_object_reads(captions, truths, reader) == {"images": 2, "kind": 1, "colour": 1}


def test_train_head_fits_the_references_of_fixed_inputs():
    torch.manual_seed(0)
    refs = [["a red circle"], ["two blue stars"]]
    vocab = Vocabulary.build([r for rs in refs for r in rs], min_count=1)
    head = CaptionHead(3, [8], [8], 32, 1, 4, False, 2, vocab_size=len(vocab), max_len=8, dropout=0.0)
    levels = [torch.randn(2, 8, 4, 4)]
    classes = [torch.zeros(2, 3, 4, 4)]
    classes[0][0, 1, 1, 1] = 0.9
    losses = []
    caption_frozen.train_head(head, [(levels, classes, refs, [0, 1])], CaptionLoss(vocab, {"cap_max_len": 8}), 3e-3,
                              60, False, lambda step, ce: losses.append(ce))
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]
    head.eval()
    assert vocab.decode_batch(head(levels, det_classes=classes).tokens) == ["a red circle", "two blue stars"]


def test_main_prints_a_row_per_report(tiny_data, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_cfg()))
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_script.main(train_args(cfg, tiny_data, tmp_path / "runs", 1)) == 0
    weights = str(tmp_path / "runs/exp/weights/last.pt")
    saved = tmp_path / "head.pt"
    for extra, says in ((["--fresh", "--save", str(saved)], "fresh, grid + 20 object tokens"),
                        (["--grid-only"], "continued, grid only")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert caption_frozen.main(["--weights", weights, "--data", str(tiny_data), "--img", "64",
                                        "--batch-size", "8", "--steps", "3", "--report", "2", *extra]) == 0
        lines = out.getvalue().splitlines()
        assert says in lines[0]
        assert [int(line.split()[0]) for line in lines[2:5]] == [0, 2, 3]
    # --save: the checkpoint with the new caption head, every other weight the run's own
    before, after = (load_checkpoint(w) for w in (weights, saved))
    before, after = (c.get("ema") or c["model"] for c in (before, after))  # a finished run keeps only its EMA
    model = build_from_checkpoint(load_checkpoint(saved))
    cap = next(name for name, m in model.named_modules() if m is model.head("cap")) + "."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(cap) for k in changed) and before.keys() == after.keys()
    # and the saved checkpoint captions from a prompt: every val caption starts with it
    words = [w for w in model.meta["vocab"] if w.isalpha()]
    prompt = f"{words[-1]} {words[-2]}"  # two real words, in an order no reference has
    captions, _ = val_captions(saved, str(tiny_data), 64, [1], prompts=[prompt])
    assert captions[prompt] and all((c + " ").startswith(prompt + " ") for c in captions[prompt].values())
    # the recorded head inputs (the forward stopped at the caption head) encode to the model's own memory
    model.eval()
    mem, ids, _ = memories(model, str(tiny_data), "val", 64, batch_size=8)
    own, data = [], load_data_config(tiny_data)
    with torch.no_grad():
        for batch in create_dataloader(CocoDataset(data, data.val, 64, augment=False), 8, False, 0):
            own.append(model(to_float(batch.images, torch.device("cpu"), False)).cap.memory.float())
    assert mem.shape[0] == len(ids) and torch.allclose(mem, torch.cat(own), atol=1e-5)
