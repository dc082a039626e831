"""skaffold.yaml, deploy/kind/cluster.yaml and the Makefile's cluster targets, checked offline (no cluster, no
skaffold, kind or helm binary here): every path and profile they name exists, the image name and tag agree
everywhere, and the port-forwards and NodePorts reach Services the chart and the local overlay render."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import CHART_DIR, deep_merge, name, of_kind, parse_manifests
from tests.deploy.test_kustomize import KUSTOMIZE_DIR, VERSION, needs_kubectl, overlay
from tests.processes import REPO_ROOT

SKAFFOLD = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
KIND_CLUSTER = yaml.safe_load((REPO_ROOT / "deploy" / "kind" / "cluster.yaml").read_text())
MAKEFILE = (REPO_ROOT / "Makefile").read_text()
(ARTIFACT,) = SKAFFOLD["build"]["artifacts"]
(RELEASE,) = SKAFFOLD["deploy"]["helm"]["releases"]
PROFILES = {profile["name"]: profile for profile in SKAFFOLD["profiles"]}


def make_variable(variable: str) -> str:
    match = re.search(rf"^{variable} \??:?= (.+)$", MAKEFILE, re.MULTILINE)
    assert match, f"the Makefile defines no {variable}"
    return match.group(1).strip()


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-zA-Z][a-zA-Z0-9_-]*):(?!=)", MAKEFILE, re.MULTILINE))


def template_variable(artifact_image: str) -> str:
    """skaffold's name for an artifact in templates: every character but letters and digits becomes `_`."""
    return re.sub(r"[^A-Za-z0-9]", "_", artifact_image)


def render_release() -> list[dict]:
    """The chart as skaffold's Helm deployer installs it: its values files, the release name."""
    import helm_python

    values = {}
    for path in RELEASE["valuesFiles"]:
        values = deep_merge(values, yaml.safe_load((REPO_ROOT / path).read_text()) or {})
    with helm_python.Chart.load(REPO_ROOT / RELEASE["chartPath"]) as chart:
        return parse_manifests(chart.render(values, name=RELEASE["name"], namespace="default"))


# --- Paths and profiles -------------------------------------------------------------------------


def test_skaffold_uses_a_current_v4_schema_and_one_artifact():
    assert SKAFFOLD["kind"] == "Config"
    assert re.fullmatch(r"skaffold/v4beta\d+", SKAFFOLD["apiVersion"])
    assert len(SKAFFOLD["build"]["artifacts"]) == 1


def test_every_path_skaffold_names_exists():
    context = REPO_ROOT / ARTIFACT.get("context", ".")
    assert (context / ARTIFACT["docker"]["dockerfile"]).is_file()
    assert (REPO_ROOT / RELEASE["chartPath"] / "Chart.yaml").is_file()
    for path in RELEASE["valuesFiles"]:
        assert (REPO_ROOT / path).is_file(), path
    for profile in PROFILES.values():
        for path in profile.get("manifests", {}).get("kustomize", {}).get("paths", []):
            assert (REPO_ROOT / path / "kustomization.yaml").is_file(), path


def test_skaffold_has_the_kustomize_kind_and_minikube_profiles_and_the_makefile_uses_only_those():
    assert set(PROFILES) == {"kustomize", "kind", "minikube"}
    for profile in ("kind", "minikube"):
        assert PROFILES[profile]["build"]["local"]["push"] is False
    used = set(re.findall(r"skaffold \w+ -p ([\w,-]+)", MAKEFILE))
    assert used, "the Makefile runs no skaffold profile"
    assert {profile for group in used for profile in group.split(",")} <= set(PROFILES)


def test_kustomize_profile_replaces_the_helm_deployer_with_kubectl_on_the_local_overlay():
    profile = PROFILES["kustomize"]

    assert {"op": "remove", "path": "/deploy/helm"} in profile["patches"]
    assert "kubectl" in profile["deploy"]
    assert profile["manifests"]["kustomize"]["paths"] == ["deploy/kustomize/overlays/local"]


# --- One image name and tag everywhere ----------------------------------------------------------


def test_image_name_agrees_across_skaffold_chart_overlays_and_makefile():
    image = ARTIFACT["image"]
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for path in RELEASE["valuesFiles"]:
        assert "repository" not in (yaml.safe_load((REPO_ROOT / path).read_text()).get("image") or {})

    assert chart_values["image"]["repository"] == image
    assert make_variable("IMAGE") == image
    for overlay_name in ("local", "production"):
        kustomization = yaml.safe_load((KUSTOMIZE_DIR / "overlays" / overlay_name / "kustomization.yaml").read_text())
        assert [entry["name"] for entry in kustomization["images"]] == [image], overlay_name
    assert "kind load docker-image $(IMAGE):$(VERSION)" in MAKEFILE


def test_skaffold_sets_the_chart_image_from_its_artifact():
    variable = template_variable(ARTIFACT["image"])
    templates = RELEASE["setValueTemplates"]

    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{variable}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{variable}}}}}"


def test_image_tag_agrees_across_makefile_chart_dockerfile_and_local_overlay():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    local = yaml.safe_load((KUSTOMIZE_DIR / "overlays" / "local" / "kustomization.yaml").read_text())
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()

    assert "sed -n" in make_variable("VERSION")
    assert "project/__init__.py" in make_variable("VERSION")
    assert chart["appVersion"] == VERSION
    assert local["images"][0]["newTag"] == VERSION
    assert f"ARG VERSION={VERSION}" in dockerfile
    assert "-t $(IMAGE):$(VERSION)" in MAKEFILE


# --- Port-forwards, NodePorts and the kind cluster ----------------------------------------------


@pytest.fixture(scope="module")
def release_services():
    return {name(doc): doc for doc in of_kind(render_release(), "Service")}


def test_port_forwards_reach_web_and_flower_services_of_the_helm_release(release_services):
    forwards = {forward["resourceName"]: forward for forward in SKAFFOLD["portForward"]}

    assert {forward["localPort"] for forward in forwards.values()} == {8000, 5555}
    for service_name, forward in forwards.items():
        assert forward["resourceType"] == "service"
        assert forward["port"] in [port["port"] for port in release_services[service_name]["spec"]["ports"]]
    assert forwards["django-celery-k8s-web"]["localPort"] == 8000
    assert forwards["django-celery-k8s-flower"]["localPort"] == 5555


def test_helm_release_runs_the_migrate_job_and_the_deployments_wait_for_it():
    docs = render_release()
    (job,) = of_kind(docs, "Job")

    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"
    for deployment in of_kind(docs, "Deployment"):
        init = [c["name"] for c in deployment["spec"]["template"]["spec"].get("initContainers") or []]
        assert "wait-for-migrations" in init, name(deployment)


@pytest.mark.subprocess
@needs_kubectl
def test_port_forwards_reach_the_same_services_in_the_local_overlay():
    services = {name(doc): doc for doc in of_kind(overlay("local"), "Service")}
    for forward in SKAFFOLD["portForward"]:
        ports = [port["port"] for port in services[forward["resourceName"]]["spec"]["ports"]]
        assert forward["port"] in ports


@pytest.mark.subprocess
@needs_kubectl
def test_kind_cluster_is_ingress_ready_and_maps_the_local_node_ports():
    assert KIND_CLUSTER["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert KIND_CLUSTER["kind"] == "Cluster"
    (node,) = KIND_CLUSTER["nodes"]
    mapped = {mapping["containerPort"]: mapping["hostPort"] for mapping in node["extraPortMappings"]}
    node_ports = {
        port["nodePort"]
        for service in of_kind(overlay("local"), "Service")
        for port in service["spec"]["ports"]
        if "nodePort" in port
    }

    assert node["role"] == "control-plane"
    assert node["labels"] == {"ingress-ready": "true"}
    assert {80: 80, 443: 443}.items() <= mapped.items()
    assert node_ports
    assert all(mapped.get(port) == port for port in node_ports)
    assert "--config deploy/kind/cluster.yaml --name $(CLUSTER)" in MAKEFILE


# --- The Makefile ------------------------------------------------------------------------------


def test_every_makefile_target_has_a_description_and_is_phony():
    targets = makefile_targets() - {"$(STAMP)", "$(CHECKOV_STAMP)"}
    described = set(re.findall(r"^([a-zA-Z][a-zA-Z0-9_-]*):.*## ", MAKEFILE, re.MULTILINE))
    phony = set(re.search(r"^\.PHONY: (.+)$", MAKEFILE, re.MULTILINE).group(1).split())

    assert targets == described
    assert targets == phony
    assert {"kind-up", "kind-down", "deploy", "dev", "undeploy", "helm-docs", "kustomize-base"} <= targets


@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("make") is None, reason="make is missing")
def test_make_help_lists_every_target():
    run = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    listed = {re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0] for line in run.stdout.splitlines() if line.strip()}

    assert run.returncode == 0, run.stderr
    assert listed == makefile_targets()


def test_makefile_scripts_exist():
    for script in re.findall(r"\$\(PY\) (deploy/\S+\.py)", MAKEFILE):
        assert (REPO_ROOT / script).is_file(), script
    assert "deploy/kustomize/generate_base.py" in MAKEFILE
    assert "deploy/helm/django-celery-k8s/generate_readme.py" in MAKEFILE
