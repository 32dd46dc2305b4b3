"""Deployment files: Kubernetes and KServe manifests, the Dockerfile, Compose.

Core Kubernetes kinds are validated with kubernetes-validate against KUBERNETES_VERSION.
It has no schemas for custom resources, so the InferenceService's container is validated
as a core Pod container, and ServiceMonitor/PodMonitor are checked structurally. The
manifests' ports, probes and ConfigMap are checked against a real server started from that
ConfigMap's own TOML.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from harness import free_port, repo_root, scrape, wait_ready

from lrnserve.client import Client
from lrnserve.server.settings import load_settings

KUBERNETES_VERSION = "1.31.0"
ROOT = repo_root()
K8S = ROOT / "deploy" / "k8s"
CORE = sorted([*K8S.glob("base/*.yaml"), *K8S.glob("cpu/*.yaml"), *K8S.glob("gpu/*.yaml")])
CUSTOM = sorted([*K8S.glob("monitoring/*.yaml"), *(ROOT / "deploy" / "kserve").glob("*.yaml")])


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str, paths: list[Path] = CORE) -> list[dict[str, Any]]:
    return [d for p in paths for d in documents(p) if d["kind"] == kind]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_manifests_validate(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_every_object_kind_is_there() -> None:
    kinds = {d["kind"] for p in CORE + CUSTOM for d in documents(p)}
    assert kinds == {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "ServiceMonitor", "PodMonitor", "InferenceService",
    }  # fmt: skip
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind("Service")}
    assert services["lrnserve-headless"]["clusterIP"] == "None"
    assert services["lrnserve"]["type"] == "ClusterIP"


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def configmap_toml() -> str:
    (configmap,) = by_kind("ConfigMap")
    return configmap["data"]["lrnserve.toml"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_wiring(variant: str, tmp_path: Path) -> None:
    (deployment,) = by_kind("Deployment", [K8S / variant / "deployment.yaml"])
    spec = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(deployment)
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "cpu" in c["resources"]["requests"]  # HPA utilization needs a request
    # Ports: what the server opens with the ConfigMap's settings.
    config = tmp_path / "lrnserve.toml"
    config.write_text(configmap_toml())
    settings = load_settings(config)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port}
    assert c["args"] == ["--config", "/etc/lrnserve/lrnserve.toml"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["config"] == "/etc/lrnserve" and mounts["tmp"] == "/tmp"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == settings.grpc_port, probe
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    assert c["readinessProbe"]["grpc"].get("service", "") == ""
    # Non-root, read-only root filesystem.
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    # The pod gets time for preStop plus the whole drain.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + settings.grace_seconds + 5
    if variant == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "LRNSERVE_DEVICE", "value": "cuda"} in c["env"]


def test_inference_service_container_is_a_valid_pod_container() -> None:
    (isvc,) = by_kind("InferenceService", CUSTOM)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "lrnserve-predictor"},
        "spec": {"containers": [c], "volumes": predictor.get("volumes", [])},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    # KServe sends gRPC to the port named h2c; the v2 protocol is what lrnserve speaks there.
    (port,) = c["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == 8001
    assert c["args"][c["args"].index("--grpc-port") + 1] == "8001"
    assert c["readinessProbe"]["grpc"]["port"] == 8001


def test_prometheus_operator_monitors_select_the_pods() -> None:
    (deployment,) = by_kind("Deployment", [K8S / "cpu" / "deployment.yaml"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "lrnserve"]
    (monitor,) = by_kind("ServiceMonitor", CUSTOM)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    (pod_monitor,) = by_kind("PodMonitor", CUSTOM)
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in container(deployment)["ports"]}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= container_ports
    assert all(e["path"] == "/metrics" for e in pod_monitor["spec"]["podMetricsEndpoints"])


def test_probes_answer_on_a_real_server_started_from_the_configmap(tmp_path: Path) -> None:
    config = tmp_path / "lrnserve.toml"
    server_section = configmap_toml().split("[models.")[0]
    assert "lrn" in tomllib.loads(configmap_toml())["models"]
    config.write_text(server_section + "[models.lrn]\nkind = 'lrn'\n")  # one model keeps the test quick
    grpc_port, metrics_port = free_port(), free_port()
    env = {**os.environ, "LRNSERVE_GRPC_PORT": str(grpc_port), "LRNSERVE_METRICS_PORT": str(metrics_port)}
    env["LRNSERVE_HOST"] = "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrnserve.client.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        target = f"127.0.0.1:{grpc_port}"
        wait_ready(target, None, 120)
        with Client(target, timeout=10) as client:
            assert client.health("liveness")  # livenessProbe / startupProbe
            assert client.health("")  # readinessProbe
        assert "lrnserve_requests_total" in scrape(metrics_port)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "AS build" in text and "AS runtime" in text
    assert "USER 10001:10001" in text and "EXPOSE 8001 8002" in text
    assert 'CMD ["lrnserve", "health"' in text and 'ENTRYPOINT ["lrnserve", "serve"]' in text
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text


def test_compose_stack() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"lrnserve", "prometheus", "grafana"}
    assert (ROOT / "deploy" / services["lrnserve"]["build"]["context"] / "Dockerfile").is_file()
    assert {"8001:8001", "8002:8002"} <= set(services["lrnserve"]["ports"])
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / "deploy" / source).exists(), volume
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["lrnserve:8002"]
    datasource = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "lrnserve.yml").read_text()
    )
    mount = next(v for v in services["grafana"]["volumes"] if "dashboards" in v and "provisioning" not in v)
    assert provider["providers"][0]["options"]["path"] == mount.split(":")[1]
