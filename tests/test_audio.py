import numpy as np
import pytest

from hub.audio import to_pcm, validate_pcm
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
