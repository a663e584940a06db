"""The provider types, in one table: for each ``type:`` a config may name, the adapter that serves it,
the request options it understands and how their values are checked, and where its workers run.

Config validation (``hub.config``), the worker's ``load_engine``, GPU placement (``hub.process.uses_gpu``),
Wyoming's model descriptions and the options table of docs/api.md (tests/test_docs.py compares it) all read
this table, so a new type is one entry here plus its adapter. The module imports nothing of ours and names
each adapter by module path: the config loader and the supervisor never import a model library, and a
worker imports only the adapter of its own type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _integer(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _text(v: Any) -> bool:
    return isinstance(v, str)


@dataclass(frozen=True)
class Option:
    """A request option's value rule, so that a typo is a BAD_REQUEST (or a config error) rather than a
    model failure that counts against the worker; ``expected`` is what the error says the value must be."""

    valid: Callable[[Any], bool]
    expected: str
    default: Any = None  # what the adapter fills in when neither request nor provider gives it; None: the library's own


@dataclass(frozen=True)
class ProviderType:
    """One ``type:`` of provider."""

    name: str
    engine: str  # the adapter class as "module:Class", imported by the worker alone
    options: Mapping[str, Option]  # every request option the type understands; a model may take a subset
    needs_model: bool = True  # whether ``model:`` is required
    gpu_on_auto: bool = True  # ``device: auto`` places its workers on a GPU (the adapter falls back to the CPU)
    credit: str = ""  # whose work the model is, for Wyoming's attribution ("" for none)
    homepage: str = ""

    def uses_gpu(self, device: str) -> bool:
        """Whether workers with this ``device:`` setting are placed on a GPU: ``cuda``, or ``auto`` for a type
        that runs a model (``echo`` has none, so only an explicit ``cuda`` places it, which is how tests
        exercise placement)."""
        return device == "cuda" or (device == "auto" and self.gpu_on_auto)

    def option_problems(self, options: Mapping[str, Any]) -> list[str]:
        """What is wrong with the values of the options this type knows, one line each (names are checked
        elsewhere, against the type's or the loaded model's options)."""
        return [
            f"{key} must be {rule.expected}, got {value!r}"
            for key, value in options.items()
            if (rule := self.options.get(key)) is not None and not rule.valid(value)
        ]


_FLAG = Option(_flag, "true or false")
_LANGUAGE = Option(lambda v: isinstance(v, str) and 0 < len(v) <= 16, "a language code such as 'en'")

WHISPER = ProviderType(
    name="whisper",
    engine="workers.whisper:WhisperEngine",
    options={
        "language": _LANGUAGE,
        "task": Option(lambda v: v in ("transcribe", "translate"), "'transcribe' or 'translate'"),
        "beam_size": Option(_integer(1, 32), "an integer from 1 to 32"),
        "vad_filter": _FLAG,
        "word_timestamps": _FLAG,
        "initial_prompt": Option(_text, "a string"),
        "temperature": Option(
            lambda v: _number(0, 1)(v) or (isinstance(v, list) and bool(v) and all(_number(0, 1)(t) for t in v)),
            "a number from 0 to 1, or a list of them",
        ),
    },
    credit="OpenAI Whisper (faster-whisper)",
    homepage="https://github.com/SYSTRAN/faster-whisper",
)

FUNASR = ProviderType(
    name="funasr",
    engine="workers.funasr:FunASREngine",
    # hotword is for Paraformers; the chunking options are for streaming (online) models, whose defaults are
    # FunASR's own examples': 600 ms chunks with 300 ms of look-ahead, the encoder looking back 4 chunks, the decoder 1
    options={
        "language": _LANGUAGE,
        "use_itn": _FLAG,
        "batch_size_s": Option(_number(1, 3600), "a number of seconds from 1 to 3600"),
        "hotword": Option(_text, "a string"),
        "chunk_size": Option(
            lambda v: isinstance(v, list) and len(v) == 3 and all(_integer(0, 100)(c) for c in v),
            "three integers",
            default=[0, 10, 5],
        ),
        "encoder_chunk_look_back": Option(_integer(0, 100), "an integer from 0 to 100", default=4),
        "decoder_chunk_look_back": Option(_integer(0, 100), "an integer from 0 to 100", default=1),
    },
    credit="FunASR",
    homepage="https://github.com/modelscope/FunASR",
)

ECHO = ProviderType(
    name="echo",
    engine="workers.echo:EchoEngine",
    options={
        "sleep": Option(_number(0, 3600), "a number of seconds"),
        "fail": Option(_text, "a message"),
        "fail_from": Option(
            _integer(1, 1_000_000), "the number of the worker's first decode that fail or exit applies to, from 1"
        ),
        "fail_every": Option(_integer(1, 1_000_000), "an integer n >= 1 (every n-th job of a worker fails)"),
        "hang": _FLAG,
        "exit": Option(_integer(0, 255), "an exit status from 0 to 255"),
        "language": _LANGUAGE,
        "segments": Option(_integer(1, 1000), "an integer from 1 to 1000"),
    },
    needs_model=False,
    gpu_on_auto=False,
)

PROVIDER_TYPES: Mapping[str, ProviderType] = {t.name: t for t in (WHISPER, FUNASR, ECHO)}
