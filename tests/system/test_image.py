"""The container images, built and run (system tier: ``pytest -m system``).

The CPU image is built as `make image` builds it (scripts/build-image.sh: FROM a base image made from Debian's
packages by scripts/base-image.sh, pip reaching PyPI with the host's CA bundle mounted for the build only), then
run with the supervisor, the gateway and the bundled tiny.en: a committed clip is transcribed through a published
loopback port with curl and with the ``openai`` SDK, and SIGTERM must end it with exit code 0 after a clean drain.
The CUDA image is built and its CUDA libraries loaded; it cannot serve without a GPU.

Podman's storage lives in a directory of the tests' own ($ASR_HUB_IMAGE_STORE, default
~/.cache/asr-hub/image-test): an image whose inputs (Dockerfile, build scripts, package sources, configs) hash the
same as a finished build's is reused, so a second run only runs it; any change builds anew and the stale images
are removed. The image size and build time are printed and written to tests/artifacts/image-<flavour>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import DATA, ROOT, free_port, reference, supervisor_faults, wait_for, word_error_rate

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

STORE = Path(os.environ.get("ASR_HUB_IMAGE_STORE") or Path.home() / ".cache" / "asr-hub" / "image-test")
BASE = "localhost/debian-py:bookworm"
REPOSITORY = "localhost/asr-hub-test"
DOCKERFILES = {"cpu": "deploy/Dockerfile", "cuda": "deploy/Dockerfile.cuda"}
# what a build reads besides its Dockerfile: the build scripts and the context .dockerignore lets through
INPUTS = tuple(
    ".dockerignore scripts/podman.sh scripts/base-image.sh scripts/build-image.sh "
    "setup.cfg pyproject.toml README.md hub workers config".split()
)
API_KEY = "image-test-key"
# the pod's securityContext (deploy/kubernetes): a read-only root, no capabilities; /dev/shm for the PCM segments
AS_THE_POD_RUNS_IT = "--read-only --cap-drop ALL --security-opt no-new-privileges --shm-size 256m".split()


def script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """One of the project's scripts/, its output captured."""
    return subprocess.run(
        [str(ROOT / "scripts" / name), *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = script("podman.sh", str(STORE), *args, timeout=timeout)
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert not check or done.returncode == 0, f"podman {' '.join(args)} exited {done.returncode}:\n{output}"
    return done


def inputs_key(flavour: str, root: Path = ROOT) -> str:
    """A digest of every file the build of ``flavour`` reads: equal digests, equal images."""
    digest = hashlib.sha256()
    for entry in sorted((DOCKERFILES[flavour], *INPUTS)):
        path = root / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def test_a_change_to_any_input_builds_anew(tmp_path: Path) -> None:
    """The reuse is keyed right: an edit to the package, the configs or the Dockerfile changes the key,
    bytecode does not, and the CPU and CUDA keys differ."""
    for entry in (*DOCKERFILES.values(), *INPUTS):
        source = ROOT / entry
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, tmp_path / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / entry)
    key = inputs_key("cpu", tmp_path)
    assert key == inputs_key("cpu") and key != inputs_key("cuda", tmp_path)
    (tmp_path / "hub" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "hub" / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    assert inputs_key("cpu", tmp_path) == key
    for edited in ("hub/__init__.py", "config/config.sample.yaml", "deploy/Dockerfile", "scripts/base-image.sh"):
        before = inputs_key("cpu", tmp_path)
        with (tmp_path / edited).open("a") as file:
            file.write("\n")
        assert inputs_key("cpu", tmp_path) != before, edited


@dataclass(frozen=True)
class Built:
    flavour: str
    tag: str
    size_mb: int
    build_seconds: float  # of the build that made it, measured then
    reused: bool  # this run found it built


@pytest.fixture(scope="module")
def containers() -> None:
    """Podman with a base image that runs, or a skip that says what is missing."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/test-packages.txt lists it; `make test-all` installs it as root)")
    made = script("base-image.sh", str(STORE), BASE, timeout=900)
    if made.returncode != 0 and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        pytest.skip(f"cannot make the base image {BASE} (debootstrap, as root): {made.stderr.strip()[-500:]}")
    assert made.returncode == 0, f"scripts/base-image.sh failed:\n{made.stderr[-3000:]}"
    ran = podman("run", "--rm", "--network", "none", BASE, "true", check=False)
    if ran.returncode != 0:
        pytest.skip(f"podman cannot run containers on this machine: {ran.stderr.strip()[-800:]}")


def build(flavour: str) -> Built:
    """The image of ``flavour`` for the inputs as they are now: built, or reused from an earlier run."""
    key = inputs_key(flavour)
    tag = f"{REPOSITORY}:{flavour}-{key}"
    record = STORE / f"built-{flavour}-{key}.json"
    if podman("image", "exists", tag, check=False).returncode == 0 and record.exists():
        seconds, reused = float(json.loads(record.read_text())["build_seconds"]), True
    else:
        start = time.monotonic()
        done = script("build-image.sh", flavour, str(STORE), tag, timeout=3000)
        seconds, reused = round(time.monotonic() - start, 1), False
        assert done.returncode == 0, f"building {flavour} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        record.write_text(json.dumps({"tag": tag, "build_seconds": seconds}))
        forget_stale(flavour, keep=tag)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    return Built(flavour, tag, round(size / 1e6), seconds, reused)


def forget_stale(flavour: str, keep: str) -> None:
    """Remove this flavour's images of other inputs, their records and the layers only they used."""
    listed = podman(
        "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", "reference=" + REPOSITORY
    ).stdout.split()
    stale = [tag for tag in listed if tag.split(":")[-1].startswith(f"{flavour}-") and tag != keep]
    if stale:
        podman("rmi", "--force", *stale)
    for record in STORE.glob(f"built-{flavour}-*.json"):
        if record.name != f"built-{keep.rsplit(':', 1)[1]}.json":
            record.unlink()
    podman("image", "prune", "--force")


def report(built: Built, capsys: pytest.CaptureFixture[str], record_property: Any, **more: float) -> None:
    figures = {**asdict(built), **more}
    for name, value in figures.items():
        record_property(name, value)
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / f"image-{built.flavour}.json").write_text(json.dumps(figures, indent=2) + "\n")
    with capsys.disabled():
        how = "reused, built earlier" if built.reused else "built now"
        extra = "".join(f", {name} {value}" for name, value in more.items())
        print(f"\n{built.tag}: {built.size_mb} MB, build {built.build_seconds} s ({how}){extra}")


def serving_config(tmp_path: Path) -> Path:
    """The sample config with the gateway on the container's own address behind an API key (a published port
    reaches the container's interface, not its loopback) and one worker, for a 2-core machine."""
    config = yaml.safe_load((ROOT / "config/config.sample.yaml").read_text())
    config["gateway"].update(host="0.0.0.0", api_keys_file="/etc/asr-hub/api-keys", wyoming_port=0)
    config["providers"]["whisper"]["pool"].update(min_size=1, max_size=1)
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "api-keys").write_text(API_KEY + "\n")
    for file in folder.iterdir():
        file.chmod(0o644)  # the image runs as user 10001
    return folder


@pytest.fixture
def container(tmp_path: Path) -> Iterator[str]:
    name = f"asr-hub-test-{os.getpid()}-{tmp_path.name}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False)


def inside(image: str, *command: str) -> str:
    """What ``command`` prints in a throwaway container of ``image``, offline."""
    return podman("run", "--rm", "--network", "none", "--entrypoint", command[0], image, *command[1:]).stdout


def test_cpu_image_serves_and_drains(
    containers: None, container: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property: Any
) -> None:
    built = build("cpu")
    user_and_compilers = inside(built.tag, "sh", "-c", "id -u; command -v gcc cc make || true")
    assert user_and_compilers.split() == ["10001"], f"root, or compilers in the image: {user_and_compilers}"
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert inside(built.tag, "cat", bundle) == inside(BASE, "cat", bundle), "the build changed the image's CA bundle"
    assert inside(built.tag, "python", "-c", "import importlib.util as u; print(u.find_spec('torch'))") == "None\n"

    etc = serving_config(tmp_path)
    port = free_port()
    publish = ["--publish", f"127.0.0.1:{port}:8000"]
    volumes = [
        arg for name in ("config.yaml", "api-keys") for arg in ("--volume", f"{etc / name}:/etc/asr-hub/{name}:ro")
    ]
    started = time.monotonic()
    podman("run", "--detach", "--name", container, *publish, *AS_THE_POD_RUNS_IT, *volumes, built.tag)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def running() -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "true"

    def logs() -> str:
        out = podman("logs", container, check=False)
        return out.stdout + out.stderr

    wait_for(lambda: ready() or not running(), 300, "the container's gateway to be ready")
    assert ready(), f"the container stopped before it was ready:\n{logs()[-5000:]}"
    ready_seconds = round(time.monotonic() - started, 1)

    assert shutil.which("curl"), "curl is missing (scripts/test-packages.txt lists it)"
    curl = ["curl", "--silent", "--show-error", "--fail-with-body", "--max-time", "120"]
    form = ["-H", f"Authorization: Bearer {API_KEY}", "-F", f"file=@{DATA / 'coffee.wav'}", "-F", "model=whisper"]
    done = subprocess.run(
        [*curl, *form, f"{url}/v1/audio/transcriptions"], check=False, capture_output=True, text=True, timeout=130
    )
    assert done.returncode == 0, f"curl: {done.stdout} {done.stderr}\n{logs()[-3000:]}"
    assert word_error_rate(reference("coffee"), json.loads(done.stdout)["text"]) <= 0.10, done.stdout

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    with (DATA / "coffee.mp3").open("rb") as clip:
        text = sdk.audio.transcriptions.create(model="whisper-1", file=clip).text
    assert word_error_rate(reference("coffee"), text) <= 0.10, text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    status = podman("exec", container, "python", "-m", "hub.client", "status")
    assert "whisper" in status.stdout, status.stdout

    podman("kill", "--signal", "TERM", container)
    code = podman("wait", container, timeout=120).stdout.strip()
    log = logs()
    assert code == "0", f"exit code {code} after SIGTERM:\n{log[-5000:]}"
    assert "SIGTERM: shutting down" in log and "supervisor stopped" in log, log[-5000:]
    assert "gateway stopped (exit status 0 " in log, log[-5000:]  # its own drain, then a clean exit
    assert supervisor_faults(log) == [], log[-5000:]
    report(built, capsys, record_property, ready_seconds=ready_seconds)


def test_cuda_image_builds(containers: None, capsys: pytest.CaptureFixture[str], record_property: Any) -> None:
    """No GPU here: the image is built, and the CUDA libraries the workers load are in it and load."""
    built = build("cuda")
    check = (
        "import ctypes, importlib.util, os, ctranslate2, nvidia.cublas, nvidia.cudnn\n"
        "for package, library in ((nvidia.cublas, 'libcublas.so.12'), (nvidia.cudnn, 'libcudnn.so.9')):\n"
        "    ctypes.CDLL(os.path.join(package.__path__[0], 'lib', library))\n"
        "print(ctranslate2.__version__, ctranslate2.get_cuda_device_count(), importlib.util.find_spec('torch'))\n"
    )
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python", built.tag, "-c", check).stdout.split()
    assert out[1:] == ["0", "None"], out  # no GPU visible here, and no torch in the image
    assert int(out[0].split(".")[0]) >= 4, out  # CTranslate2 4.x: cuBLAS 12 and cuDNN 9
    report(built, capsys, record_property)
