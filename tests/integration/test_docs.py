"""The docs stay true: their YAML loads through the config loader, and the SDK names, CLI commands,
flags and make targets they mention exist."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hub.client
import hub.client.session
import hub.errors
from hub.client.__main__ import _parser as client_parser
from hub.config import parse_config
from hub.gateway.__main__ import parser as gateway_parser
from hub.provider_types import PROVIDER_TYPES
from tests.conftest import ROOT, echo_provider, free_port, wait_for

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SDK = {name: getattr(hub.client, name) for name in hub.client.__all__}
CLI_MODULES = {
    "hub.client",
    "hub.supervisor",
    "hub.gateway",
    "hub.keys",
    "hub.client.rollback",
    "bench",
    "bench.soak",
    "bench.streaming",
    "bench.funasr_batch",
    "bench.long_audio",
    "workers",
}


def _text(path: Path) -> str:
    return path.read_text()


def _yaml_blocks() -> list[tuple[str, str]]:
    """Every YAML snippet of the docs but Kubernetes manifests (``apiVersion:``; tests/system/test_deploy.py checks those)."""
    return [
        (f"{path.relative_to(ROOT)}#{i}", block)
        for path in DOCS
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", _text(path), re.S))
        if not re.search(r"^apiVersion:", block, re.M)
    ]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def test_there_are_docs_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"docs/guides/provider_pooling.md", "docs/operations/pool_monitoring.md", "docs/api.md"} <= names
    assert _yaml_blocks()


@pytest.mark.parametrize("where, block", _yaml_blocks(), ids=[w for w, _ in _yaml_blocks()])
def test_every_yaml_snippet_is_a_valid_config(where: str, block: str) -> None:
    parse_config(yaml.safe_load(block), check_paths=False)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_sdk_names_exist(path: Path) -> None:
    for cls_name, attr in re.findall(r"\b(" + "|".join(SDK) + r")\.([a-z_]\w*)", _text(path)):
        cls = SDK[cls_name]
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        assert hasattr(cls, attr) or attr in fields, f"{path.name}: {cls_name}.{attr} does not exist"
    for names in re.findall(r"from hub\.client import ([\w, ]+)", _text(path)):
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(hub.client, name), f"{path.name}: hub.client has no {name}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cli_commands_and_flags_exist(path: Path) -> None:
    client = client_parser()
    commands, flags = _subcommands(client), _options(client)
    for line in _text(path).splitlines():
        for module in re.findall(r"python -m ([\w.]+)", line):
            assert module in CLI_MODULES, f"{path.name}: python -m {module} is not a command of this project"
        for command in re.findall(r"python -m hub\.client(?: --[\w-]+(?: \S+)?)* ([a-z]\w*)", line):
            assert command in commands, f"{path.name}: hub.client has no command {command!r}"
        if after := re.split(r"python -m hub\.client(?![\w.])", line, maxsplit=1)[1:]:
            for flag in re.findall(r"\s(--[a-z][\w-]*)", after[0]):
                assert flag in flags, f"{path.name}: hub.client has no flag {flag}"
        if "python -m hub.gateway" in line:
            for flag in re.findall(r"\s\[?(--[a-z][\w-]*)", line.split("python -m hub.gateway", 1)[1]):
                assert flag in _options(gateway_parser()), f"{path.name}: hub.gateway has no flag {flag}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_make_targets_exist(path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for target in re.findall(r"`make ([\w-]+)", _text(path)):
        assert target in targets, f"{path.name}: make {target} is not a target"


def _table_rows(path: Path, first_cells: str) -> dict[str, str]:
    """The rows of ``path``'s tables whose first cell is a backticked name matching ``first_cells``: name → the rest."""
    return dict(re.findall(rf"^\| `({first_cells})` \|(.*)\|$", _text(path), re.M))


def test_the_options_table_is_the_provider_type_table() -> None:
    """docs/api.md lists each provider type's request options (the names outside parentheses) and their
    defaults, exactly as hub/provider_types.py does."""
    rows = _table_rows(ROOT / "docs" / "api.md", r"\w+")
    documented = {kind: rows.get(kind, "") for kind in PROVIDER_TYPES}
    for kind, cell in documented.items():
        names = set(re.findall(r"`(\w+)`", re.sub(r"\([^()]*\)", "", cell)))
        assert names == set(PROVIDER_TYPES[kind].options), f"docs/api.md, options of {kind}: {sorted(names)}"
        for key, rule in PROVIDER_TYPES[kind].options.items():
            if rule.default is not None:
                assert re.search(rf"`{key}` \([^()]*default `?{re.escape(json.dumps(rule.default))}`?\)", cell), (
                    kind,
                    key,
                )
    pooling = _table_rows(ROOT / "docs" / "guides" / "provider_pooling.md", "type")
    assert re.findall(r"`(\w+)` \(", pooling["type"]) == list(PROVIDER_TYPES), pooling["type"]


def _paragraph(path: Path, start: str) -> str:
    """The list item or paragraph of ``path`` that contains ``start``, up to the next item or blank line."""
    text = _text(path)
    at = text.index(start)
    begin = max(text.rfind("\n- ", 0, at + 3), text.rfind("\n\n", 0, at + 2)) + 1
    ends = [i for i in (text.find("\n- ", at), text.find("\n\n", at)) if i != -1]
    return text[begin : min(ends)] if ends else text[begin:]


ERRORS = {
    name
    for name, value in vars(hub.errors).items()
    if isinstance(value, type) and issubclass(value, hub.errors.HubError)
}


@pytest.mark.timeout(60)
def test_wait_ready_raises_what_the_api_guide_says(hub_factory, tmp_path: Path) -> None:
    """The guide names the errors ``wait_ready`` raises; they must be the ones it raises with no hub at all
    and with a hub that answers but never becomes ready."""
    documented = set(re.findall(r"`(\w+)`", _paragraph(ROOT / "docs" / "api.md", "- `wait_ready(timeout"))) & ERRORS
    raised = {}
    with hub.client.HubClient(f"tcp://127.0.0.1:{free_port()}", timeout=1.0) as client:
        with pytest.raises(hub.errors.HubError) as nobody:
            client.wait_ready(timeout=1.0)
        raised["no hub answered"] = type(nobody.value).__name__
    (tmp_path / "empty-model").mkdir()
    broken = hub_factory(
        {"broken": {"type": "whisper", "model": str(tmp_path / "empty-model"), "device": "cpu"}}, ready=False
    )
    with broken.client() as client:
        assert not client.status(timeout=30)["hub"]["ready"]  # it answers
        with pytest.raises(hub.errors.HubError) as unready:
            client.wait_ready(timeout=1.0)
        raised["answered, not ready"] = type(unready.value).__name__
    assert raised == {"no hub answered": "HubUnreachable", "answered, not ready": "ProviderUnavailable"}
    assert documented == set(raised.values()), f"docs/api.md names {documented} for wait_ready, it raises {raised}"


@pytest.mark.timeout(90)
def test_the_rollback_checklist_says_whether_a_supervisor_started_with_frontend_is_found(hub_factory) -> None:
    """The checklist says whether scripts/rollback.sh finds a supervisor started with ``--frontend``; run it."""
    claim = " ".join(_paragraph(ROOT / "docs" / "operations" / "pool_monitoring.md", "`--frontend`").split())
    sentence = next(s for s in re.split(r"(?<=[.;]) ", claim) if "`--frontend`" in s)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = hub_factory({"echo": echo_provider(min_size=1, max_size=1)}, args=("--frontend", endpoint))
    assert started.status()["hub"]["frontend"] == endpoint
    out = subprocess.run(
        ["scripts/rollback.sh", str(started.config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    found = out.returncode == 0 and "sent SIGHUP" in out.stdout
    if found:  # and the reload it asked for happened
        wait_for(lambda: not started.status()["providers"]["echo"]["pool_enabled"], timeout=30, what="the rollback")
    else:
        assert out.returncode == 1 and "no running supervisor" in out.stderr, out.stderr
    assert ("not found" in sentence or "is not" in sentence) is not found, (sentence, out.stdout, out.stderr)
