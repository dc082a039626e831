"""The chart's OpenTelemetry settings: off by default; on, web, every worker pool and beat get the
collector's address and the sampler (the ConfigMap) and a service name and Kubernetes resource
attributes of their own, which the OpenTelemetry SDK reads as the chart means them once the
kubelet has expanded them; the NetworkPolicy lets the traces out."""

import re

import helm_python
import kubernetes_validate
import pytest

from project import tracing
from tests.deploy.conftest import (
    CI_FILES,
    NAMESPACE,
    POOL_LABEL,
    containers,
    deep_merge,
    load_values,
    main_container,
    name,
    of_kind,
    pod_component,
    pod_labels,
    render_chart,
    workloads,
)
from tests.deploy.test_chart_invariants import effective_env

ENDPOINT = "http://otel-collector.observability:4318"
TRACING_ON = {
    "tracing": {
        "enabled": True,
        "endpoint": ENDPOINT,
        "samplerRatio": 0.25,
        "resourceAttributes": {"deployment.environment.name": "production"},
    }
}
TRACED = ("web", "worker", "beat")


def kubelet_env(container: dict, pod_fields: dict[str, str]) -> dict[str, str]:
    """The container's own env as the kubelet gives it: fieldRefs resolved, and $(NAME) expanded
    when NAME is defined earlier in the list (later or unknown names stay as written)."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), item["value"])
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = pod_fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def otel_names(container: dict) -> set[str]:
    return {item["name"] for item in container.get("env") or [] if item["name"].startswith("OTEL_")}


@pytest.fixture(scope="module")
def traced():
    values = deep_merge(load_values("production-values.yaml"), TRACING_ON)
    return values, render_chart(values)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_tracing_is_off_by_default(render_ci, ci_file):
    docs = render_ci(ci_file)

    for workload in workloads(docs):
        for container in containers(workload):
            env = effective_env(docs, container)
            assert not [key for key in env if key.startswith("OTEL_")], f"{name(workload)}/{container['name']}"
            assert not tracing.enabled(env), f"{name(workload)} would trace"


def test_the_traced_roles_export_to_the_collector_with_the_sampler(traced):
    _, docs = traced
    roles = {pod_component(w) for w in workloads(docs) if otel_names(main_container(w))}

    assert roles == set(TRACED)
    for workload in workloads(docs, *TRACED):
        env = effective_env(docs, main_container(workload))
        assert tracing.enabled(env), name(workload)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == ENDPOINT
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"


def test_each_role_names_its_service_pod_and_deployment_as_the_sdk_reads_them(traced, monkeypatch):
    from opentelemetry.sdk.resources import Resource

    values, docs = traced
    expected_services = {"web": "django-celery-k8s-web", "beat": "django-celery-k8s-beat"}
    for workload in workloads(docs, *TRACED):
        pod = f"{name(workload)}-5d8f9c7b4-x2x7q"
        env = kubelet_env(main_container(workload), {"metadata.name": pod, "metadata.namespace": NAMESPACE})
        for key, value in env.items():
            monkeypatch.setenv(key, value)

        attributes = Resource.create().attributes

        role = pod_component(workload)
        pool = pod_labels(workload).get(POOL_LABEL)
        assert attributes["service.name"] == expected_services.get(role, f"django-celery-k8s-worker-{pool}")
        assert attributes["k8s.pod.name"] == pod
        assert attributes["k8s.namespace.name"] == NAMESPACE
        assert attributes["k8s.deployment.name"] == name(workload)
        assert attributes["service.version"] == values["image"]["tag"]
        assert attributes["deployment.environment.name"] == "production"


def test_the_service_name_prefix_follows_the_value(minimal_values):
    docs = render_chart(deep_merge(minimal_values, deep_merge(TRACING_ON, {"tracing": {"serviceNamePrefix": "shop"}})))

    names = {
        item["value"]
        for workload in workloads(docs, *TRACED)
        for item in main_container(workload)["env"]
        if item["name"] == "OTEL_SERVICE_NAME"
    }
    assert names == {"shop-web", "shop-beat", "shop-worker-default", "shop-worker-long"}


@pytest.mark.parametrize("kube_version", ["1.30", "1.34"])
def test_traced_workloads_pass_the_strict_kubernetes_schema(traced, kube_version):
    _, docs = traced

    for doc in of_kind(docs, "Deployment", "ConfigMap", "NetworkPolicy"):
        kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize(("endpoint", "port"), [(ENDPOINT, 4318), ("https://otlp.example.com", 443)])
def test_the_network_policy_lets_traces_reach_the_collector(endpoint, port):
    values = deep_merge(
        load_values("production-values.yaml"), deep_merge(TRACING_ON, {"tracing": {"endpoint": endpoint}})
    )
    docs = render_chart(values)

    default_policy = next(d for d in of_kind(docs, "NetworkPolicy") if "egress" in d["spec"])
    egress_ports = {p["port"] for rule in default_policy["spec"]["egress"] for p in rule.get("ports") or []}
    assert port in egress_ports


def test_tracing_without_an_endpoint_is_refused(minimal_values):
    with pytest.raises(helm_python.HelmError) as raised:
        render_chart(deep_merge(minimal_values, {"tracing": {"enabled": True}}))

    assert "tracing.endpoint" in str(raised.value)


@pytest.mark.parametrize(
    "tracing_values",
    [
        {"samplerRatio": 1.5},
        {"sampler": "sometimes"},
        {"endpoint": "otel-collector:4318"},
        {"resourceAttributes": {"team": "a,b"}},
        {"exporter": "zipkin"},
    ],
    ids=["ratio-above-1", "unknown-sampler", "endpoint-without-scheme", "comma-in-an-attribute", "unknown-key"],
)
def test_the_schema_refuses_a_wrong_tracing_value(minimal_values, tracing_values):
    with pytest.raises(helm_python.HelmError) as raised:
        render_chart(deep_merge(minimal_values, {"tracing": tracing_values}))

    assert "/tracing" in str(raised.value)
