"""benchmarks/profile_step.py: the timed parts of a training batch cover the batch, and profiling leaves the
trainer as it found it (no timed assertion: only shares of one measured total)."""
from __future__ import annotations

import math

from benchmarks import profile_step
from utils.engine.trainer import _no_section


def test_parts_cover_the_measured_batch(tiny_cfg_file, tiny_data, tmp_path):
    opt = profile_step.parse_opt(["--cfg", str(tiny_cfg_file), "--data", str(tiny_data), "--img", "64",
                                  "--batch-size", "4", "--workers", "0", "--steps", "2", "--warmup", "1",
                                  "--accumulate", "1", "--project", str(tmp_path)])
    trainer = profile_step.build_trainer(opt)
    tasks = trainer.model.tasks
    assert tasks == ["det", "inst", "sem", "cap"]
    sec, walls, _ = profile_step.profile_steps(trainer, opt.steps, opt.warmup, opt.accumulate)
    assert len(walls) == 2
    for t in tasks:  # every head and every task loss timed once per timed batch
        assert sec.calls[f"head/{t}"] == 2 and sec.calls[f"loss/{t}"] == 2, t
    for part in ("loader", "forward", "loss", "backward", "step", "ema"):
        assert sec.calls[part] == 2, part
    rows = {name.strip(): seconds for name, _, seconds in profile_step.step_rows(sec, walls, tasks)}
    total = sum(walls)
    # the named parts account for the batch: what no section covers is under 10% of the measured wall time
    assert abs(rows["other (hooks, warmup lr, bookkeeping)"]) < 0.10 * total, rows
    assert sum(sec.seconds[f"head/{t}"] for t in tasks) <= sec.seconds["forward"]
    assert sum(sec.seconds[f"loss/{t}"] for t in tasks) <= sec.seconds["loss"]
    # the trainer is left unprofiled: its section hook and its loss callables are the originals again
    assert trainer.section is _no_section
    assert not any(isinstance(getattr(trainer.loss, t), profile_step.Timed) for t in tasks)
    assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks
    trainer.logger.close()


def test_self_critical_steps_split_the_caption_loss(tiny_cfg_file, tiny_data, tmp_path):
    """--scst: the caption loss row is the self-critical one, split into sampling, the samples' log-probabilities
    and the rest; the head's methods are its own again afterwards."""
    opt = profile_step.parse_opt(["--cfg", str(tiny_cfg_file), "--data", str(tiny_data), "--img", "64",
                                  "--batch-size", "4", "--workers", "0", "--steps", "2", "--warmup", "1",
                                  "--accumulate", "1", "--project", str(tmp_path), "--scst"])
    trainer = profile_step.build_trainer(opt)
    assert trainer.loss.scst_loss is not None  # hyp.scratch trains self-critical epochs
    trainer.loss.scst = True
    head = trainer.model.head("cap")
    sec, walls, _ = profile_step.profile_steps(trainer, opt.steps, opt.warmup, opt.accumulate)
    assert sec.calls["scst/sample"] == sec.calls["scst/logprobs"] == sec.calls["loss/cap"] == 2
    assert sec.seconds["scst/sample"] + sec.seconds["scst/logprobs"] <= sec.seconds["loss/cap"]
    rows = [name.strip() for name, _, _ in profile_step.step_rows(sec, walls, trainer.model.tasks)]
    i = rows.index("loss cap")
    assert rows[i + 1:i + 4] == ["SCST candidates, sampled or beams (no gradient, eval mode)", "SCST samples' log-probabilities",
                                 "SCST rewards (CIDEr-D), baseline, rest"]
    assert not {"sample", "beam_search", "sequence_logprobs"} & set(head.__dict__)
    assert not isinstance(trainer.loss.scst_loss, profile_step.Timed)
    trainer.logger.close()


def test_memory_charges_the_step_to_its_parts(tiny_cfg_file, tiny_data, tmp_path):
    """--memory: one traced batch's tensors are charged to the part of the step that made them; the parts alive
    at the peak add up to it, the weights held between steps are among them, and backward makes the gradients."""
    opt = profile_step.parse_opt(["--cfg", str(tiny_cfg_file), "--data", str(tiny_data), "--img", "64",
                                  "--batch-size", "4", "--workers", "0", "--project", str(tmp_path), "--memory"])
    trainer = profile_step.build_trainer(opt)
    mem, allocated = profile_step.profile_memory(trainer, 1)
    rows = mem.report()
    tasks = trainer.model.tasks
    for part in ["weights, EMA, optimizer state", "forward_hooked", "backward", "step",
                 *[f"head/{t}" for t in tasks], *[f"loss/{t}" for t in tasks]]:
        assert part in rows, part
    assert sum(p.live_at_peak for p in rows.values()) == mem.peak > 0
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    # the model, its EMA copy and AdamW's two moments, all fp32 (buffers and the balancer on top)
    assert rows["weights, EMA, optimizer state"].live_at_peak >= 4 * params
    assert rows["other"].allocated < params  # the loader's batch: none of the weights
    assert rows["backward"].allocated >= params  # every parameter's gradient at least
    assert rows["head/sem"].allocated > 0 and rows["loss/sem"].peak_while_open >= rows["head/sem"].peak_while_open
    assert math.isnan(allocated)  # no CUDA figure on the CPU
    assert trainer.section is _no_section and not trainer.model._forward_hooks
    trainer.logger.close()
