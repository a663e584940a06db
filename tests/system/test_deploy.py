"""The Kubernetes manifests: each overlay renders, validates against the Kubernetes schemas offline, and agrees
with the hub config it ships (probe paths and ports, /dev/shm size, grace period, GPUs, the autoscaling metric)."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from hub.config import HubConfig, parse_config
from tests.conftest import ROOT
from tests.integration.test_monitoring import DOCUMENTED

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
)

pytestmark = pytest.mark.timeout(60)

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32"
CRDS = {"ServiceMonitor"}  # not in the Kubernetes schemas: checked against the Services below instead
PCM_BYTES_PER_SECOND = 16000 * 4  # float32 mono at 16 kHz


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed; it renders the Kustomize overlays (kubectl kustomize)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(yaml.safe_load_all(out.stdout))


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def shipped_config(docs: tuple[dict[str, Any], ...]) -> HubConfig:
    return parse_config(yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"]), check_paths=False)


def quantity_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_kubernetes_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }
    for doc in docs:
        if doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    misspelt = copy.deepcopy(one(docs, "Deployment"))  # the validation would catch a wrong field name
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_grace_agree_with_the_config(overlay: str) -> None:
    docs = rendered(overlay)
    config = shipped_config(docs)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    supervisor, gateway = container(deployment, "supervisor"), container(deployment, "gateway")

    metrics = config.hub.metrics_port
    assert metrics > 0 and config.hub.metrics_host == "0.0.0.0"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = supervisor[probe]["httpGet"]
        assert (get["path"], port_number(supervisor, get["port"])) == (path, metrics), probe
    startup = supervisor["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= config.hub.start_timeout  # model loading

    frontend_port = int(config.hub.frontend.rsplit(":", 1)[1])
    assert config.hub.frontend.startswith("tcp://0.0.0.0:") and port_number(supervisor, "zmq") == frontend_port
    assert not config.gateway.enabled, "the gateway runs as its own container; the supervisor must not start another"
    args = gateway["args"]
    assert args[args.index("--hub") + 1] == f"tcp://127.0.0.1:{frontend_port}"
    assert port_number(gateway, "http") == config.gateway.port and config.gateway.host == "0.0.0.0"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert gateway[probe]["httpGet"] == {"path": path, "port": "http"}

    pause = 5  # the gateway's preStop sleep
    assert "time.sleep(5)" in gateway["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert pod["terminationGracePeriodSeconds"] > config.hub.drain_timeout + pause
    assert "signal.SIGTERM" in supervisor["lifecycle"]["preStop"]["exec"]["command"][-1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_is_sized_from_max_audio_seconds(overlay: str) -> None:
    docs = rendered(overlay)
    config = shipped_config(docs)
    deployment = one(docs, "Deployment")
    (shm,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    workers = sum(p.pool.max_size for p in config.enabled_providers)
    needed = (workers + 2) * config.hub.max_audio_seconds * PCM_BYTES_PER_SECOND  # every job running, two waiting
    assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= needed
    for name in ("supervisor", "gateway"):
        assert {"name": "shm", "mountPath": "/dev/shm"} in container(deployment, name)["volumeMounts"]


GATEWAY_HEADROOM = 384 * 2**20  # the gateway idles at ~80 MiB; the rest is for sessions, answers and the heap's slack


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_memory_budget_fits_its_container(overlay: str) -> None:
    """Uploads in flight and their PCM (in /dev/shm, charged to the gateway that writes it) stay under the limit."""
    docs = rendered(overlay)
    config = shipped_config(docs)
    limit = quantity_bytes(container(one(docs, "Deployment"), "gateway")["resources"]["limits"]["memory"])
    assert config.gateway.max_buffered_mb * 2**20 + GATEWAY_HEADROOM <= limit


def test_gpu_overlay_asks_for_the_gpus_its_config_uses() -> None:
    docs = rendered("gpu")
    config = shipped_config(docs)
    supervisor = container(one(docs, "Deployment"), "supervisor")
    devices = {d for p in config.enabled_providers for d in p.devices}
    assert all(p.device == "cuda" for p in config.enabled_providers)
    assert supervisor["resources"]["limits"]["nvidia.com/gpu"] == len(devices) == 1
    assert supervisor["image"].endswith(":cuda")
    cpu = container(one(rendered("cpu"), "Deployment"), "supervisor")
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert all(p.device == "cpu" for p in shipped_config(rendered("cpu")).enabled_providers)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_autoscaling_and_monitoring_fit_together(overlay: str) -> None:
    docs = rendered(overlay)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    zmq, http = one(docs, "Service", "asr-hub-zmq"), one(docs, "Service", "asr-hub")
    assert zmq["spec"]["clusterIP"] == "None" and http["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in http["spec"]["ports"]] == [8000]
    for service in (zmq, http):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert any(
                port["targetPort"] in [p["name"] for p in c["ports"]]
                for c in deployment["spec"]["template"]["spec"]["containers"]
            )
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= zmq["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in [p["name"] for p in zmq["spec"]["ports"]]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # one pod drains at a time (the PDB) while another serves
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
    assert series in DOCUMENTED, f"{series} is not a metric the hub exports"


def test_the_documented_gateway_deployment_fronts_the_headless_service() -> None:
    """docs/operations/kubernetes.md's gateway Deployment: valid manifests whose ``--hub`` is the headless
    Service's name and ZeroMQ port, whose Service selects its pods, and whose probes use the gateway's paths."""
    text = (ROOT / "docs" / "operations" / "kubernetes.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL) if "asr-hub-gateway" in b]
    docs = tuple(yaml.safe_load_all(block))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployment, service = one(docs, "Deployment", "asr-hub-gateway"), one(docs, "Service", "asr-hub-gateway")
    gateway = container(deployment, "gateway")
    zmq = one(rendered("cpu"), "Service", "asr-hub-zmq")
    port = next(p["port"] for p in zmq["spec"]["ports"] if p["name"] == "zmq")
    args = gateway["args"]
    assert zmq["spec"]["clusterIP"] == "None"
    assert args[0] == "hub.gateway" and args[args.index("--hub") + 1] == f"dns+tcp://{zmq['metadata']['name']}:{port}"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    http = port_number(gateway, "http")
    assert (
        http == int(args[args.index("--port") + 1]) == port_number(gateway, service["spec"]["ports"][0]["targetPort"])
    )
    assert (
        gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
