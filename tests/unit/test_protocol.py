import pytest

from hub import protocol
from hub.errors import BadRequest, InvalidAudio
from hub.protocol import AudioRef, MsgType, WorkerSpec


def test_round_trip_with_and_without_payload() -> None:
    frames = protocol.build(MsgType.TRANSCRIBE, "42", {"provider": "whisper"}, b"\x00" * 8)
    msg = protocol.parse(frames)
    assert (msg.type, msg.id, msg.body, msg.payload) == (MsgType.TRANSCRIBE, "42", {"provider": "whisper"}, b"\x00" * 8)
    assert protocol.parse(protocol.build(MsgType.STATUS, "a")).payload is None


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"\x01", b"STATUS", b"1"], "expected 4 or 5 frames"),
        ([b"\x02", b"STATUS", b"1", b"{}"], "unsupported protocol version 2"),
        ([b"\x01", b"NOPE", b"1", b"{}"], "unknown message type"),
        ([b"\x01", b"STATUS", b"", b"{}"], "message id"),
        ([b"\x01", b"STATUS", b"x" * 65, b"{}"], "message id"),
        ([b"\x01", b"STATUS", b"1", b"[1]"], "must be a JSON object"),
        ([b"\x01", b"STATUS", b"1", b"{"], "not valid JSON"),
        ([b"\x01", b"STATUS", b"1", b'{"a": NaN}'], "not valid JSON"),
        ([b"\x01", b"STATUS", b"1", b"\xff\xfe"], "not valid JSON"),
    ],
)
def test_malformed_messages_are_bad_requests(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        protocol.parse(frames)


def test_split_identity_needs_an_envelope() -> None:
    assert protocol.split_identity([b"id", b"x"]) == (b"id", [b"x"])
    with pytest.raises(BadRequest):
        protocol.split_identity([b"only"])


def test_audio_ref_inline_and_shm() -> None:
    assert protocol.parse_audio_ref({"audio": {"samples": 2}}, b"\x00" * 8, 100) == AudioRef(samples=2)
    ref = protocol.parse_audio_ref({"audio": {"samples": 16000, "shm": "asrhub_x_1_ab"}}, None, 10**6)
    assert ref.shm == "asrhub_x_1_ab" and ref.seconds == 1.0
    piece = protocol.parse_audio_ref({"audio": {"samples": 10, "shm": "asrhub_x_1_ab", "offset": 30}}, None, 100)
    assert piece == AudioRef(samples=10, shm="asrhub_x_1_ab", offset=30) and piece.to_dict()["offset"] == 30
    assert "offset" not in ref.to_dict()  # a whole request's descriptor is as before


@pytest.mark.parametrize(
    "audio, payload, error, fragment",
    [
        (None, None, BadRequest, "field 'audio'"),
        ({"samples": "3"}, None, BadRequest, "integer"),
        ({"samples": 0}, None, InvalidAudio, "empty"),
        ({"samples": 1000}, None, InvalidAudio, "over the limit"),
        ({"samples": 2}, None, InvalidAudio, "no shared-memory segment"),
        ({"samples": 2}, b"\x00" * 7, InvalidAudio, "need 8"),
        ({"samples": 2, "shm": 5}, None, BadRequest, "segment name"),
        ({"samples": 2, "shm": "asrhub_x_1_ab"}, b"\x00" * 8, BadRequest, "not both"),
        ({"samples": 2, "shm": "asrhub_x_1_ab", "offset": -1}, None, BadRequest, "offset"),
        ({"samples": 2, "offset": 4}, b"\x00" * 8, BadRequest, "inline PCM has none"),
    ],
)
def test_audio_ref_errors(audio: object, payload: bytes | None, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        protocol.parse_audio_ref({"audio": audio}, payload, max_samples=100)


def test_options_and_timeout_validation() -> None:
    assert protocol.parse_options({"options": {"beam_size": 5}}) == {"beam_size": 5}
    with pytest.raises(BadRequest):
        protocol.parse_options({"options": [1]})
    assert protocol.parse_timeout({"timeout": 2}) == 2.0
    assert protocol.parse_timeout({}) is None
    for bad in (0, -1, "5", True):
        with pytest.raises(BadRequest):
            protocol.parse_timeout({"timeout": bad})


def test_worker_spec_round_trip() -> None:
    spec = WorkerSpec(
        "w-1", "w", "whisper", "tiny.en", "auto", "auto", 1, "ipc:///x", "asrhub_a_", 1.0, {"beam_size": 1}
    )
    assert WorkerSpec.from_json(spec.to_json()) == spec


def test_peek_id_only_returns_ids_that_can_be_sent_back() -> None:
    assert protocol.peek_id([b"\x01", b"X", b"abc"]) == "abc"
    assert protocol.peek_id([b"\x01", b"X", b"\xff\xfe"]) == "-"
    assert protocol.peek_id([b"\x01"]) == "-"
