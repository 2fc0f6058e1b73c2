"""Task-loss balancing: fixed / uncertainty / dwa / mtcp weights, missing tasks, resume, bad methods."""
from __future__ import annotations

import io
import math

import pytest
import torch

from utils.loss.balance import BALANCERS, TaskBalancer, build_balancer

TASKS = ["det", "inst", "sem", "cap"]


def _losses(**v: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(x, requires_grad=True) for k, x in v.items()}


def _a_halves_b_constant(bal: TaskBalancer) -> None:
    """Two finished epochs: task A (det) halves, task B (sem) stays constant."""
    bal.end_epoch({"det": 2.0, "sem": 3.0})
    bal.end_epoch({"det": 1.0, "sem": 3.0})


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_fixed_reproduces_gains():
    hyp = {"det": 1.0, "inst": 2.0, "sem": 0.5, "cap": 0.25, "box": 7.5}
    bal = build_balancer(TASKS, "fixed", hyp)
    assert bal.weights() == {"det": 1.0, "inst": 2.0, "sem": 0.5, "cap": 0.25}
    total = bal(_losses(det=1.0, inst=1.0, sem=2.0, cap=4.0))
    assert total.item() == pytest.approx(1 + 2 + 1 + 1)
    bal.end_epoch({"det": 2.0, "inst": 1.0, "sem": 1.0, "cap": 1.0})
    bal.end_epoch({"det": 1.0, "inst": 1.0, "sem": 1.0, "cap": 1.0})
    assert bal.weights()["inst"] == 2.0  # fixed weights never move
    assert list(bal.parameters()) == []
    assert build_balancer(TASKS, "fixed", {}).weights() == dict.fromkeys(TASKS, 1.0)


def test_uncertainty_formula_and_gradients():
    bal = TaskBalancer(["det", "sem"], "uncertainty", gains={"det": 2.0})
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.5, -0.3]))
    losses = _losses(det=1.5, sem=0.7)
    total = bal(losses)
    s = [0.5, -0.3]
    expect = 2.0 * (math.exp(-s[0]) * 1.5 + s[0]) + 1.0 * (math.exp(-s[1]) * 0.7 + s[1])
    assert total.item() == pytest.approx(expect, rel=1e-6)
    assert bal.weights() == pytest.approx({"det": 2.0 * math.exp(-0.5), "sem": math.exp(0.3)})
    total.backward()
    assert bal.log_vars.grad is not None and torch.all(bal.log_vars.grad != 0)
    assert losses["det"].grad.item() == pytest.approx(2.0 * math.exp(-0.5), rel=1e-6)


def test_uncertainty_downweights_large_loss():
    bal = build_balancer(["det", "sem"], "uncertainty", {})
    # what the trainer does: balancer parameters in their own group, no weight decay
    opt = torch.optim.SGD([{"params": list(bal.parameters()), "weight_decay": 0.0}], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        bal({"det": torch.tensor(10.0), "sem": torch.tensor(1.0)}).backward()
        opt.step()
    w = bal.weights()
    assert w["det"] < 0.5 and w["det"] < w["sem"]
    assert w["sem"] == pytest.approx(1.0, abs=0.05)  # optimum exp(-s) = 1 / L
    assert w["det"] == pytest.approx(0.1, rel=0.2)


def test_dwa_favours_stalled_task():
    bal = TaskBalancer(["det", "sem"], "dwa")
    assert bal.weights() == {"det": 1.0, "sem": 1.0}
    bal.end_epoch({"det": 2.0, "sem": 3.0})
    assert bal.weights() == {"det": 1.0, "sem": 1.0}  # one epoch: no ratio yet
    bal.end_epoch({"det": 1.0, "sem": 3.0})
    w = bal.weights()
    assert w["sem"] > w["det"]
    assert sum(w.values()) == pytest.approx(2.0)
    e = [math.exp(0.5 / 2.0), math.exp(1.0 / 2.0)]
    assert w["det"] == pytest.approx(2 * e[0] / sum(e))
    # gains multiply on top of the T-normalised weights
    g = TaskBalancer(["det", "sem"], "dwa", gains={"det": 3.0})
    _a_halves_b_constant(g)
    assert g.weights()["det"] == pytest.approx(3.0 * w["det"])
    assert g.weights()["sem"] == pytest.approx(w["sem"])


def test_mtcp_favours_stalled_task():
    bal = build_balancer(["det", "sem"], "mtcp", {})
    _a_halves_b_constant(bal)
    w = bal.weights()
    assert w["sem"] > w["det"]
    assert sum(w.values()) / 2 == pytest.approx(1.0)
    r = [math.log(2.0) / math.log(3.0), 1.0]
    mu = sum(r) / 2
    assert w["det"] == pytest.approx(1 + (r[0] / mu - 1))
    total = bal(_losses(det=1.0, sem=1.0))
    assert total.item() == pytest.approx(w["det"] + w["sem"])


def test_mtcp_k_zero_clamp_and_warmup():
    flat = build_balancer(["det", "sem"], "mtcp", {"mtcp_k": 0.0})
    _a_halves_b_constant(flat)
    assert flat.weights() == {"det": 1.0, "sem": 1.0}
    strong = TaskBalancer(["det", "sem"], "mtcp", k=100.0)
    strong.end_epoch({"det": 2.0, "sem": 3.0})
    assert strong.weights() == {"det": 1.0, "sem": 1.0}  # ones until two epochs exist
    strong.end_epoch({"det": 1.0, "sem": 3.0})
    assert strong.weights() == {"det": 0.1, "sem": 10.0}


def test_missing_task_in_batch_is_skipped():
    for method in ("fixed", "dwa", "mtcp"):
        bal = TaskBalancer(TASKS, method, gains={"sem": 2.0})
        _a_halves_b_constant(bal)
        w = bal.weights()
        total = bal(_losses(det=1.5, sem=0.5))
        assert total.item() == pytest.approx(w["det"] * 1.5 + w["sem"] * 0.5), method
    # uncertainty: an absent task contributes neither its loss nor its s_t regulariser (and gets no gradient)
    bal = TaskBalancer(TASKS, "uncertainty", gains={"sem": 2.0})
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    total = bal(_losses(det=1.5, sem=0.5))
    expect = (math.exp(-0.1) * 1.5 + 0.1) + 2.0 * (math.exp(-0.3) * 0.5 + 0.3)
    assert total.item() == pytest.approx(expect, rel=1e-6)
    total.backward()
    assert bal.log_vars.grad[1].item() == 0.0 and bal.log_vars.grad[3].item() == 0.0
    with pytest.raises(KeyError):
        TaskBalancer(TASKS)(_losses(seg=1.0))


def test_missing_task_in_epoch_gets_mean_ratio():
    bal = TaskBalancer(["det", "sem", "cap"], "mtcp")
    bal.end_epoch({"det": 2.0, "sem": 3.0})  # no caption loss this epoch
    bal.end_epoch({"det": 1.0, "sem": 3.0, "cap": 5.0})
    w = bal.weights()
    assert w["cap"] == pytest.approx(1.0)
    assert w["sem"] > w["det"]


@pytest.mark.parametrize("method", ["dwa", "mtcp"])
def test_non_positive_loss_gets_mean_ratio(method):
    """A caption loss that turns negative (self-critical training) or reaches 0 is treated as average,
    not as a task whose loss fell by more than all of it."""
    for cap in (-0.2, 0.0):
        bal = TaskBalancer(["det", "sem", "cap"], method)
        bal.end_epoch({"det": 2.0, "sem": 3.0, "cap": 1.5})
        bal.end_epoch({"det": 1.0, "sem": 3.0, "cap": cap})
        ref = TaskBalancer(["det", "sem", "cap"], method)
        ref.end_epoch({"det": 2.0, "sem": 3.0})
        ref.end_epoch({"det": 1.0, "sem": 3.0, "cap": 5.0})
        assert bal.weights() == pytest.approx(ref.weights())
        assert min(bal.weights().values()) > 0.5


@pytest.mark.parametrize("method", BALANCERS)
def test_state_dict_roundtrip_and_resume(method):
    epochs = [{"det": 3.0, "sem": 2.0}, {"det": 2.0, "sem": 1.9}, {"det": 1.2, "sem": 1.85},
              {"det": 1.0, "sem": 1.0}]
    ref = TaskBalancer(["det", "sem"], method, gains={"sem": 0.5})
    if method == "uncertainty":
        with torch.no_grad():
            ref.log_vars.copy_(torch.tensor([0.7, -0.2]))
    for e in epochs[:2]:
        ref.end_epoch(e)
    sd = _roundtrip(ref.state_dict())
    resumed = TaskBalancer(["det", "sem"], method, gains={"sem": 0.5})
    resumed.load_state_dict(sd)
    assert resumed.weights() == pytest.approx(ref.weights())
    assert resumed.history == ref.history
    for e in epochs[2:]:  # continuing after resume matches the uninterrupted run
        ref.end_epoch(e)
        resumed.end_epoch(e)
        assert resumed.weights() == pytest.approx(ref.weights())
    with pytest.raises(ValueError):
        TaskBalancer(["det", "cap"], method).load_state_dict(sd)


def test_unknown_method():
    with pytest.raises(ValueError, match="fixed, uncertainty, dwa, mtcp"):
        build_balancer(TASKS, "gradnorm", {})
    with pytest.raises(ValueError, match="mtcp"):
        TaskBalancer(TASKS, "nope")
