"""Build the CPU image (deploy/Dockerfile) and run the README's commands inside it, where this machine can.

Building needs podman and a base image in local storage: no image registry is reachable from the test
machines, so the base must have been imported beforehand (e.g. made from Debian's packages with
mmdebstrap and `podman import`); ASR_HUB_IMAGE_BASE names it. Otherwise the test says why it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import pytest

from tests.conftest import DATA, ROOT, reference

pytestmark = pytest.mark.timeout(2400)

BASE = os.environ.get("ASR_HUB_IMAGE_BASE", "docker.io/library/python:3.11-slim-bookworm")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert not check or done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_cpu_image_builds_and_serves() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian's podman builds the image); no image registry is reachable here either")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.skip(f"the base image {BASE} is not in local storage and no registry is reachable; import one and set ASR_HUB_IMAGE_BASE")
    tag = f"localhost/asr-hub-test:{uuid.uuid4().hex[:8]}"
    name = f"asr-hub-test-{uuid.uuid4().hex[:8]}"
    podman("build", "-f", "deploy/Dockerfile", "--build-arg", f"BASE={BASE}", "-t", tag, ".", timeout=1800)
    try:
        tools = podman("run", "--rm", "--entrypoint", "sh", tag, "-c", "id -u; command -v gcc cc make || true")
        assert tools.stdout.split() == ["10001"], f"root, or build tools left in the image: {tools.stdout}"
        podman("run", "-d", "--name", name, "--network", "none", tag)  # the sample config, offline
        podman("cp", str(DATA / "coffee.wav"), f"{name}:/tmp/coffee.wav")
        deadline = time.monotonic() + 120
        while podman("exec", name, "python", "-m", "hub.client", "status", check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
            time.sleep(1)
        text = podman("exec", name, "python", "-m", "hub.client", "transcribe", "/tmp/coffee.wav").stdout
        assert reference("coffee").split()[0].lower() in text.lower(), text
        assert "hub" in podman("exec", name, "python", "-m", "hub.client", "status").stdout
    finally:
        podman("rm", "-f", name, check=False)
        podman("rmi", "-f", tag, check=False)
