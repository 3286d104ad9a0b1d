"""`to_the_end`: started work finishes even when its caller is cancelled, and the caller still
sees its cancellation afterwards."""

from __future__ import annotations

import asyncio

import pytest

from fastsandbox._aio.to_the_end import to_the_end


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
