"""One file per head. ``HEADS`` maps the cfg module name to the class; each class has a ``task``."""
from models.heads.detect import Detect

HEADS = {"Detect": Detect}
