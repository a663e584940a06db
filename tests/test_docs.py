"""The docs stay true: their YAML loads through the config loader, and the SDK names, CLI commands,
flags and make targets they mention exist."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import hub.client
import hub.stream
from hub.cli import _parser as client_parser
from hub.config import parse_config
from hub.gateway.__main__ import parser as gateway_parser
from tests.conftest import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SDK = {name: getattr(hub.client, name) for name in hub.client.__all__}
CLI_MODULES = {"hub.client", "hub.supervisor", "hub.gateway", "hub.keys", "hub.rollback", "bench", "bench.soak", "workers"}


def _text(path: Path) -> str:
    return path.read_text()


def _yaml_blocks() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", block)
        for path in DOCS
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", _text(path), re.S))
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
        if "python -m hub.client" in line:
            for flag in re.findall(r"\s(--[a-z][\w-]*)", line.split("python -m hub.client", 1)[1]):
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
