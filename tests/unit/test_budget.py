"""The gateway's memory budget on its own (asyncio, no process): first come first served, 429 past the wait,
a reservation that settles to its real size, and nothing leaked by a client that goes away while waiting."""

from __future__ import annotations

import asyncio

import pytest

from hub.gateway.budget import MemoryBudget
from hub.gateway.errors import ApiError


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_uploads_that_fit_go_at_once_and_the_rest_wait_in_order() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(limit=100, wait=5)
        first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
        await first.grow_to(60)
        order: list[str] = []

        async def take(name: str, reservation, nbytes: int) -> None:  # type: ignore[no-untyped-def]
            await reservation.grow_to(nbytes)
            order.append(name)

        waiting = [asyncio.ensure_future(take("second", second, 50)), asyncio.ensure_future(take("third", third, 10))]
        await asyncio.sleep(0.01)
        assert order == [] and budget.reserved == 60  # "third" would fit, but it came after "second"
        first.settle(30)  # decoded: the upload is dropped, its PCM stays
        await asyncio.gather(*waiting)
        assert budget.reserved == 90 and budget.peak == 90
        for r in (first, second, third):
            r.release()
            r.release()  # once, however often
        assert budget.reserved == 0
        return order

    assert run(scenario()) == ["second", "third"]


def test_past_the_wait_an_upload_is_refused_with_too_many_requests() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(limit=100, wait=0.05)
        holder = budget.reservation()
        await holder.grow_to(90)
        with pytest.raises(ApiError) as refused:
            await budget.reservation().grow_to(20)
        assert refused.value.code == "TOO_MANY_REQUESTS" and "gateway.max_buffered_mb" in refused.value.message
        holder.release()
        late = budget.reservation()  # the one that timed out left no trace: the next one goes at once
        await late.grow_to(100)
        assert budget.reserved == 100

    run(scenario())


def test_no_wait_refuses_at_once_and_more_than_the_whole_budget_is_too_large() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(limit=100, wait=0)
        await budget.reservation().grow_to(50)
        with pytest.raises(ApiError, match="max_buffered_mb"):
            await budget.reservation().grow_to(60)
        with pytest.raises(ApiError) as huge:
            await budget.reservation().grow_to(101)
        assert huge.value.code == "UPLOAD_TOO_LARGE"

    run(scenario())


def test_a_chunked_upload_grows_step_by_step() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(limit=100, wait=0)
        chunked = budget.reservation()
        for total in (10, 30, 30, 60):
            await chunked.grow_to(total)
        assert budget.reserved == 60 and chunked.held == 60

    run(scenario())


def test_a_pcm_larger_than_expected_overdraws_and_later_uploads_wait_for_it() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(limit=100, wait=0.05)
        compressed = budget.reservation()
        await compressed.grow_to(30)
        compressed.settle(120)  # an mp3 decodes to more than a WAV of its size would
        assert budget.reserved == 120
        with pytest.raises(ApiError):
            await budget.reservation().grow_to(1)
        compressed.release()
        assert budget.reserved == 0

    run(scenario())


def test_a_client_gone_while_waiting_leaves_nothing_reserved() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(limit=100, wait=5)
        holder = budget.reservation()
        await holder.grow_to(100)
        waiter = asyncio.ensure_future(budget.reservation().grow_to(50))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        holder.release()
        assert budget.reserved == 0

        await holder.grow_to(100)
        late = budget.reservation()
        waiter = asyncio.ensure_future(late.grow_to(50))
        await asyncio.sleep(0.01)
        holder.release()  # grants the waiter at once ...
        waiter.cancel()  # ... which is cancelled before it runs again
        await asyncio.gather(waiter, return_exceptions=True)
        assert budget.reserved == late.held  # granted and kept by its reservation, or given back: never lost
        late.release()
        assert budget.reserved == 0

    run(scenario())
