"""The event loop's step timer and its sampling, under fake CPU clocks and MockClock."""

from __future__ import annotations

import collections
import functools
import gc
import logging

import pytest
import trio
import trio.testing

from tests.conftest import Server
from trioagg.service.loopwatch import (
    KEPT,
    LongSteps,
    StepTimer,
    sample_loop_steps,
    tune_garbage_collector,
)
from trioagg.service.metrics import Metrics


class FakeCPU:
    """A thread CPU clock that advances only when told (as a task's code would)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_a_step_that_uses_cpu_is_timed_and_named() -> None:
    metrics = Metrics()
    found = LongSteps(metrics)
    cpu = FakeCPU()
    timer = StepTimer(found, clock=cpu)

    async def holder() -> None:
        cpu.now += 0.022  # 30 ms of the loop thread's CPU before the next checkpoint,
        timer.collecting("start", {})
        cpu.now += 0.008  # 8 ms of them collecting garbage
        timer.collecting("stop", {})
        await trio.sleep(0)

    async def polite() -> None:
        for _ in range(5):
            cpu.now += 0.0002
            await trio.sleep(0)

    trio.lowlevel.add_instrument(timer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, name="holder")
            nursery.start_soon(polite, name="polite")
    finally:
        trio.lowlevel.remove_instrument(timer)
    assert timer.stopped() >= 7
    (step,) = found.longest()
    assert step.cpu == pytest.approx(0.030)
    assert step.task == "holder"
    assert step.collecting == pytest.approx(0.008)
    assert "test_loopwatch.py" in step.where and "holder" in step.where
    assert _sample(metrics, "trioagg_loop_step_cpu_seconds_count") == 1
    bucket = "trioagg_loop_step_cpu_seconds_bucket"
    assert metrics.registry.get_sample_value(bucket, {"le": "0.02"}) == 0
    assert metrics.registry.get_sample_value(bucket, {"le": "0.05"}) == 1
    assert b"trioagg_loop_step_cpu_max_seconds 0.03" in metrics.render()


def test_only_long_steps_are_counted_and_only_the_longest_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    found = LongSteps(metrics)
    cpu = FakeCPU()
    timer = StepTimer(found, clock=cpu)
    task = trio.lowlevel.Task.__new__(trio.lowlevel.Task)  # never run: a name only
    object.__setattr__(task, "name", "request")
    object.__setattr__(task, "coro", None)

    def step(seconds: float) -> None:
        timer.before_task_step(task)
        cpu.now += seconds
        timer.after_task_step(task)

    # installed in the middle of a step: that step's start is unknown, so it is skipped
    cpu.now += 5.0
    timer.after_task_step(task)
    with caplog.at_level(logging.WARNING, logger="trioagg.loop"):
        for ms in (0.5, 0.9, 2, 3, *range(6, 6 + KEPT + 3)):
            step(ms / 1000)
    assert timer.stopped() == 4 + KEPT + 3
    # below 1 ms: not in the histogram; 2 and 3 ms: counted, not kept (under 5 ms)
    assert _sample(metrics, "trioagg_loop_step_cpu_seconds_count") == 2 + KEPT + 3
    kept = [round(s.cpu * 1000) for s in found.longest()]
    assert kept == list(range(6 + KEPT + 2, 5, -1))[:KEPT]
    assert all(s.where == "finished" for s in found.longest())
    # one warning per new longest step, each naming the task
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == KEPT + 3 and all("in task request" in w for w in warned)
    # removed during a step: forgotten, so the next step after re-adding is not misread
    timer.before_task_step(task)
    timer.stopped()
    cpu.now += 10.0
    timer.after_task_step(task)
    assert max(s.cpu for s in found.longest()) < 1


async def test_sampling_times_steps_only_in_its_share_of_each_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    found = LongSteps(metrics)
    cpu = FakeCPU()
    held_at: list[float] = []

    async def hold_now_and_then() -> None:
        # a 20 ms holder every 0.1 s: 10 per second, 2.5 of them inside a 0.25 s window
        while True:
            await trio.sleep(0.1)
            held_at.append(trio.current_time())
            cpu.now += 0.020

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(sample_loop_steps, found, 0.25, 1.0, clock=cpu))
        nursery.start_soon(hold_now_and_then)
        await trio.sleep(10.05)
        nursery.cancel_scope.cancel()
    long_steps = _sample(metrics, "trioagg_loop_step_cpu_seconds_count")
    assert len(held_at) == 100
    assert 10 <= long_steps <= 40  # the windows' share of 100 holders, not all of them
    assert _sample(metrics, "trioagg_loop_steps_timed_total") >= long_steps


async def test_no_sampling_times_nothing(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    with trio.move_on_after(5):
        await sample_loop_steps(LongSteps(metrics), 0.0)
    assert _sample(metrics, "trioagg_loop_steps_timed_total") == 0


def test_startup_objects_are_frozen_out_of_the_collector() -> None:
    tune_garbage_collector()
    assert gc.get_freeze_count() > 1000


def test_full_collections_run_once_per_thousand_young_ones() -> None:
    """Objects that live a while and die, as requests waiting in a full queue do: of
    1,000 collections, at most one full one (over every connection's objects), and a
    middle one after every 5 young ones (CPython's defaults: 10 full, 1 in 11 middle)."""
    tune_garbage_collector()
    started: collections.Counter[int] = collections.Counter()

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[info["generation"]] += 1

    ring: list[object] = [None] * 5_000  # each object outlives ~7 young collections
    gc.callbacks.append(count)
    try:
        for allocated in range(2_000_000):
            ring[allocated % len(ring)] = []
            cycle: list[object] = []
            cycle.append(cycle)  # garbage only a collection frees: the heap grows
            if started[0] + started[1] + started[2] >= 1_000:
                break
    finally:
        gc.callbacks.remove(count)
    assert started[2] <= 1
    assert started[1] >= 125  # one in 7 collections here; one in 11 by default


@pytest.mark.parametrize("path", ["/metrics", "/v1/status"])
async def test_metrics_are_rendered_off_the_event_loop(server: Server, path: str) -> None:
    """Both answers wait for the render thread's limiter, and the loop keeps serving."""
    answers: list[int] = []

    async def ask() -> None:
        answers.append((await server.client.get(path)).status_code)

    async with trio.open_nursery() as nursery, server.app.metrics.rendering:
        nursery.start_soon(ask)
        for _ in range(3):
            assert (await server.client.get("/healthz")).status_code == 200
        assert answers == []  # still waiting for its turn in a render thread
    assert answers == [200]
