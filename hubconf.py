"""torch.hub entry points (YOLOv5's names), for a local clone; nothing is ever downloaded::

    model = torch.hub.load("path/to/yolor-mt", "custom", path="best.pt", source="local")   # or best.onnx
    results = model("image.jpg", conf=0.3)       # list of utils.deploy.predictor.Results

The model is :class:`utils.deploy.api.YOLOR`.
"""
from __future__ import annotations

from pathlib import Path

from utils.deploy.api import YOLOR

dependencies = ["torch", "numpy", "cv2", "yaml"]  # what torch.hub checks importable before loading


def custom(path: str | Path = "", device: str = "", half: bool = False) -> YOLOR:
    """A trained yolor-mt model from ``path`` (``.pt`` checkpoint, ``.onnx`` or any format the backends read).

    Args:
        path: the weights file; required (there are no pretrained weights to fetch).
        device: ``""`` (CUDA when available), ``"cpu"``, ``"0"``, ...
        half: FP16 inference (CUDA ``.pt`` models).
    Raises:
        FileNotFoundError: no ``path`` given, or it does not exist.
    """
    if not str(path):
        raise FileNotFoundError('custom: give the weights, e.g. torch.hub.load(repo, "custom", path="best.pt", '
                                'source="local") (yolor-mt never downloads weights)')
    return YOLOR(path, device, half)
