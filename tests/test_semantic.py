"""Tests for the semantic segmentation head, loss and metrics (tiny widths, 64x64 inputs)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.common import Conv
from models.heads.semantic import SemanticHead, SemOutput
from models.implicit import FORMS, Implicit
from tests.conftest import randomize_bn_and_implicits
from utils.eval.metrics.semantic import SemanticMeter
from utils.loss.semantic import SemanticLoss
from utils.ops.letterbox import upsample_logits

CH, STRIDES, IMG = [8, 12, 16], [8, 16, 32], 64


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # These tensors are tiny: intra-op threads only add sync overhead, which explodes on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def feats(b: int = 2, ch: list[int] = CH, strides: list[int] = STRIDES, img: int = IMG) -> list[torch.Tensor]:
    return [torch.randn(b, c, img // s, img // s) for c, s in zip(ch, strides)]


def blocky_target(b: int, k: int, cell: int = 16, img: int = IMG) -> torch.Tensor:
    """Random labels on a coarse grid, upsampled: learnable from stride-4 logits, unlike per-pixel noise."""
    coarse = torch.randint(0, k, (b, img // cell, img // cell))
    return coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ metrics


def test_perfect_prediction() -> None:
    t = torch.randint(0, 4, (2, 16, 16))
    m = SemanticMeter(4)
    m.update(t.clone(), t.to(torch.uint8))
    r = m.compute()
    assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0
    assert r["pixels"] == 2 * 16 * 16 and r["unknown_pixels"] == 0


def test_hand_checked_two_class() -> None:
    target = torch.tensor([[[0, 0], [1, 1]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1], [1, 1]]])
    m = SemanticMeter(2)
    m.update(pred, target)
    r = m.compute()
    assert r["per_class_iou"] == [0.5, 2 / 3]
    assert r["miou"] == pytest.approx(7 / 12, abs=1e-12)
    assert r["pixel_acc"] == 0.75
    np.testing.assert_array_equal(r["confusion"], [[1, 1], [0, 2]])


def test_ignore_valid_unknown_and_absent_classes() -> None:
    target = torch.tensor([[[0, 255], [1, 7]]], dtype=torch.uint8)  # 255 ignored, 7 unknown (K = 3)
    pred = torch.tensor([[[0, 2], [1, 2]]])  # wrong preds only on ignored/unknown pixels
    m = SemanticMeter(3)
    m.update(pred, target)
    r = m.compute()
    assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0 and r["pixels"] == 2
    assert r["unknown_pixels"] == 1
    assert math.isnan(r["per_class_iou"][2])  # class 2 in neither target nor counted prediction
    # the valid mask removes pixels as well (and unknown pixels outside it are not counted)
    m.reset()
    valid = torch.tensor([[[True, True], [False, False]]])
    m.update(pred, target, valid)
    r = m.compute()
    assert r["pixels"] == 1 and r["unknown_pixels"] == 0 and r["per_class_iou"][0] == 1.0
    assert math.isnan(r["per_class_iou"][1])
    # accumulation over calls
    m.update(pred, target)
    assert m.compute()["pixels"] == 3


def test_meter_rejects_out_of_range_prediction() -> None:
    with pytest.raises(ValueError):
        SemanticMeter(2).update(torch.tensor([[[2]]]), torch.tensor([[[0]]]))
    with pytest.raises(ValueError):
        SemanticMeter(0)


# ------------------------------------------------------------------------------------------------ head


def test_output_stride_and_shapes() -> None:
    head = SemanticHead(80, CH, STRIDES, num_classes=5, width=8)
    out = head(feats())
    assert isinstance(out, SemOutput)
    assert out.stride == 4 and head.out_stride == 4
    assert out.logits.shape == (2, 5, IMG // 4, IMG // 4)
    assert upsample_logits(out.logits, (IMG, IMG)).shape == (2, 5, IMG, IMG)
    assert out.upsample((IMG, IMG)).shape == (2, 5, IMG, IMG)
    # finest input already at stride 4: no upsampling; at stride 16: two x2 steps
    for strides, expect in (([4, 8, 16], 4), ([16, 32], 4), ([2, 4], 2)):
        h = SemanticHead(80, CH[: len(strides)], strides, num_classes=3, width=8)
        o = h(feats(ch=CH[: len(strides)], strides=strides))
        assert o.stride == expect and o.logits.shape[-1] == IMG // expect


def test_bad_num_classes() -> None:
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_classes"):
            SemanticHead(80, CH, STRIDES, num_classes=bad)


@pytest.mark.parametrize("form", FORMS)
def test_fuse_parity(form: str) -> None:
    head = SemanticHead(80, CH, STRIDES, num_classes=5, width=8, form=form)
    randomize_bn_and_implicits(head)
    head.eval()
    x = feats()
    with torch.no_grad():
        ref = head(x).logits
        for m in head.modules():
            if isinstance(m, Conv):
                m.fuse()
        head.fuse()
        out = head(x).logits
    assert not any(isinstance(m, (Implicit, nn.BatchNorm2d)) for m in head.modules())
    assert (out - ref).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ loss


def test_loss_overfits_two_maps() -> None:
    k = 3
    head = SemanticHead(80, CH, STRIDES, num_classes=k, width=16)
    x = feats()
    target = blocky_target(2, k)
    present = torch.tensor([True, True])
    loss_fn = SemanticLoss({"sem_dice": 0.5})
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss, parts = loss_fn(head(x).logits, target, present)
        assert torch.isfinite(loss) and set(parts) == {"ce", "dice"}
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # judged in train mode: after 50 steps BN running stats (momentum 0.03) are only ~78% converged, and
    # what is tested here is the head + loss fitting, not BN's running averages
    with torch.no_grad():
        logits = head(x).logits
        final, _ = loss_fn(logits, target, present)
    assert final.item() < 0.5 * first
    pred = upsample_logits(logits, target.shape[-2:]).argmax(1)
    m = SemanticMeter(k)
    m.update(pred, target)
    assert m.compute()["pixel_acc"] > 0.9


def test_loss_masks_absent_images_and_ignores() -> None:
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    target = torch.randint(0, 4, (2, 64, 64), dtype=torch.uint8)
    present = torch.tensor([True, False])
    loss_fn = SemanticLoss({"sem_dice": 1.0})
    a, pa = loss_fn(logits, target, present)
    t2 = target.clone()
    t2[1] = torch.randint(0, 4, (64, 64), dtype=torch.uint8)
    b, pb = loss_fn(logits, t2, present)
    assert torch.equal(a, b) and pa == pb
    # ignore (255) and unknown ids (>= K) behave the same: excluded from the average
    t3 = target.clone()
    t3[0, :32] = 255
    t4 = target.clone()
    t4[0, :32] = 9
    c, _ = loss_fn(logits, t3, present)
    d, _ = loss_fn(logits, t4, present)
    assert torch.allclose(c, d) and not torch.allclose(a, c)
    # nothing present / everything ignored: a finite zero that still backpropagates
    for tgt, pres in ((target, torch.tensor([False, False])), (torch.full_like(target, 255), present)):
        z, parts = loss_fn(logits, tgt, pres)
        assert torch.isfinite(z) and z.item() == 0.0 and parts == {"ce": 0.0, "dice": 0.0}
        z.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_ce_matches_reference_and_dice() -> None:
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 32, 32))
    target[0, 0] = 255
    present = torch.tensor([True, True])
    up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, target, ignore_index=255)
    off, parts = SemanticLoss({})(logits, target, present)
    assert torch.allclose(off, ref, atol=1e-6) and parts["dice"] == 0.0
    on, parts = SemanticLoss({"sem_dice": 2.0})(logits, target, present)
    assert 0.0 < parts["dice"] < 1.0
    assert torch.allclose(on, ref + 2.0 * parts["dice"], atol=1e-5)
    # a confident correct prediction drives both terms to ~0
    good = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    loss, parts = SemanticLoss({"sem_dice": 1.0})(good, target, present)
    assert parts["ce"] < 1e-6 and parts["dice"] < 1e-3


def test_loss_stride_scores_the_cell_centre_pixels() -> None:
    """sem_loss_stride s: the cross-entropy of the logits upsampled to the s-times coarser grid against the
    target pixel nearest each cell's centre; s 1 is the full-resolution loss."""
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 32, 32))
    target[:, 2::4, 2::4][0, 0, :3] = 255
    present = torch.tensor([True, True])
    coarse = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(coarse, target[:, 2::4, 2::4], ignore_index=255)
    loss, _ = SemanticLoss({"sem_loss_stride": 4})(logits, target, present)
    torch.testing.assert_close(loss, ref)
    full, _ = SemanticLoss({"sem_loss_stride": 1})(logits, target, present)
    assert not torch.allclose(full, loss)
    with pytest.raises(ValueError, match="sem_loss_stride"):
        SemanticLoss({"sem_loss_stride": 0})


@pytest.mark.parametrize("chunk,stride", [(1, 1), (2, 2), (3, 1)])
def test_chunked_loss_and_gradient_equal_the_whole_batch(chunk: int, stride: int) -> None:
    """sem_loss_chunk c: the cross-entropy c images at a time (checkpointed) has the loss and the gradient of
    the whole batch at once, with ignored pixels, an unlabelled image and bf16 logits (AMP) among them."""
    torch.manual_seed(0)
    base = torch.randn(5, 7, 6, 8)
    target = torch.randint(0, 7, (5, 24, 32), dtype=torch.uint8)
    target[1, :5] = 255
    target[3, 4:9, 3:30] = 9  # outside [0, K): ignored too
    present = torch.tensor([True, True, False, True, True])
    for dtype in (torch.float32, torch.bfloat16):
        grads, values = [], []
        for c in (0, chunk):
            logits = base.to(dtype).detach().clone().requires_grad_()
            loss, parts = SemanticLoss({"sem_loss_stride": stride, "sem_loss_chunk": c})(logits, target, present)
            loss.backward()
            grads.append(logits.grad.float())
            values.append((loss, parts["ce"]))
        torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-6, atol=1e-6)
        assert values[1][1] == pytest.approx(values[0][1], rel=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)
        assert grads[0][2].abs().sum() == 0 and grads[0][0].abs().sum() > 0  # the unlabelled image gets none
    with pytest.raises(ValueError, match="sem_loss_chunk"):
        SemanticLoss({"sem_loss_chunk": -1})


def test_chunked_loss_keeps_one_chunk_of_full_resolution_tensors() -> None:
    """What the chunks are for: the largest tensor memory alive during the loss and its backward falls with the
    chunk (counted by benchmarks.memtrack, the tracker of profile_step --memory)."""
    from benchmarks.memtrack import TensorMemory

    logits0 = torch.randn(8, 20, 16, 16)
    target = torch.randint(0, 20, (8, 128, 128))
    peaks = {}
    for c in (0, 1):
        logits = logits0.clone().requires_grad_()
        with TensorMemory() as mem:
            loss, _ = SemanticLoss({"sem_loss_chunk": c})(logits, target, torch.ones(8, dtype=torch.bool))
            loss.backward()
        peaks[c] = mem.peak
    one_image = 20 * 128 * 128 * 4  # one image's upsampled fp32 logits
    assert peaks[0] > 8 * 2 * one_image  # the batch's upsampled logits and log-probabilities at once
    assert peaks[1] < 4 * one_image + 2 * target.numel() * 8


# ------------------------------------------------------------------------------------------------ protocol


class _OneMap:
    """The part of CocoDataset that evaluation at original resolution reads: the original map by index
    (``items`` says image ``a.jpg`` is index 0)."""

    def __init__(self, target: np.ndarray):
        self.target = target
        self.items = [(SimpleNamespace(images=Path("")), SimpleNamespace(file="a.jpg"))]

    def semantic_target(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        assert index == 0 and shape == self.target.shape
        return self.target


def test_miou_at_original_resolution_differs_from_letterboxed_and_matches_numpy() -> None:
    from utils.data.augment import letterbox
    from utils.data.dataset import Batch
    from utils.data.sample import Sample
    from utils.eval.evaluators import SemanticEvaluator
    from utils.ops.postprocess import postprocess

    # original 8 x 16 map with 1-px stripes of class 1 on odd columns; letterboxed to 8 x 8 (ratio 0.5,
    # 2 rows of padding above and below) the stripes cannot survive the nearest-neighbour downscale
    orig = np.zeros((8, 16), np.uint8)
    orig[:, 1::2] = 1
    sample, lb = letterbox(Sample(image=np.zeros((8, 16, 3), np.uint8), semantic=orig), 8)
    assert (lb.ratio, lb.pad, lb.orig_shape, lb.input_shape) == (0.5, (0.0, 2.0), (8, 16), (8, 8))
    assert set(np.unique(sample.semantic[2:6])) != {0, 1}
    # logits: the image's left half class 0, right half class 1; the padding says class 2, which must not leak
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 0, 2:6, :4] = logits[0, 1, 2:6, 4:] = 5.0
    logits[0, 2, :2] = logits[0, 2, 6:] = 10.0
    batch = Batch(images=torch.zeros(1, 3, 8, 8, dtype=torch.uint8), targets=torch.zeros(0, 6), segments=[],
                  semantic=torch.from_numpy(sample.semantic)[None], captions=[[]],
                  present=torch.tensor([[False, False, True, False]]), image_ids=[1], paths=["a.jpg"],
                  letterboxes=[lb])
    results = {}
    for at in ("input", "original"):
        evaluator = SemanticEvaluator(3, _OneMap(orig), at)
        # the evaluation path: postprocess (boxes would be in original pixels) with the map where it is scored
        evaluator.process(batch, postprocess({"sem_logits": logits}, batch.letterboxes, semantic_at=at,
                                             semantic_for=evaluator.wanted(batch)))
        results[at] = evaluator.meter.compute()
    # by hand: bilinear x2 of a step between input columns 3 and 4 puts it between original columns 7 and 8
    pred = np.zeros((8, 16), np.int64)
    pred[:, 8:] = 1
    ious = [((pred == c) & (orig == c)).sum() / ((pred == c) | (orig == c)).sum() for c in (0, 1)]
    assert ious == [1 / 3, 1 / 3]  # per row: 4 of the 12 pixels in either map are right, for both classes
    assert results["original"]["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert results["original"]["pixel_acc"] == pytest.approx((pred == orig).mean(), abs=1e-12)
    assert results["original"]["pixels"] == orig.size
    assert results["input"]["pixels"] == 4 * 8 and results["input"]["miou"] != pytest.approx(1 / 3)
