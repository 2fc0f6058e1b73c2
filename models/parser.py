"""YAML cfg -> modules. Rows are ``[from, number, module, args]``; modules come from a registry (no eval).

Every error names the cfg file, the section and the row index, because a cfg is written by hand.
A cfg's ``scale`` picks the body's multiples from ``scales`` and the heads' args from ``head_scales`` (see
:func:`resolve_head_sizes`), so one cfg describes a whole model at every size.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from models.common import SPPCSP, SPPF, Bottleneck, BottleneckCSP, C2f, Concat, Conv
from models.gelan import SPPELAN, ADown, RepNCSPELAN4
from models.heads import HEADS
from models.implicit import FORMS, Implicit, ImplicitA, ImplicitC, ImplicitM, fold_error

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"
SECTIONS = ("backbone", "neck", "heads")
TOP_KEYS = {"nc", "scales", "scale", "head_scales", "depth_multiple", "width_multiple", "max_channels", "implicit",
            *SECTIONS}


class CfgError(ValueError):
    """A cfg file that cannot be built; the message names the row."""


@dataclass
class Row:
    """One parsed cfg row, and what building it produced."""

    index: int
    section: str
    source: list[int]  # absolute indices of the inputs
    module: nn.Module | None  # None: a head row skipped because its task was not requested
    name: str
    c_out: int
    stride: float
    task: str | None = None  # set for head rows


@dataclass
class ModuleSpec:
    """How a registry entry is built: arg count range and a builder returning (module, c_out, stride)."""

    min_args: int
    max_args: int
    build: Callable[..., tuple[nn.Module, int, float]]
    repeats: bool = False  # True: ``number`` is passed into the block (CSP), not stacked


@dataclass
class BuildContext:
    """What a builder may read: the input channels/strides, scaling, the dataset and the head extras."""

    ch: list[int]
    strides: list[float]
    n: int
    nc: int
    width: Callable[[int], int]
    form: str
    head_kwargs: dict[str, Any] = field(default_factory=dict)


def _conv(ctx: BuildContext, c2, k=1, s=1, p=None, g=1, act=True):
    c2 = ctx.width(c2)
    return Conv(ctx.ch[0], c2, k, s, p, g, act), c2, ctx.strides[0] * s


def _bottleneck(ctx: BuildContext, c2, shortcut=True):
    c2 = ctx.width(c2)
    return Bottleneck(ctx.ch[0], c2, shortcut), c2, ctx.strides[0]


def _csp(ctx: BuildContext, c2, shortcut=True):
    c2 = ctx.width(c2)
    return BottleneckCSP(ctx.ch[0], c2, ctx.n, shortcut), c2, ctx.strides[0]


def _c2f(ctx: BuildContext, c2, shortcut=False):
    c2 = ctx.width(c2)
    return C2f(ctx.ch[0], c2, ctx.n, shortcut), c2, ctx.strides[0]


def _sppcsp(ctx: BuildContext, c2):
    c2 = ctx.width(c2)
    return SPPCSP(ctx.ch[0], c2), c2, ctx.strides[0]


def _sppf(ctx: BuildContext, c2, k=5):
    c2 = ctx.width(c2)
    return SPPF(ctx.ch[0], c2, k), c2, ctx.strides[0]


def _elan(ctx: BuildContext, c2, c3, c4):
    c2, c3, c4 = ctx.width(c2), ctx.width(c3), ctx.width(c4)
    return RepNCSPELAN4(ctx.ch[0], c2, c3, c4, ctx.n), c2, ctx.strides[0]


def _adown(ctx: BuildContext, c2):
    c2 = ctx.width(c2)
    return ADown(ctx.ch[0], c2), c2, ctx.strides[0] * 2


def _sppelan(ctx: BuildContext, c2, c3):
    c2, c3 = ctx.width(c2), ctx.width(c3)
    return SPPELAN(ctx.ch[0], c2, c3), c2, ctx.strides[0]


def _upsample(ctx: BuildContext, scale=2, mode="nearest"):
    return nn.Upsample(scale_factor=scale, mode=mode), ctx.ch[0], ctx.strides[0] / scale


def _concat(ctx: BuildContext, dim=1):
    if len(set(ctx.strides)) != 1:
        raise CfgError(f"Concat inputs have different strides {ctx.strides}")
    return Concat(dim), sum(ctx.ch), ctx.strides[0]


def _implicit(cls: type[Implicit]):
    def build(ctx: BuildContext, form=None):
        form = form or ctx.form
        return cls(ctx.ch[0], form), ctx.ch[0], ctx.strides[0]
    return build


def _implicit_concat(ctx: BuildContext, c2, form=None):
    c2 = ctx.width(c2)
    return ImplicitC(c2, form or ctx.form), ctx.ch[0] + c2, ctx.strides[0]


def _head(ctx: BuildContext, cls: type[nn.Module], *args):
    module = cls(ctx.nc, ctx.ch, ctx.strides, *args, form=ctx.form, **ctx.head_kwargs.get(cls.task, {}))
    return module, 0, ctx.strides[0]


def registry() -> dict[str, ModuleSpec]:
    """Module name -> spec. Heads are imported here so the registry is the one place that knows them."""

    reg = {
        "Conv": ModuleSpec(1, 6, _conv),
        "Bottleneck": ModuleSpec(1, 2, _bottleneck),
        "BottleneckCSP": ModuleSpec(1, 2, _csp, repeats=True),
        "C2f": ModuleSpec(1, 2, _c2f, repeats=True),
        "SPPCSP": ModuleSpec(1, 1, _sppcsp),
        "SPPF": ModuleSpec(1, 2, _sppf),
        # YOLOv9's GELAN (models/gelan.py); RepNCSPELAN4's ``number`` is its RepNCSP depth (YOLOv9's 4th arg, c5)
        "RepNCSPELAN4": ModuleSpec(3, 3, _elan, repeats=True),
        "ADown": ModuleSpec(1, 1, _adown),
        "SPPELAN": ModuleSpec(2, 2, _sppelan),
        "Upsample": ModuleSpec(0, 2, _upsample),
        "Concat": ModuleSpec(0, 1, _concat),
        "ImplicitA": ModuleSpec(0, 1, _implicit(ImplicitA)),
        "ImplicitM": ModuleSpec(0, 1, _implicit(ImplicitM)),
        "ImplicitC": ModuleSpec(1, 2, _implicit_concat),
    }
    for name, cls in HEADS.items():
        reg[name] = ModuleSpec(0, 5, lambda ctx, *a, _cls=cls: _head(ctx, _cls, *a))
    return reg


def resolve_cfg(cfg: str | Path) -> tuple[Path, str | None]:
    """Finds a cfg file. ``cfg/yolor-mt-n.yaml`` with no such file means ``cfg/yolor-mt.yaml`` at scale ``n``."""
    path = Path(cfg)
    candidates = [path, CFG_DIR / path.name]
    for p in candidates:
        if p.is_file():
            return p, None
    stem, _, scale = path.stem.rpartition("-")
    for p in (path.with_name(f"{stem}{path.suffix}"), CFG_DIR / f"{stem}{path.suffix}"):
        if stem and p.is_file():
            return p, scale
    raise CfgError(f"cfg file not found: {cfg} (looked in . and {CFG_DIR})")


def load_cfg(cfg: str | Path | dict) -> dict:
    """Reads a cfg yaml (or copies a dict) and checks its top-level keys."""
    if isinstance(cfg, dict):
        d, name, scale = dict(cfg), d_name(cfg), None
    else:
        path, scale = resolve_cfg(cfg)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CfgError(f"{path}: not valid YAML: {e}") from None
        name = str(path)
        d["_file"] = name
    unknown = set(d) - TOP_KEYS - {"_file"}
    if unknown:
        raise CfgError(f"{name}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if scale is not None:
        if scale not in (d.get("scales") or {}):
            raise CfgError(f"{name}: no scale '{scale}' (scales: {sorted(d.get('scales') or {})})")
        d["scale"] = scale
    return resolve_head_sizes(d)


def scale_name(d: dict) -> str | None:
    """The scale a cfg is built at (``scale``, else the first of ``scales``); None when it gives explicit multiples."""
    if "depth_multiple" in d or "width_multiple" in d:
        return None
    scales = d.get("scales") or {}
    return d.get("scale") or next(iter(scales), None)


def resolve_head_sizes(d: dict) -> dict:
    """``d`` with each head row's args replaced by ``head_scales[scale][module]``: the heads sized for the scale.

    ``head_scales`` maps every scale of ``scales`` to ``{head module: args}``; a head it does not list keeps its
    row's args, and so does every head of a cfg given explicit multiples (no scale name). The rule behind each
    entry is the cfg's to state (a comment), as the body's widths are; the parser only looks the row up, so a
    built model's ``yaml`` shows the args it was built with. Idempotent: resolving a resolved cfg changes nothing.
    """
    table, scale, name = d.get("head_scales"), scale_name(d), d_name(d)
    if table is None or scale is None:
        return d
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise CfgError(f"{name}: head_scales must map each scale to {{head module: args}}, got {table!r}")
    scales = set(d.get("scales") or {})
    if set(table) != scales:
        raise CfgError(f"{name}: head_scales has scales {sorted(table)}, scales has {sorted(scales)}; "
                       "give every scale its head sizes")
    if scale not in scales:
        return d  # scale_multiples names the unknown scale
    sizes = table[scale]
    unknown = set(sizes) - set(HEADS)
    if unknown:
        raise CfgError(f"{name}: head_scales[{scale}] names {sorted(unknown)}, not heads; heads: {sorted(HEADS)}")
    heads = [[r[0], r[1], r[2], list(sizes[r[2]])] if isinstance(r, (list, tuple)) and len(r) == 4 and r[2] in sizes
             else r for r in d.get("heads") or []]
    return {**d, "heads": heads}


def d_name(d: dict) -> str:
    return str(d.get("_file", "<cfg dict>"))


def scale_multiples(d: dict) -> tuple[float, float, int]:
    """(depth multiple, width multiple, max channels) from ``scales``/``scale`` or the explicit keys."""
    if "depth_multiple" in d or "width_multiple" in d:
        return float(d.get("depth_multiple", 1.0)), float(d.get("width_multiple", 1.0)), int(d.get("max_channels", 1 << 16))
    scales = d.get("scales") or {"l": [1.0, 1.0, 1024]}
    scale = scale_name(d) or next(iter(scales))
    if scale not in scales:
        raise CfgError(f"{d_name(d)}: scale '{scale}' not in scales {sorted(scales)}")
    depth, width, max_ch = scales[scale]
    return float(depth), float(width), int(max_ch)


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def parse_model(d: dict, nc: int, tasks: set[str] | None = None, ch: int = 3,
                head_kwargs: dict[str, dict] | None = None) -> list[Row]:
    """Builds every row of cfg dict ``d``. Head rows whose task is not in ``tasks`` are skipped."""

    name = d_name(d)
    depth, width, max_ch = scale_multiples(d)
    form = d.get("implicit", "vector")
    if form not in FORMS:
        raise CfgError(f"{name}: implicit form '{form}' unknown; choose one of {FORMS}")
    reg = registry()
    rows: list[Row] = []
    chans: list[int] = []
    strides: list[float] = []
    flat = [(s, r) for s in SECTIONS for r in (d.get(s) or [])]
    if not flat:
        raise CfgError(f"{name}: no rows in {SECTIONS}")
    for i, (section, row) in enumerate(flat):
        where = f"{name} row {i} ({section})"
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise CfgError(f"{where}: expected [from, number, module, args], got {row!r}")
        src, number, mname, args = row
        if mname not in reg:
            raise CfgError(f"{where}: unknown module '{mname}'; known: {sorted(reg)}")
        spec = reg[mname]
        args = list(args or [])
        if not spec.min_args <= len(args) <= spec.max_args:
            raise CfgError(f"{where}: {mname} takes {spec.min_args}..{spec.max_args} args, got {len(args)}: {args}")
        args = [nc if a == "nc" else a for a in args]
        srcs = [src] if isinstance(src, int) else list(src) if isinstance(src, (list, tuple)) else None
        if not srcs or not all(isinstance(s, int) for s in srcs):
            raise CfgError(f"{where}: 'from' must be an int or a list of ints, got {src!r}")
        absolute = []
        for s in srcs:
            if s == -1 and i == 0:
                absolute.append(-1)  # the input image
                continue
            j = i + s if s < 0 else s
            if not 0 <= j < i:
                raise CfgError(f"{where}: 'from' index {s} does not point at an earlier row")
            if rows[j].task is not None:
                raise CfgError(f"{where}: 'from' index {s} points at head row {j}; heads are outputs")
            absolute.append(j)
        if not isinstance(number, int) or number < 1:
            raise CfgError(f"{where}: number must be a positive int, got {number!r}")
        n = max(round(number * depth), 1) if number > 1 else 1
        head_cls = HEADS.get(mname)
        if head_cls is not None and tasks is not None and head_cls.task not in tasks:
            rows.append(Row(i, section, absolute, None, mname, 0, 0.0, task=head_cls.task))  # not built
            chans.append(0)
            strides.append(0.0)
            continue
        ctx = BuildContext(
            ch=[ch if j == -1 else chans[j] for j in absolute],
            strides=[1.0 if j == -1 else strides[j] for j in absolute],
            n=n if spec.repeats else 1, nc=nc,
            width=lambda c: make_divisible(min(c, max_ch) * width, 8),
            form=form, head_kwargs=head_kwargs or {})
        try:
            built = [spec.build(ctx, *args) for _ in range(1 if spec.repeats else n)]
        except CfgError as e:
            raise CfgError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise CfgError(f"{where}: cannot build {mname}{args}: {e}") from None
        modules = [b[0] for b in built]
        if len(modules) > 1 and built[0][1] != ctx.ch[0]:  # stacked copies must chain
            raise CfgError(f"{where}: {mname} stacked {n}x must keep its channel count ({ctx.ch[0]} -> {built[0][1]})")
        module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
        c_out, stride = built[0][1], built[0][2]
        rows.append(Row(i, section, absolute, module, mname, c_out, stride,
                        task=head_cls.task if head_cls else None))
        chans.append(c_out)
        strides.append(stride)
    check_implicit_placement(rows, name)
    check_head_pairing(rows, name)
    if not any(r.task for r in rows if r.module is not None):
        raise CfgError(f"{name}: no head is built (tasks requested: {sorted(tasks or [])})")
    return rows


def check_head_pairing(rows: list[Row], name: str) -> None:
    """Refuses an instance head beside a detection head whose predictions are not one per anchor point.

    The instance head predicts mask coefficients per anchor point and is trained with the anchor-free
    assignment; an anchor-based head has ``na`` predictions per cell and its own matching.
    """
    built = {r.task: r for r in rows if r.task and r.module is not None}
    det, inst = built.get("det"), built.get("inst")
    if det is not None and inst is not None and not getattr(det.module, "anchor_free", True):
        raise CfgError(f"{name} row {inst.index} ({inst.section}): {inst.name} needs an anchor-free detection head "
                       f"(mask coefficients per anchor point, trained with its assignment), but row {det.index} is "
                       f"{det.name}; use Detect, or drop the inst task (--tasks det,sem,cap)")


def check_implicit_placement(rows: list[Row], name: str) -> None:
    """Refuses implicit rows that ``fuse()`` could not fold exactly into the convs that read them."""
    for row in rows:
        if not isinstance(row.module, Implicit):
            continue
        consumers = [r for r in rows if row.index in r.source and r.module is not None]
        where = f"{name} row {row.index} ({row.section})"
        if not consumers:
            raise CfgError(f"{where}: {row.name} output is never used; an implicit row must feed a Conv row")
        for r in consumers:
            if not isinstance(r.module, Conv) or len(r.source) != 1:
                raise CfgError(f"{where}: {row.name} feeds row {r.index} ({r.name}); an implicit row may feed only "
                               "single-input Conv rows, so fuse() can fold it into them")
            reason = fold_error(row.module, r.module.conv, "next")
            if reason:
                raise CfgError(f"{where}: {reason}")
