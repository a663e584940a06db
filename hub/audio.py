"""Turn what a user hands us (a file, an array, raw bytes) into float32 mono 16 kHz PCM.

Everything that is not usable audio raises ``InvalidAudio`` with a message that says
what to change. ``validate_pcm`` is also what a worker runs on PCM it receives, since a
hostile client can skip the SDK.
"""

from __future__ import annotations

import io
import os
import wave
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from hub.errors import InvalidAudio
from hub.protocol import SAMPLE_RATE

AudioInput = Union[str, os.PathLike, np.ndarray, bytes, bytearray, memoryview]


def validate_pcm(pcm: np.ndarray) -> np.ndarray:
    """Check float32 mono PCM: non-empty, one-dimensional, finite."""
    if pcm.dtype != np.float32:
        raise InvalidAudio(f"PCM must be float32, got {pcm.dtype}")
    if pcm.ndim != 1:
        raise InvalidAudio(f"PCM must be mono (one dimension), got shape {pcm.shape}")
    if pcm.size == 0:
        raise InvalidAudio("the audio is empty (0 samples)")
    if not np.isfinite(pcm).all():
        raise InvalidAudio("the audio contains NaN or infinite samples")
    return pcm


def to_pcm(audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """Decode or convert ``audio``; ``sample_rate`` describes arrays and bytes (default 16000)."""
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise InvalidAudio("sample_rate= applies to arrays and raw bytes; a file's own rate is read from it")
        return validate_pcm(decode_file(Path(audio)))
    rate = check_sample_rate(SAMPLE_RATE if sample_rate is None else sample_rate)
    if isinstance(audio, np.ndarray):
        pcm = _from_array(audio)
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        pcm = _from_array(pcm16(audio))
    else:
        raise InvalidAudio(
            f"audio must be a file path, a numpy array or raw 16-bit PCM bytes, got {type(audio).__name__}"
        )
    validate_pcm(pcm)
    return pcm if rate == SAMPLE_RATE else validate_pcm(resample(pcm, rate))


def pcm16(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """Raw little-endian 16-bit PCM as an int16 array."""
    data = bytes(raw)
    if len(data) % 2:
        raise InvalidAudio(f"raw PCM must be 16-bit samples (an even number of bytes), got {len(data)} bytes")
    return np.frombuffer(data, dtype="<i2")


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim != 1:
        raise InvalidAudio(f"the array must be mono (one dimension), got shape {array.shape}; mix it down first")
    if array.dtype == np.float32:
        return np.ascontiguousarray(array)
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    raise InvalidAudio(
        f"arrays must be float32 (samples in [-1, 1]) or int16, got {array.dtype}; convert with .astype(np.float32)"
    )


def decode_file(path: Path) -> np.ndarray:
    """Decode any container PyAV reads (wav, flac, mp3, ogg, ...) to float32 mono 16 kHz."""
    if not path.is_file():
        raise InvalidAudio(f"audio file {str(path)!r} does not exist or is not a file")
    return _decode(str(path), repr(str(path)))


def decode_bytes(data: bytes, name: str = "the upload") -> np.ndarray:
    """Decode a whole file held in memory (an HTTP upload) without writing it anywhere."""
    if not data:
        raise InvalidAudio(f"{name} is empty (0 bytes)")
    pcm = _mono_wav(data)
    return validate_pcm(_decode(io.BytesIO(data), name) if pcm is None else pcm)


def _mono_wav(data: bytes) -> np.ndarray | None:
    """Mono 16-bit PCM WAV, the most common upload, read without FFmpeg (about ten times cheaper for a short
    clip); None for anything else, which FFmpeg then decodes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate = w.getframerate()
            if not 1000 <= rate <= 384000:
                raise InvalidAudio(
                    f"the WAV header says the audio is sampled at {rate} Hz; a sample rate must be between "
                    "1000 and 384000 Hz: the file is damaged or its header was written wrong"
                )
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                return None
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError):
        return None
    if not raw:
        return None
    pcm = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    return pcm if rate == SAMPLE_RATE else resample(pcm, rate)


def _decode(source: str | BinaryIO, name: str) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    try:
        with av.open(source, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidAudio(f"{name} has no audio stream")
            for frame in container.decode(audio=0):
                frame.pts = None
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise InvalidAudio(f"cannot decode {name}: {ffmpeg_reason(exc)}") from None
    if not chunks:
        raise InvalidAudio(f"{name} decodes to no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's own words for a failure, without the errno and the '<none>' file name PyAV adds for an
    in-memory source, and what to do about the commonest one."""
    import av

    reason = getattr(exc, "strerror", None) or str(exc)
    if isinstance(exc, av.error.InvalidDataError):
        return f"{reason.lower()}: it is not an audio file FFmpeg knows (send WAV, FLAC, MP3, OGG, M4A, WebM ...)"
    return reason


def resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Resample float32 mono PCM from ``rate`` to 16 kHz with FFmpeg's resampler."""
    import av

    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    return _joined([*resampler.resample(frame), *resampler.resample(None)])


def check_sample_rate(rate: object) -> int:
    """A sample rate a stream may declare: an integer number of Hz between 1000 and 384000."""
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1000 <= rate <= 384000:
        raise InvalidAudio(f"sample_rate must be an integer number of Hz between 1000 and 384000, got {rate!r}")
    return rate


class StreamResampler:
    """Resample one live stream to float32 16 kHz, chunk after chunk, with one FFmpeg resampler kept
    for the whole stream.

    Resampling each chunk on its own restarts the filter every time and lengthens the audio (0.8 %
    for 128-sample chunks); carried over chunks, the filter's state makes the output of the whole
    stream, tail included, the same samples and the same length as ``resample`` of all of it at once.
    Call ``feed`` per chunk (float32 in [-1, 1] or int16) and ``flush`` once at the end.
    """

    def __init__(self, rate: int) -> None:
        self.rate = check_sample_rate(rate)
        self._resampler = None
        if rate != SAMPLE_RATE:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def feed(self, chunk: np.ndarray) -> np.ndarray:
        """The 16 kHz samples ``chunk`` completes (often a few fewer or more than its share: the filter looks ahead)."""
        pcm = _from_array(chunk)
        if pcm.size == 0:
            return pcm
        if not np.isfinite(pcm).all():
            raise InvalidAudio("the audio contains NaN or infinite samples")
        if self._resampler is None:
            return pcm
        import av

        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate
        return _joined(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples the filter still holds; the stream ends here."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return _joined(self._resampler.resample(None))


def _joined(frames: list[Any]) -> np.ndarray:
    if not frames:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)
