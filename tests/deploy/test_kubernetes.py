"""deploy/kubernetes: the manifests of built-in kinds validated against the Kubernetes schemas
bundled in kubernetes-validate, the ServiceMonitor (a CRD) checked field by field, the ConfigMap's
config run through `phoenix-gateway check-config`, and the manifests in agreement with one another,
with the image and with the Prometheus config. No cluster needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_config
from tests.deploy.files import (
    KUBERNETES,
    PROMETHEUS_CONFIG,
    Instruction,
    check_config,
    key_variables,
    kubernetes_documents,
    manifest,
    served_port,
)

# Kinds served by operators' CRDs: no schema in kubernetes-validate, checked structurally below.
CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}
# The oldest Kubernetes release the manifests are meant for, and the newest schemas bundled.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def gateway_config_from_configmap(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(manifest("ConfigMap")["data"]["gateway.yaml"])
    return path


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    (found,) = containers
    return found


def standard_documents() -> list[Any]:
    """The manifests of built-in kinds, as pytest parameters named `FILE:KIND`."""
    return [
        pytest.param(document, id=f"{path.relative_to(KUBERNETES)}:{document['kind']}")
        for path, document in kubernetes_documents()
        if document["kind"] not in CUSTOM_KINDS
    ]


def test_kubernetes_manifests_cover_the_deployment() -> None:
    kinds = sorted(document["kind"] for _, document in kubernetes_documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Kustomization",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("document", standard_documents())
def test_manifest_validates_against_the_kubernetes_schema(document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validation_catches_mistakes() -> None:
    deployment = manifest("Deployment")
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, "1.30", strict=True)
    service = manifest("Service")
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.30", strict=True)


def test_configmap_config_passes_check_config(tmp_path: Path) -> None:
    result = check_config(gateway_config_from_configmap(tmp_path))
    assert result.returncode == 0, result.stderr


def test_probes_ports_and_config_agree(tmp_path: Path, image: list[Instruction]) -> None:
    spec = container()
    (port,) = spec["ports"]
    config = load_config(gateway_config_from_configmap(tmp_path))
    assert port["containerPort"] == served_port(image) == config.server.port
    assert spec.get("command") is None and spec.get("args") is None, "the image's command serves"
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    (service_port,) = manifest("Service")["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    assert service_port["port"] == config.server.port


def test_config_is_mounted_where_phoenix_config_points() -> None:
    deployment = manifest("Deployment")
    spec = container()
    env = {item["name"]: item for item in spec["env"]}
    config_path = Path(env["PHOENIX_CONFIG"]["value"])
    mounts = {mount["name"]: mount for mount in spec["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [name for name, volume in volumes.items() if "configMap" in volume]
    assert mounts[name]["mountPath"] == str(config_path.parent) and mounts[name]["readOnly"]
    configmap = volumes[name]["configMap"]
    assert configmap["name"] == manifest("ConfigMap")["metadata"]["name"]
    assert configmap["items"] == [{"key": "gateway.yaml", "path": config_path.name}]


def test_provider_keys_come_from_the_secret(tmp_path: Path) -> None:
    env = {item["name"]: item for item in container()["env"]}
    secret = manifest("Secret")
    needed = key_variables(gateway_config_from_configmap(tmp_path))
    assert needed == {"OPENAI_API_KEY", "GEMINI_API_KEY"}
    for name in needed:
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"], name
        assert reference["key"] in secret["stringData"], name
        assert reference["optional"] is True, name
    assert all(value.startswith("replace-with-") for value in secret["stringData"].values())


def test_pods_are_replicated_limited_and_locked_down() -> None:
    deployment = manifest("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    spec = container()
    assert set(spec["resources"]["requests"]) == set(spec["resources"]["limits"]) == {"cpu", "memory"}
    security = spec["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    writable = {mount["mountPath"] for mount in spec["volumeMounts"] if not mount.get("readOnly")}
    assert writable == {"/tmp"}


def test_pods_get_time_to_drain(tmp_path: Path) -> None:
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    config = load_config(gateway_config_from_configmap(tmp_path))
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + config.server.shutdown_timeout


def test_service_pdb_and_hpa_select_the_gateway_pods() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifest("Service")["spec"]["selector"].items() <= labels.items()
    pdb = manifest("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert pdb["minAvailable"] < hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]


def test_servicemonitor_scrapes_the_service_metrics_port() -> None:
    """A Prometheus Operator CRD, outside the Kubernetes schemas: checked field by field."""
    monitor = manifest("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    service = manifest("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    scrape_interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert endpoint["interval"] == scrape_interval


def test_kustomization_applies_every_manifest_but_the_secret_and_the_servicemonitor() -> None:
    kustomization = manifest("Kustomization")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    resources = kustomization["resources"]
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {
        "kustomization.yaml",
        "servicemonitor.yaml",
    }
    assert sorted(resources) == sorted(on_disk)
    kinds = {document["kind"] for path, document in kubernetes_documents() if path.name in resources}
    assert "Secret" not in kinds, "applying the kustomization must never overwrite real keys"
