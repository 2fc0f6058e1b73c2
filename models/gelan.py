"""YOLOv9's GELAN blocks (Wang et al. 2024, github.com/WongKinYiu/yolov9 ``models/common.py``): RepNCSPELAN4, ADown,
SPPELAN and the re-parameterizable conv they are built of. GeneralistYOLO's body is GELAN-C, which
``cfg/yolor-mt.yaml`` (the default body) is at scale l.

The only block that is not plain Conv-BN-SiLU is :class:`RepConvN`: a 3x3 and a 1x1 branch, each with its own
BatchNorm, summed before the activation (RepVGG without the identity branch). ``fuse()`` folds both BatchNorms and
then the 1x1 kernel, zero-padded to 3x3, into the 3x3 conv: one conv, the same function (exact up to float
rounding; the 1x1 branch has no padding and the 3x3 branch padding 1, so both see the same input pixel at the
kernel centre).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Conv


class RepConvN(nn.Module):
    """``act(bn(conv3x3(x)) + bn(conv1x1(x)))``; ``fuse()`` makes it ``act(conv3x3'(x))``."""

    def __init__(self, c1: int, c2: int, s: int = 1):
        super().__init__()
        self.conv1: nn.Module | None = Conv(c1, c2, 3, s, 1, act=False)
        self.conv2: nn.Module | None = Conv(c1, c2, 1, s, 0, act=False)
        self.conv: nn.Conv2d | None = None  # the single conv after fuse()
        self.act = nn.SiLU()
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Folds both branches (and their BatchNorms) into one 3x3 conv with bias. Idempotent."""
        if self.conv is not None:
            return
        self.conv1.fuse()
        self.conv2.fuse()
        k3, k1 = self.conv1.conv, self.conv2.conv
        fused = nn.Conv2d(k3.in_channels, k3.out_channels, 3, k3.stride, 1, bias=True).to(k3.weight.device,
                                                                                            k3.weight.dtype)
        fused.weight.copy_(k3.weight + F.pad(k1.weight, [1, 1, 1, 1]))
        fused.bias.copy_(k3.bias + k1.bias)
        self.conv = fused.requires_grad_(False)
        self.conv1 = self.conv2 = None


class RepNBottleneck(nn.Module):
    """RepConvN 3x3 then Conv 3x3, with a residual when the widths match."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """CSP of ``n`` RepNBottlenecks: one half through the bottlenecks, the other straight, concatenated, 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    """GELAN's block: a 1x1 to ``c3``, split in two; two stages of (RepNCSP of ``n`` + 3x3 conv) at ``c4`` chained on
    one half; every piece concatenated (ELAN: each stage's output kept), 1x1 to ``c2``."""

    def __init__(self, c1: int, c2: int, c3: int, c4: int, n: int = 1):
        super().__init__()
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, n), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, n), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in (self.cv2, self.cv3))
        return self.cv4(torch.cat(y, 1))


class ADown(nn.Module):
    """GELAN's stride-2 downsample: a 2x2 average (stride 1), then half the channels through a 3x3 stride-2 conv and
    half through a 3x3 max-pool + 1x1 conv, concatenated. Cheaper than a 3x3 stride-2 conv over all channels."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        if c1 % 2 or c2 % 2:
            raise ValueError(f"ADown needs even channel counts, got {c1} -> {c2}")
        self.cv1 = Conv(c1 // 2, c2 // 2, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, c2 // 2, 1, 1, 0)
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2, 1, 0, False, True)
        x1, x2 = x.chunk(2, 1)
        return torch.cat((self.cv1(x1), self.cv2(F.max_pool2d(x2, 3, 2, 1))), 1)


class SPPELAN(nn.Module):
    """SPP as an ELAN: a 1x1 to ``c3``, three chained 5x5 max-pools, all four concatenated, 1x1 to ``c2``."""

    def __init__(self, c1: int, c2: int, c3: int):
        super().__init__()
        self.cv1 = Conv(c1, c3, 1, 1)
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.cv5 = Conv(4 * c3, c2, 1, 1)
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv5(torch.cat(y, 1))
