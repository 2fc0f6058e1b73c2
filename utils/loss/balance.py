"""Task-loss balancing for multi-task training (``--balance fixed|uncertainty|dwa|mtcp``).

A :class:`TaskBalancer` turns the per-task losses of a batch into the one scalar that is back-propagated,
and reports the per-task weights it used (logged to results.csv as ``weight/<task>``). All four rules
multiply by a fixed per-task gain from the hyp file (keys ``det``, ``inst``, ``sem``, ``cap``; default 1).

Let ``g_t`` be the gain of task ``t``, ``T`` the number of tasks, and ``L_t(e)`` the mean unweighted
loss of task ``t`` over epoch ``e`` (passed to :meth:`TaskBalancer.end_epoch`). Epoch ``e`` is the one
being trained; ``e-1`` and ``e-2`` are the last two finished ones.

``fixed``
    ``w_t = g_t``.
``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018)
    One learned ``s_t = log sigma_t^2`` per task (``nn.Parameter``, init 0) and
    ``total = sum_t g_t * (exp(-s_t) * L_t + s_t)``. The paper's 1/2 factors are dropped everywhere (both
    on the loss and on the regulariser, so the optimum is unchanged up to scale): minimising over ``s_t``
    gives ``exp(-s_t) = 1 / L_t``, i.e. each task contributes ~1 to the total. Reported weight
    ``g_t * exp(-s_t)``.
``dwa`` (Dynamic Weight Average; Liu, Johns & Davison, CVPR 2019)
    ``r_t = L_t(e-1) / L_t(e-2)``, ``w_t = g_t * T * exp(r_t / temp) / sum_k exp(r_k / temp)``
    (``temp`` default 2.0, hyp ``dwa_temp``); ``w_t = g_t`` until two epochs have finished. Before gains
    the weights sum to ``T``.
``mtcp`` (the MT-CP rule)
    Each epoch loss is projected with ``P_t(e) = log(L_t(e) + 1)`` (compresses tasks whose losses live on
    very different scales) and the descent rate is ``r_t = P_t(e-1) / P_t(e-2)``; ``r_t < 1`` means the
    loss is still falling, ``r_t >= 1`` that it has stalled or risen. With ``mu = mean_t r_t``::

        w_t = g_t * clamp(1 + k * (r_t / mu - 1), 0.1, 10)

    (``k`` default 1.0, hyp ``mtcp_k``). Tasks that fall more slowly than average get more weight; before
    clamping and gains the weights average exactly 1 (``k = 0`` gives all ones); the clamp is applied
    after that normalisation and is not re-normalised. ``w_t = g_t`` until two epochs have finished.

Default: ``dwa``, chosen by measurement (``benchmarks/multitask.py``: a joint nano model per rule vs the four
single-task models at the same budget and seed; Δm = mean relative change of box mAP, mask mAP, mIoU and
CIDEr-D; in brackets the worst single task's change, in percent)::

    budget                                          fixed            uncertainty      dwa              mtcp
    H100, 9 epochs, 256 px, batch 32, scratch, s0   -3.8% (-18 sem)  -7.9% (-35 sem)  +1.9% (-10 det)  +0.7% (-38 sem)
    CPU, 8 epochs, 192 px, batch 16, short, s0      -0.5% (-9 sem)   +8.1% (-9 sem)   +0.0% (-9 sem)   +1.0% (-9 sem)
    CPU, same, seed 1                               +11.5% (+2 sem)  +17.4% (-2 sem)  +15.3% (+1 sem)  +11.6% (+2 sem)

from (the GPU run trains the eight models at once; every CPU model trains on 1 torch thread)::

    python -m benchmarks.multitask --epochs 9 --img 256 --batch-size 32 --workers 2 --noval --device 0 --balance fixed,uncertainty,dwa,mtcp --jobs 8
    python -m benchmarks.multitask --epochs 8 --img 192 --hyp data/hyps/hyp.short.yaml --threads 1 --balance fixed,uncertainty,dwa,mtcp [--seed 1]

Seeds move these figures by more than the rules do (the single-task caption model alone: CIDEr-D 0.28 with
seed 0, 0.26 with seed 1), and the ranking changes with the budget. DWA is the only rule with Δm >= 0 in
every run and it has the smallest worst-task drop: one network should not buy a better average by giving a
task up, and mtcp and uncertainty did that to the semantic head on the GPU run, the one closest to real
training (their gains there are CIDEr-D, the noisiest metric). Uncertainty weighting has the best mean
(+5.9% against DWA's +5.7%) and was clearly best on the CPU runs, but worst on the GPU run: it drives each
task's contribution to ~1 whatever its loss scale, which the longer, larger-batch run punished.

For ``dwa`` and ``mtcp``, a task whose ratio is undefined (its loss was missing, non-finite, ~0 or negative
in one of the two epochs, as under ``scst_epochs``) is given the mean ratio of the other tasks, so it is treated as average (weight
exactly ``g_t`` under ``mtcp``); if no task has a ratio, all weights are ``g_t``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from utils.tasks import TASKS

BALANCERS = ("fixed", "uncertainty", "dwa", "mtcp")
DEFAULT_BALANCE = "dwa"  # measured best of the four; see the module docstring
HYP_GAIN_KEYS = TASKS  # each task's fixed gain is the hyp key of its name
_EPS = 1e-12  # below this a loss (or projected loss) is treated as 0 and the ratio as undefined


class TaskBalancer(nn.Module):
    """Combines per-task losses into one scalar and exposes the current per-task weights.

    Args:
        tasks: every task the model trains, in a fixed order (defines the state layout).
        method: one of :data:`BALANCERS`.
        gains: fixed per-task multipliers; tasks not named get 1.0, names that are not tasks are ignored
            (the hyp file carries gains for all four heads whatever the model has).
        temp: ``dwa`` temperature (default 2.0).
        k: ``mtcp`` strength (default 1.0).
        w_min, w_max: ``mtcp`` clamp (default 0.1, 10).

    Only ``uncertainty`` has parameters (``log_vars``, one per task in ``tasks`` order); the trainer adds
    ``balancer.parameters()`` to the optimizer without weight decay (decay would pull every ``s_t`` to 0,
    i.e. back to fixed weights). For the other methods ``parameters()`` is empty.

    The epoch-loss history is kept as plain Python lists in the module's extra state, so
    ``state_dict()`` contains only tensors, lists, floats and strings and loads with
    ``torch.load(weights_only=True)``; the dynamic weights are recomputed from it on load.
    """

    def __init__(self, tasks: list[str], method: str = "fixed", gains: Mapping[str, float] | None = None,
                 **kw: float):
        super().__init__()
        if method not in BALANCERS:
            raise ValueError(f"unknown balance method {method!r}; choose one of {', '.join(BALANCERS)}")
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {tasks!r}")
        unknown = set(kw) - {"temp", "k", "w_min", "w_max"}
        if unknown:
            raise TypeError(f"unknown TaskBalancer option(s) {sorted(unknown)}; known: temp, k, w_min, w_max")
        self.tasks = list(tasks)
        self.method = method
        gains = gains or {}
        self.gains = {t: float(gains.get(t, 1.0)) for t in self.tasks}
        self.temp = float(kw.get("temp", 2.0))
        self.k = float(kw.get("k", 1.0))
        self.w_min, self.w_max = float(kw.get("w_min", 0.1)), float(kw.get("w_max", 10.0))
        if self.temp <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {self.temp}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if method == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        self.history: list[list[float]] = []  # one row per finished epoch, tasks order; NaN = no value
        self._dyn = [1.0] * len(self.tasks)  # dwa/mtcp weights before gains, derived from history

    # ------------------------------------------------------------------ combining
    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum over the tasks present in ``losses`` (a task absent from this batch is skipped)."""
        if not losses:
            raise ValueError("TaskBalancer got no task losses")
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise KeyError(f"losses for unknown task(s) {sorted(unknown)}; balancer tasks: {self.tasks}")
        total = None
        for i, t in enumerate(self.tasks):
            if t not in losses:
                continue
            loss = losses[t]
            if self.method == "uncertainty":
                s = self.log_vars[i]
                term = self.gains[t] * (torch.exp(-s) * loss + s)
            else:
                term = self.gains[t] * self._dyn[i] * loss
            total = term if total is None else total + term
        return total

    def weights(self) -> dict[str, float]:
        """Current effective weight per task (gain included), for logging as ``weight/<task>``."""
        if self.method == "uncertainty":
            w = torch.exp(-self.log_vars.detach()).tolist()
        else:
            w = self._dyn
        return {t: self.gains[t] * float(w[i]) for i, t in enumerate(self.tasks)}

    # ------------------------------------------------------------------ epoch updates
    def end_epoch(self, epoch_losses: Mapping[str, float | torch.Tensor]) -> None:
        """Records the finished epoch's mean unweighted loss per task and updates dwa/mtcp weights.

        Tasks missing from ``epoch_losses`` (or with a non-finite value) are stored as NaN; a key that is
        not a task is an error (a typo would otherwise silently freeze that task's weight).
        """
        unknown = set(epoch_losses) - set(self.tasks)
        if unknown:
            raise KeyError(f"epoch losses for unknown task(s) {sorted(unknown)}; balancer tasks: {self.tasks}")
        row = []
        for t in self.tasks:
            v = float(epoch_losses[t]) if t in epoch_losses else math.nan
            row.append(v if math.isfinite(v) else math.nan)
        self.history.append(row)
        self._dyn = self._dynamic_weights()

    def _ratios(self, project: bool) -> list[float] | None:
        """``value(e-1) / value(e-2)`` per task, undefined ones filled with the mean; None if none defined."""
        if len(self.history) < 2:
            return None
        prev2, prev1 = self.history[-2], self.history[-1]
        f = (lambda x: math.log1p(max(x, 0.0))) if project else (lambda x: x)
        r: list[float | None] = []
        for a, b in zip(prev1, prev2):
            # a loss that is not positive (~0, or self-critical captioning's advantage-weighted objective,
            # negative) has no rate of change to compare: undefined in either epoch
            ok = math.isfinite(a) and math.isfinite(b) and f(b) > _EPS and f(a) > _EPS
            r.append(f(a) / f(b) if ok else None)
        known = [x for x in r if x is not None]
        if not known:
            return None
        fill = sum(known) / len(known)
        return [fill if x is None else x for x in r]

    def _dynamic_weights(self) -> list[float]:
        """dwa/mtcp weights (before gains) from the last two history rows; ones for the other methods."""
        n = len(self.tasks)
        if self.method == "dwa":
            r = self._ratios(project=False)
            if r is None:
                return [1.0] * n
            # softmax via torch for numerical stability when a ratio explodes
            return (n * torch.softmax(torch.tensor(r, dtype=torch.float64) / self.temp, 0)).tolist()
        if self.method == "mtcp":
            r = self._ratios(project=True)
            if r is None:
                return [1.0] * n
            mu = sum(r) / n
            if mu <= _EPS:  # every task's loss reached ~0: nothing to rebalance
                return [1.0] * n
            return [min(max(1.0 + self.k * (x / mu - 1.0), self.w_min), self.w_max) for x in r]
        return [1.0] * n

    # ------------------------------------------------------------------ resume
    def get_extra_state(self) -> dict[str, Any]:
        # Plain lists/str/float only: loadable with torch.load(weights_only=True).
        return {"tasks": list(self.tasks), "history": [list(row) for row in self.history]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        tasks = list(state.get("tasks", self.tasks))
        if tasks != self.tasks:
            raise ValueError(f"balancer state is for tasks {tasks}, this balancer has {self.tasks}")
        history = [[float(v) for v in row] for row in state.get("history", [])]
        if any(len(row) != len(self.tasks) for row in history):
            raise ValueError("balancer state history rows do not match the number of tasks")
        self.history = history
        self._dyn = self._dynamic_weights()

    def extra_repr(self) -> str:
        return f"method={self.method!r}, tasks={self.tasks}, gains={self.gains}"


def build_balancer(tasks: list[str], method: str, hyp: Mapping[str, Any] | None) -> TaskBalancer:
    """The balancer for ``--balance method``: gains from hyp ``det``/``inst``/``sem``/``cap`` (default 1.0),
    ``dwa_temp`` (default 2.0) and ``mtcp_k`` (default 1.0).

    Raises:
        ValueError: ``method`` is not one of :data:`BALANCERS` (the message lists them).
    """
    if method not in BALANCERS:
        raise ValueError(f"unknown balance method {method!r}; choose one of {', '.join(BALANCERS)}")
    hyp = hyp or {}
    gains = {t: float(hyp.get(t, 1.0)) for t in HYP_GAIN_KEYS}
    return TaskBalancer(tasks, method, gains, temp=float(hyp.get("dwa_temp", 2.0)),
                        k=float(hyp.get("mtcp_k", 1.0)))
