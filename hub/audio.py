"""Turn what a user hands us (a file, an array, raw bytes) into float32 mono 16 kHz PCM.

Everything that is not usable audio raises ``InvalidAudio`` with a message that says
what to change. ``validate_pcm`` is also what a worker runs on PCM it receives, since a
hostile client can skip the SDK.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from hub.errors import InvalidAudio
from hub.protocol import SAMPLE_RATE

AudioInput = str | os.PathLike | np.ndarray | bytes | bytearray | memoryview


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


def decode_bytes(data: bytes | bytearray | memoryview, name: str = "the upload") -> np.ndarray:
    """Decode a whole file held in memory (an HTTP upload) without writing it anywhere."""
    if not data:
        raise InvalidAudio(f"{name} is empty (0 bytes)")
    chunks = list(_chunks(data, name))
    if not chunks:
        raise InvalidAudio(f"{name} decodes to no audio samples")
    return validate_pcm(np.concatenate(chunks))


def decoded_room(data: bytes | bytearray | memoryview) -> int | None:
    """How many samples ``decode_into`` may write for ``data``: exact for a mono 16-bit WAV at 16 kHz, an upper
    bound for one at another rate, None when only decoding tells (compressed formats)."""
    layout = wav_layout(data)
    if layout is None:
        return None
    if layout.rate == SAMPLE_RATE:
        return layout.frames
    return -(-layout.frames * SAMPLE_RATE // layout.rate) + RESAMPLER_SLACK


def decode_into(data: bytes | bytearray | memoryview, name: str, out: np.ndarray) -> int:
    """Decode a file held in memory straight into ``out`` (float32: a shared-memory segment, say), a block at a
    time, so that no second copy of the whole audio is ever made; return the samples written. A file that
    decodes to more than ``out`` holds is decoded no further: the answer is then ``out.size + 1``."""
    if not data:
        raise InvalidAudio(f"{name} is empty (0 bytes)")
    written = 0
    for chunk in _chunks(data, name):
        if written + chunk.size > out.size:
            return out.size + 1
        if not np.isfinite(chunk).all():
            raise InvalidAudio(f"{name} decodes to NaN or infinite samples")
        out[written : written + chunk.size] = chunk
        written += chunk.size
    if not written:
        raise InvalidAudio(f"{name} decodes to no audio samples")
    return written


PCM_PER_WAV_BYTE = 2  # a 16-bit WAV at 16 kHz, the common upload: 2 bytes in, 4 bytes of float32 out


def upload_peak_bytes(upload: int, max_audio_seconds: float) -> int:
    """What decoding an upload of ``upload`` bytes is expected to hold at its peak (``decode_into``): the upload
    and its float32 PCM, twice the upload's size for a 16-bit WAV at 16 kHz, and no more than ``max_audio_seconds``."""
    return upload + min(PCM_PER_WAV_BYTE * upload, int(max_audio_seconds * SAMPLE_RATE * 4))


RESAMPLER_SLACK = 1024  # samples a resampled WAV may come to beyond its length times the rate ratio
WAV_BLOCK = 1 << 16  # samples converted at a time: the only temporary copies are this small


@dataclass(frozen=True)
class WavLayout:
    rate: int
    offset: int  # where the first sample starts
    frames: int


def wav_layout(data: bytes | bytearray | memoryview) -> WavLayout | None:
    """Where the samples of a mono 16-bit PCM WAV are (the most common upload, read without FFmpeg, about ten
    times cheaper for a short clip); None for anything else, which FFmpeg then decodes."""
    view = memoryview(data)
    if bytes(view[:4]) != b"RIFF" or bytes(view[8:12]) != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(view):
        kind, size = bytes(view[pos : pos + 4]), int.from_bytes(view[pos + 4 : pos + 8], "little")
        body = pos + 8
        if kind == b"fmt " and size >= 16:
            fmt = struct.unpack("<HHIIHH", view[body : body + 16])
        elif kind == b"data":
            if fmt is None:
                return None
            audio_format, channels, rate, _, _, bits = fmt
            if not 1000 <= rate <= 384000:
                raise InvalidAudio(
                    f"the WAV header says the audio is sampled at {rate} Hz; a sample rate must be between "
                    "1000 and 384000 Hz: the file is damaged or its header was written wrong"
                )
            frames = min(size, len(view) - body) // 2
            if audio_format != 1 or channels != 1 or bits != 16 or not frames:
                return None
            return WavLayout(rate, body, frames)
        pos = body + size + (size & 1)
    return None


def _chunks(data: bytes | bytearray | memoryview, name: str) -> Iterator[np.ndarray]:
    """The file's audio as float32 mono 16 kHz, a block at a time."""
    layout = wav_layout(data)
    if layout is None:
        yield from _ffmpeg_chunks(io.BytesIO(data), name)
        return
    samples = np.frombuffer(data, dtype="<i2", count=layout.frames, offset=layout.offset)
    resampler = StreamResampler(layout.rate) if layout.rate != SAMPLE_RATE else None
    for start in range(0, samples.size, WAV_BLOCK):
        block = samples[start : start + WAV_BLOCK].astype(np.float32) * np.float32(1 / 32768)
        yield block if resampler is None else resampler.feed(block)
    if resampler is not None:
        yield resampler.flush()


def _decode(source: str | BinaryIO, name: str) -> np.ndarray:
    chunks = list(_ffmpeg_chunks(source, name))
    if not chunks:
        raise InvalidAudio(f"{name} decodes to no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _ffmpeg_chunks(source: str | BinaryIO, name: str) -> Iterator[np.ndarray]:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    try:
        # mode "r" is the default; the stubs type a file object's open without a mode as either container
        with cast("av.container.InputContainer", av.open(source, metadata_errors="ignore")) as container:
            if not container.streams.audio:
                raise InvalidAudio(f"{name} has no audio stream")
            for frame in container.decode(audio=0):
                frame.pts = None
                yield from (f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            yield from (f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise InvalidAudio(f"cannot decode {name}: {ffmpeg_reason(exc)}") from None


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
