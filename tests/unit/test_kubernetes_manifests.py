"""deploy/kubernetes: every manifest validated offline, and the manifests, the container image and
the daemon agreeing with each other.

Validators (both from the dev extra, no cluster and no network):

- built-in kinds (Namespace, ServiceAccount, DaemonSet, Service): ``kubernetes-validate``, which
  bundles the Kubernetes OpenAPI-derived JSON schemas; its *strict* schemas also reject unknown
  fields.  Checked against the oldest Kubernetes minor the DaemonSet supports (1.30:
  ``securityContext.appArmorProfile``) and the newest one it ships a schema for (capabilities
  such as BPF/PERFMON are plain strings to the API, so old minors accept them); the oldest
  shipped minor accepts everything but that field (its clusters use the annotation).
- prometheus-operator CRDs (PodMonitor, PrometheusRule): ``cloudcoil-models-prometheus-operator``,
  pydantic models generated from the operator's CRD ``openAPIV3Schema`` (types, enums, patterns
  such as the Duration regex, required fields).  The models ignore unknown keys, so a document is
  also required to survive a dump of the validated model unchanged: a misspelt field is dropped
  by the model and the round trip fails.
- ``kustomization.yaml`` is not an API object: its resources are checked to be exactly the
  manifests in the directory.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule
from kubernetes_validate import utils as kv_utils

from tracer import __version__
from tracer.metrics import DEFAULT_METRICS_PORT, HEALTH_CHECKS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "kvm-completion-tracer.rules.yml"
GENERATOR = ROOT / "scripts" / "gen-prometheusrule.py"
NAME = "kvm-completion-tracer"
NAMESPACE = "kvm-completion-tracer"
CAPABILITIES = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"]  # as the container's
MIN_KUBERNETES = "1.30"  # securityContext.appArmorProfile
CRD_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "PodMonitor": PodMonitor,
    "PrometheusRule": PrometheusRule,
}


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _named_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return int(ports[name])


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def _shipped_versions() -> list[str]:
    return sorted({kv_utils.major_minor(v) for v in kv_utils.all_versions()}, key=_minor)


def _kubernetes_versions() -> list[str]:
    versions = _shipped_versions()
    assert MIN_KUBERNETES in versions
    return [MIN_KUBERNETES, versions[-1]]


def _crd_round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    model = CRD_MODELS[doc["kind"]].model_validate(doc)
    dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return dumped


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generator() -> ModuleType:
    return _load("gen_prometheusrule", GENERATOR)


# --- schema validation -----------------------------------------------------------------------


def test_every_manifest_is_a_known_kind() -> None:
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "DaemonSet", "Service", "PodMonitor", "PrometheusRule"]
    )


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_builtin_kinds_validate_strictly(version: str) -> None:
    checked = 0
    for name, doc in _documents():
        if doc["kind"] in CRD_MODELS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} ({doc['kind']}) against Kubernetes {version}: {err.message}")
        checked += 1
    assert checked == 4


def test_older_clusters_differ_only_by_the_apparmor_field() -> None:
    # Before 1.30 the API has no appArmorProfile (strict validation rejects it; the DaemonSet's
    # header says to apply with --validate=warn there) and the annotation alone confines.
    oldest = _shipped_versions()[0]
    assert _minor(oldest) < _minor(MIN_KUBERNETES)
    daemonset = copy.deepcopy(_one("DaemonSet"))
    with pytest.raises(kubernetes_validate.ValidationError, match="appArmorProfile"):
        kubernetes_validate.validate(daemonset, oldest, strict=True)
    del daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "appArmorProfile"]
    kubernetes_validate.validate(daemonset, oldest, strict=True)


def test_builtin_validator_rejects_mistakes() -> None:
    # The validator must bite: an unknown field and a wrongly typed one.
    version = _kubernetes_versions()[-1]
    daemonset = copy.deepcopy(_one("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostPid"] = True  # hostPID misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, version, strict=True)
    daemonset = copy.deepcopy(_one("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9110"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, version, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_MODELS))
def test_crd_kinds_validate_against_the_crd_models(kind: str) -> None:
    doc = _one(kind)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert _crd_round_trip(doc) == doc  # nothing unknown was dropped


def test_crd_validator_rejects_mistakes() -> None:
    rule = copy.deepcopy(_one("PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"  # not a Prometheus duration
    with pytest.raises(pydantic.ValidationError):
        _crd_round_trip(rule)
    rule = copy.deepcopy(_one("PrometheusRule"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(pydantic.ValidationError):
        _crd_round_trip(rule)
    monitor = copy.deepcopy(_one("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "rename"
    with pytest.raises(pydantic.ValidationError):
        _crd_round_trip(monitor)
    monitor = copy.deepcopy(_one("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["portt"] = "metrics"  # misspelt: dropped
    assert _crd_round_trip(monitor) != monitor


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in _manifest_files()]
    (image,) = kustomization["images"]
    assert image["name"] == _container()["image"]
    assert image["newTag"] == __version__  # the image is tagged with the package version


# --- consistency -----------------------------------------------------------------------------


def test_everything_in_one_namespace_with_one_app_label() -> None:
    for name, doc in _documents():
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
            assert meta["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
        else:
            assert meta.get("namespace") == NAMESPACE, name
        assert meta["labels"]["app.kubernetes.io/name"] == NAME, name


def test_selectors_select_the_daemonset_pods() -> None:
    daemonset = _one("DaemonSet")
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    for selector in (
        daemonset["spec"]["selector"]["matchLabels"],
        _one("Service")["spec"]["selector"],
        _one("PodMonitor")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()


def test_metrics_port_everywhere() -> None:
    container = _container()
    assert _named_port("metrics") == DEFAULT_METRICS_PORT
    args = container["args"]
    i = args.index("--metrics-addr")
    assert args[i + 1] == f"0.0.0.0:{DEFAULT_METRICS_PORT}"
    paths = {"startupProbe": "/-/healthy", "livenessProbe": "/-/healthy",
             "readinessProbe": "/-/ready"}
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in HEALTH_CHECKS, probe  # the daemon serves it
        port = get["port"]
        assert (_named_port(port) if isinstance(port, str) else port) == DEFAULT_METRICS_PORT
    (service_port,) = _one("Service")["spec"]["ports"]
    assert service_port["port"] == DEFAULT_METRICS_PORT
    assert _named_port(service_port["targetPort"]) == DEFAULT_METRICS_PORT
    for endpoint in _one("PodMonitor")["spec"]["podMetricsEndpoints"]:
        assert _named_port(endpoint["port"]) == DEFAULT_METRICS_PORT
        assert endpoint["path"] == "/metrics"


def test_probe_timing_fits_the_start_up() -> None:
    # The probes compile in ~2 s (longer on a throttled node): the startup probe must allow
    # minutes before the kubelet gives up, and liveness must not be quicker than its own
    # timeout allows.
    container = _container()
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert startup.get("initialDelaySeconds", 0) >= 2
    for name in ("livenessProbe", "readinessProbe"):
        probe = container[name]
        assert probe["timeoutSeconds"] <= probe["periodSeconds"], name
        assert probe["failureThreshold"] >= 2, name


def test_args_are_the_images_default_arguments() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert len(cmd) == 1
    assert _container()["args"] == json.loads(cmd[0])
    assert "command" not in _container()  # the image's entrypoint: kvm-completion-tracer run


def test_service_is_headless() -> None:
    assert _one("Service")["spec"]["clusterIP"] == "None"


def test_job_label_matches_the_alert_rules() -> None:
    # The rules select job="kvm-completion-tracer"; the PodMonitor's jobLabel names a pod label
    # whose value becomes the job.
    monitor = _one("PodMonitor")["spec"]
    pod_labels = _one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[monitor["jobLabel"]] == NAME
    assert f'job="{NAME}"' in RULES.read_text()


def test_pod_privileges() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork")  # the pod network suffices for scraping
    assert pod["nodeSelector"]["kvm-completion-tracer/kvm"] == "true"
    assert {"operator": "Exists"} in pod["tolerations"]
    security = _container()["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert security["readOnlyRootFilesystem"] is True
    # AppArmor's default container profiles deny ptrace reads of the host's VMMs: the field
    # (>= 1.30) and the annotation (older clusters), agreeing, on this container.
    assert security["appArmorProfile"] == {"type": "Unconfined"}
    annotations = _one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    key = f"container.apparmor.security.beta.kubernetes.io/{_container()['name']}"
    assert annotations == {key: "unconfined"}


def test_capabilities_and_mounts_match_the_container() -> None:
    # Same grant as docs/deploy.md's docker run line (tests/unit/test_container.py pins that one).
    test_container = _load("container_checks", Path(__file__).with_name("test_container.py"))
    assert set(CAPABILITIES) == test_container.CAPABILITIES
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = set()
    for mount in _container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" not in volume:
            continue
        mounts.add(
            (
                volume["hostPath"]["path"],
                mount["mountPath"],
                "ro" if mount.get("readOnly") else "",
            )
        )
    assert mounts == test_container.REQUIRED_MOUNTS
    assert all(
        volumes[m["name"]].get("emptyDir") is not None or "hostPath" in volumes[m["name"]]
        for m in _container()["volumeMounts"]
    )


def test_resources() -> None:
    resources = _container()["resources"]
    assert resources["requests"] == {"cpu": "50m", "memory": "192Mi"}
    assert resources["limits"] == {"cpu": "500m", "memory": "512Mi"}


# --- the generated PrometheusRule ------------------------------------------------------------


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    generated = _generator().render(RULES.read_text(), str(RULES))
    assert (K8S / "prometheusrule.yaml").read_text() == generated, (
        "deploy/kubernetes/prometheusrule.yaml is stale: run scripts/gen-prometheusrule.py"
    )
    rule = _one("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_generator_check_mode(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        "groups:\n"
        "  - name: g\n"
        "    rules:\n"
        "      - record: job:up:sum\n"
        "        expr: sum by (job) (up)\n"
        "      - alert: Down\n"
        "        expr: |\n"
        "          up == 0\n"
        "        for: 5m\n"
        "        labels: {severity: warning}\n"
        "        annotations: {summary: '{{ $labels.instance }} is down'}\n"
    )
    out = tmp_path / "prometheusrule.yaml"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(GENERATOR), "--rules", str(rules), "--output", str(out), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    assert run("--check").returncode == 1  # missing
    assert run().returncode == 0
    assert run("--check").returncode == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["spec"]["groups"] == yaml.safe_load(rules.read_text())["groups"]
    assert _crd_round_trip(doc) == doc
    out.write_text(out.read_text() + "# edited by hand\n")
    assert run("--check").returncode == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: []\n", "only 'groups'"),
        ("groups: []\n", "non-empty"),
        ("groups: [{rules: []}]\n", "needs a name"),
        ("groups: [{name: a, rules: []}, {name: a, rules: []}]\n", "duplicate"),
        ("groups: [{name: a}]\n", "no rules list"),
        ("groups: [{name: a, rules: [{expr: up}]}]\n", "exactly one of"),
        ("groups: [{name: a, rules: [{alert: X, record: y, expr: up}]}]\n", "exactly one of"),
        ("groups: [{name: a, rules: [{alert: X}]}]\n", "without expr"),
    ],
)
def test_generator_refuses_malformed_rules(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _generator().render(text)
