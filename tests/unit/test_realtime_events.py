"""The Realtime API's events without I/O: client events parsed (both dialects, every mistake typed), server
events built, and a hub session's events mapped onto items, with fake ``StreamEvent``s in the order the
hub's VAD sends them (speech_started, speech_stopped, the utterance's finals, utterance)."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest

from hub.client import StreamEvent
from hub.errors import PoolBusy
from hub.gateway.realtime_events import (
    RATE,
    AppendAudio,
    ClearBuffer,
    CommitBuffer,
    Dialect,
    Problem,
    ServerVad,
    SessionConfig,
    Turns,
    UpdateSession,
    error_event,
    parse_client_event,
    session_event,
)

DEFAULT = SessionConfig()


def parse(body: Any, config: SessionConfig = DEFAULT) -> Any:
    return parse_client_event(json.dumps(body), config)


def problem(body: Any, config: SessionConfig = DEFAULT) -> Problem:
    with pytest.raises(Problem) as caught:
        parse_client_event(body if isinstance(body, str) else json.dumps(body), config)
    return caught.value


# --- client events ------------------------------------------------------------------------------


def test_buffer_events() -> None:
    pcm = (b"\x01\x00" * 480) + b"\xff\x7f"
    append = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode(), "event_id": "e1"})
    assert append == AppendAudio(pcm, "e1")
    assert parse({"type": "input_audio_buffer.commit"}) == CommitBuffer()
    assert parse({"type": "input_audio_buffer.clear", "event_id": "e2"}) == ClearBuffer("e2")


def test_ga_session_update_merges_only_what_it_names() -> None:
    update = parse(
        {
            "type": "session.update",
            "event_id": "u1",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "tiny", "language": "en", "prompt": "Stella"},
                        "turn_detection": None,
                        "noise_reduction": {"type": "near_field"},
                    }
                },
            },
        }
    )
    assert update == UpdateSession(SessionConfig("tiny", "en", "Stella", None), Dialect.GA, "u1")
    # a later update naming only the language keeps the model and prompt; turn detection back on takes defaults
    again = parse(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "transcription": {"language": "de"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 700},
                    }
                },
            },
        },
        update.config,
    )
    assert again.config == SessionConfig("tiny", "de", "Stella", ServerVad(silence_duration_ms=700))


def test_beta_transcription_session_update() -> None:
    update = parse(
        {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.6,
                    "prefix_padding_ms": 200,
                    "silence_duration_ms": 400,
                },
                "input_audio_noise_reduction": None,
            },
        }
    )
    assert update == UpdateSession(SessionConfig("whisper-1", "en", "", ServerVad(0.6, 200, 400)), Dialect.BETA)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ({"audio": "AAAA"}, "invalid_event", "type"),
        ({"type": "response.create"}, "unknown_event_type", "type"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_base64", "audio"),
        ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append"}, "invalid_value", "audio"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "unsupported_value", "session.type"),
        (
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            },
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
            },
            "unsupported_value",
            "session.audio.input.format.type",
        ),
        (
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            },
            "unsupported_value",
            "session.audio.input.turn_detection.type",
        ),
        (
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": {"threshold": 2}}}},
            },
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": 3}}}},
            },
            "invalid_value",
            "session.audio.input.transcription.model",
        ),
        (
            {"type": "transcription_session.update", "session": {"input_audio_format": "g711_ulaw"}},
            "unsupported_value",
            "session.input_audio_format",
        ),
        ({"type": "session.update", "session": "transcription"}, "invalid_value", "session"),
    ],
)
def test_every_mistake_is_a_typed_problem(body: Any, code: str, param: str | None) -> None:
    found = problem(body)
    assert (found.code, found.param, found.kind) == (code, param, "invalid_request_error")
    assert found.message


def test_a_problem_names_the_event_it_came_from() -> None:
    found = problem({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "mine"})
    assert error_event(found)["error"] == {
        "type": "invalid_request_error",
        "code": "invalid_base64",
        "message": "'audio' is not valid base64",
        "param": "audio",
        "event_id": "mine",
    }


def test_a_hub_error_keeps_its_code_and_type() -> None:
    found = Problem.of(PoolBusy("every session slot of 'whisper' is taken"), "e9")
    assert found.body() == {
        "type": "rate_limit_error",
        "code": "pool_busy",
        "message": "every session slot of 'whisper' is taken",
        "param": None,
        "event_id": "e9",
    }


# --- server events ------------------------------------------------------------------------------


def test_session_events_in_both_dialects() -> None:
    config = SessionConfig("whisper-1", "en", "", None)
    ga = session_event("created", config, "sess_1", Dialect.GA)
    assert ga == {
        "type": "session.created",
        "session": {
            "id": "sess_1",
            "object": "realtime.transcription_session",
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": {"model": "whisper-1", "language": "en", "prompt": ""},
                    "turn_detection": None,
                    "noise_reduction": None,
                }
            },
            "include": [],
        },
    }
    beta = session_event("updated", SessionConfig(), "sess_1", Dialect.BETA)
    assert beta["type"] == "transcription_session.updated"
    assert beta["session"]["input_audio_format"] == "pcm16"
    assert beta["session"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
    }


# --- turns --------------------------------------------------------------------------------------


def turns(manual: bool) -> Turns:
    counter = itertools.count(1)
    return Turns(lambda: f"item_{next(counter)}", manual=manual)


def final(text: str) -> StreamEvent:
    return StreamEvent("final", text)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].rsplit(".", 1)[-1] if e["type"] != "error" else "error" for e in events]


def test_server_vad_maps_the_hubs_turns_onto_items() -> None:
    t = turns(manual=False)
    t.session_opened()
    out = t.appended(RATE * 3)  # 3 s of audio sent; the hub's events follow
    out += t.hub_event(StreamEvent("partial", "hel"))  # partials are not part of the API
    out += t.hub_event(StreamEvent("speech_started", "", at=0.5))
    out += t.hub_event(StreamEvent("speech_stopped", "", at=2.25))
    out += t.hub_event(final(" Hello there."))
    out += t.hub_event(final(" How are you?"))
    out += t.hub_event(StreamEvent("utterance", "Hello there. How are you?", at=2.25))
    assert out == [
        {"type": "input_audio_buffer.speech_started", "item_id": "item_1", "audio_start_ms": 500},
        {"type": "input_audio_buffer.speech_stopped", "item_id": "item_1", "audio_end_ms": 2250},
        {"type": "input_audio_buffer.committed", "item_id": "item_1", "previous_item_id": None},
        {
            "type": "conversation.item.input_audio_transcription.delta",
            "item_id": "item_1",
            "content_index": 0,
            "delta": "Hello there.",
        },
        {
            "type": "conversation.item.input_audio_transcription.delta",
            "item_id": "item_1",
            "content_index": 0,
            "delta": " How are you?",
        },
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_1",
            "content_index": 0,
            "transcript": "Hello there. How are you?",
            "usage": {"type": "duration", "seconds": 1.75},
        },
    ]
    # the next utterance starts before the first's finals are out: finals still go to the older item
    second = t.hub_event(StreamEvent("speech_started", "", at=3.0))
    second += t.hub_event(StreamEvent("speech_stopped", "", at=4.0))
    assert second[-1] == {"type": "input_audio_buffer.committed", "item_id": "item_2", "previous_item_id": "item_1"}


def test_utterances_overlapping_their_finals_keep_their_own_text() -> None:
    t = turns(manual=False)
    t.session_opened()
    t.appended(RATE * 10)
    events = [
        StreamEvent("speech_started", "", at=1.0),
        StreamEvent("speech_stopped", "", at=2.0),
        StreamEvent("speech_started", "", at=2.5),  # the second utterance begins before the first's final
        final("One."),
        StreamEvent("utterance", "One.", at=2.0),
        StreamEvent("speech_stopped", "", at=3.5),
        final("Two."),
        StreamEvent("utterance", "Two.", at=3.5),
    ]
    out = [e for event in events for e in t.hub_event(event)]
    done = [(e["item_id"], e["transcript"]) for e in out if e["type"].endswith("completed")]
    deltas = [(e["item_id"], e["delta"]) for e in out if e["type"].endswith("delta")]
    assert done == [("item_1", "One."), ("item_2", "Two.")]
    assert deltas == [("item_1", "One."), ("item_2", "Two.")]


def test_session_offsets_make_times_of_the_whole_connection() -> None:
    t = turns(manual=False)
    t.session_opened()
    t.appended(RATE * 5)
    t.session_ended()
    t.session_opened()  # a second hub session begins 5 s into the connection's audio
    started = t.hub_event(StreamEvent("speech_started", "", at=1.0))
    assert started[0]["audio_start_ms"] == 6000


def test_manual_commit_makes_the_item_and_the_session_end_completes_it() -> None:
    t = turns(manual=True)
    t.session_opened()
    t.appended(RATE // 2)
    live = t.hub_event(final(" Hello"))  # a final before the commit is sent at once, for the item being filled
    live += t.hub_event(StreamEvent("speech_started", "", at=0.1))  # without turn detection the hub's turns are ignored
    committed = t.commit()
    flushed = t.hub_event(final(" world."))
    done = t.session_ended()
    assert kinds(live) == ["delta"] and live[0]["item_id"] == "item_1"
    assert committed == [{"type": "input_audio_buffer.committed", "item_id": "item_1", "previous_item_id": None}]
    assert flushed[0]["delta"] == " world."
    assert done[0]["transcript"] == "Hello world."
    assert done[0]["usage"] == {"type": "duration", "seconds": 0.5}
    # the next audio makes the next item, linked to the first
    t.session_opened()
    t.appended(RATE)
    assert t.commit()[0] == {"type": "input_audio_buffer.committed", "item_id": "item_2", "previous_item_id": "item_1"}


def test_commit_needs_100_ms_of_audio() -> None:
    t = turns(manual=True)
    with pytest.raises(Problem) as caught:
        t.commit()
    assert caught.value.code == "input_audio_buffer_commit_empty"
    t.appended(RATE // 10 - 1)
    with pytest.raises(Problem):
        t.commit()
    t.appended(1)
    assert kinds(t.commit()) == ["committed"]


def test_clear_drops_the_open_items_text_but_not_a_committed_one() -> None:
    t = turns(manual=False)
    t.session_opened()
    t.appended(RATE * 4)
    out = t.hub_event(StreamEvent("speech_started", "", at=0.2))
    out += t.hub_event(StreamEvent("speech_stopped", "", at=1.0))
    out += t.hub_event(StreamEvent("speech_started", "", at=1.5))
    assert t.clear() == [{"type": "input_audio_buffer.cleared"}]
    out += t.hub_event(final("Kept."))  # the committed item's final
    out += t.hub_event(StreamEvent("utterance", "Kept.", at=1.0))
    out += t.hub_event(final("Dropped."))  # the cleared audio's final, decoded as the session closes
    out += t.session_ended()
    assert [e.get("delta") or e.get("transcript") for e in out if e["type"].startswith("conversation")] == [
        "Kept.",
        "Kept.",
    ]
    with pytest.raises(Problem):
        t.commit()  # the buffer is empty after a clear


def test_a_failed_session_fails_its_committed_items() -> None:
    t = turns(manual=True)
    t.session_opened()
    t.appended(RATE)
    t.commit()
    failed = t.session_ended(Problem.of(PoolBusy("no room")))
    assert failed == [
        {
            "type": "conversation.item.input_audio_transcription.failed",
            "item_id": "item_1",
            "content_index": 0,
            "error": {"type": "rate_limit_error", "code": "pool_busy", "message": "no room", "param": None},
        }
    ]


def test_a_hub_without_vad_still_gives_deltas_under_server_vad() -> None:
    """Finals with no speech events (a hub without VAD): they fill an item the client's commit completes."""
    t = turns(manual=False)
    t.session_opened()
    t.appended(RATE * 2)
    out = t.hub_event(final("Words."))
    out += t.commit()
    out += t.session_ended()
    assert kinds(out) == ["delta", "committed", "completed"]
    assert {e["item_id"] for e in out} == {"item_1"}


def test_a_session_the_hub_ends_commits_the_open_item() -> None:
    """The hub closed the session on its own (silence past pool.session_idle_timeout): what it heard is
    committed and completed, not left as an item that never ends; too little audio to commit is dropped."""
    t = turns(manual=True)
    t.session_opened()
    t.appended(RATE)
    out = t.hub_event(final("Heard."))
    out += t.session_ended()
    assert kinds(out) == ["delta", "committed", "completed"]
    assert out[-1]["transcript"] == "Heard." and out[-1]["usage"]["seconds"] == 1.0
    t.session_opened()
    t.appended(RATE // 20)  # 50 ms
    assert t.session_ended() == []
    vad = turns(manual=False)
    vad.session_opened()
    vad.appended(RATE * 2)
    out = vad.hub_event(StreamEvent("speech_started", "", at=0.5))
    out += vad.hub_event(final("Cut off"))
    out += vad.session_ended()
    assert kinds(out) == ["speech_started", "delta", "committed", "completed"]


def test_server_vad_settings_become_the_hub_sessions_turn_detection() -> None:
    assert ServerVad().hub_turns() == {"vad": True, "endpoint_ms": 500, "vad_threshold": 0.5}
    assert ServerVad(threshold=0.0, silence_duration_ms=0).hub_turns() == {
        "vad": True,
        "endpoint_ms": 100,
        "vad_threshold": 0.2,
    }
    assert ServerVad(threshold=1.0, silence_duration_ms=10_000).hub_turns()["vad_threshold"] == 0.99


def test_an_utterance_that_covers_two_turns_completes_both() -> None:
    """A hub that fell behind decodes two utterances as one: its utterance (ending at the second's end)
    completes both items, the first with the text, so that no item is left waiting forever."""
    t = turns(manual=False)
    t.session_opened()
    t.appended(RATE * 10)
    events = [
        StreamEvent("speech_started", "", at=1.0),
        StreamEvent("speech_stopped", "", at=2.0),
        StreamEvent("speech_started", "", at=3.0),
        StreamEvent("speech_stopped", "", at=5.0),
        final("One. Two."),
        StreamEvent("utterance", "One. Two.", at=5.0),
    ]
    out = [e for event in events for e in t.hub_event(event)]
    done = [(e["item_id"], e["transcript"]) for e in out if e["type"].endswith("completed")]
    assert done == [("item_1", "One. Two."), ("item_2", "")]
