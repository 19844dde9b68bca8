"""gateway.deadlines: many waits' deadlines on one timer per length."""

from __future__ import annotations

import asyncio

import pytest

from gateway.deadlines import Deadlines

# The async tests run on anyio's asyncio backend; the last makes event loops of its own.


async def wait(deadlines: Deadlines, seconds: float, work: float, *, rival: bool = False) -> str:
    """Sleep `work` seconds under a deadline of `seconds`: 'done' or 'timeout', or CancelledError.
    `rival`: somebody else cancels the task at the deadline's moment too, before it runs again."""
    deadline = deadlines.start(seconds)
    if rival:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_at(deadline.due, task.cancel)
    try:
        await asyncio.sleep(work)
        return "done"
    except asyncio.CancelledError:
        if deadline.timed_out():
            return "timeout"
        raise
    finally:
        deadline.end()


@pytest.mark.anyio
async def test_a_wait_past_its_deadline_is_cancelled_and_told_so() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await wait(deadlines, 0.05, 5) == "timeout"
    assert 0.04 <= loop.time() - started < 1
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@pytest.mark.anyio
async def test_waits_that_end_in_time_are_left_alone_and_the_queue_moves_on() -> None:
    deadlines = Deadlines()
    # A short wait first, then one that outlives its deadline: the timer set for the first
    # (gone by then) must move on to the second.
    quick = asyncio.create_task(wait(deadlines, 0.5, 0.01))
    await asyncio.sleep(0.03)
    slow = asyncio.create_task(wait(deadlines, 0.5, 5))
    also_quick = asyncio.create_task(wait(deadlines, 0.5, 0.02))
    assert list(await asyncio.gather(quick, slow, also_quick)) == ["done", "timeout", "done"]


@pytest.mark.anyio
async def test_lengths_have_their_own_queues() -> None:
    deadlines = Deadlines()
    long = asyncio.create_task(wait(deadlines, 0.3, 0.15))
    short = asyncio.create_task(wait(deadlines, 0.05, 0.15))
    assert list(await asyncio.gather(long, short)) == ["done", "timeout"]


@pytest.mark.anyio
async def test_another_cancellation_is_not_taken_for_the_deadline() -> None:
    deadlines = Deadlines()
    task = asyncio.create_task(wait(deadlines, 5, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_a_cancellation_pending_with_the_deadline_is_kept() -> None:
    deadlines = Deadlines()

    task = asyncio.create_task(wait(deadlines, 0.02, 5, rival=True))
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_queue_outlives_an_event_loop() -> None:
    deadlines = Deadlines()
    # The first loop ends with the queue's timer still set (its wait ended long before).
    assert asyncio.run(wait(deadlines, 0.2, 0)) == "done"
    # That timer never fires: the queue must set a new one on the new loop.
    assert asyncio.run(wait(deadlines, 0.2, 5)) == "timeout"
