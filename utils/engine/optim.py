"""The optimizer's parameter groups (YOLOv5's three: biases, decayed weights, undecayed)."""
from __future__ import annotations

import torch
from torch import nn

from models.implicit import Implicit


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, decay: float) -> torch.optim.Optimizer:
    """Three groups, as YOLOv5: 0 biases (no decay; the warmup ramps its lr from warmup_bias_lr), 1 decayed
    weights, 2 no decay: every parameter anywhere inside an Implicit module (any form, including the nn form's
    Linear weight) and normalisation weights.

    A bias is any parameter whose name has "bias" as an underscore-separated word (bias, and
    MultiheadAttention's in_proj_bias, bias_k and bias_v).  Each parameter lands in exactly one group, the
    first time it is met (shared ones are not repeated).

    Args:
        model: the network (not a DDP wrapper: group membership goes by module type).
        name: ``SGD``, ``Adam`` or ``AdamW`` (``--optimizer auto`` is resolved by the caller).
        lr: the initial learning rate of every group; momentum: SGD momentum, or Adam's beta1.
        decay: the weight decay of group 1.
    """
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # _NormBase: BatchNorm*, SyncBN, InstanceNorm
    decayed, undecayed, biases = [], [], []
    seen: set[int] = set()
    # named_modules() visits a parent before its children, so the Implicit modules a module is nested
    # in are known when its own parameters are met: their prefixes mark the whole subtree as implicit.
    implicit_prefixes: list[str] = []
    for mname, module in model.named_modules():
        if isinstance(module, Implicit):
            implicit_prefixes.append(mname + "." if mname else "")
        in_implicit = any((mname + ".").startswith(pre) for pre in implicit_prefixes)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if in_implicit or isinstance(module, norms):
                undecayed.append(p)  # implicit knowledge and norm scales are not shrunk toward 0
            elif "bias" in pname.split("_"):  # bias, in_proj_bias, bias_k, bias_v
                biases.append(p)
            else:
                decayed.append(p)
    if name == "SGD":
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        opt = cls(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"--optimizer {name}: choose SGD, Adam, AdamW or auto")
    opt.add_param_group({"params": decayed, "weight_decay": decay})
    opt.add_param_group({"params": undecayed, "weight_decay": 0.0})
    return opt


def fit_adamw_lr(lr0: float, nc: int) -> float:
    """Ultralytics' AdamW learning rate for ``--optimizer auto`` (hyp ``lr_fit: true``): ``lr0 * 5 / (4 + nc)``,
    i.e. ``lr0`` for one class, less for many (0.00111 for 5 classes, 0.00012 for COCO's 80 from 0.002)."""
    return lr0 * 5.0 / (4 + max(int(nc), 1))


def freeze_rows(spec: str | int | None, n_rows: int) -> list[int]:
    """The cfg rows ``--freeze`` names: ``N`` the first N rows, ``i,j,...`` those rows (YOLOv5's rule: one
    number is a count, several are indices; ``"5,"`` is row 5 alone); ``""`` / ``0``: none.

    Raises ValueError on anything else, or a row the cfg does not have (it has ``n_rows``).
    """
    text = str(spec if spec is not None else "").strip()
    if text in ("", "0"):
        return []
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise ValueError(f"--freeze {text}: expected a row count N or a comma list of row indices") from None
    if not values:
        return []
    rows = list(range(values[0])) if len(parts) == 1 else sorted(set(values))
    bad = [r for r in rows if not 0 <= r < n_rows]
    if bad or (len(parts) == 1 and values[0] < 0):
        raise ValueError(f"--freeze {text}: the cfg has rows 0..{n_rows - 1}")
    return rows


def freeze(model: nn.Module, rows: list[int]) -> int:
    """Stops gradients to every parameter of the ``layers.<row>.`` modules in ``rows`` (they then never move:
    no gradient, so no optimizer step or weight decay touches them); returns how many tensors were frozen.

    Their BatchNorm statistics are held by :func:`hold_frozen_statistics`, called after every ``model.train()``.
    """
    params = row_parameters(model, rows)
    for p in params.values():
        p.requires_grad_(False)
    return len(params)


def row_parameters(model: nn.Module, rows: list[int]) -> dict[str, nn.Parameter]:
    """The parameters of the cfg ``rows`` (the ``layers.<row>.`` modules), by name."""
    prefixes = tuple(f"layers.{r}." for r in rows)
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}


def hold_frozen_statistics(model: nn.Module, rows: list[int]) -> None:
    """Puts the BatchNorm layers of the frozen ``rows`` in eval mode: they normalize with their running
    statistics and never update them, so a frozen row computes in training what it computes at test time
    (detectron2's FrozenBatchNorm; YOLOv5 and Ultralytics let them move). A stage that trains only the caption
    head on a frozen body otherwise shifts every other task's features: box mAP 0.906 -> 0.897 (README)."""
    for r in rows:
        for m in model.layers[r].modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
