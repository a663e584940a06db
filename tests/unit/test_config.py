from datetime import date
from pathlib import Path

import pytest

from hub.config import ConfigError, ProviderConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_sample_config_loads_into_typed_values() -> None:
    config = load_config(ROOT / "config" / "config.sample.yaml")
    whisper = config.providers["whisper"]
    assert whisper.type == "whisper" and whisper.model == "tiny.en" and whisper.devices is None
    assert whisper.pool.enabled and (whisper.pool.min_size, whisper.pool.max_size) == (1, 2)
    assert config.hub.frontend == "tcp://127.0.0.1:5555"
    assert [p.name for p in config.enabled_providers] == ["whisper"]


def test_type_defaults_to_name_and_pools_of_one_type_coexist() -> None:
    config = parse_config(
        {"providers": {"echo": {}, "fast": {"type": "echo"}, "whisper-small": {"type": "whisper", "model": "small"}}}
    )
    assert [p.type for p in config.providers.values()] == ["echo", "echo", "whisper"]


@pytest.mark.parametrize("pool", [None, {"enabled": False, "min_size": 3, "max_size": 5}])
def test_no_pool_section_or_pool_disabled_is_a_single_instance(pool: dict | None) -> None:
    body = {"type": "echo"} if pool is None else {"type": "echo", "pool": pool}
    p = parse_config({"providers": {"e": body}}).providers["e"].pool
    assert not p.enabled and (p.min_size, p.max_size) == (1, 1)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"providers": {"echo": {"pool": {"min_size": "two"}}}}, "providers.echo.pool.min_size: expected an integer"),
        ({"providers": {"echo": {"pool": {"mn_size": 1}}}}, "providers.echo.pool.mn_size: unknown key"),
        (
            {"providers": {"echo": {"pool": {"min_size": 3, "max_size": 2}}}},
            "providers.echo.pool: min_size (3) is greater",
        ),
        ({"providers": {"whisper": {"model": "/no/such/dir"}}}, "providers.whisper.model: model directory"),
        ({"providers": {"whisper": {}}}, "providers.whisper.model: required"),
        ({"providers": {"x": {"type": "nope"}}}, "providers.x.type: unknown provider type"),
        ({"providers": {"echo": {"device": "tpu"}}}, "providers.echo.device"),
        ({"providers": {"echo": {"devices": [0, "1"]}}}, "providers.echo.devices[1]: expected an integer"),
        ({"providers": {"echo": {"enabled": "yes"}}}, "providers.echo.enabled: expected true or false"),
        ({"hub": {"frontend": 5555}, "providers": {"echo": {}}}, "hub.frontend: expected a string"),
        ({"hub": {"bogus": 1}, "providers": {"echo": {}}}, "hub.bogus: unknown key"),
        ({"providers": {"echo": {"enabled": False}}}, "at least one provider must be enabled"),
        ({"providers": {"Bad Name": {"type": "echo"}}}, "provider names"),
        ({"nope": 1}, "nope: unknown key"),
        ({"providers": {"echo": {"pool": {"acquire_timeout": 0}}}}, "providers.echo.pool.acquire_timeout"),
        ({"hub": {"log_level": "LOUD"}, "providers": {"echo": {}}}, "hub.log_level: must be one of"),
        (
            {"providers": {"whisper": {"model": "x", "options": {"beam": 5}}}},
            "providers.whisper.options: beam not understood",
        ),
        ({"providers": {"whisper": {"model": "x", "options": {"beam_size": "five"}}}}, "beam_size must be an integer"),
        ({"providers": {"echo": {"pool": {"max_sessions": 9, "max_size": 2}}}}, "providers.echo.pool.max_sessions"),
        ({"providers": {"echo": {"pool": {"sessions_per_worker": 0}}}}, "providers.echo.pool.sessions_per_worker"),
    ],
)
def test_errors_name_the_key_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


def test_model_directory_is_resolved_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    path = tmp_path / "hub.yaml"
    path.write_text("providers:\n  whisper:\n    model: ./models/mine\n")
    assert load_config(path).providers["whisper"].model == str(tmp_path / "models" / "mine")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_the_sample_config_documents_every_key() -> None:
    import dataclasses

    from hub.config import CurveConfig, HubSection, PoolConfig, StreamConfig

    text = (ROOT / "config" / "config.sample.yaml").read_text()
    keys = {
        f.name
        for cls in (HubSection, CurveConfig, ProviderConfig, StreamConfig, PoolConfig)
        for f in dataclasses.fields(cls)
    }
    missing = sorted(k for k in keys - {"name"} if f"{k}:" not in text)
    assert not missing, f"config/config.sample.yaml does not mention {missing}"


def test_sessions_in_a_single_instance_take_its_one_worker() -> None:
    pools = parse_config({"providers": {"a": {"type": "echo"}, "b": {"type": "echo", "pool": {"max_size": 3}}}})
    assert pools.providers["a"].pool.session_limit == 1 and pools.providers["a"].pool.sessions_per_worker == 1
    # every worker the pool may have, full (four sessions each by default)
    assert pools.providers["b"].pool.session_limit == 12 and pools.providers["b"].pool.sessions_per_worker == 4
    rollback = parse_config(
        {"providers": {"a": {"type": "echo", "pool": {"enabled": False, "sessions_per_worker": 8}}}}
    )
    assert rollback.providers["a"].pool.sessions_per_worker == 1 and rollback.providers["a"].pool.session_limit == 1
    capped = parse_config({"providers": {"a": {"type": "echo", "pool": {"enabled": False, "max_sessions": 1}}}})
    assert capped.providers["a"].pool.session_limit == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"providers": {"echo": {"name": "x"}}}, "providers.echo.name: unknown key (known keys: allow_download, "),
        ({"providers": {"echo": {"devices": 3}}}, "providers.echo.devices: expected a list, got int 3"),
        ({"providers": {"echo": {"stream": 5}}}, "providers.echo.stream: expected a mapping, got int 5"),
        (
            {"providers": {"echo": {"pool": {"max_sessions": 1.5}}}},
            "providers.echo.pool.max_sessions: expected an integer, got float 1.5",
        ),
        (
            {"providers": {"echo": {}}, "routes": {"r": [{"provider": "echo", "wait": 1}]}},
            "routes.r.providers[0].wait: unknown key (known keys: provider, weight)",
        ),
        ({"providers": {"echo": {}}, "routes": {"r": [{"weight": 1}]}}, "routes.r.providers[0].provider: required"),
        (
            {"providers": {"echo": {}}, "gateway": {"model_aliases": {"big": 1}}},
            "gateway.model_aliases.big: expected a string, got int 1",
        ),
        (
            {"providers": {"echo": {}}, "hub": {"frontend": date(2026, 1, 1)}},
            "hub: date datetime.date(2026, 1, 1) is not a config value",
        ),
    ],
)
def test_errors_from_the_schema_name_the_key_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


def test_an_integer_is_a_number() -> None:
    pool = parse_config({"providers": {"echo": {"pool": {"idle_timeout": 10}}}}).providers["echo"].pool
    assert pool.idle_timeout == 10.0 and isinstance(pool.idle_timeout, float)


def test_batching_keys_default_to_one_job_at_a_time_and_are_checked() -> None:
    pools = parse_config(
        {
            "providers": {
                "a": {"type": "echo", "pool": {}},
                "b": {"type": "echo", "pool": {"max_batch": 16, "batch_wait_ms": 0}},
                "off": {"type": "echo", "pool": {"enabled": False, "max_batch": 8}},
            }
        }
    )
    assert (pools.providers["a"].pool.max_batch, pools.providers["a"].pool.batch_wait_ms) == (1, 5.0)
    assert (pools.providers["b"].pool.max_batch, pools.providers["b"].pool.batch_wait_ms) == (16, 0.0)
    assert pools.providers["off"].pool.max_batch == 1  # single-instance mode: one job at a time
    for pool, message in (
        ({"max_batch": 0}, "max_batch: must be a whole number from 1 to 256, got 0"),
        ({"max_batch": 257}, "max_batch: must be"),
        ({"max_batch": 2.5}, "max_batch"),
        ({"batch_wait_ms": -1}, "batch_wait_ms: must be from 0 to 1000"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"providers": {"a": {"type": "echo", "pool": pool}}})


@pytest.mark.parametrize(
    "section, message",
    [
        ({"hub": {"metrics_header_timeout": 0}}, "metrics_header_timeout must be a positive"),
        ({"hub": {"metrics_max_connections": 0}}, "metrics_max_connections at least 1"),
        ({"gateway": {"header_timeout": 0}}, "header_timeout"),
        ({"gateway": {"max_connections": 0}}, "max_connections"),
        ({"gateway": {"max_buffer_wait": -1}}, "max_buffer_wait: must be >= 0"),
        # 100 MiB of upload decodes to up to 110 MiB of PCM (hub.max_audio_seconds 1800): 210 MiB in all
        ({"gateway": {"max_buffered_mb": 200}}, r"cannot hold one upload of max_upload_mb \(100 MB\).*210 MB"),
        ({"hub": {"max_audio_seconds": 60}, "gateway": {"max_upload_mb": 100, "max_buffered_mb": 100}}, "104 MB"),
    ],
)
def test_connection_and_memory_limits_are_checked(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"providers": {"echo": {"type": "echo"}}, **section})


def test_a_budget_that_holds_the_largest_upload_is_accepted() -> None:
    config = parse_config(
        {"providers": {"echo": {"type": "echo"}}, "gateway": {"max_upload_mb": 10, "max_buffered_mb": 30}}
    )
    assert config.gateway.max_buffered_mb == 30 and config.gateway.max_buffer_wait == 10


def test_split_keys_are_checked_and_single_instance_never_splits() -> None:
    pool = parse_config({"providers": {"a": {"type": "echo", "pool": {"max_size": 2}}}}).providers["a"].pool
    assert (pool.split_over_seconds, pool.split_piece_seconds) == (60.0, 30.0)
    off = parse_config({"providers": {"a": {"type": "echo", "pool": {"split_over_seconds": 0}}}}).providers["a"].pool
    assert off.split_over_seconds == 0
    single = parse_config({"providers": {"a": {"type": "echo"}}}).providers["a"].pool
    rollback = parse_config({"providers": {"a": {"type": "echo", "pool": {"enabled": False}}}}).providers["a"].pool
    assert single.split_over_seconds == 0 and rollback.split_over_seconds == 0
    for bad, match in (
        ({"split_over_seconds": -1}, "split_over_seconds: must be 0"),
        ({"split_piece_seconds": 0.5}, "split_piece_seconds: must be at least 1"),
        ({"split_over_seconds": 20, "split_piece_seconds": 30}, "at most split_over_seconds"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_config({"providers": {"a": {"type": "echo", "pool": bad}}})
