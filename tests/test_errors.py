import pytest

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
