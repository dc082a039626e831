"""helm lint (strict) passes for every values file, and values.schema.json turns a bad value into an
install-time error that names the field."""

import json

import helm_python
import pytest

from tests.deploy.conftest import CHART_DIR, CI_FILES, deep_merge, load_values, render_chart

SEVERITY_WARNING = 2


@pytest.mark.parametrize("kube_version", ["v1.30.0", "v1.34.0"])
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_strict_lint_reports_no_error_or_warning(ci_file, kube_version):
    report = helm_python.lint(CHART_DIR, load_values(ci_file), strict=True, kube_version=kube_version)

    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= SEVERITY_WARNING]
    assert not report["errors"], json.dumps(report, indent=2)
    assert not problems, json.dumps(report, indent=2)


def test_strict_lint_reports_a_schema_violation():
    # The lint above is only worth something if lint does see values: a bad one must be an error.
    values = deep_merge(load_values("minimal-values.yaml"), {"web": {"replicas": -1}})

    report = helm_python.lint(CHART_DIR, values, strict=True, kube_version="v1.30.0")

    assert report["errors"], json.dumps(report, indent=2)


def open_objects(node, path="") -> list[str]:
    """Paths of schema objects that list their properties yet accept any other key."""
    found = []
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            found.append(path or "/")
        for key, child in node.items():
            if key in ("properties", "patternProperties", "definitions", "$defs"):
                for name, sub in child.items():
                    found += open_objects(sub, f"{path}/{name}")
            elif key in ("items", "additionalProperties", "not", "if", "then", "else"):
                found += open_objects(child, f"{path}/{key}" if key != "items" else f"{path}[]")
            elif key in ("allOf", "anyOf", "oneOf"):
                for sub in child:
                    found += open_objects(sub, path)
    return found


def test_the_schema_forbids_unknown_keys_everywhere_it_lists_keys():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())

    assert schema.get("additionalProperties") is False
    assert len(schema["properties"]) >= 15
    assert not open_objects(schema), f"these blocks accept any key: {open_objects(schema)}"


def schema_error(overrides: dict) -> str:
    values = deep_merge(load_values("minimal-values.yaml"), overrides)
    with pytest.raises(helm_python.HelmError) as raised:
        render_chart(values)
    return str(raised.value)


def first_pool(**changes) -> dict:
    pools = load_values("minimal-values.yaml").get("workerPools")
    if not pools:
        with helm_python.Chart.load(CHART_DIR) as chart:
            pools = chart.values["workerPools"]
    return {"workerPools": [{**pools[0], **changes}, *pools[1:]]}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        pytest.param({"web": {"replicas": -1}}, "/web/replicas", id="negative-web-replicas"),
        pytest.param(
            {"worker": {"keda": {"minReplicaCount": -1}}}, "/worker/keda/minReplicaCount", id="negative-keda-minimum"
        ),
        pytest.param({"replicaCount": 3}, "replicaCount", id="unknown-top-level-key"),
        pytest.param({"web": {"replcas": 2}}, "replcas", id="unknown-key-in-web"),
        pytest.param({"image": {"tga": "1.0"}}, "tga", id="unknown-key-in-image"),
    ],
)
def test_schema_rejects_a_bad_value_naming_the_field(overrides, named):
    message = schema_error(overrides)

    assert "schema" in message, message
    assert named in message, message


def test_schema_refuses_a_second_beat():
    # Beat is a singleton: either beat.replicas is capped at 1 or the key does not exist at all.
    message = schema_error({"beat": {"replicas": 2}})

    assert "/beat/replicas" in message or ("/beat" in message and "replicas" in message), message


def test_schema_rejects_a_negative_worker_pool_replica_count():
    message = schema_error(first_pool(replicas=-1))

    assert "/workerPools/0/replicas" in message, message


def test_schema_rejects_a_misspelt_key_in_a_worker_pool():
    message = schema_error(first_pool(concurency=4))

    assert "/workerPools/0" in message, message
    assert "concurency" in message, message


def test_schema_rejects_a_worker_pool_without_queues():
    pool = first_pool()["workerPools"][0]
    pool.pop("queues")

    message = schema_error({"workerPools": [pool]})

    assert "queues" in message, message


def test_schema_accepts_every_values_file():
    with helm_python.Chart.load(CHART_DIR) as chart:
        for ci_file in CI_FILES:
            chart.validate_schema(load_values(ci_file))


def test_two_pools_with_one_name_are_refused_naming_the_pool():
    pool = first_pool()["workerPools"][0]

    message = schema_error({"workerPools": [pool, {**pool, "queues": ["other"]}]})

    assert pool["name"] in message, message
