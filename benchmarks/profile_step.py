"""Where a training step's time goes: the joint model's batch split into its parts, a validation pass split
likewise, the per-epoch costs outside the batches, and a run's epoch-time series.

    python -m benchmarks.profile_step                                  # 192 px, batch 16, CPU, 10 steps
    python -m benchmarks.profile_step --steps 20 --warmup 3 --profiler # + backward's top-15 ops (torch.profiler)
    python -m benchmarks.profile_step --tasks det,inst --val 0         # two heads, no validation pass
    python -m benchmarks.profile_step --weights runs/train/exp/weights/last.pt   # a trained model's validation
    python -m benchmarks.profile_step --steps 0 --val 0 --results runs/train/exp/results.csv  # series only
    python -m benchmarks.coco_like && python -m benchmarks.profile_step --memory --workers 0 --img 640 \
        --batch-size 16 --data runs/bench/coco-like/data.yaml   # tensor memory by part, COCO's counts

``--memory``: one batch (after an untraced one) traced by :class:`benchmarks.memtrack.TensorMemory`, each of the
parts below a phase: per part, the MiB it allocated that are alive at the step's peak, the peak while it ran and
the largest tensor it made (on CUDA also ``torch.cuda.max_memory_allocated``). No timing, validation or per-epoch
costs then.

Everything is built by :class:`utils.engine.trainer.Trainer` from train.py's own options (data, model, loss,
optimizer, AMP scaler, EMA, loaders, default hooks; the run folder goes under ``--project``), and each batch
is trained by the trainer's own ``_train_batch``: its named sections (``Trainer.section``) are timed, the
body and each head through forward pre/post hooks on the model and on every head module, each task loss by
wrapping the loss's per-task callables. ``loader`` is the time blocked in ``next()`` on the training loader;
``other`` is what no section covers (hooks, warmup lr, bookkeeping). ``ms/call`` is per call of that part,
``ms/batch`` per trained batch (the optimizer step and EMA run once per ``accumulate`` batches, so their
share is amortised), ``share`` of the mean batch wall time. On CUDA every boundary synchronises (the split is
then exact, the total a little slower than unprofiled).

Validation is the trainer's own ``_validate`` (EMA model, the val loader, validation losses), split by hooks
and wrappers around evaluate()'s pieces: model forward (the caption head's greedy decoding apart), validation
losses, postprocess (NMS, masks, semantic resize), each evaluator's per-batch ``process`` and final
``evaluate`` (COCOeval boxes / masks, semantic scoring, caption scoring, panoptic); the rest is loader wait
and ``to_float``. The trainer draws no pictures during validation (only labels.jpg and the first train
batches of epoch 1, and everything else after training), so there is no pictures row. A model with random
weights keeps up to ``max_det`` boxes per image, so its postprocess and COCOeval rows are those of an early
epoch; ``--weights`` (matching tensors transferred, as train.py's --weights) shows a trained model's.

Per-epoch costs (``--epoch-costs``, default on): the training loader's start (``iter()`` + the first batch:
its workers are forked again every epoch, ``persistent_workers=False``), one epoch's checkpoint write, the
results.csv append, and a full ``gc.collect()``. ``--results`` prints a run's ``time/train_s`` per epoch
with each epoch's ratio to the run's median.

Figures on a machine shared with other jobs are contended: compare shares, not absolute times, and rerun.

Measured (2 CPU cores shared with a 10-epoch 192 px training and other test runs, so every figure is
contended), ``--steps 8 --warmup 2 --threads 1 --weights <that run's epoch-6 last.pt>``, all four tasks:

* training batch, 3.0 s wall (min 2.6, max 3.7): backward 55.8%, forward 34.9% (body 18.9%, heads cap 5.5,
  sem 4.8, inst 3.7, det 1.9), losses 7.2% (sem 5.0, inst 1.0, det 1.0, cap 0.0), optimizer step 0.8% and
  EMA 0.4% (once per 4 batches: 94 and 43 ms a call), loader wait 0.4% (one worker keeps up), to_float 0.3%.
  With torch's default 2 threads beside the other jobs the same batch took 3.6 to 27.5 s (median 14.1):
  oversubscribed cores slow the threaded kernels far more than proportionally.
* validation, 200 images, 56.1 s: postprocess (NMS, masks, semantic resize) 44.1%, forward 34.1% of which
  greedy caption decoding 20.3%, mask COCOeval 11.4% (per batch 8.0 + final 3.4), box COCOeval 2.8%,
  semantic 2.4%, validation losses 2.2%, panoptic 1.8%, caption scoring 0.5%.
* per epoch: train loader start 240 ms (its worker forked again every epoch), checkpoint 238 ms, results.csv
  1 ms, a full gc.collect() 442 ms (530k objects).

Why some epochs take about twice as long as their neighbours: ``time/train_s`` runs from the epoch's
``_begin_epoch`` to its last batch, so validation, checkpoints, results.csv and TensorBoard (after the
batches) are not in it. What is in it and not the same every epoch: the loader's worker start (~0.24 s),
mid-epoch checkpoints (``--save-period``, off by default), the pictures of epoch 1's first batches (off with
``--noplots``), Python's GC (< 0.5 s for a full collection); EMA, the optimizer step and DWA cost the same
every epoch, and every training image is drawn the same way each epoch. Together under 1 s of a ~70 s epoch,
so none doubles one. What does is other processes on the same cores (train_s is wall time): the benchmark's
results.csv (``--results``) read 70.5, 108.0, 68.3, 83.7, 74.5, 137.6 s for epochs 1-6 (ratios 0.86 to
1.74) while this script and other test runs shared its 2 cores, and the 2-thread batch above varied 8x
within one minute for the same reason. Rerun an epoch-time comparison on an otherwise idle machine (or with
``--threads 1`` per job and jobs x threads <= cores) before reading anything into one slow epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import train as train_script
import utils.eval.evaluate as evaluate_module
from benchmarks.memtrack import TensorMemory, print_memory_table
from utils.data.dataset import stall_guard
from utils.engine.hooks import write_results
from utils.engine.trainer import Trainer, _no_section
from utils.runtime.checkpoint import save_checkpoint

TASKS = ("det", "inst", "sem", "cap")


class Sections:
    """Seconds and calls per named part; ``timer(name)`` is a context manager (nesting allowed). With ``memory``
    every part is also a phase of that :class:`~benchmarks.memtrack.TensorMemory` (its tensors charged to it)."""

    def __init__(self, device: torch.device, memory: TensorMemory | None = None):
        self.cuda = device.type == "cuda"
        self.device = device
        self.memory = memory
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def enter(self, name: str) -> float:
        """Opens part ``name``; returns its start time for :meth:`exit`."""
        self.sync()
        if self.memory is not None:
            self.memory.enter(name)
        return time.perf_counter()

    def exit(self, name: str, t0: float) -> None:
        self.sync()
        self.add(name, time.perf_counter() - t0)
        if self.memory is not None:
            self.memory.exit()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self.enter(name)
        try:
            yield
        finally:
            self.exit(name, t0)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class Timed:
    """``fn`` called inside ``sections(name)``; other attributes are ``fn``'s."""

    def __init__(self, fn, name: str, sections: Sections):
        self._fn, self._name, self._sections = fn, name, sections

    def __call__(self, *args, **kwargs):
        with self._sections(self._name):
            return self._fn(*args, **kwargs)

    def __getattr__(self, item):
        return getattr(self._fn, item)


def time_module(module: torch.nn.Module, name: str, sections: Sections) -> list:
    """Forward pre/post hooks adding each call of ``module`` to ``sections[name]``; returns the handles."""
    start: list[float] = []

    def pre(*_):
        start.append(sections.enter(name))

    def post(*_):
        sections.exit(name, start.pop())

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="cfg/yolor-mt-n.yaml")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch.yaml")
    p.add_argument("--weights", default="", help="initial weights (train.py's --weights); default random")
    p.add_argument("--img", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="loader workers (the benchmarks' default 1)")
    p.add_argument("--tasks", default="", help="comma list of det,inst,sem,cap; default all the data has")
    p.add_argument("--steps", type=int, default=10, help="timed training batches")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (the loader's start among them)")
    p.add_argument("--accumulate", type=int, default=0, help="batches per optimizer step (0: the trainer's, "
                   "nominal batch 64 / batch size)")
    p.add_argument("--val", type=int, default=1, help="1: time one validation pass; 0: none")
    p.add_argument("--epoch-costs", type=int, default=1, help="1: time the per-epoch costs outside the batches")
    p.add_argument("--scst", action="store_true", help="time the self-critical epochs' steps (hyp scst_epochs > 0): "
                   "sampled captions scored by CIDEr-D instead of teacher forcing; the caption loss row is split into "
                   "sampling, the samples' log-probabilities and the rest")
    p.add_argument("--profiler", action="store_true", help="torch.profiler's top-15 ops of backward (inflates it)")
    p.add_argument("--memory", action="store_true", help="instead of the timings: one batch's tensor memory by part "
                   "of the step (benchmarks/memtrack.py; pass --workers 0: a worker's tensors are not seen)")
    p.add_argument("--results", default="", help="a run's results.csv: print its epoch-time series")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--project", default="runs/profile", help="where the Trainer's run folder goes")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_trainer(opt: argparse.Namespace) -> Trainer:
    """A Trainer exactly as train.py builds it, from train.py's own parser."""
    args = ["--cfg", str(opt.cfg), "--data", str(opt.data), "--hyp", str(opt.hyp), "--img", str(opt.img),
            "--batch-size", str(opt.batch_size), "--device", str(opt.device), "--workers", str(opt.workers),
            "--seed", str(opt.seed), "--project", str(opt.project), "--name", "profile", "--exist-ok",
            "--no-progress", "--noplots", "--epochs", "10"]
    if opt.tasks:
        args += ["--tasks", opt.tasks]
    if opt.weights:
        args += ["--weights", opt.weights]
    return Trainer(train_script.parse_opt(args))


def profile_steps(trainer: Trainer, steps: int, warmup: int, accumulate: int = 0, profiler: bool = False,
                  memory: TensorMemory | None = None):
    """Trains ``warmup + steps`` batches of epoch 0 through ``trainer._train_batch``; returns (Sections of the
    timed batches, wall seconds of each timed batch, backward op table rows or None). ``memory``: every part
    is also a phase of it (pass ``warmup`` 0 and trace only the steps wanted)."""
    sec = Sections(trainer.device, memory)
    model = trainer.model
    handles = time_module(model, "forward_hooked", sec)
    for t in model.tasks:
        handles += time_module(model.head(t), f"head/{t}", sec)
    loss = trainer.loss
    for t in TASKS:
        if getattr(loss, t, None) is not None:
            setattr(loss, t, Timed(getattr(loss, t), f"loss/{t}", sec))
    # the candidates: drawn samples or beams (hyp scst_sampler), one row
    scst_parts = {"sample": "scst/sample", "beam_search": "scst/sample", "sequence_logprobs": "scst/logprobs"}
    if loss.scst_loss is not None:  # the self-critical epochs' caption loss (--scst) is the caption row too
        loss.scst_loss = Timed(loss.scst_loss, "loss/cap", sec)
        for method, name in scst_parts.items():  # its decoder passes, as instance attributes over the methods
            setattr(model.head("cap"), method, Timed(getattr(model.head("cap"), method), name, sec))
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    section = sec

    if profiler:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.cuda else [])

        @contextlib.contextmanager
        def profiled(name: str):  # the backward section under torch.profiler
            if name != "backward" or not sec.enabled:
                with sec(name):
                    yield
                return
            with sec(name), profile(activities=acts) as prof:
                yield
            for e in prof.key_averages():
                row = ops[e.key]
                row[0] += e.self_cpu_time_total / 1e3
                row[1] += getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e3
                row[2] += e.count

    trainer.section = profiled if profiler else section
    if accumulate > 0:
        trainer.accumulate = accumulate
    trainer.nb = len(trainer.train_loader)
    warmup_iters = max(round(trainer.hyp.get("warmup_epochs", 3) * trainer.nb), 100)
    trainer.epoch = 0
    trainer.progress = trainer._begin_epoch(0)
    walls = []
    it = iter(stall_guard(trainer.train_loader))
    try:
        for i in range(warmup + steps):
            if i >= trainer.nb:
                raise SystemExit(f"--warmup + --steps must be at most one epoch's {trainer.nb} batches")
            sec.enabled = i >= warmup
            sec.sync()
            t0 = time.perf_counter()
            batch = next(it)
            sec.add("loader", time.perf_counter() - t0)
            trainer.batch_index = i
            trainer._train_batch(i, batch, warmup_iters)
            trainer._fire("after_batch")
            sec.sync()
            if sec.enabled:
                walls.append(time.perf_counter() - t0)
    finally:
        del it
        for h in handles:
            h.remove()
        for t in [*TASKS, "scst_loss"]:
            if isinstance(getattr(loss, t, None), Timed):
                setattr(loss, t, getattr(loss, t)._fn)
        if loss.scst_loss is not None:
            for method in scst_parts:
                model.head("cap").__dict__.pop(method, None)
        trainer.section = _no_section
    return sec, walls, (dict(ops) if profiler else None)


# memory phases (the Sections' part names) as the table shows them
MEMORY_LABELS = {"forward_hooked": "forward: body (backbone + neck)", "forward": "forward: outside the model",
                 **{f"head/{t}": f"forward: head {t}" for t in TASKS}, **{f"loss/{t}": f"loss {t}" for t in TASKS},
                 "loss": "loss: other (gt masks, balancer)", "backward": "backward (activation + weight grads)",
                 "step": "optimizer step (unscale, clip, step)", "ema": "EMA update",
                 "other": "other (loader with 0 workers, hooks)"}


def state_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """The tensors a run holds between steps: weights and buffers, the EMA copy, the optimizer state, the
    balancer's parameters."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers(), *trainer.ema.ema.state_dict().values(),
               *trainer.loss.balancer.parameters()]
    return tensors + [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def profile_memory(trainer: Trainer, warmup: int = 1) -> tuple[TensorMemory, float]:
    """One training batch traced by :class:`~benchmarks.memtrack.TensorMemory`, each part of the step a phase,
    with an optimizer step (accumulate 1), after ``warmup`` untraced batches (which create the optimizer state,
    held from then on); returns the tracker and, on CUDA, ``torch.cuda.max_memory_allocated`` over that batch
    in MiB (NaN elsewhere)."""
    profile_steps(trainer, 0, warmup, accumulate=1)
    if trainer.cuda:
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
    mem = TensorMemory(trainer.device.type)
    held = state_tensors(trainer)  # outside the tracker: state_dict()'s detach() would be charged as an allocation
    with mem:
        mem.adopt(held, "weights, EMA, optimizer state")
        profile_steps(trainer, 1, 0, accumulate=1, memory=mem)
    allocated = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20 if trainer.cuda else float("nan")
    return mem, allocated


def step_rows(sec: Sections, walls: list[float], tasks: list[str]) -> list[tuple[str, int, float, float]]:
    """(part, calls, seconds) rows in display order; a leading '  ' marks a sub-part of the row above."""
    s, c = sec.seconds, sec.calls
    rows = [("loader wait", c["loader"], s["loader"]), ("to_device + to_float", c["to_device"], s["to_device"]),
            ("head inputs (caption targets)", c["head_inputs"], s["head_inputs"]),
            ("forward", c["forward"], s["forward"])]
    heads = sum(s[f"head/{t}"] for t in tasks)
    rows.append(("  body (backbone + neck)", c["forward"], s["forward"] - heads))
    rows += [(f"  head {t}", c[f"head/{t}"], s[f"head/{t}"]) for t in tasks]
    rows.append(("loss", c["loss"], s["loss"]))
    task_losses = sum(s[f"loss/{t}"] for t in tasks)
    rows += [(f"  loss {t}", c[f"loss/{t}"], s[f"loss/{t}"]) for t in tasks if c[f"loss/{t}"]]
    if c["scst/sample"]:  # a self-critical step: the caption loss's parts (cap is the last task row)
        rows += [("    SCST candidates, sampled or beams (no gradient, eval mode)", c["scst/sample"], s["scst/sample"]),
                 ("    SCST samples' log-probabilities", c["scst/logprobs"], s["scst/logprobs"]),
                 ("    SCST rewards (CIDEr-D), baseline, rest", c["loss/cap"],
                  s["loss/cap"] - s["scst/sample"] - s["scst/logprobs"])]
    rows.append(("  loss other (gt masks, balancer, parts)", c["loss"], s["loss"] - task_losses))
    rows += [("backward", c["backward"], s["backward"]),
             ("optimizer step (unscale, clip, step, zero_grad)", c["step"], s["step"]),
             ("EMA update", c["ema"], s["ema"])]
    top = sum(s[k] for k in ("loader", "to_device", "head_inputs", "forward", "loss", "backward", "step", "ema"))
    rows.append(("other (hooks, warmup lr, bookkeeping)", len(walls), sum(walls) - top))
    return rows


def print_table(title: str, rows, batches: int, total: float) -> None:
    print(f"\n{title}")
    print(f"{'part':<50} {'calls':>6} {'ms/call':>9} {'ms/batch':>9} {'share':>7}")
    for name, calls, seconds in rows:
        per_call = 1e3 * seconds / calls if calls else 0.0
        print(f"{name:<50} {calls:>6} {per_call:>9.1f} {1e3 * seconds / max(batches, 1):>9.1f} "
              f"{100 * seconds / max(total, 1e-12):>6.1f}%")
    print(f"{'total (measured wall per batch)':<50} {batches:>6} {'':>9} {1e3 * total / max(batches, 1):>9.1f} "
          f"{100.0:>6.1f}%")


def profile_validation(trainer: Trainer) -> tuple[list[tuple[str, int, float]], float, int]:
    """One ``trainer._validate`` pass split into its parts; returns (rows, wall seconds, images)."""
    sec = Sections(trainer.device)
    model = trainer.ema.ema
    handles = time_module(model, "forward", sec)
    cap = model.head("cap") if "cap" in model.tasks else None
    if cap is not None:
        cap.greedy = Timed(cap.greedy, "greedy", sec)
    orig_post, orig_build, orig_loss = evaluate_module.postprocess, evaluate_module.build_evaluators, trainer.loss
    names: list[str] = []

    def build(*args, **kwargs):
        evaluators = orig_build(*args, **kwargs)
        for e in evaluators:
            n = type(e).__name__.replace("Evaluator", "").lower()
            names.append(n)
            e.process = Timed(e.process, f"{n}.process", sec)
            e.evaluate = Timed(e.evaluate, f"{n}.evaluate", sec)
        return evaluators

    evaluate_module.postprocess = Timed(orig_post, "postprocess", sec)
    evaluate_module.build_evaluators = build
    trainer.loss = Timed(orig_loss, "val_loss", sec)
    t0 = time.perf_counter()
    try:
        trainer._validate({})
    finally:
        wall = time.perf_counter() - t0
        evaluate_module.postprocess, evaluate_module.build_evaluators, trainer.loss = orig_post, orig_build, orig_loss
        for h in handles:
            h.remove()
        if cap is not None:
            del cap.greedy
    s, c = sec.seconds, sec.calls
    what = {"box": "COCOeval boxes", "mask": "COCOeval masks", "semantic": "semantic scoring",
            "caption": "caption scoring", "panoptic": "panoptic PQ"}
    rows = [("forward", c["forward"], s["forward"]), ("  body + heads", c["forward"], s["forward"] - s["greedy"])]
    if cap is not None:
        rows.append(("  caption decoding (greedy)", c["greedy"], s["greedy"]))
    rows += [("validation losses", c["val_loss"], s["val_loss"]),
             ("postprocess (NMS, masks, semantic resize)", c["postprocess"], s["postprocess"])]
    for n in names:
        rows.append((f"{what.get(n, n)}: per batch", c[f"{n}.process"], s[f"{n}.process"]))
        rows.append((f"{what.get(n, n)}: final", c[f"{n}.evaluate"], s[f"{n}.evaluate"]))
    covered = s["forward"] + s["val_loss"] + s["postprocess"] + sum(s[f"{n}.process"] + s[f"{n}.evaluate"]
                                                                    for n in names)
    rows.append(("other (loader wait, to_float, export)", 1, wall - covered))
    return rows, wall, len(trainer.val_set)


def epoch_costs(trainer: Trainer) -> list[tuple[str, float]]:
    """Seconds of the work done once per epoch around the batches."""
    out = []
    t0 = time.perf_counter()
    it = iter(stall_guard(trainer.train_loader))
    next(it)
    out.append(("train loader start: iter() + first batch (in train_s)", time.perf_counter() - t0))
    del it
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_checkpoint(trainer.checkpoint(0), Path(d) / "last.pt")
        out.append(("checkpoint: last.pt (+ best.pt when best; after train_s)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        write_results(Path(d) / "results.csv", {"epoch": 1, "time/train_s": 1.0} | {f"k{i}": 0.5 for i in range(60)})
        out.append(("results.csv append (after train_s)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    gc.collect()
    out.append((f"gc.collect() full, {len(gc.get_objects())} objects (any time)", time.perf_counter() - t0))
    return out


def epoch_series(path: Path) -> list[tuple[int, float, float]]:
    """(epoch, time/train_s, ratio to the run's median) per row of a results.csv."""
    with open(path, newline="") as f:
        rows = [(int(r["epoch"]), float(r["time/train_s"])) for r in csv.DictReader(f) if r.get("time/train_s")]
    med = statistics.median(t for _, t in rows) if rows else 1.0
    return [(e, t, t / med) for e, t in rows]


def print_memory(trainer: Trainer, opt: argparse.Namespace) -> None:
    """``--memory``: the table of :func:`profile_memory`, with the sizes it is for."""
    mem, allocated = profile_memory(trainer, max(opt.warmup, 1))
    head = trainer.model.head
    sizes = []
    if "sem" in trainer.model.tasks:
        sizes.append(f"{head('sem').num_classes} semantic classes")
    if "cap" in trainer.model.tasks:
        sizes.append(f"{head('cap').vocab_size}-word vocabulary x {trainer.loss.cap.refs} references")
    extra = {"torch.cuda.max_memory_allocated": allocated} if trainer.cuda else None
    print_memory_table(mem, f"tensor memory of one training batch (MiB; {', '.join(sizes)}; {trainer.model.nc} "
                       "classes)", extra, MEMORY_LABELS)


def main(argv: list[str] | None = None) -> int:
    opt = parse_opt(argv)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    if opt.steps > 0 or opt.val or opt.epoch_costs:
        trainer = build_trainer(opt)
        if opt.scst:
            if trainer.loss.scst_loss is None:
                raise SystemExit("--scst: this hyp trains no self-critical epochs (scst_epochs 0) or no caption head")
            trainer.loss.scst = True
        tasks = trainer.model.tasks
        print(f"\n{opt.cfg} tasks {','.join(tasks)}, {opt.img} px, batch {opt.batch_size}, device {trainer.device}, "
              f"{torch.get_num_threads()} torch threads, {opt.workers} loader workers, accumulate "
              f"{opt.accumulate or trainer.accumulate}")
        if opt.memory:
            print_memory(trainer, opt)
        elif opt.steps > 0:
            sec, walls, ops = profile_steps(trainer, opt.steps, opt.warmup, opt.accumulate, opt.profiler)
            print_table(f"training batch: {opt.steps} timed after {opt.warmup} untimed "
                        f"(batch wall ms: min {1e3 * min(walls):.0f}, median {1e3 * statistics.median(walls):.0f}, "
                        f"max {1e3 * max(walls):.0f})", step_rows(sec, walls, tasks), len(walls), sum(walls))
            if ops is not None:
                key = 1 if trainer.cuda else 0
                print(f"\nbackward: top-15 ops by self {'device' if key else 'CPU'} time (ms per batch, "
                      "profiler on)")
                print(f"{'op':<70} {'self CPU':>9}" + (f" {'self dev':>9}" if key else "") + f" {'calls':>7}")
                for name, (cpu, dev, n) in sorted(ops.items(), key=lambda kv: -kv[1][key])[:15]:
                    print(f"{name[:70]:<70} {cpu / opt.steps:>9.2f}" + (f" {dev / opt.steps:>9.2f}" if key else "")
                          + f" {n // opt.steps:>7}")
        if opt.val and not opt.memory:
            rows, wall, images = profile_validation(trainer)
            print_table(f"validation pass: {images} images, {wall:.1f} s (ms/batch: per validation pass)",
                        rows, 1, wall)
        if opt.epoch_costs and not opt.memory:
            print("\nper-epoch costs outside the batches")
            for name, seconds in epoch_costs(trainer):
                print(f"{name:<68} {1e3 * seconds:>9.1f} ms")
        trainer.logger.close()
    if opt.results:
        series = epoch_series(Path(opt.results))
        print(f"\n{opt.results}: time/train_s per epoch (ratio to the median)")
        print(f"{'epoch':>5} {'train_s':>9} {'ratio':>6}")
        for e, t, r in series:
            print(f"{e:>5} {t:>9.1f} {r:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
