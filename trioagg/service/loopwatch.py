"""Who holds the event loop, and for how long: a heartbeat and a task-step timer.

Two measures, both on ``/metrics``:

* **The heartbeat** (:func:`watch_loop_stalls`) wakes every 10 ms and records
  how late it woke (``trioagg_loop_stall_seconds``). It is free, but it
  measures wall time: a process waiting for a core (OS preemption on a busy
  machine) or for the GIL (a worker thread's Python) looks the same as a task
  that holds the loop.
* **The step timer** (:class:`StepTimer`, a :class:`trio.abc.Instrument`)
  reads the event-loop thread's own CPU clock (``time.thread_time``) before
  and after every task step: a step is the code a task runs between two
  checkpoints, the unit in which one task keeps all others waiting. CPU time
  does not advance while the thread waits for a core, the GIL or I/O, so a
  long CPU step is a real holder. Steps of at least :data:`LONG_STEP` are
  counted in ``trioagg_loop_step_cpu_seconds``; the longest since start is
  ``trioagg_loop_step_cpu_max_seconds``; steps of at least
  :data:`REPORT_STEP` are kept (the :data:`KEPT` longest, with the task's
  name and where it suspended) and logged when one is the longest so far.

Timing a step costs about 3-5 us of CPU (two clock reads, which are system
calls, and trio's hook calls), on each of the ~25 steps of a request: too
much to pay on every step. :func:`sample_loop_steps` therefore installs the
timer for a share of the time (``--loop-step-sampling``, by default 0.1 of
every second), which catches any holder that recurs, at a tenth of the cost.
"""

from __future__ import annotations

import gc
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from .metrics import Metrics

log = logging.getLogger("trioagg.loop")

#: Steps using at least this much CPU are counted in the histogram.
LONG_STEP = 0.001
#: Steps using at least this much CPU are kept and named (a few ms is the bound).
REPORT_STEP = 0.005
#: How many of the longest steps are kept.
KEPT = 10
#: The sampling period: the timer is installed for ``fraction`` of each period.
PERIOD = 1.0

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TRIO = os.path.dirname(os.path.abspath(trio.__file__))


@dataclass(order=True, frozen=True)
class Step:
    """One long task step: its CPU and wall seconds, its task, where it suspended."""

    cpu: float
    wall: float = field(compare=False)
    #: CPU seconds of the step spent in the cyclic garbage collector
    collecting: float = field(compare=False)
    task: str = field(compare=False)
    where: str = field(compare=False)

    def describe(self) -> str:
        return (
            f"{self.cpu * 1000:.1f} ms CPU ({self.wall * 1000:.1f} ms wall, "
            f"{self.collecting * 1000:.1f} ms of it collecting garbage) "
            f"in task {self.task} at {self.where}"
        )


class LongSteps:
    """What the timer found: the histogram and gauge in ``metrics``, the longest
    steps of at least :data:`REPORT_STEP` (at most :data:`KEPT`) and how many
    steps were timed."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.kept: list[Step] = []  # a min-heap: the shortest kept step first
        self.timed = 0

    def record(self, cpu: float, wall: float, collecting: float, task: trio.lowlevel.Task) -> None:
        """One step of at least :data:`LONG_STEP` of CPU (rare: may take its time)."""
        self.metrics.loop_step(cpu)
        if cpu < REPORT_STEP or (len(self.kept) == KEPT and cpu <= self.kept[0].cpu):
            return
        step = Step(cpu, wall, collecting, task.name, where(task))
        longest = max(self.kept, default=None)
        if len(self.kept) < KEPT:
            heapq.heappush(self.kept, step)
        else:
            heapq.heapreplace(self.kept, step)
        if longest is None or cpu > longest.cpu:
            log.warning("the longest event-loop step so far: %s", step.describe())

    def longest(self) -> list[Step]:
        """The kept steps, longest first."""
        return sorted(self.kept, reverse=True)

    def add_timed(self, steps: int) -> None:
        self.timed += steps
        self.metrics.loop_steps_timed.inc(steps)


def where(task: trio.lowlevel.Task) -> str:
    """Where ``task`` is suspended now (the await that ended the step): its innermost
    frame in trioagg's code and its innermost frame outside trio's own
    (``file:line function``), or "finished"."""
    frames = [
        frame
        for frame, _ in task.iter_await_frames()
        if not frame.f_code.co_filename.startswith(_TRIO)
    ]
    if not frames:
        return "finished"
    ours = [frame for frame in frames if frame.f_code.co_filename.startswith(_PACKAGE)]
    shown = [ours[-1]] if ours else []
    if frames[-1] not in shown:
        shown.append(frames[-1])
    return " > ".join(_frame_text(frame) for frame in shown)


def _frame_text(frame: object) -> str:
    code = frame.f_code  # type: ignore[attr-defined]
    name = os.path.basename(code.co_filename)
    return f"{name}:{frame.f_lineno} {code.co_name}"  # type: ignore[attr-defined]


class StepTimer(trio.abc.Instrument):
    """Times every task step on the loop thread's CPU clock (see the module), and
    how much of it the cyclic garbage collector took (:meth:`collecting`, a
    ``gc.callbacks`` entry). ``clock`` and ``wall`` are injectable for tests."""

    def __init__(
        self,
        found: LongSteps,
        *,
        clock: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.found = found
        self.steps = 0
        self._clock = clock
        self._wall = wall
        self._cpu_at: float | None = None
        self._wall_at = 0.0
        self._loop_thread = threading.get_ident()
        self._collecting_at = 0.0
        self._collected = 0.0

    def stopped(self) -> int:
        """Call once removed: forgets the step it was removed in (its end is unknown)
        and returns how many steps it timed since the last call."""
        steps, self.steps, self._cpu_at = self.steps, 0, None
        return steps

    def collecting(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry: adds the loop thread's collections to the step."""
        if threading.get_ident() != self._loop_thread:
            return
        if phase == "start":
            self._collecting_at = self._clock()
        else:
            self._collected += self._clock() - self._collecting_at

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._collected = 0.0
        self._wall_at = self._wall()
        self._cpu_at = self._clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        cpu = self._clock()
        started, self._cpu_at = self._cpu_at, None
        if started is None:  # installed during this step: its start is unknown
            return
        self.steps += 1
        cpu -= started
        if cpu >= LONG_STEP:
            self.found.record(cpu, self._wall() - self._wall_at, self._collected, task)


async def sample_loop_steps(
    found: LongSteps,
    fraction: float,
    period: float = PERIOD,
    *,
    clock: Callable[[], float] = time.thread_time,
) -> None:
    """Until cancelled, time the event loop's task steps for ``fraction`` of every
    ``period`` (1: all the time; 0: never) on ``clock``."""
    if fraction <= 0:
        return
    timer = StepTimer(found, clock=clock)
    on, off = period * min(fraction, 1.0), period * max(0.0, 1.0 - fraction)
    try:
        while True:
            trio.lowlevel.add_instrument(timer)
            gc.callbacks.append(timer.collecting)
            try:
                await trio.sleep(on if off else PERIOD)
            finally:
                gc.callbacks.remove(timer.collecting)
                trio.lowlevel.remove_instrument(timer)
                found.add_timed(timer.stopped())
            if off:
                await trio.sleep(off)
    finally:
        for step in found.longest():
            log.info("a long event-loop step: %s", step.describe())


#: The cyclic garbage collector's thresholds once the service has started (see
#: :func:`tune_garbage_collector`): CPython's default young generation (a young
#: collection per 700 more tracked objects), a middle collection every 5 young ones
#: (default 10) and a full collection every 200 middle ones (default 10), so once per
#: 1,000 young collections instead of 100.
GC_THRESHOLDS: Final = (700, 5, 200)

_tuned = False


def tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector's collections short, once per process.

    A collection runs in whichever step (or worker thread, holding the GIL)
    allocates at the wrong moment, and walks every tracked object of the
    generations it collects. Two things make that long:

    * The objects alive once the service has started (modules, classes,
      functions: ~70,000 of them) are frozen out of its reach: a full collection
      over them took 40-70 ms, under 2 ms without them. Frozen objects are still
      freed by reference counting; a cycle among them would only be kept.
    * What every open connection holds (hypercorn's and trio's tasks, coroutines
      and cancel scopes: about 200 objects a connection, 25,000 with 128
      connections a process) is walked by every full collection: 10-25 ms each
      under the overload benchmark, where CPython's thresholds ran one about every
      second. :data:`GC_THRESHOLDS` runs them ten times less often, and halves the
      middle collections (whose survivors, requests waiting in the queue, took up
      to 6 ms) by running them twice as often. Garbage cycles that reach the old
      generation are freed ten times later: seconds under load.
    """
    global _tuned
    if not _tuned:
        _tuned = True
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)


async def watch_loop_stalls(metrics: Metrics, interval: float = 0.01) -> None:
    """Until cancelled, wake every ``interval`` seconds and record how late the wake-up
    was: the time some task held the event loop without a checkpoint, or the process
    waited for a core."""
    while True:
        asleep = trio.current_time()
        await trio.sleep(interval)
        metrics.loop_stalled(max(0.0, trio.current_time() - asleep - interval))
