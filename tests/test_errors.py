import pytest
import zmq

from hub.client import _Handshake
from hub.errors import ERROR_CLASSES, HubError, PoolBusy, WorkerCrashed


@pytest.mark.parametrize("cls", list(ERROR_CLASSES.values()))
def test_every_error_crosses_processes_intact(cls: type[HubError]) -> None:
    err = cls("something went wrong", job_id="7")
    back = HubError.from_dict(err.to_dict())
    assert type(back) is cls and back.code == cls.code and back.message == err.message and back.job_id == "7"


def test_documented_codes_exist() -> None:
    for code in ("POOL_BUSY", "ACQUIRE_TIMEOUT", "INVALID_AUDIO", "UNKNOWN_PROVIDER", "PROVIDER_UNAVAILABLE",
                 "WORKER_CRASHED", "JOB_TIMEOUT", "BAD_REQUEST", "SHUTTING_DOWN"):
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
