"""Turn what a user hands us (a file, an array, raw bytes) into float32 mono 16 kHz PCM.

Everything that is not usable audio raises ``InvalidAudio`` with a message that says
what to change. ``validate_pcm`` is also what a worker runs on PCM it receives, since a
hostile client can skip the SDK.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

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
    rate = SAMPLE_RATE if sample_rate is None else sample_rate
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1000 <= rate <= 384000:
        raise InvalidAudio(f"sample_rate must be an integer number of Hz between 1000 and 384000, got {rate!r}")
    if isinstance(audio, np.ndarray):
        pcm = _from_array(audio)
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        raw = bytes(audio)
        if len(raw) % 2:
            raise InvalidAudio(f"raw PCM must be 16-bit samples (an even number of bytes), got {len(raw)} bytes")
        pcm = _from_array(np.frombuffer(raw, dtype="<i2"))
    else:
        raise InvalidAudio(
            f"audio must be a file path, a numpy array or raw 16-bit PCM bytes, got {type(audio).__name__}"
        )
    validate_pcm(pcm)
    return pcm if rate == SAMPLE_RATE else resample(pcm, rate)


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
    import av

    if not path.is_file():
        raise InvalidAudio(f"audio file {str(path)!r} does not exist or is not a file")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidAudio(f"{str(path)!r} has no audio stream")
            for frame in container.decode(audio=0):
                frame.pts = None
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise InvalidAudio(f"cannot decode {str(path)!r}: {exc}") from None
    if not chunks:
        raise InvalidAudio(f"{str(path)!r} decodes to no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def resample(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Resample float32 mono PCM from ``rate`` to 16 kHz with FFmpeg's resampler."""
    import av

    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = [f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(out).astype(np.float32, copy=False)
