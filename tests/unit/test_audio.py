import io
import wave

import numpy as np
import pytest

from hub.audio import (
    StreamResampler,
    WavLayout,
    _decode,
    decode_bytes,
    decode_into,
    decoded_room,
    resample,
    to_pcm,
    validate_pcm,
    wav_layout,
)
from hub.errors import InvalidAudio
from tests.conftest import DATA


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_files_decode_to_16k_mono_float32(ext: str) -> None:
    pcm = to_pcm(DATA / f"coffee.{ext}")
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(pcm.size / 16000 - 3.58) < 0.05  # same length whatever the container and rate
    assert 0.01 < float(np.sqrt(np.mean(pcm**2))) < 0.5


def test_int16_and_bytes_match_float32() -> None:
    ints = (np.sin(np.linspace(0, 100, 16000)) * 10000).astype(np.int16)
    from_ints = to_pcm(ints)
    assert from_ints.dtype == np.float32 and np.allclose(from_ints, ints / 32768.0)
    assert np.array_equal(to_pcm(ints.tobytes()), from_ints)


def test_other_rates_are_resampled() -> None:
    pcm = to_pcm(np.zeros(44100, dtype=np.float32) + 0.25, sample_rate=44100)
    assert abs(pcm.size - 16000) <= 32 and abs(float(pcm[8000]) - 0.25) < 1e-3
    for rate in (100, 10**6, 16000.5, True):
        with pytest.raises(InvalidAudio, match="sample_rate must be"):
            to_pcm(np.zeros(100, dtype=np.float32), sample_rate=rate)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "audio, fragment",
    [
        (np.array([], dtype=np.float32), "empty"),
        (np.array([0.1, np.nan], dtype=np.float32), "NaN"),
        (np.array([0.1, np.inf], dtype=np.float32), "NaN or infinite"),
        (np.zeros(10, dtype=np.float64), "float32"),
        (np.zeros((10, 2), dtype=np.float32), "mono"),
        (b"\x00\x01\x02", "even number"),
        (12345, "file path, a numpy array"),
    ],
)
def test_bad_audio_is_invalid_audio(audio: object, fragment: str) -> None:
    with pytest.raises(InvalidAudio, match=fragment):
        to_pcm(audio)  # type: ignore[arg-type]


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(InvalidAudio, match="does not exist"):
        to_pcm(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(InvalidAudio, match="cannot decode"):
        to_pcm(junk)
    with pytest.raises(InvalidAudio, match="sample_rate"):
        to_pcm(DATA / "coffee.wav", sample_rate=8000)


def test_validate_pcm_is_what_workers_run() -> None:
    with pytest.raises(InvalidAudio):
        validate_pcm(np.zeros(4, dtype=np.int16))
    ok = np.ones(4, dtype=np.float32)
    assert validate_pcm(ok) is ok


@pytest.mark.parametrize("rate", [44100, 48000])
@pytest.mark.parametrize("chunk", [1, 127, 4096])
def test_stream_resampler_equals_a_whole_file_resample(rate: int, chunk: int) -> None:
    pcm = (0.3 * np.random.default_rng(chunk).standard_normal(rate // 4 + 77)).astype(np.float32)
    whole = resample(pcm, rate)
    resampler = StreamResampler(rate)
    streamed = np.concatenate(
        [*(resampler.feed(pcm[i : i + chunk]) for i in range(0, pcm.size, chunk)), resampler.flush()]
    )
    assert streamed.size == whole.size
    assert abs(streamed.size - pcm.size * 16000 / rate) < 1  # the length of the audio, to the sample
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    # what the resampler is for: resampling each chunk on its own gets the length wrong
    if chunk == 127:
        full = pcm.size // chunk * chunk
        alone = sum(resample(pcm[i : i + chunk], rate).size for i in range(0, full, chunk))
        assert abs(alone - full * 16000 / rate) > 5


def test_stream_resampler_takes_int16_passes_16k_through_and_refuses_nan() -> None:
    ints = (np.sin(np.linspace(0, 300, 4410)) * 20000).astype(np.int16)
    resampler = StreamResampler(44100)
    out = np.concatenate([resampler.feed(ints), resampler.flush()])
    np.testing.assert_allclose(out, resample(ints.astype(np.float32) / 32768, 44100), atol=1e-6)
    same = StreamResampler(16000)
    pcm = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    assert np.array_equal(same.feed(pcm), pcm) and same.flush().size == 0
    with pytest.raises(InvalidAudio, match="NaN"):
        StreamResampler(48000).feed(np.array([0.1, np.nan], dtype=np.float32))


def wav_of(pcm: np.ndarray, rate: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat((pcm * 32767).astype("<i2"), channels).tobytes())
    return out.getvalue()


@pytest.mark.parametrize("rate, channels", [(16000, 1), (44100, 1), (48000, 2), (8000, 1)])
def test_uploads_decode_as_ffmpeg_does_with_or_without_the_wav_shortcut(rate: int, channels: int) -> None:
    pcm = (0.4 * np.sin(np.linspace(0, 500, rate))).astype(np.float32)
    data = wav_of(pcm, rate, channels)
    np.testing.assert_allclose(decode_bytes(data), _decode(io.BytesIO(data), "x"), atol=1e-6)
    clip = (DATA / "stella.wav").read_bytes()
    assert np.array_equal(decode_bytes(clip), _decode(io.BytesIO(clip), "x"))
    with pytest.raises(InvalidAudio, match="empty"):
        decode_bytes(b"")
    with pytest.raises(InvalidAudio, match="cannot decode"):
        decode_bytes(b"RIFF\x00\x00\x00\x00WAVEnonsense" * 10)


def test_a_few_samples_at_another_rate_are_refused_not_a_crash() -> None:
    assert resample(np.full(3, 0.1, dtype=np.float32), 48000).size <= 1
    with pytest.raises(InvalidAudio):
        to_pcm(np.full(2, 0.1, dtype=np.float32), sample_rate=48000)


@pytest.mark.parametrize("rate", [16000, 44100, 8000])
def test_decode_into_writes_what_decode_bytes_returns_within_its_room(rate: int) -> None:
    pcm = (0.4 * np.sin(np.linspace(0, 900, 3 * rate))).astype(np.float32)
    data = bytearray(wav_of(pcm, rate))  # as the gateway holds an upload: not copied to bytes
    room = decoded_room(data)
    assert room is not None and (room == 3 * 16000 if rate == 16000 else room >= 3 * 16000)
    out = np.full(room, np.nan, dtype=np.float32)
    written = decode_into(data, "x", out)
    assert np.array_equal(out[:written], decode_bytes(data))
    assert np.isnan(out[written:]).all()  # nothing written past the audio


def test_decode_into_stops_when_its_room_is_full() -> None:
    data = wav_of(np.zeros(16000, dtype=np.float32), 16000)
    assert decode_into(data, "x", np.empty(15999, dtype=np.float32)) == 16000  # room + 1: longer than the room
    mp3 = (DATA / "coffee.mp3").read_bytes()
    assert decoded_room(mp3) is None  # only decoding tells
    assert decode_into(mp3, "x", np.empty(16000, dtype=np.float32)) == 16001
    out = np.empty(5 * 16000, dtype=np.float32)
    assert abs(decode_into(mp3, "x", out) / 16000 - 3.58) < 0.05
    with pytest.raises(InvalidAudio, match="empty"):
        decode_into(b"", "x", out)


@pytest.mark.parametrize(
    "channels, width, rate",
    [(2, 2, 16000), (1, 1, 16000)],  # stereo, 8-bit: FFmpeg decides
)
def test_only_mono_16_bit_wav_takes_the_shortcut(channels: int, width: int, rate: int) -> None:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x00" * 1000 * channels * width)
    assert wav_layout(out.getvalue()) is None
    assert wav_layout(wav_of(np.zeros(100, dtype=np.float32), 16000)) == WavLayout(16000, 44, 100)


@pytest.mark.parametrize("channels, width", [(1, 2), (2, 2), (1, 1)])
def test_a_wav_header_claiming_a_2_ghz_rate_says_so(channels: int, width: int) -> None:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(b"\x01" * width * channels * 16000)
    data = bytearray(out.getvalue())
    data[24:28] = (2_000_000_000).to_bytes(4, "little")  # the fmt chunk's sample rate
    with pytest.raises(InvalidAudio, match="WAV header says the audio is sampled at 2000000000 Hz"):
        decode_bytes(bytes(data))


@pytest.mark.parametrize(
    "data",
    [b"this is a text file, not audio" * 50, bytes(1000), (DATA / "coffee.mp3").read_bytes()[:200]],
)
def test_an_undecodable_upload_says_what_is_wrong_without_errno_or_none(data: bytes) -> None:
    with pytest.raises(InvalidAudio) as refused:
        decode_bytes(data)
    message = refused.value.message
    assert message.startswith("cannot decode the upload: ") and "not an audio file FFmpeg knows" in message, message
    assert "Errno" not in message and "<none>" not in message, message
