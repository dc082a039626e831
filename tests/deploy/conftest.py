"""Fixtures for the Helm chart tests: the chart rendered with Helm's own Go engine (helm-python-sdk),
once per values file and session, parsed to plain dicts, and helpers to walk the parsed objects."""

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.processes import REPO_ROOT

CHART_NAME = "django-celery-k8s"
CHART_DIR = REPO_ROOT / "deploy" / "helm" / CHART_NAME
CI_DIR = CHART_DIR / "ci"
RELEASE = "demo"
NAMESPACE = "apps"

EXPECTED_CI_FILES = (
    "minimal-values.yaml",
    "production-values.yaml",
    "local-values.yaml",
    "pools-values.yaml",
    "existing-secret-values.yaml",
    "sentinel-values.yaml",
    "tls-values.yaml",
)
# Every values file found, and the expected ones even when missing, so a missing file fails a test.
CI_FILES = sorted({path.name for path in CI_DIR.glob("*.yaml")} | set(EXPECTED_CI_FILES))

APP_COMPONENTS = ("web", "worker", "beat", "flower", "migrate")
BUNDLED_COMPONENTS = ("redis", "postgresql")
COMPONENTS = APP_COMPONENTS + BUNDLED_COMPONENTS
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
COMPONENT_LABEL = "app.kubernetes.io/component"
POOL_LABEL = "app.kubernetes.io/worker-pool"


def load_values(ci_file: str) -> dict:
    return yaml.safe_load((CI_DIR / ci_file).read_text()) or {}


def deep_merge(base: dict, overrides: dict) -> dict:
    """Values as Helm merges them: dicts key by key, anything else (lists too) replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_manifests(manifests: dict[str, str]) -> list[dict]:
    docs = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs.extend(doc for doc in yaml.safe_load_all(manifests[path]) if doc)
    return docs


def render_chart(values: dict | None = None, chart_dir: Path = CHART_DIR, **options) -> list[dict]:
    import helm_python

    with helm_python.Chart.load(chart_dir) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, **options)
    return parse_manifests(manifests)


def merged_values(values: dict | None = None) -> dict:
    """The values a release would use: the chart's defaults coalesced with these."""
    import helm_python

    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.merge_values(values or {})


@functools.cache
def _render_ci_cached(ci_file: str) -> tuple:
    return tuple(render_chart(load_values(ci_file)))


@pytest.fixture(scope="session")
def render_ci():
    """render_ci("minimal-values.yaml") -> the parsed objects; each file is rendered once per session."""

    def render(ci_file: str) -> list[dict]:
        if not (CI_DIR / ci_file).is_file():
            pytest.fail(f"values file {CI_DIR / ci_file} is missing")
        return copy.deepcopy(list(_render_ci_cached(ci_file)))

    return render


@pytest.fixture(scope="session")
def minimal_values() -> dict:
    return load_values("minimal-values.yaml")


@pytest.fixture
def chart_copy(tmp_path) -> Path:
    """A scratch copy of the chart, for tests that edit Chart.yaml or the README."""
    destination = tmp_path / CHART_NAME
    shutil.copytree(CHART_DIR, destination)
    return destination


# --- Walking the parsed objects -------------------------------------------------------------


def of_kind(docs: list[dict], *kinds: str) -> list[dict]:
    return [doc for doc in docs if doc.get("kind") in kinds]


def labels(doc: dict) -> dict:
    return doc.get("metadata", {}).get("labels") or {}


def component(doc: dict) -> str | None:
    return labels(doc).get(COMPONENT_LABEL)


def name(doc: dict) -> str:
    return doc["metadata"]["name"]


def workloads(docs: list[dict], *components: str) -> list[dict]:
    found = of_kind(docs, *WORKLOAD_KINDS)
    return [doc for doc in found if not components or component(doc) in components]


def pod_template(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def pod_spec(workload: dict) -> dict:
    return pod_template(workload)["spec"]


def pod_component(workload: dict) -> str | None:
    return (pod_template(workload).get("metadata", {}).get("labels") or {}).get(COMPONENT_LABEL) or component(workload)


def containers(workload: dict, *, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return list(spec.get("containers") or []) + (list(spec.get("initContainers") or []) if init else [])


def main_container(workload: dict) -> dict:
    """The container that runs the role: the one whose first argument is the role name, else the first."""
    role = pod_component(workload)
    for container in pod_spec(workload)["containers"]:
        if (container.get("args") or [None])[0] == role:
            return container
    return pod_spec(workload)["containers"][0]


def command_line(container: dict) -> str:
    return " ".join(str(part) for part in (container.get("command") or []) + (container.get("args") or []))


def env_from_refs(container: dict) -> set[tuple[str, str]]:
    refs = set()
    for source in container.get("envFrom") or []:
        for kind in ("configMapRef", "secretRef"):
            if kind in source:
                refs.add((kind, source[kind]["name"]))
    return refs


def selector_matches(selector: dict, pod_labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions, or a plain Service selector) against labels."""
    if not selector:
        return True
    match_labels = (
        selector.get("matchLabels", {}) if "matchLabels" in selector or "matchExpressions" in selector else selector
    )
    if any(pod_labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and pod_labels.get(key) not in values:
            return False
        if operator == "NotIn" and pod_labels.get(key) in values:
            return False
        if operator == "Exists" and key not in pod_labels:
            return False
        if operator == "DoesNotExist" and key in pod_labels:
            return False
    return True


def pod_labels(workload: dict) -> dict:
    return pod_template(workload).get("metadata", {}).get("labels") or {}


CHECKOV = REPO_ROOT / ".venv" / "checkov" / "bin" / "checkov"


def run_checkov(docs: list[dict], directory: Path) -> dict:
    """checkov's kubernetes report on these objects, written one file each into directory."""
    for index, doc in enumerate(docs):
        (directory / f"{index:03d}-{doc['kind'].lower()}-{name(doc)}.yaml").write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [str(CHECKOV), "-d", str(directory), "--framework", "kubernetes", "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.stdout.strip(), run.stderr
    report = json.loads(run.stdout)
    if isinstance(report, list):
        report = next(r for r in report if r.get("check_type") == "kubernetes")
    return report


PROMTOOL = shutil.which("promtool")


def needs_promtool(test):
    """A test that runs promtool: marked subprocess, and skipped where it is missing."""
    missing = pytest.mark.skipif(
        PROMTOOL is None, reason="promtool is missing: install the Debian package `prometheus` (.ci/run does)"
    )
    return pytest.mark.subprocess(missing(test))
