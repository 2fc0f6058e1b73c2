"""One file per head. ``HEADS`` maps the cfg module name to the class; each class has a ``task``."""
from models.heads.caption import CaptionHead
from models.heads.detect import Detect
from models.heads.detect_anchor import DetectAnchor
from models.heads.instance import InstanceHead
from models.heads.semantic import SemanticHead

HEADS = {"Detect": Detect, "DetectAnchor": DetectAnchor, "InstanceHead": InstanceHead, "SemanticHead": SemanticHead,
         "CaptionHead": CaptionHead}
