"""Tensor memory by phase on any device: which part of a training step holds the bytes at its peak.

``torch.cuda.max_memory_allocated`` gives one number per device, CUDA only, and nothing about who holds it.
:class:`TensorMemory` is a ``TorchDispatchMode`` that sees every tensor an op returns (forward, autograd's
backward, the optimizer), counts each storage once while it lives (a weak reference to the storage tells when
it is freed) and charges it to the innermost open phase (``with mem.phase("loss/sem"):``). It reports, per
phase: the bytes it allocated that are still alive at the step's peak, the peak of all live bytes while it
was open, and the largest tensor it made. Tensors made before tracking began (weights, optimizer state)
are added with :meth:`TensorMemory.adopt` under a phase name of their own.

It counts tensor bytes, as ``max_memory_allocated`` does, not the caching allocator's reserve, fragmentation
or workspaces (cuDNN, oneDNN), so on CUDA it sits a little under ``max_memory_allocated``; on the CPU it is
the only per-phase figure there is.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = float(1 << 20)


@dataclass
class PhaseMemory:
    """One phase's figures (bytes)."""

    live_at_peak: int = 0  # its allocations still alive when the whole step peaked
    peak_while_open: int = 0  # the peak of all live bytes while it was open (0: never opened)
    allocated: int = 0  # everything it allocated, freed or not
    largest: tuple[int, str] = (0, "")  # (bytes, "op shape dtype") of the largest tensor it made


@dataclass
class _Open:
    name: str
    peak: int


class TensorMemory(TorchDispatchMode):
    """Live tensor bytes, their peak and their phase (see the module doc). Use as ``with TensorMemory() as m``.

    Args:
        device_type: count only tensors on this device type (``None``: every device).
    """

    def __init__(self, device_type: str | None = None):
        super().__init__()
        self.device_type = device_type
        self.live = self.peak = 0
        self.phases: dict[str, PhaseMemory] = defaultdict(PhaseMemory)
        self._by_phase: dict[str, int] = defaultdict(int)  # live bytes per allocating phase
        self._at_peak: dict[str, int] = {}
        self._refs: dict[int, weakref.ref] = {}  # the storages' weak references, kept so their callbacks fire
        self._seen: set[int] = set()  # data_ptr of every live storage counted
        self._open: list[_Open] = []

    # --- phases ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Charges what is allocated inside to ``name`` (the innermost open phase wins) and records the peak."""
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def enter(self, name: str) -> None:
        """Opens phase ``name`` (inside the open ones); :meth:`exit` closes the innermost."""
        self._open.append(_Open(name, self.live))
        self.phases[name]  # listed even if it allocates nothing

    def exit(self) -> None:
        """Closes the innermost open phase, keeping the peak reached while it was open."""
        top = self._open.pop()
        p = self.phases[top.name]
        p.peak_while_open = max(p.peak_while_open, top.peak)

    @property
    def current(self) -> str:
        """The phase new tensors are charged to: the innermost open one, ``other`` outside every phase."""
        return self._open[-1].name if self._open else "other"

    # --- counting ----------------------------------------------------------------------------------
    def adopt(self, tensors: Iterable[torch.Tensor], phase: str) -> None:
        """Counts ``tensors`` (made before tracking) as allocated by ``phase``."""
        self._open.append(_Open(phase, self.live))
        try:
            for t in tensors:
                self._track(t, "")
        finally:
            self._open.pop()

    def _track(self, t: torch.Tensor, op: str) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta or (self.device_type and t.device.type != self.device_type):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / nested tensors: not in a training step here
            return
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr in self._seen:  # a view or an in-place result: counted with its storage
            return
        name = self.current
        self.live += nbytes
        self._by_phase[name] += nbytes
        p = self.phases[name]
        p.allocated += nbytes
        if nbytes > p.largest[0]:
            p.largest = (nbytes, f"{op} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}".strip())

        def freed(ref: weakref.ref, ptr=ptr, nbytes=nbytes, name=name) -> None:
            self._refs.pop(id(ref), None)
            self._seen.discard(ptr)
            self.live -= nbytes
            self._by_phase[name] -= nbytes

        ref = weakref.ref(st, freed)
        self._refs[id(ref)] = ref
        self._seen.add(ptr)
        for o in self._open:
            o.peak = max(o.peak, self.live)
        if self.live > self.peak:
            self.peak = self.live
            self._at_peak = dict(self._by_phase)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = getattr(func, "__name__", str(func)).split(".")[0]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, op)
        return out

    def report(self) -> dict[str, PhaseMemory]:
        """The phases with ``live_at_peak`` filled in, in the order they were first opened."""
        for name, b in self._at_peak.items():
            self.phases[name].live_at_peak = b
        return dict(self.phases)


def print_memory_table(mem: TensorMemory, title: str, extra: dict[str, float] | None = None,
                       labels: dict[str, str] | None = None) -> None:
    """The per-phase table (MiB): allocated by the phase and alive at the step's peak, the peak while it was
    open, the largest tensor it made; ``extra`` lines (name -> MiB) below the total; ``labels`` rename phases."""
    rows = mem.report()
    labels = labels or {}
    print(f"\n{title}")
    print(f"{'phase':<40} {'at peak':>9} {'share':>6} {'peak open':>10} {'largest tensor it made':>48}")
    for name, p in rows.items():
        big = f"{p.largest[1]} {p.largest[0] / MIB:.0f}" if p.largest[0] else ""
        print(f"{labels.get(name, name)[:40]:<40} {p.live_at_peak / MIB:>9.0f} {100 * p.live_at_peak / max(mem.peak, 1):>5.1f}% "
              f"{p.peak_while_open / MIB:>10.0f} {big[-48:]:>48}")
    print(f"{'peak live tensor memory':<40} {mem.peak / MIB:>9.0f} {100.0:>5.1f}%")
    for name, mib in (extra or {}).items():
        print(f"{name:<40} {mib:>9.0f}")


def step_memory(step: Callable[[], None], device: torch.device, steps: int, warmup: int, batch: int,
                state: Callable[[], list[torch.Tensor]]) -> dict:
    """Times ``steps`` calls of ``step`` (one training step on a batch of ``batch`` images) after ``warmup``
    untimed ones; returns img/s, ms per step and the peak memory in MiB: on CUDA ``torch.cuda.max_memory_allocated``
    over the timed steps, elsewhere the peak of one more step traced by :class:`TensorMemory` with ``state()`` (the
    tensors held between steps: weights, EMA, optimizer state) adopted."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        held = state()  # outside the tracker: a state_dict()'s detach() inside it would count as an allocation
        with TensorMemory(device.type) as mem:
            mem.adopt(held, "state")
            step()
        peak = mem.peak
    return {"img_s": batch * steps / max(seconds, 1e-9), "step_ms": 1e3 * seconds / max(steps, 1),
            "peak_mib": peak / MIB}
