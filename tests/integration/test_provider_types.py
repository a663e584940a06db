"""The provider-type table is the one place types are listed: every entry names an adapter that exists and
takes exactly the type's options, and reading the table (or the worker's engine interface) imports no adapter
and no model library, so the supervisor side stays light and the adapters import ``workers.engine`` without a cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hub.protocol import WorkerSpec
from hub.provider_types import PROVIDER_TYPES
from tests.conftest import ROOT
from workers.engine import load_engine

HEAVY = ("faster_whisper", "ctranslate2", "torch", "funasr")
ADAPTERS = tuple(t.engine.partition(":")[0] for t in PROVIDER_TYPES.values())


def _fresh(code: str) -> None:
    """Run ``code`` in a new interpreter (this one has imported everything already) and require it to succeed."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _loaded(modules: tuple[str, ...]) -> str:
    return f"import sys; loaded = [m for m in {modules!r} if m in sys.modules]; assert not loaded, loaded"


def test_the_table_lists_the_types_the_config_knows() -> None:
    assert list(PROVIDER_TYPES) == ["whisper", "funasr", "echo"]
    assert ADAPTERS == ("workers.whisper", "workers.funasr", "workers.echo")


@pytest.mark.parametrize("module", ["hub.config", "hub.supervisor.process", "hub.provider_types", "workers.engine"])
def test_reading_the_table_imports_no_adapter_and_no_model_library(module: str) -> None:
    _fresh(f"import {module}; " + _loaded(ADAPTERS + HEAVY))


@pytest.mark.parametrize("kind", PROVIDER_TYPES.values(), ids=list(PROVIDER_TYPES))
def test_each_adapter_imports_alone_and_takes_its_types_options(kind) -> None:
    """An adapter module imported first, in a fresh interpreter, has its class and pulls no model library in
    (the library is imported when a model loads); its options are the type's (FunASR's per model, all together)."""
    module, _, name = kind.engine.partition(":")
    _fresh(f"import {module}; assert isinstance({module}.{name}, type); " + _loaded(HEAVY))
    if kind.name == "funasr":
        from workers.funasr import BASE_OPTIONS, ONLINE_DEFAULTS, PARAFORMER_OPTIONS

        assert BASE_OPTIONS | PARAFORMER_OPTIONS | ONLINE_DEFAULTS.keys() == set(kind.options)
        assert ONLINE_DEFAULTS == {"chunk_size": [0, 10, 5], "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1}
    else:
        engine_class = getattr(__import__(module, fromlist=[name]), name)
        assert engine_class.options == set(kind.options)


def test_defaults_pass_their_own_rule() -> None:
    defaults = {(t.name, key): rule.default for t in PROVIDER_TYPES.values() for key, rule in t.options.items()}
    given = {where: value for where, value in defaults.items() if value is not None}
    assert len(given) == 3, given
    assert all(PROVIDER_TYPES[kind].options[key].valid(value) for (kind, key), value in given.items())


def test_option_problems_check_only_the_types_own_options() -> None:
    whisper, echo = PROVIDER_TYPES["whisper"], PROVIDER_TYPES["echo"]
    assert whisper.option_problems({"beam_size": 0, "language": "", "sleep": -1}) == [
        "beam_size must be an integer from 1 to 32, got 0",
        "language must be a language code such as 'en', got ''",
    ]
    assert echo.option_problems({"sleep": -1, "beam_size": 0}) == ["sleep must be a number of seconds, got -1"]


def test_a_type_the_table_lacks_has_no_adapter() -> None:
    spec = WorkerSpec(
        id="x-1",
        provider="x",
        type="nope",
        model="",
        device="cpu",
        compute_type="auto",
        cpu_threads=1,
        backend="ipc:///nowhere",
        shm_prefix="x",
        heartbeat_interval=1.0,
        options={},
    )
    with pytest.raises(ValueError, match="no adapter for provider type 'nope'"):
        load_engine(spec)
