"""Every shipped config loads and validates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hub.config import load_config
from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))


def test_the_examples_are_there() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "cpu-dev.yaml",
        "single-gpu.yaml",
        "multi-gpu.yaml",
        "whisper-and-funasr.yaml",
    }


@pytest.mark.parametrize("path", [*EXAMPLES, ROOT / "config" / "config.sample.yaml"], ids=lambda p: p.name)
def test_each_config_loads(path: Path, tmp_path: Path) -> None:
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    (tmp_path / "models" / "SenseVoiceSmall").mkdir(parents=True)  # the directory whisper-and-funasr.yaml names
    config = load_config(copy)
    assert config.enabled_providers
    if path.name == "multi-gpu.yaml":
        assert config.providers["whisper"].devices == (0, 1, 2, 3)
    if path.name == "whisper-and-funasr.yaml":
        assert config.providers["sensevoice"].model == str(tmp_path / "models" / "SenseVoiceSmall")
