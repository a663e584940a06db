"""One request's tries over a pool of hubs (``Attempts``), without sockets or a clock: fake clients, times given."""

from __future__ import annotations

from typing import Any

import pytest

from hub.client.balance import RETRY_PAUSE, Attempts, Balancer, Member
from hub.errors import AuthFailed, HubUnreachable, JobTimeout, PoolBusy, ShuttingDown

A, B = "tcp://a:1", "tcp://b:1"


class FakeClient:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def pool(*endpoints: str) -> Balancer[Any]:
    balancer: Balancer[Any] = Balancer(FakeClient)
    balancer.update(set(endpoints))
    return balancer


def attempts(balancer: Balancer[Any], timeout: float = 10.0, keep: bool = False) -> Attempts[Any]:
    return Attempts(balancer, "echo", started=100.0, deadline=100.0 + timeout, where=f"{A}, {B}", keep=keep)


def hub(step: Member[Any] | float) -> Member[Any]:
    assert isinstance(step, Member), f"expected a hub to try, got a wait of {step} s"
    return step


def test_a_refused_try_goes_to_the_other_hub_then_both_again_after_a_pause() -> None:
    balancer = pool(A, B)
    tries = attempts(balancer)
    first = hub(tries.next(100.0))
    assert first.in_flight == 1
    assert tries.failed(PoolBusy("full")) == (True, [])
    assert first.in_flight == 0
    second = hub(tries.next(100.1))
    assert second.endpoint != first.endpoint
    assert tries.failed(ShuttingDown("draining"))[0]
    assert tries.next(100.2) == RETRY_PAUSE  # both refused once: wait, then both are candidates again
    assert hub(tries.next(100.3)) is first  # the draining one is left out until a probe says otherwise
    assert tries.succeeded() == [] and first.in_flight == 0


def test_the_pause_never_passes_the_deadline() -> None:
    tries = attempts(pool(A), timeout=1.0)
    hub(tries.next(100.0))
    tries.failed(PoolBusy("full"))
    assert tries.next(100.99) == pytest.approx(0.01)


def test_when_time_is_up_the_last_refusal_is_raised() -> None:
    tries = attempts(pool(A), timeout=1.0)
    hub(tries.next(100.0))
    busy = PoolBusy("full")
    tries.failed(busy)
    with pytest.raises(PoolBusy) as caught:
        tries.next(101.0)
    assert caught.value is busy


def test_with_no_hub_at_all_the_error_names_the_pool_and_the_wait() -> None:
    tries = attempts(pool(), timeout=2.0)
    assert tries.next(100.0) == RETRY_PAUSE
    with pytest.raises(
        HubUnreachable, match=r"no hub of the pool \(tcp://a:1, tcp://b:1\) took the request within 2.5 s"
    ):
        tries.next(102.5)


def test_a_failure_after_part_of_the_answer_is_final() -> None:
    balancer = pool(A, B)
    tries = attempts(balancer)
    member = hub(tries.next(100.0))
    tries.answered()
    retry, closable = tries.failed(HubUnreachable("gone mid-stream"))
    assert not retry and closable == [] and member.in_flight == 0
    assert balancer.members[member.endpoint] is member  # the balancer was not told: the caller gets the error


@pytest.mark.parametrize("error", [JobTimeout("slow"), ValueError("bad audio"), GeneratorExit()])
def test_other_errors_are_final_and_let_go_of_the_hub(error: BaseException) -> None:
    tries = attempts(pool(A))
    member = hub(tries.next(100.0))
    assert tries.failed(error) == (False, [])
    assert member.in_flight == 0 and not member.down and not member.draining


def test_an_unreachable_hub_is_replaced_and_its_old_client_closed_once_let_go() -> None:
    balancer = pool(A)
    tries = attempts(balancer)
    member = hub(tries.next(100.0))
    retry, closable = tries.failed(HubUnreachable("gone"))
    assert retry and closable == [member.client]
    replacement = balancer.members[A]
    assert replacement is not member and replacement.down
    assert tries.next(100.1) == RETRY_PAUSE  # down until a probe answers


def test_a_kept_session_stays_counted_on_its_hub() -> None:
    balancer = pool(A)
    tries = attempts(balancer, keep=True)
    member = hub(tries.next(100.0))
    assert tries.succeeded() == [] and member.in_flight == 1 and tries.member is member
    assert balancer.release(member) == [] and member.in_flight == 0


def test_ending_a_try_that_was_not_started_is_a_bug() -> None:
    tries = attempts(pool(A))
    with pytest.raises(AssertionError):
        tries.succeeded()


def test_a_hub_refusing_the_key_sends_the_request_to_another_and_all_refusing_is_final_at_once() -> None:
    """A hub that stops in the middle of a client's first handshake can look like a refusal: the request goes to
    another hub. When every hub has refused the key, that is the answer at once, not after the timeout."""
    tries = attempts(pool(A, B))
    hub(tries.next(100.0))
    assert tries.failed(AuthFailed("refused"))[0]
    other = hub(tries.next(100.1))
    assert tries.succeeded() == [] and other.in_flight == 0
    refused = AuthFailed("refused")
    tries = attempts(pool(A, B))
    for now in (100.0, 100.1):
        hub(tries.next(now))
        assert tries.failed(refused)[0]
    with pytest.raises(AuthFailed) as raised:
        tries.next(100.2)
    assert raised.value is refused


def test_a_refusal_beside_a_busy_hub_waits_and_tries_both_again() -> None:
    tries = attempts(pool(A, B))
    hub(tries.next(100.0))
    tries.failed(AuthFailed("refused"))
    hub(tries.next(100.1))
    tries.failed(PoolBusy("full"))
    assert tries.next(100.2) == RETRY_PAUSE  # not final: the busy hub may take it on the next round
    assert hub(tries.next(100.3)).in_flight == 1
