"""YOLOR implicit knowledge layers and the rules that fold them into a neighbouring conv.

Implicit knowledge (YOLOR, Wang et al. 2021) is an input-independent, learned per-channel
vector that is added to (``ImplicitA``), multiplied with (``ImplicitM``) or concatenated
onto (``ImplicitC``) a feature map.  Because it does not depend on the input it can usually
be folded into an adjacent ``nn.Conv2d`` for deployment, so inference pays nothing for it.

The vector can be modelled in three forms (YOLOR Sec. 3.2), picked by a cfg string:

* ``"vector"``: a plain learned vector ``z`` of shape ``(C,)``.
* ``"nn"``:     ``W z``  - a learned latent ``z`` (``dim``) mapped by a bias-free
  ``nn.Linear(dim, C)``, plus a fixed offset (1 for multiply, 0 otherwise).  A learned bias
  would itself be a free ``(C,)`` vector, collapsing the form into ``"vector"``.
* ``"mf"``:     ``Z^T c`` - matrix factorisation with learned ``Z`` (``dim x C``) and
  ``c`` (``dim``), plus the same fixed offset.

Folding rules (``fold_error`` says *why* when a fold is not exact):

* into the **previous** conv (``implicit(conv(x))``): always exact.  add -> bias,
  mul -> scale output rows of weight and bias, concat -> extra output channels with zero
  weight and bias = value (concat needs ``groups == 1``).
* into the **next** conv (``conv(implicit(x))``): mul scales input-channel slices of the
  weight and is exact for any kernel/stride/dilation/padding (padding copies or zeros a
  channel, and both commute with a per-channel scale).  add/concat become a bias term
  ``sum_k W . a``, which is only exact if every output pixel sees ``a`` under its whole
  kernel, i.e. no zero padding (``padding == 0`` or a non-``"zeros"`` padding mode, which
  pads with copies of ``x + a``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

__all__ = [
    "FORMS",
    "Implicit",
    "ImplicitA",
    "ImplicitM",
    "ImplicitC",
    "fold_into_next_conv",
    "fold_into_prev_conv",
    "fold_error",
]

FORMS = ("vector", "nn", "mf")

_INIT_MEAN = {"add": 0.0, "mul": 1.0, "concat": 0.0}  # YOLOR: identity-ish start for each op
_INIT_STD = 0.02
_DEFAULT_DIM = 16


class Implicit(nn.Module):
    """Base class of the implicit knowledge layers; use ImplicitA / ImplicitM / ImplicitC.

    Args:
        channels: length C of the implicit vector (for ImplicitC: channels appended).
        form: how the vector is modelled, one of ``FORMS`` (case-insensitive).
        dim: latent size for the ``"nn"`` and ``"mf"`` forms (default 16); ignored by
            ``"vector"``.

    At init the value is ~N(0, 0.02) for add/concat and ~N(1, 0.02) for mul, in every form.
    """

    op: str  # "add" | "mul" | "concat", set by the subclasses

    def __init__(self, channels: int, form: str = "vector", dim: int | None = None) -> None:
        super().__init__()
        if getattr(type(self), "op", None) not in _INIT_MEAN:
            raise TypeError(f"{type(self).__name__} has no valid op; use ImplicitA, ImplicitM or ImplicitC")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"{type(self).__name__}: channels must be a positive int, got {channels!r}")
        if not isinstance(form, str) or form.strip().lower() not in FORMS:
            raise ValueError(
                f"{type(self).__name__}: unknown implicit form {form!r}; expected one of {', '.join(FORMS)}"
            )
        form = form.strip().lower()
        if dim is None:
            dim = _DEFAULT_DIM
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")

        self.channels = channels
        self.form = form
        self.dim = dim
        self.init_mean = _INIT_MEAN[self.op]
        # "nn" and "mf" have no learnable bias (one would make them a plain learned vector), so the
        # mean (1 for mul) comes from a fixed offset; a plain float keeps it out of the state dict
        # and follows the parameters' dtype automatically.
        self.offset = 0.0 if form == "vector" else self.init_mean

        if form == "vector":
            self.implicit = nn.Parameter(torch.empty(channels))
        elif form == "nn":
            self.z = nn.Parameter(torch.empty(dim))
            self.linear = nn.Linear(dim, channels, bias=False)
        else:  # "mf"
            self.Z = nn.Parameter(torch.empty(dim, channels))
            self.c = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """YOLOR init: value ~ N(init_mean, 0.02) elementwise, whatever the form."""
        mean, std = self.init_mean, _INIT_STD
        if self.form == "vector":
            nn.init.normal_(self.implicit, mean, std)
        elif self.form == "nn":
            # A unit-norm latent makes W z ~ N(0, std^2) exactly when W ~ N(0, std^2); the fixed
            # offset then carries the mean.  A random direction keeps z from being degenerate.
            self.z.copy_(_unit_vector(self.dim, self.z))
            nn.init.normal_(self.linear.weight, 0.0, std)
        else:
            # Same argument as "nn": Z^T c ~ N(0, std^2) for unit-norm c; offset carries the mean.
            self.c.copy_(_unit_vector(self.dim, self.c))
            nn.init.normal_(self.Z, 0.0, std)

    def value(self) -> torch.Tensor:
        """The implicit vector, shape ``(channels,)`` (differentiable w.r.t. the parameters)."""
        if self.form == "vector":
            return self.implicit
        if self.form == "nn":
            return self.linear(self.z) + self.offset
        return torch.mv(self.Z.t(), self.c) + self.offset

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # Before the nn form lost its bias, its state dict held a learned ``linear.bias``; dropping
        # it would silently change the model.  It could be folded into W (W += (b - mean) z^T/|z|^2),
        # but the nn form is not the default (cfg: implicit: vector) and such checkpoints' optimizer
        # state would not match anyway, so refuse clearly.  load_state_dict raises on error_msgs
        # whether strict or not.
        if self.form == "nn" and prefix + "linear.bias" in state_dict:
            error_msgs.append(
                f"{type(self).__name__} at {prefix[:-1] or '<root>'!r}: the checkpoint has "
                f"{prefix}linear.bias from the old 'nn' implicit form (W z + learned bias); the "
                "'nn' form is now W z + a fixed mean with no bias, so these weights cannot be "
                "loaded exactly; retrain the model (the vector and mf forms are unaffected)."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _broadcast_value(self, x: torch.Tensor) -> torch.Tensor:
        # Cast to the feature dtype so fp16/AMP activations are not promoted to fp32.
        return self.value().to(x.dtype).view(1, self.channels, 1, 1)

    def extra_repr(self) -> str:
        s = f"{self.channels}, form={self.form!r}"
        return s if self.form == "vector" else f"{s}, dim={self.dim}"


class ImplicitA(Implicit):
    """Implicit addition: ``x + a`` (per channel)."""

    op = "add"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._broadcast_value(x)


class ImplicitM(Implicit):
    """Implicit multiplication: ``x * m`` (per channel)."""

    op = "mul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._broadcast_value(x)


class ImplicitC(Implicit):
    """Implicit concatenation: appends ``channels`` constant channels, output has C_in + C channels."""

    op = "concat"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return torch.cat([x, self._broadcast_value(x).expand(b, self.channels, h, w)], 1)


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------


def _unit_vector(n: int, like: torch.Tensor) -> torch.Tensor:
    v = torch.randn(n, device=like.device, dtype=like.dtype)
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def _has_padding(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):  # "valid" pads nothing; "same" pads iff the kernel spans > 1
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


def _describe(conv: nn.Conv2d) -> str:
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        pad = repr(conv.padding)
    else:
        pad = str(conv.padding[0]) if len(set(conv.padding)) == 1 else str(tuple(conv.padding))
    return f"a {kh}x{kw} conv with padding {pad}"


def fold_error(implicit: Implicit, conv: nn.Conv2d, where: str) -> str | None:
    """None if folding ``implicit`` into ``conv`` is exact, else a one-line human reason.

    ``where="next"``: ``conv`` consumes the implicit's output, i.e. ``conv(implicit(x))``.
    ``where="prev"``: the implicit consumes ``conv``'s output directly (no activation between),
    i.e. ``implicit(conv(x))``.
    """
    if where not in ("next", "prev"):
        raise ValueError(f"where must be 'next' or 'prev', got {where!r}")
    if not isinstance(implicit, Implicit):
        return f"{type(implicit).__name__} is not an implicit layer (ImplicitA/ImplicitM/ImplicitC)"
    name, op, c = type(implicit).__name__, implicit.op, implicit.channels
    if not isinstance(conv, nn.Conv2d):
        return f"{name} can only be folded into an nn.Conv2d, not {type(conv).__name__}"
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        # The fold returns a plain nn.Conv2d; a custom forward would silently be dropped.
        return f"{name} cannot be folded into {type(conv).__name__}: it overrides nn.Conv2d's forward"
    if is_lazy(conv.weight):
        return f"{name} cannot be folded into an uninitialized lazy conv; run a forward pass first"
    if not conv.weight.is_floating_point():
        return f"{name} cannot be folded into a conv with non-float weights ({conv.weight.dtype})"

    if where == "prev":
        if conv.out_channels != c and op != "concat":
            return f"{name} has {c} channels but the previous conv outputs {conv.out_channels}"
        if op == "concat" and conv.groups != 1:
            # New output channels would change how outputs map onto groups.
            return f"{name} cannot be folded into a grouped conv (groups={conv.groups}); use groups=1"
        return None

    # where == "next"
    if op == "concat":
        if conv.in_channels <= c:
            return (
                f"{name} appends {c} channels but the next conv takes only {conv.in_channels} "
                "input channels, so no input channels would remain"
            )
        if conv.groups != 1:
            return f"{name} cannot be folded into a grouped conv (groups={conv.groups}); use groups=1"
    elif conv.in_channels != c:
        return f"{name} has {c} channels but the next conv expects {conv.in_channels} input channels"

    # Non-"zeros" modes pad with copies of x + a, so the constant still fills every window.
    if op in ("add", "concat") and conv.padding_mode == "zeros" and _has_padding(conv):
        hint = "place it before an unpadded conv (e.g. 1x1, padding 0)"
        if op == "add":
            hint += " or use ImplicitM"
        return (
            f"{name} before {_describe(conv)} cannot be folded exactly "
            f"(zero padding makes border pixels differ); {hint}"
        )
    return None


def _check(implicit: Implicit, conv: nn.Conv2d, where: str) -> None:
    reason = fold_error(implicit, conv, where)
    if reason is not None:
        raise ValueError(reason)


def _acc_dtype(conv: nn.Conv2d) -> torch.dtype:
    # Do the algebra in float64 where the device supports it so the fold adds no rounding.
    return torch.float32 if conv.weight.device.type == "mps" else torch.float64


def _new_conv(conv: nn.Conv2d, in_channels: int, out_channels: int, weight: torch.Tensor,
              bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(
        in_channels, out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    out.train(conv.training)
    return out


def _per_output(v: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Map a per-input-channel vector to the weight layout (out, in/groups) of a grouped conv."""
    g = conv.groups
    in_pg, out_pg = conv.in_channels // g, conv.out_channels // g
    return v.view(g, 1, in_pg).expand(g, out_pg, in_pg).reshape(conv.out_channels, in_pg)


@torch.no_grad()
def fold_into_next_conv(implicit: Implicit, conv: nn.Conv2d) -> nn.Conv2d:
    """Return a new conv with ``conv(implicit(x)) == returned_conv(x)``.

    For ImplicitC the returned conv has ``in_channels - C`` input channels.  Raises ValueError
    with ``fold_error``'s reason when the fold would not be exact.  Inputs are not modified.
    """
    _check(implicit, conv, "next")
    acc = _acc_dtype(conv)
    w = conv.weight.to(acc)
    b = conv.bias.to(acc) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=acc, device=w.device)
    v = implicit.value().detach().to(device=w.device, dtype=acc)

    if implicit.op == "mul":
        w = w * _per_output(v, conv)[:, :, None, None]
        return _new_conv(conv, conv.in_channels, conv.out_channels, w, b)
    if implicit.op == "add":
        b = b + (w.sum((2, 3)) * _per_output(v, conv)).sum(1)
        return _new_conv(conv, conv.in_channels, conv.out_channels, w, b)
    # concat: the appended constant channels contribute a constant -> bias; drop their weights.
    keep = conv.in_channels - implicit.channels
    b = b + w[:, keep:].sum((2, 3)) @ v
    return _new_conv(conv, keep, conv.out_channels, w[:, :keep], b)


@torch.no_grad()
def fold_into_prev_conv(conv: nn.Conv2d, implicit: Implicit) -> nn.Conv2d:
    """Return a new conv with ``implicit(conv(x)) == returned_conv(x)``.

    add -> bias += a; mul -> weight rows and bias scaled by m; concat -> C extra output
    channels with zero weight and bias = value.  ``conv`` may have no bias (one is created).
    Raises ValueError with ``fold_error``'s reason when not foldable.  Inputs are not modified.
    """
    _check(implicit, conv, "prev")
    acc = _acc_dtype(conv)
    w = conv.weight.to(acc)
    b = conv.bias.to(acc) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=acc, device=w.device)
    v = implicit.value().detach().to(device=w.device, dtype=acc)

    if implicit.op == "add":
        return _new_conv(conv, conv.in_channels, conv.out_channels, w, b + v)
    if implicit.op == "mul":
        return _new_conv(conv, conv.in_channels, conv.out_channels, w * v[:, None, None, None], b * v)
    c = implicit.channels
    w = torch.cat([w, w.new_zeros((c, *w.shape[1:]))], 0)
    return _new_conv(conv, conv.in_channels, conv.out_channels + c, w, torch.cat([b, v]))
