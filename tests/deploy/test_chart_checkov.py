"""checkov's Kubernetes policies pass on the production-like render; every skip is an annotation in the
chart with its reason."""

import re

import pytest

from tests.deploy.conftest import name, run_checkov

# In a parallel run this module stays in one process: checkov scans the chart once for the module.
pytestmark = pytest.mark.xdist_group("chart-checkov")

SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d*$")
SKIP_VALUE = re.compile(r"^(CKV2?_K8S_\d+)\s*=\s*(.*)$", re.DOTALL)


@pytest.fixture(scope="module")
def production(render_ci):
    return render_ci("production-values.yaml")


@pytest.fixture(scope="module")
def checkov_report(production, tmp_path_factory):
    return run_checkov(production, tmp_path_factory.mktemp("rendered"))


def skip_annotations(docs):
    """(check id, reason, resource) for every checkov.io/skip annotation in the rendered objects."""
    skips = []
    for doc in docs:
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if SKIP_ANNOTATION.match(key):
                match = SKIP_VALUE.match(str(value).strip())
                assert match, f"{doc['kind']} {name(doc)}: {key}: {value!r} is not CHECK_ID=reason"
                skips.append((match.group(1), match.group(2).strip(), f"{doc['kind']}/{name(doc)}"))
    return skips


@pytest.mark.subprocess
def test_checkov_scanned_every_rendered_object(checkov_report, production):
    summary = checkov_report["summary"]

    assert summary["resource_count"] >= len(production) - 1, summary
    assert summary["passed"] > 300, f"checkov passed only {summary['passed']} checks: it scanned less than expected"


@pytest.mark.subprocess
def test_checkov_finds_no_failed_check(checkov_report):
    failed = [
        f"{check['check_id']} {check['resource']}: {check['check_name']}"
        for check in checkov_report["results"]["failed_checks"]
    ]

    assert checkov_report["summary"]["failed"] == 0, "\n".join(failed)


@pytest.mark.subprocess
def test_every_skip_comes_from_a_justified_annotation(checkov_report, production):
    skips = skip_annotations(production)
    skipped = checkov_report["results"]["skipped_checks"]

    assert checkov_report["summary"]["skipped"] == len(skipped) == len(skips), (skipped, skips)
    assert sorted(check["check_id"] for check in skipped) == sorted(check_id for check_id, _, _ in skips)
    short = [(check_id, resource, reason) for check_id, reason, resource in skips if len(reason) < 20]
    assert not short, f"skips without a real reason: {short}"
