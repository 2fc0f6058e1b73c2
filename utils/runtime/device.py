"""Device selection, seeding and RNG state."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch


def select_device(device: str = "") -> torch.device:
    """'' picks CUDA:0 when available, else CPU; 'cpu', '0', 'cuda:1' as YOLOv5. Clear error if absent."""
    device = str(device).strip().lower().replace("cuda:", "")
    if device in ("", None):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    idx = int(device.split(",")[0])
    if idx >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{idx}")


def use_half(half: bool, device: torch.device, exported: bool = False) -> bool:
    """The scripts' one ``--half`` policy, Ultralytics': FP16 where it runs, i.e. a PyTorch model on a CUDA device;
    elsewhere a warning on stderr and FP32 (an exported graph keeps the precision it was exported with).

    Ultralytics warns and falls back in its predictor, validator and exporter alike, where YOLOv5 drops the flag
    silently in detect/val and fails in export: a precision hint that cannot apply is worth a line, not a failed
    run, and one rule for the three scripts is one less thing to remember.
    """
    if not half:
        return False
    why = "an exported model keeps its precision" if exported else (
        "" if device.type == "cuda" else "FP16 needs a CUDA device")
    if why:
        print(f"warning: --half ignored ({why}); running in FP32", file=sys.stderr)
        return False
    return True


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The mixed-precision dtype of training on ``device``, ``None`` for fp32 (``enabled`` False, or no fast
    low-precision path): float16 on CUDA (with a GradScaler); bfloat16 on a CPU whose instructions multiply bf16
    natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions measured a nano batch's forward + backward
    about 35% faster than fp32 (2 cores). bf16 keeps fp32's exponent range, so it needs no loss scaling. Without
    those instructions bf16 is emulated and slower than fp32, so such a CPU trains in fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seeds python, numpy and torch; deterministic kernels where they exist (warn-only elsewhere)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state(cuda: bool = False) -> dict:
    """This process's torch, numpy, python (and CUDA) RNG states as tensors and plain values, so a checkpoint
    holding them loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": list(np_state[2:]), "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return state | ({"cuda": torch.cuda.get_rng_state_all()} if cuda else {})


def set_rng_state(state: dict, cuda: bool = False) -> None:
    """Restores what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_pos"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if cuda and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
