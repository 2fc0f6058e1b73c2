"""benchmarks.feature_probe: the instance colour it reads and the linear probe it fits."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.feature_probe import instance_colour, probe_accuracy
from utils.data.synthetic import PALETTE


def test_instance_colour_reads_the_polygon_not_its_surroundings():
    image = np.full((40, 40, 3), PALETTE["blue"][::-1], np.uint8)  # RGB background of the palette's blue
    image[10:30, 10:30] = PALETTE["red"][::-1]
    square = [np.array([[10, 10], [29, 10], [29, 29], [10, 29]], np.float32)]
    assert instance_colour(image, square) == list(PALETTE).index("red")
    assert instance_colour(image, [np.array([[0, 0], [1, 0], [1, 1]], np.float32)]) == -1  # eroded away: no pixel


def test_probe_separates_what_the_features_hold_and_not_what_they_lack():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    x = torch.randn(400, 8, generator=g)
    x[:, 0] += 8 * y  # the label is written in one channel, far above its noise
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.95
    noise = torch.randn(400, 8, generator=g)
    assert probe_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.6
