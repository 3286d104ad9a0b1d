"""`to_the_end`: started work finishes even when its caller is cancelled, and the caller still
sees its cancellation afterwards."""

from __future__ import annotations

import asyncio

import pytest

from fastsandbox._aio.to_the_end import to_the_end
from fastsandbox.errors import FsbError, Unavailable


async def test_the_result_when_nothing_is_cancelled() -> None:
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await to_the_end(work()) == 7


async def test_a_cancelled_caller_waits_for_the_work_then_is_cancelled() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def work() -> None:
        entered.set()
        await release.wait()
        finished.append("done")

    caller = asyncio.create_task(to_the_end(work()))
    await entered.wait()
    caller.cancel()
    caller.cancel()  # twice: still one wait for the work
    await asyncio.sleep(0.05)
    assert not caller.done() and finished == []  # the work is still running, and awaited
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["done"]


async def test_the_work_failing_is_the_callers_error() -> None:
    async def work() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await to_the_end(work())


# Issue 12: during a kube-apiserver restart a cancelled request failed with Unavailable, and
# the leader's loops took that for an outage and ran on after stepping down (two leaders).
async def _failing_later(gate: asyncio.Event, finished: list[str]) -> None:
    await gate.wait()
    finished.append("ran to its end")
    raise Unavailable("cannot reach the Kubernetes apiserver (test)")


async def test_a_cancelled_caller_hears_of_its_cancellation_not_of_the_steps_failure() -> None:
    gate, finished = asyncio.Event(), []
    caught: list[str] = []

    async def loop_told_to_stop() -> None:
        # What the leader's loops do: an unavailable store is an outage, retried.
        while True:
            try:
                await to_the_end(_failing_later(gate, finished))
            except FsbError:
                caught.append("outage")
                await asyncio.sleep(0)

    task = asyncio.create_task(loop_told_to_stop())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done()  # the step is still running: the caller waits for it
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert finished == ["ran to its end"]
    assert caught == []  # the loop stopped instead of retrying


async def test_the_result_or_failure_reaches_a_caller_not_cancelled() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert await to_the_end(value()) == 7
    gate = asyncio.Event()
    gate.set()
    with pytest.raises(Unavailable):
        await to_the_end(_failing_later(gate, []))


async def test_a_cancel_repeated_while_waiting_still_ends_in_cancellation() -> None:
    gate = asyncio.Event()

    async def step() -> int:
        await gate.wait()
        return 1

    task = asyncio.create_task(to_the_end(step()))
    await asyncio.sleep(0)
    for _ in range(3):
        task.cancel()
        await asyncio.sleep(0)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
