"""Instance head (coefficients + prototypes), its fuse, the mask utilities and the mask loss."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torch import nn

from models.common import Conv
from models.heads.instance import InstanceHead, InstOutput
from models.implicit import Implicit
from tests.conftest import randomize_bn_and_implicits
from utils.data import augment as A
from utils.data.sample import Sample
from utils.loss.instance import InstanceLoss, gt_masks_from_batch
from utils.ops.masks import (
    assemble_masks,
    bilinear_matrix,
    box_mask,
    crop_masks,
    encode_rle,
    process_masks,
    rasterize_polygons,
    resize_masks_windowed,
)

CH, STRIDES, NM = [16, 24, 32], [8, 16, 32], 8


def make_head(form: str = "vector") -> InstanceHead:
    return InstanceHead(3, CH, STRIDES, nm=NM, npr=16, form=form)


def features(b: int = 2, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for c, s in zip(CH, STRIDES)]


def iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# ------------------------------------------------------------------------------------------------ head
def test_output_shapes():
    head = make_head().eval()
    out = head(features())
    assert isinstance(out, InstOutput)
    a = 8 * 8 + 4 * 4 + 2 * 2
    assert out.coeffs.shape == (2, a, NM)
    assert out.protos.shape == (2, NM, 16, 16)  # stride 4 of a 64 x 64 input
    assert head.proto_stride == 4
    head.train()
    out = head(features())
    assert out.coeffs.shape == (2, a, NM) and out.protos.shape == (2, NM, 16, 16)


def test_coeff_order_matches_levels():
    """Row a of coeffs is anchor a: level 0 row-major first, then level 1, ..."""
    head = make_head().eval()
    xs = features(1)
    out = head(xs)
    lvl1 = head.coef_out[1](head.coef_stem[1](head.task_in[1](xs[1])))  # (1, nm, 4, 4)
    torch.testing.assert_close(out.coeffs[0, 64:80], lvl1[0].flatten(1).T)


@pytest.mark.parametrize("form", ["vector", "nn", "mf"])
def test_fuse_is_exact_and_complete(form):
    head = make_head(form).eval()
    randomize_bn_and_implicits(head)
    xs = features()
    with torch.no_grad():
        ref = head(xs)
        for m in head.modules():
            if isinstance(m, Conv):
                m.fuse()
        head.fuse()
        got = head(xs)
    assert not any(isinstance(m, (nn.BatchNorm2d, Implicit)) for m in head.modules())
    torch.testing.assert_close(got.coeffs, ref.coeffs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.protos, ref.protos, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- mask utils
def test_assemble_and_crop():
    protos = torch.randn(NM, 16, 16)
    coeffs = torch.randn(3, NM)
    masks = assemble_masks(protos, coeffs)
    torch.testing.assert_close(masks[1], torch.einsum("k,khw->hw", coeffs[1], protos))
    boxes = torch.tensor([[2.0, 3.0, 10.0, 7.0], [0.0, 0.0, 16.0, 16.0], [5.0, 5.0, 5.0, 9.0]])
    cropped = crop_masks(masks, boxes)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:7, 2:10] = True
    assert (cropped[0][~inside] == 0).all() and torch.equal(cropped[0][inside], masks[0][inside])
    torch.testing.assert_close(cropped[1], masks[1])
    assert (cropped[2] == 0).all()  # an empty box keeps nothing
    assert crop_masks(masks > 0, boxes).dtype == torch.bool


def test_process_masks_crops_at_input_resolution():
    protos = torch.ones(NM, 16, 16)
    coeffs = torch.ones(2, NM)  # positive logits everywhere
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 64.0, 64.0]])
    m = process_masks(protos, coeffs, boxes, (64, 64))
    assert m.shape == (2, 64, 64) and m.dtype == torch.bool
    assert m[0].sum() == 20 * 30 and m[0, 20:50, 10:30].all()
    assert m[1].all()
    assert process_masks(protos, coeffs[:0], boxes[:0], (64, 64)).shape == (0, 64, 64)


def test_encode_rle_round_trip():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 30, generator=g) > 0.5
    rles = encode_rle(masks)
    assert len(rles) == 3 and all(isinstance(r["counts"], str) for r in rles)
    assert rles[0]["size"] == [20, 30]
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert encode_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []


def test_masks_to_original_undoes_letterbox():
    h0, w0 = 48, 80
    orig = np.zeros((h0, w0), np.uint8)
    orig[10:30, 20:60] = 255
    sample = Sample(image=np.repeat(orig[..., None], 3, 2))
    boxed, lb = A.letterbox(sample, 64)
    assert lb.pad[1] > 0 and lb.orig_shape == (h0, w0)  # really padded
    at_input = torch.from_numpy(boxed.image[..., 0] > 127)[None]
    back = lb.masks_to_original(at_input)
    assert back.shape == (1, h0, w0) and back.dtype == torch.bool
    assert iou(back[0], orig > 0) > 0.95


def test_rasterize_square():
    square = np.array([[16, 8], [48, 8], [48, 40], [16, 40]], np.float32)
    m = rasterize_polygons([[square], []], (64, 64), downsample=4)
    assert m.shape == (2, 16, 16) and m.dtype == np.uint8
    expected = np.zeros((16, 16), np.uint8)
    expected[2:10, 4:12] = 1
    assert np.array_equal(m[0], expected)
    assert m[1].sum() == 0
    full = rasterize_polygons([[square]], (64, 64), downsample=1)[0]
    assert full.sum() == 32 * 32 and full[8:40, 16:48].all()


def test_gt_masks_follow_pad_targets_order():
    from utils.loss.detection import pad_targets

    sq = lambda x1, y1, x2, y2: [np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)]
    # image indices interleaved on purpose: pad_targets sorts them stably by image
    targets = torch.tensor([[1, 0, 0, 0, 16, 16], [0, 1, 32, 32, 64, 64], [1, 2, 16, 16, 48, 48]], dtype=torch.float32)
    segments = [sq(0, 0, 16, 16), sq(32, 32, 64, 64), sq(16, 16, 48, 48)]
    masks = gt_masks_from_batch(segments, targets, 3, (64, 64), 4)
    assert [tuple(m.shape) for m in masks] == [(1, 16, 16), (2, 16, 16), (0, 16, 16)]
    cls, boxes, _ = pad_targets(targets, 3)
    for i in range(2):
        for g, m in enumerate(masks[i]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            got = torch.stack((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)).float() * 4
            torch.testing.assert_close(got, boxes[i, g])


# ------------------------------------------------------------------------------------------------ loss
def _overfit_segments() -> list[list[np.ndarray]]:
    """An ellipse in image 0; a triangle and a rectangle in image 1 (input pixels)."""
    t = np.linspace(0, 2 * np.pi, 40)[:-1]
    ellipse = np.stack((32 + 20 * np.cos(t), 36 + 12 * np.sin(t)), 1).astype(np.float32)
    tri = np.array([[3, 3], [43, 3], [3, 43]], np.float32)
    rect = np.array([[36, 40], [60, 40], [60, 58], [36, 58]], np.float32)
    return [[ellipse], [tri], [rect]]


def _overfit_problem():
    """Two 64 x 64 images, three objects, with a hand-made assignment on the stride-8 level."""
    targets = torch.tensor([[0, 0, 12, 24, 52, 48], [1, 1, 3, 3, 43, 43], [1, 2, 36, 40, 60, 58]]).float()
    gt = gt_masks_from_batch(_overfit_segments(), targets, 2, (64, 64), 4)
    a = 8 * 8 + 4 * 4 + 2 * 2
    fg = torch.zeros(2, a, dtype=torch.bool)
    target_gt = torch.zeros(2, a, dtype=torch.long)
    target_boxes = torch.zeros(2, a, 4)
    cx = (torch.arange(8) + 0.5) * 8  # stride-8 anchor centres
    yy, xx = torch.meshgrid(cx, cx, indexing="ij")
    pts = torch.stack((xx, yy), -1).view(-1, 2)
    for img, slot, row in ((0, 0, 0), (1, 0, 1), (1, 1, 2)):
        box = targets[row, 2:]
        inside = ((pts > box[:2]) & (pts < box[2:])).all(1)
        fg[img, :64] |= inside
        target_gt[img, :64][inside] = slot
        target_boxes[img, :64][inside] = box
    return targets, gt, fg, target_gt, target_boxes


def test_loss_overfits_two_images():
    torch.manual_seed(0)
    targets, gt, fg, target_gt, target_boxes = _overfit_problem()
    head = make_head()
    xs = features(2, seed=1)
    loss_fn = InstanceLoss({"mask": 1.0}, NM)
    present = torch.tensor([True, True])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss, parts = loss_fn(head(xs), fg, target_gt, target_boxes, gt, present)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["mask"])
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        out = head(xs)
    for img, slot, row in ((0, 0, 0), (1, 0, 1), (1, 1, 2)):
        anchors = torch.nonzero(fg[img] & (target_gt[img] == slot))[:, 0]
        boxes = targets[row, 2:].expand(len(anchors), 4)
        pred = process_masks(out.protos[img], out.coeffs[img, anchors], boxes, (64, 64))
        target = rasterize_polygons([_overfit_segments()[row]], (64, 64), 1)[0]
        assert min(iou(m, target) for m in pred) > 0.8  # every anchor of the object has learned it


def test_absent_images_do_not_count():
    targets, gt, fg, target_gt, target_boxes = _overfit_problem()
    head = make_head()
    out = head(features(2))
    loss_fn = InstanceLoss({}, NM)
    present = torch.tensor([True, False])
    coeffs = out.coeffs.detach().requires_grad_(True)
    loss, _ = loss_fn(InstOutput(coeffs, out.protos), fg, target_gt, target_boxes, gt, present)
    loss.backward()
    assert coeffs.grad[1].abs().sum() == 0 and coeffs.grad[0].abs().sum() > 0
    # changing image 1's labels or predictions leaves the loss alone
    gt2 = [gt[0], 1 - gt[1]]
    coeffs2 = coeffs.detach().clone()
    coeffs2[1] += 3.0
    loss2, _ = loss_fn(InstOutput(coeffs2, out.protos), fg, target_gt, target_boxes, gt2, present)
    torch.testing.assert_close(loss2, loss.detach())
    # ... and equals the loss of image 0 alone (count normalisation over present images only)
    only0, _ = loss_fn(InstOutput(coeffs.detach()[:1], out.protos[:1]), fg[:1], target_gt[:1],
                       target_boxes[:1], gt[:1], present[:1])
    torch.testing.assert_close(loss.detach(), only0 * 2)


def test_zero_foreground_is_zero_and_backprops():
    _, gt, fg, target_gt, target_boxes = _overfit_problem()
    head = make_head()
    out = head(features(2))
    loss_fn = InstanceLoss({}, NM)
    for fg_, present in ((torch.zeros_like(fg), torch.tensor([True, True])), (fg, torch.tensor([False, False]))):
        loss, parts = loss_fn(out, fg_, target_gt, target_boxes, gt, present)
        assert torch.isfinite(loss) and float(loss.detach()) == 0.0 and parts["mask"] == 0.0
        loss.backward(retain_graph=True)
    assert all(p.grad is not None for p in head.coef_out.parameters())


def test_objects_without_polygons_are_skipped():
    targets, gt, fg, target_gt, target_boxes = _overfit_problem()
    out = make_head()(features(2))
    loss_fn = InstanceLoss({}, NM)
    present = torch.tensor([True, True])
    ref, _ = loss_fn(out, fg, target_gt, target_boxes, gt, present)
    gt_unknown = [torch.zeros_like(gt[0]), gt[1]]  # image 0's only object has no polygon
    fg1 = fg.clone()
    fg1[0] = False
    got, _ = loss_fn(out, fg, target_gt, target_boxes, gt_unknown, present)
    want, _ = loss_fn(out, fg1, target_gt, target_boxes, gt, present)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, ref)


def _reference_process_masks(protos, coeffs, boxes, shape):
    """The whole-image path the windowed one replaces: upsample every mask over the input, then crop."""
    logits = assemble_masks(protos, coeffs)
    up = torch.nn.functional.interpolate(logits[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
    return (up > 0) & box_mask(boxes, *shape)


@pytest.mark.parametrize("shape", [(64, 64), (96, 72)])
def test_windowed_process_masks_equal_the_whole_image_path(shape):
    g = torch.Generator().manual_seed(1)
    protos, coeffs = torch.randn(NM, 16, 16, generator=g), torch.randn(40, NM, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([shape[1], shape[0]])
    wh = torch.rand(40, 2, generator=g) * 40
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)  # some cross the image border
    got = process_masks(protos, coeffs, boxes, shape)
    want = _reference_process_masks(protos, coeffs, boxes, shape)
    assert want.any() and want.sum() < 0.5 * want.numel()  # masks of every size, not all empty or full
    assert (got != want).sum() <= 2  # float rounding at logit exactly 0 only


@pytest.mark.parametrize("size", [(48, 80), (200, 130), (20, 30)])
def test_windowed_resize_equals_interpolate(size):
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(12, 64, 64, dtype=torch.bool)
    for k in range(12):
        y, x = torch.randint(0, 56, (2,), generator=g).tolist()
        masks[k, y:y + 1 + k, x:x + 3 + k] = torch.rand(1 + k, 3 + k, generator=g)[: 64 - y, : 64 - x] > 0.2
    masks[0] = False  # an empty mask stays empty
    want = torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="bilinear",
                                           align_corners=False)[:, 0] >= 0.5
    got = resize_masks_windowed(masks, size)
    assert want.any() and not got[0].any()
    assert (got != want).sum() <= 2  # float rounding at exactly 0.5 only


def test_bilinear_matrix_is_interpolate():
    x = torch.randn(1, 1, 7, 11)
    for size in [(7, 11), (20, 33), (3, 4)]:
        want = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0]
        got = bilinear_matrix(7, size[0]) @ x[0, 0] @ bilinear_matrix(11, size[1]).T
        assert torch.allclose(got, want, atol=1e-5)
