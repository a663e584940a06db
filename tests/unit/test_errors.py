import pytest
import zmq

from hub.client.call import CurveKeys, Peer, _Handshake
from hub.errors import ERROR_CLASSES, HubError, PoolBusy, WorkerCrashed


@pytest.mark.parametrize("cls", list(ERROR_CLASSES.values()))
def test_every_error_crosses_processes_intact(cls: type[HubError]) -> None:
    err = cls("something went wrong", request_id="7")
    back = HubError.from_dict(err.to_dict())
    assert type(back) is cls and back.code == cls.code and back.message == err.message and back.request_id == "7"
    assert err.to_dict()["job_id"] == "7"  # the wire keeps its key


def test_documented_codes_exist() -> None:
    for code in (
        "POOL_BUSY",
        "ACQUIRE_TIMEOUT",
        "INVALID_AUDIO",
        "UNKNOWN_PROVIDER",
        "PROVIDER_UNAVAILABLE",
        "WORKER_CRASHED",
        "JOB_TIMEOUT",
        "BAD_REQUEST",
        "SHUTTING_DOWN",
    ):
        assert code in ERROR_CLASSES


def test_unknown_code_from_a_newer_peer_is_kept() -> None:
    err = HubError.from_dict({"code": "SOMETHING_NEW", "message": "m"})
    assert type(err) is HubError and err.code == "SOMETHING_NEW" and "SOMETHING_NEW" in str(err)
    assert PoolBusy.code == "POOL_BUSY" and str(WorkerCrashed("x")) == "[WORKER_CRASHED] x"


def test_a_handshake_without_detail_is_a_refusal_only_before_one_succeeded() -> None:
    """A wrong server key and a hub stopping in mid-handshake both fail without detail: only the first, which
    never lets a handshake succeed, is AUTH_FAILED; the second is a lost hub, which a pool retries elsewhere."""
    wrong_key = _Handshake()
    assert wrong_key.take(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) and wrong_key.refused
    stopping = _Handshake()
    assert not stopping.take(zmq.EVENT_CONNECTED) and not stopping.refused
    assert stopping.take(zmq.EVENT_HANDSHAKE_SUCCEEDED) and not stopping.refused
    assert stopping.take(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) and not stopping.refused
    assert stopping.take(zmq.EVENT_HANDSHAKE_FAILED_AUTH) and stopping.refused  # the hub said so: always a refusal


def test_a_protocol_failure_is_a_refusal_only_when_the_mechanisms_differ() -> None:
    """A client without keys meeting a CURVE hub (or one with keys meeting a plain hub, which may also fail
    without detail) fails with a mechanism mismatch: AUTH_FAILED. Any other protocol failure (a peer that does
    not speak ZMTP) says nothing of the key."""
    mismatch = _Handshake()
    assert mismatch.take(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
    assert mismatch.refused
    other = _Handshake()
    assert other.take(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_UNEXPECTED_COMMAND)
    assert not other.refused
    assert "requires CURVE keys" in str(Peer("tcp://h:1").refused())
    with_keys = str(Peer("tcp://h:1", CurveKeys(b"p" * 40, b"s" * 40, b"k" * 40)).refused())
    assert "allowed_clients" in with_keys and "does not use CURVE" in with_keys
