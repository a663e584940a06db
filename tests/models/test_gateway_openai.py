"""The OpenAI-compatible API, driven by the real ``openai`` SDK (and curl) against a real supervisor and gateway."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from hub.client import HubClient
from hub.gateway.auth import ApiKeys
from tests.conftest import CLIPS, DATA, reference, word_error_rate
from tests.gateway_support import Gateway

pytestmark = pytest.mark.timeout(180)


def sdk(gw: Gateway, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=str(kwargs.pop("api_key", "unused")), max_retries=0, timeout=60, **kwargs
    )


@pytest.mark.parametrize("clip", CLIPS)
def test_sdk_transcribes_the_committed_clips(whisper_gateway: Gateway, clip: str) -> None:
    with open(DATA / f"{clip}.wav", "rb") as audio:
        result = sdk(whisper_gateway).audio.transcriptions.create(model="whisper-1", file=audio)
    assert word_error_rate(reference(clip), result.text) <= 0.10, result.text


@pytest.mark.parametrize("container", ["mp3", "flac", "ogg"])
def test_other_containers_decode_in_memory(whisper_gateway: Gateway, container: str) -> None:
    with open(DATA / f"coffee.{container}", "rb") as audio:
        result = sdk(whisper_gateway).audio.transcriptions.create(model="whisper", file=audio)
    assert word_error_rate(reference("coffee"), result.text) <= 0.10, result.text


def parse_cues(text: str, separator: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of every cue of an SRT or VTT body; fails on a malformed timing line."""
    stamp = r"(\d\d):(\d\d):(\d\d)" + re.escape(separator) + r"(\d\d\d)"
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.strip().splitlines()
        timing = next(line for line in lines if "-->" in line)
        match = re.fullmatch(stamp + " --> " + stamp, timing)
        assert match, timing
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in match.groups())
        cue_text = " ".join(lines[lines.index(timing) + 1 :])
        cues.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000, cue_text))
    return cues


def test_every_response_format(whisper_gateway: Gateway) -> None:
    client = sdk(whisper_gateway)
    path = DATA / "stella.wav"
    expected = reference("stella")

    def create(response_format: str, **extra: object) -> object:
        with open(path, "rb") as audio:
            return client.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format=response_format, **extra
            )  # type: ignore[call-overload]

    text = create("text")
    assert isinstance(text, str) and word_error_rate(expected, text) <= 0.10, text
    for fmt, separator in (("srt", ","), ("vtt", ".")):
        body = create(fmt)
        assert isinstance(body, str)
        if fmt == "vtt":
            assert body.startswith("WEBVTT\n\n"), body
            body = body[len("WEBVTT\n\n") :]
        else:
            assert body.lstrip().startswith("1\n"), body
        cues = parse_cues(body, separator)
        assert cues and all(0 <= start < end <= 6.0 for start, end, _ in cues), cues
        assert word_error_rate(expected, " ".join(c[2] for c in cues)) <= 0.10, body
    verbose = create("verbose_json", timestamp_granularities=["word", "segment"])
    seconds = len(np.frombuffer(path.read_bytes()[44:], dtype="<i2")) / 16000
    assert verbose.language == "en" and abs(verbose.duration - seconds) < 0.1, verbose  # type: ignore[attr-defined]
    assert verbose.segments and word_error_rate(expected, verbose.text) <= 0.10  # type: ignore[attr-defined]
    words = verbose.words  # type: ignore[attr-defined]
    assert word_error_rate(expected, " ".join(w.word for w in words)) <= 0.10, words
    assert all(a.start <= b.start for a, b in zip(words, words[1:], strict=False)), words


def test_stream_sends_deltas_then_done(whisper_gateway: Gateway) -> None:
    with open(DATA / "weather.wav", "rb") as audio:
        events = list(sdk(whisper_gateway).audio.transcriptions.create(model="whisper-1", file=audio, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}, kinds
    done = events[-1].text  # type: ignore[union-attr]
    assert word_error_rate(reference("weather"), done) <= 0.10, done
    assert " ".join(e.delta.strip() for e in events[:-1]) == done  # type: ignore[union-attr]


def test_what_the_model_cannot_do_is_a_400_naming_what_it_can(whisper_gateway: Gateway) -> None:
    """tiny.en is English-only: a translation, or a language it lacks, is refused with the languages it has,
    rather than decoded as English."""
    client = sdk(whisper_gateway)
    with pytest.raises(openai.BadRequestError) as translation:
        client.audio.translations.create(model="whisper-1", file=(DATA / "hello.wav").open("rb"))
    assert translation.value.body["code"] == "bad_request" and "English-only" in translation.value.message  # type: ignore[index]
    for language in ("klingon", "fr"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(
                model="whisper-1", file=(DATA / "hello.wav").open("rb"), language=language
            )
        assert refused.value.status_code == 400 and refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        assert (
            f"language '{language}' is not supported" in refused.value.message
            and "(supported: en)" in refused.value.message
        )
    result = client.audio.transcriptions.create(model="whisper-1", file=(DATA / "hello.wav").open("rb"), language="en")
    assert word_error_rate(reference("hello"), result.text) <= 0.10, result.text


def test_models_list_the_providers(whisper_gateway: Gateway) -> None:
    client = sdk(whisper_gateway)
    assert sorted(m.id for m in client.models.list()) == ["echo", "whisper"]
    assert client.models.retrieve("whisper-1").id == "whisper-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_errors_are_the_sdks_own_exceptions(whisper_gateway: Gateway) -> None:
    client = sdk(whisper_gateway)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.audio.transcriptions.create(model="no-such-model", file=(DATA / "hello.wav").open("rb"))
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.message
    assert unknown.value.body["code"] == "unknown_provider"  # type: ignore[index]
    cases = {
        "not audio": ("notes.wav", b"this is a text file, not audio" * 50),
        "empty": ("empty.wav", b""),
        "truncated": ("cut.mp3", (DATA / "coffee.mp3").read_bytes()[:200]),
    }
    for name, upload in cases.items():
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model="whisper-1", file=upload)
        assert bad.value.status_code == 400 and bad.value.body["code"] == "invalid_audio", name  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as fmt:
        client.audio.transcriptions.create(
            model="whisper-1", file=(DATA / "hello.wav").open("rb"), response_format="xml"
        )  # type: ignore[arg-type]
    assert "response_format" in fmt.value.message
    # the gateway and the hub carry on
    assert (
        word_error_rate(
            reference("hello"),
            client.audio.transcriptions.create(model="whisper-1", file=(DATA / "hello.wav").open("rb")).text,
        )
        <= 0.10
    )


def raw_http(port: int, request: bytes, read_timeout: float = 10.0) -> bytes:
    """Send bytes as they are (for requests no client library would make) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in chunks[-1]:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_malformed_and_oversized_bodies_get_clear_4xx(whisper_gateway: Gateway) -> None:
    port = whisper_gateway.port
    head = "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=BOUND\r\n"
    broken = b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF....'
    answer = raw_http(port, (head + f"Content-Length: {len(broken)}\r\n\r\n").encode() + broken)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"multipart" in answer
    started = time.monotonic()
    answer = raw_http(port, (head + f"Content-Length: {2 * 1024**3}\r\n\r\n").encode() + b"--BOUND\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert time.monotonic() - started < 10  # answered without waiting for 2 GB that never comes
    not_form = b"just bytes"
    answer = raw_http(
        port,
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: {len(not_form)}\r\n\r\n".encode()
        + not_form,
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"multipart/form-data" in answer, answer[:300]
    code, body = whisper_gateway.get("/v1/no/such/route")
    assert code == 404 and json.loads(body)["error"]["message"]
    assert whisper_gateway.get("/readyz")[0] == 200


def test_upload_limit_is_enforced_while_streaming(gateway_factory: object) -> None:
    gw = gateway_factory({"echo": {"type": "echo"}}, max_upload_mb=0.05)  # type: ignore[operator]
    wav = (DATA / "stella.wav").read_bytes()  # ~150 KB
    with pytest.raises(openai.APIStatusError) as big:
        sdk(gw).audio.transcriptions.create(model="echo", file=("stella.wav", wav))
    assert big.value.status_code == 413 and big.value.body["code"] == "upload_too_large"  # type: ignore[index]
    # chunked: no Content-Length, so the limit stops the body as it streams in
    boundary = "B0UND"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.wav"\r\n\r\n'.encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192]) for i in range(0, len(body), 8192)
    )
    answer = raw_http(
        gw.port,
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
        + chunked
        + b"0\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    small = sdk(gw).audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
    assert small.text.startswith("echo")


def occupy(hub_endpoint: str, seconds: float, requests: int = 1) -> list[threading.Thread]:
    """Keep an echo worker busy from the SDK for ``seconds`` (the HTTP API has no sleep option)."""
    tone = np.zeros(1600, dtype=np.float32) + 0.1

    def busy() -> None:
        with HubClient(hub_endpoint, timeout=60) as client:
            client.transcribe(tone, "echo", sleep=seconds)

    threads = [threading.Thread(target=busy) for _ in range(requests)]
    for thread in threads:
        thread.start()
    return threads


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_busy_pool_is_429_with_retry_after(gateway_factory: object) -> None:
    gw = gateway_factory({"echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 1, "max_queue": 1}}})  # type: ignore[operator]
    threads = occupy(gw.hub.endpoint, 4.0, requests=2)  # one running, one queued: the queue is full
    wait_for(lambda: gw.hub.status()["providers"]["echo"]["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as busy:
        sdk(gw).audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
    assert busy.value.response.headers["retry-after"] == "1"
    assert busy.value.body["code"] == "pool_busy"  # type: ignore[index]
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()


def test_concurrency_bound_and_abandoned_request_is_cancelled(gateway_factory: object) -> None:
    gw = gateway_factory(  # type: ignore[operator]
        {"echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 1}}}, max_concurrent_requests=1
    )
    threads = occupy(gw.hub.endpoint, 5.0)
    wait_for(lambda: gw.hub.status()["providers"]["echo"]["workers_by_state"].get("busy", 0) == 1)
    wav = (DATA / "hello.wav").read_bytes()
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\necho\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="h.wav"\r\n\r\n'.encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    waiting = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    waiting.sendall(
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    wait_for(lambda: gw.hub.status()["providers"]["echo"]["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as limited:
        sdk(gw).audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
    assert limited.value.body["code"] == "too_many_requests"  # type: ignore[index]
    waiting.close()  # the client gives up: its queued job leaves the hub at once, long before the worker is free
    wait_for(lambda: gw.hub.status()["providers"]["echo"]["queue_depth"] == 0, timeout=3.0)
    assert threads[0].is_alive()  # the worker is still busy with the SDK's job
    for thread in threads:
        thread.join(30)
    wait_for(lambda: "too_many_requests" not in _try(gw), timeout=10)


def _try(gw: Gateway) -> str:
    try:
        return sdk(gw).audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb")).text
    except openai.APIStatusError as exc:
        return str(exc.body)


def test_api_keys_and_reload_on_sighup(gateway_factory: object, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\nfirst-key\n")
    gw = gateway_factory({"echo": {"type": "echo"}}, api_keys_file=str(keys))  # type: ignore[operator]
    hello = (DATA / "hello.wav").read_bytes()
    with pytest.raises(openai.AuthenticationError) as missing:
        sdk(gw, api_key="wrong-key").audio.transcriptions.create(model="echo", file=("h.wav", hello))
    assert missing.value.status_code == 401 and "incorrect API key" in missing.value.message
    assert sdk(gw, api_key="first-key").audio.transcriptions.create(model="echo", file=("h.wav", hello)).text
    code, _ = gw.get("/v1/models")
    assert code == 401
    keys.write_text("second-key\n")
    gw.hub.proc.send_signal(__import__("signal").SIGHUP)
    wait_for(lambda: _authorised(gw, "second-key", hello), timeout=20)
    assert not _authorised(gw, "first-key", hello)


def _authorised(gw: Gateway, key: str, audio: bytes) -> bool:
    try:
        sdk(gw, api_key=key).audio.transcriptions.create(model="echo", file=("h.wav", audio))
        return True
    except openai.AuthenticationError:
        return False


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_no_keys_file_means_nothing_to_reload(caplog: pytest.LogCaptureFixture) -> None:
    """The sample config has no keys file: a SIGHUP's reload reads nothing and logs no error."""
    keys = ApiKeys("")
    with caplog.at_level(logging.INFO, logger="hub.gateway"):
        keys.reload()
    assert not keys.required and caplog.records == []
    keys.check(None)  # no key needed


def test_curl_from_the_readme(whisper_gateway: Gateway) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-F", f"file=@{DATA / 'coffee.wav'}", f"{whisper_gateway.url}/v1/audio/transcriptions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert word_error_rate(reference("coffee"), json.loads(out)["text"]) <= 0.10, out


def test_metrics_health_and_status(whisper_gateway: Gateway) -> None:
    sdk(whisper_gateway).audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
    code, metrics = whisper_gateway.get("/metrics")
    assert code == 200
    assert re.search(
        r'asr_hub_gateway_requests_total\{route="/v1/audio/transcriptions",status="200"\} [1-9]', metrics
    ), metrics
    assert "asr_hub_gateway_request_seconds_bucket" in metrics and "asr_hub_gateway_websockets_open" in metrics
    assert whisper_gateway.get("/healthz") == (200, "ok\n")
    gateway = whisper_gateway.hub.status()["gateway"]
    assert gateway["running"] and gateway["url"] == whisper_gateway.url and gateway["pid"] > 0
