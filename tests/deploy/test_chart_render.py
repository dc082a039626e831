"""The chart renders with Helm's own engine for every values file, its built-in objects pass the strict
Kubernetes schemas of 1.30 and 1.34, and its custom resources carry the fields their operators read."""

import json
import re

import helm_python
import kubernetes_validate
import pytest

from tests.deploy.conftest import (
    CHART_DIR,
    CI_DIR,
    CI_FILES,
    EXPECTED_CI_FILES,
    containers,
    deep_merge,
    labels,
    load_values,
    merged_values,
    name,
    of_kind,
    parse_manifests,
    pod_labels,
    pod_spec,
    render_chart,
    selector_matches,
    workloads,
)

KUBE_VERSIONS = ("1.30", "1.34")
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}


def test_the_expected_values_files_exist():
    missing = [ci_file for ci_file in EXPECTED_CI_FILES if not (CI_DIR / ci_file).is_file()]

    assert not missing, f"missing values files in {CI_DIR}: {missing}"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_values_file_renders_workloads_for_every_role(render_ci, ci_file):
    docs = render_ci(ci_file)

    roles = {labels(doc).get("app.kubernetes.io/component") for doc in workloads(docs)}
    assert {"web", "worker", "beat", "migrate"} <= roles, f"{ci_file} renders workloads only for {roles}"


def test_default_values_without_urls_fail_naming_the_missing_value():
    with pytest.raises(helm_python.HelmError) as raised:
        render_chart({})

    message = str(raised.value)
    assert "required" in message.lower() or "secrets." in message, message
    assert any(key in message for key in ("databaseUrl", "brokerUrl", "existingSecret")), message


@pytest.mark.parametrize("missing", ["databaseUrl", "brokerUrl"])
def test_each_missing_url_is_named_in_the_render_error(minimal_values, missing):
    values = json.loads(json.dumps(minimal_values))
    values.setdefault("secrets", {}).pop("existingSecret", None)
    assert values["secrets"].get(missing), f"minimal-values.yaml is expected to set secrets.{missing}"
    values["secrets"][missing] = ""

    with pytest.raises(helm_python.HelmError) as raised:
        render_chart(values)

    assert missing in str(raised.value), str(raised.value)


def test_chart_app_version_is_the_project_version():
    import project

    with helm_python.Chart.load(CHART_DIR) as chart:
        assert chart.metadata["name"] == "django-celery-k8s"
        assert chart.metadata["appVersion"] == project.__version__


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_builtin_object_passes_the_strict_kubernetes_schema(render_ci, ci_file, kube_version):
    docs = [doc for doc in render_ci(ci_file) if doc["kind"] not in CUSTOM_KINDS]
    assert docs

    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {name(doc)}: no schema for {doc['apiVersion']} in {kube_version}")
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{doc['kind']} {name(doc)}: {error.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_only_known_custom_resources_are_rendered(render_ci, ci_file):
    unknown = []
    for doc in render_ci(ci_file):
        try:
            kubernetes_validate.validate(doc, "1.30", strict=False)
        except kubernetes_validate.SchemaNotFoundError:
            if CUSTOM_KINDS.get(doc["kind"]) != doc["apiVersion"]:
                unknown.append(f"{doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError:
            pass  # reported by the strict test
    assert not unknown, unknown


# --- Custom resources, checked against the fields their operators read ----------------------


@pytest.fixture(scope="module")
def production(render_ci):
    return render_ci("production-values.yaml")


def services_by_name(docs):
    return {name(doc): doc for doc in of_kind(docs, "Service")}


def test_production_renders_every_custom_resource(production):
    kinds = {doc["kind"] for doc in production}

    assert set(CUSTOM_KINDS) <= kinds, f"production-values.yaml does not render {set(CUSTOM_KINDS) - kinds}"
    for doc in production:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]], doc["apiVersion"]


def test_service_monitors_select_a_rendered_service_and_name_its_ports(production):
    services = of_kind(production, "Service")
    monitors = of_kind(production, "ServiceMonitor")
    assert monitors

    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["endpoints"], f"{name(monitor)} has no endpoints"
        selected = [svc for svc in services if selector_matches(spec["selector"], labels(svc))]
        assert spec["selector"].get("matchLabels"), f"{name(monitor)} selects every Service in the namespace"
        assert selected, f"{name(monitor)} selects no rendered Service"
        port_names = {port.get("name") for svc in selected for port in svc["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint.get("port") in port_names, (
                f"{name(monitor)}: port {endpoint.get('port')} not in {port_names}"
            )
            assert endpoint.get("path", "/metrics").startswith("/")


def test_pod_monitors_select_rendered_pods_and_name_their_ports(production):
    monitors = of_kind(production, "PodMonitor")
    assert monitors

    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["podMetricsEndpoints"], f"{name(monitor)} has no podMetricsEndpoints"
        assert spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions")
        selected = [w for w in workloads(production) if selector_matches(spec["selector"], pod_labels(w))]
        assert selected, f"{name(monitor)} selects no rendered pod"
        port_names = {
            port.get("name") for w in selected for c in containers(w, init=False) for port in c.get("ports") or []
        }
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint.get("port") in port_names, (
                f"{name(monitor)}: port {endpoint.get('port')} not in {port_names}"
            )


def test_prometheus_rules_have_groups_of_alerts_with_expressions(production):
    rules = of_kind(production, "PrometheusRule")
    assert rules

    for rule_doc in rules:
        groups = rule_doc["spec"]["groups"]
        assert groups, f"{name(rule_doc)} has no groups"
        for group in groups:
            assert group.get("name")
            assert group.get("rules"), f"group {group.get('name')} has no rules"
            for rule in group["rules"]:
                assert rule.get("alert") or rule.get("record"), rule
                assert str(rule.get("expr") or "").strip(), rule
                if "alert" in rule:
                    assert rule.get("labels", {}).get("severity"), f"alert {rule['alert']} has no severity"
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule


def test_no_horizontal_pod_autoscaler_fights_a_scaled_object(production):
    keda_targets = {doc["spec"]["scaleTargetRef"]["name"] for doc in of_kind(production, "ScaledObject")}
    hpa_targets = {doc["spec"]["scaleTargetRef"]["name"] for doc in of_kind(production, "HorizontalPodAutoscaler")}

    assert not keda_targets & hpa_targets, f"both KEDA and an HPA scale {keda_targets & hpa_targets}"


def test_autoscalers_and_disruption_budgets_target_rendered_workloads(production):
    deployments = {name(doc): doc for doc in of_kind(production, "Deployment")}
    hpas = of_kind(production, "HorizontalPodAutoscaler")
    pdbs = of_kind(production, "PodDisruptionBudget")
    assert hpas
    assert pdbs

    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment", target
        assert target["name"] in deployments, target
        assert labels(deployments[target["name"]]).get("app.kubernetes.io/component") != "beat"
    for pdb in pdbs:
        selected = [w for w in deployments.values() if selector_matches(pdb["spec"]["selector"], pod_labels(w))]
        assert selected, f"PodDisruptionBudget {name(pdb)} selects no pod"
        for deployment in selected:
            if deployment["spec"].get("replicas") == 1 and "beat" in labels(deployment).get(
                "app.kubernetes.io/component", ""
            ):
                blocks = pdb["spec"].get("minAvailable") in (1, "100%") or pdb["spec"].get("maxUnavailable") in (
                    0,
                    "0%",
                )
                assert not blocks, f"{name(pdb)} would block every node drain of the single beat pod"


def test_services_and_ingress_route_to_rendered_ports(production):
    services = services_by_name(production)
    pods = workloads(production)
    for service in services.values():
        selected = [w for w in pods if selector_matches(service["spec"]["selector"], pod_labels(w))]
        assert selected, f"Service {name(service)} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            container_ports = {
                value
                for w in selected
                for c in containers(w, init=False)
                for p in c.get("ports") or []
                for value in (p.get("name"), p["containerPort"])
            }
            assert target in container_ports, f"Service {name(service)} targets {target}, pods expose {container_ports}"

    ingresses = of_kind(production, "Ingress")
    assert ingresses
    for ingress in ingresses:
        assert ingress["spec"].get("tls"), f"Ingress {name(ingress)} has no TLS in production-values.yaml"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, backend
                ports = services[backend["name"]]["spec"]["ports"]
                assert backend["port"].get("name") in {p.get("name") for p in ports} or backend["port"].get(
                    "number"
                ) in {p["port"] for p in ports}, backend


def test_grafana_dashboards_are_json_in_a_config_map_with_the_sidecar_label(production):
    grafana = merged_values(load_values("production-values.yaml"))["metrics"]["grafanaDashboards"]
    label, value = grafana["sidecarLabel"], str(grafana["sidecarLabelValue"])

    dashboards = [doc for doc in of_kind(production, "ConfigMap") if labels(doc).get(label) == value]

    assert dashboards, f"production-values.yaml renders no ConfigMap labelled {label}={value}"
    for config_map in dashboards:
        for key, text in (config_map.get("data") or {}).items():
            assert key.endswith(".json"), key
            dashboard = json.loads(text)
            assert dashboard.get("panels") or dashboard.get("rows"), f"{key} has no panels"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_pods_reference_only_rendered_config_maps_secrets_and_accounts(render_ci, ci_file):
    docs = render_ci(ci_file)
    config_maps = {name(doc) for doc in of_kind(docs, "ConfigMap")}
    secrets = {name(doc) for doc in of_kind(docs, "Secret")}
    secrets.add(merged_values(load_values(ci_file))["secrets"]["existingSecret"])
    accounts = {name(doc) for doc in of_kind(docs, "ServiceAccount")}

    for workload in workloads(docs):
        spec = pod_spec(workload)
        if spec.get("serviceAccountName"):
            assert spec["serviceAccountName"] in accounts | {"default"}, spec["serviceAccountName"]
        for container in containers(workload):
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, source
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, source


def test_disruption_budgets_never_block_a_drain_at_the_minimum_replica_count(production):
    # A budget that keeps every pod of a workload at its minimum size makes `kubectl drain` wait forever.
    deployments = {name(doc): doc for doc in of_kind(production, "Deployment")}
    minimum = {target: doc["spec"].get("replicas", 1) for target, doc in deployments.items()}
    for hpa in of_kind(production, "HorizontalPodAutoscaler"):
        minimum[hpa["spec"]["scaleTargetRef"]["name"]] = hpa["spec"].get("minReplicas", 1)
    for scaled in of_kind(production, "ScaledObject"):
        minimum[scaled["spec"]["scaleTargetRef"]["name"]] = scaled["spec"].get("minReplicaCount", 0)

    blocking = []
    for pdb in of_kind(production, "PodDisruptionBudget"):
        spec = pdb["spec"]
        for target, deployment in deployments.items():
            if not selector_matches(spec["selector"], pod_labels(deployment)) or minimum[target] == 0:
                continue
            min_available = spec.get("minAvailable")
            if spec.get("maxUnavailable") in (0, "0%") or min_available == "100%":
                blocking.append(f"{name(pdb)} allows no disruption of {target}")
            elif isinstance(min_available, int) and min_available >= minimum[target]:
                blocking.append(f"{name(pdb)}: minAvailable {min_available}, {target} may run only {minimum[target]}")
    assert not blocking, "\n".join(blocking)


def test_ingress_routes_root_to_web_and_the_flower_prefix_to_flower(production):
    values = merged_values(load_values("production-values.yaml"))
    services = services_by_name(production)
    routes = {}
    for ingress in of_kind(production, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = services[path["backend"]["service"]["name"]]
                routes[(rule.get("host"), path["path"])] = labels(service).get("app.kubernetes.io/component")

    for host in (h["host"] for h in values["ingress"]["hosts"]):
        assert routes.get((host, "/")) == "web", routes
        if values["ingress"]["flower"]["enabled"] and values["flower"]["enabled"]:
            assert routes.get((host, values["ingress"]["flower"]["path"])) == "flower", routes


def test_flower_behind_a_prefix_is_probed_under_that_prefix(production):
    values = merged_values(load_values("production-values.yaml"))
    assert values["ingress"]["flower"]["enabled"]
    prefix = (values["flower"]["urlPrefix"] or values["ingress"]["flower"]["path"]).strip("/")
    flower = next(w for w in workloads(production) if labels(w).get("app.kubernetes.io/component") == "flower")
    container = next(c for c in containers(flower, init=False) if (c.get("args") or [None])[0] == "flower")

    env = {item["name"]: item.get("value") for item in container.get("env") or []}
    config = {k: v for doc in of_kind(production, "ConfigMap") for k, v in (doc.get("data") or {}).items()}
    assert (env.get("FLOWER_URL_PREFIX") or config.get("FLOWER_URL_PREFIX")) == prefix
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert path.startswith(f"/{prefix}/"), f"{probe} asks {path}, Flower answers under /{prefix}/"


def test_network_policy_lets_prometheus_reach_what_the_monitors_scrape(production):
    # The scrapers do not come through the ingress controller: a port open only to ingressFrom is not scraped.
    values = merged_values(load_values("production-values.yaml"))
    ingress_from = values["networkPolicy"]["ingressFrom"]
    policies = [p for p in of_kind(production, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", [])]
    services = of_kind(production, "Service")
    assert policies

    scraped = []  # (pod workload, port name)
    for monitor in of_kind(production, "ServiceMonitor"):
        for service in (s for s in services if selector_matches(monitor["spec"]["selector"], labels(s))):
            for endpoint in monitor["spec"]["endpoints"]:
                port = next(p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"])
                for workload in (
                    w for w in workloads(production) if selector_matches(service["spec"]["selector"], pod_labels(w))
                ):
                    scraped.append((workload, port.get("targetPort", port["port"])))
    for monitor in of_kind(production, "PodMonitor"):
        for workload in (
            w for w in workloads(production) if selector_matches(monitor["spec"]["selector"], pod_labels(w))
        ):
            scraped.extend((workload, endpoint["port"]) for endpoint in monitor["spec"]["podMetricsEndpoints"])
    assert scraped

    blocked = []
    for workload, port in scraped:
        numbers = {port} | {
            p["containerPort"]
            for c in containers(workload, init=False)
            for p in c.get("ports") or []
            if p.get("name") == port
        }
        rules = [
            rule
            for policy in policies
            if selector_matches(policy["spec"]["podSelector"], pod_labels(workload))
            for rule in policy["spec"].get("ingress") or []
            if not rule.get("ports") or any(p.get("port") in numbers for p in rule["ports"])
        ]
        if not any(not rule.get("from") or rule["from"] != ingress_from for rule in rules):
            blocked.append(f"{name(workload)} port {port}")
    assert not blocked, f"scraped but closed to Prometheus by the NetworkPolicy: {blocked}"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_notes_tell_how_to_reach_the_api_admin_and_flower_through_rendered_objects(render_ci, ci_file):
    values = merged_values(load_values(ci_file))
    with helm_python.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(load_values(ci_file), name="demo", namespace="apps")
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    docs = render_ci(ci_file)
    rendered = {(doc["kind"], name(doc)) for doc in docs}

    assert "/api/docs" in notes
    assert "/admin/" in notes
    if values["flower"]["enabled"]:
        assert "Flower" in notes
    for kind, ref in re.findall(r"\b(service|deployment)/([a-z0-9-]+)", notes):
        assert (kind.capitalize(), ref) in rendered, f"NOTES.txt names {kind}/{ref}, which is not rendered"
    for ref, port in re.findall(r"service/([a-z0-9-]+) \d+:(\d+)", notes):
        service = next(doc for doc in of_kind(docs, "Service") if name(doc) == ref)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{ref} has no port {port}"
    for ref in re.findall(r"get secret ([a-z0-9-]+)", notes):
        assert ("Secret", ref) in rendered or ref == values["secrets"]["existingSecret"], ref
    if values["ingress"]["enabled"]:
        for host in values["ingress"]["hosts"]:
            assert f"https://{host['host']}/admin/" in notes or not values["ingress"]["tls"], notes


def test_each_disruption_budget_covers_exactly_one_workload(production):
    for pdb in of_kind(production, "PodDisruptionBudget"):
        selected = [name(w) for w in workloads(production) if selector_matches(pdb["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, f"{name(pdb)} covers {selected}"


def test_ingress_uses_the_class_field(production):
    class_name = merged_values(load_values("production-values.yaml"))["ingress"]["className"]

    for ingress in of_kind(production, "Ingress"):
        assert ingress["spec"].get("ingressClassName") == class_name
        assert "kubernetes.io/ingress.class" not in (ingress["metadata"].get("annotations") or {})


@pytest.mark.parametrize("ci_file", ["pools-values.yaml", "local-values.yaml", "production-values.yaml"])
def test_names_fit_kubernetes_limits_with_the_longest_release_name(ci_file):
    # Helm allows 53 characters; a Service name is a DNS label (63), a Job's name becomes a label
    # value of its pods (63), a StatefulSet's a controller-revision-hash label (name + 11).
    with helm_python.Chart.load(CHART_DIR) as chart:
        docs = parse_manifests(chart.render(load_values(ci_file), name="r" * 53, namespace="apps"))
    limits = {"Service": 63, "Job": 63, "StatefulSet": 52}

    too_long = [
        f"{doc['kind']} {name(doc)} ({len(name(doc))})" for doc in docs if len(name(doc)) > limits.get(doc["kind"], 253)
    ]
    too_long += [
        f"{doc['kind']} {name(doc)} label {key}"
        for doc in docs
        for key, value in labels(doc).items()
        if len(str(value)) > 63
    ]
    seen = [(doc["kind"], name(doc)) for doc in docs]
    too_long += [f"two {kind} objects named {ref}" for kind, ref in sorted(set(seen)) if seen.count((kind, ref)) > 1]
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_no_two_objects_share_a_kind_and_name(render_ci, ci_file):
    seen = [(doc["kind"], name(doc)) for doc in render_ci(ci_file)]

    assert len(seen) == len(set(seen)), sorted({key for key in seen if seen.count(key) > 1})


def test_log_format_and_sentry_reach_every_pod_through_config_and_secret(minimal_values):
    import base64

    def settings(docs) -> dict:
        """Every app ConfigMap and Secret (the migrate hook has copies) merged: one value each."""
        found: dict[str, set] = {}
        for doc in of_kind(docs, "ConfigMap"):
            for key in ("LOG_FORMAT", "SENTRY_ENVIRONMENT", "SENTRY_TRACES_SAMPLE_RATE"):
                if key in doc["data"]:
                    found.setdefault(key, set()).add(doc["data"][key])
        for doc in of_kind(docs, "Secret"):
            if "SENTRY_DSN" in doc["data"]:
                found.setdefault("SENTRY_DSN", set()).add(base64.b64decode(doc["data"]["SENTRY_DSN"]).decode())
        return found

    overrides = {
        "config": {"logFormat": "console", "sentryEnvironment": "staging", "sentryTracesSampleRate": 0.1},
        "secrets": {"sentryDsn": "https://key@sentry.invalid/1"},
    }
    assert settings(render_chart(deep_merge(minimal_values, overrides))) == {
        "LOG_FORMAT": {"console"},
        "SENTRY_ENVIRONMENT": {"staging"},
        "SENTRY_TRACES_SAMPLE_RATE": {"0.1"},
        "SENTRY_DSN": {"https://key@sentry.invalid/1"},
    }
    # Defaults: JSON lines, and an empty DSN, which leaves Sentry off.
    assert settings(render_chart(minimal_values)) == {
        "LOG_FORMAT": {"json"},
        "SENTRY_ENVIRONMENT": {"production"},
        "SENTRY_TRACES_SAMPLE_RATE": {"0"},
        "SENTRY_DSN": {""},
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {"config": {"logFormat": "xml"}},
        {"secrets": {"sentryDsn": "not a url"}},
        {"config": {"sentryTracesSampleRate": 2}},
    ],
)
def test_the_schema_refuses_a_bad_log_format_or_sentry_value(minimal_values, overrides):
    with pytest.raises(Exception, match="schema"):
        render_chart(deep_merge(minimal_values, overrides))


def test_the_result_backend_url_reaches_the_secret_only_when_set(minimal_values):
    import base64

    def result_backends(docs) -> set:
        return {
            base64.b64decode(doc["data"]["RESULT_BACKEND_URL"]).decode()
            for doc in of_kind(docs, "Secret")
            if "RESULT_BACKEND_URL" in doc["data"]
        }

    url = "rediss://:secret@results.example:6380/0?ssl_cert_reqs=required"
    assert result_backends(render_chart(deep_merge(minimal_values, {"secrets": {"resultBackendUrl": url}}))) == {url}
    # Unset: the app derives it (the broker's Redis; the database beside RabbitMQ).
    assert result_backends(render_chart(minimal_values)) == set()
    with pytest.raises(Exception, match="schema"):
        render_chart(deep_merge(minimal_values, {"secrets": {"resultBackendUrl": "memcached://x"}}))


def app_settings(docs) -> dict:
    """The app's ConfigMap and Secret (the migrate hook's copies hold the same), decoded, merged."""
    import base64

    found = {}
    for doc in of_kind(docs, "ConfigMap"):
        found.update(doc.get("data") or {})
    for doc in of_kind(docs, "Secret"):
        found.update({key: base64.b64decode(value).decode() for key, value in (doc.get("data") or {}).items()})
    return found


def test_sentinel_values_give_the_master_name_and_the_sentinels_password(render_ci):
    values = load_values("sentinel-values.yaml")
    found = app_settings(render_ci("sentinel-values.yaml"))

    assert found["REDIS_SENTINEL_MASTER_NAME"] == "tasks"
    assert found["REDIS_SENTINEL_PASSWORD"] == "sentinel-password"
    assert found["CELERY_BROKER_URL"] == values["secrets"]["brokerUrl"]
    assert found["CACHE_URL"] == values["secrets"]["cacheUrl"]
    # Without Sentinel neither is set (the app's default master name is mymaster).
    assert not {"REDIS_SENTINEL_MASTER_NAME", "REDIS_SENTINEL_PASSWORD"} & set(
        app_settings(render_ci("minimal-values.yaml"))
    )


def test_keda_scales_a_sentinel_broker_on_the_projects_own_metrics():
    values = deep_merge(load_values("sentinel-values.yaml"), {"worker": {"keda": {"enabled": True}}})
    scaled = of_kind(render_chart(values), "ScaledObject")

    assert scaled
    assert {trigger["type"] for doc in scaled for trigger in doc["spec"]["triggers"]} == {"prometheus"}


SENTINEL_URL = "sentinel://:pw@sentinel-0:26379/0;sentinel://:pw@sentinel-1:26379/0"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secrets": {"brokerUrl": SENTINEL_URL}}, "set redisSentinel.enabled"),
        ({"secrets": {"resultBackendUrl": SENTINEL_URL}}, "set redisSentinel.enabled"),
        ({"redisSentinel": {"enabled": True}}, "no sentinel:// URL in secrets"),
        (
            {"redisSentinel": {"enabled": True}, "bundledRedis": {"enabled": True}, "secrets": {"brokerUrl": ""}},
            "the bundled Redis has no Sentinel",
        ),
    ],
)
def test_a_half_configured_sentinel_fails_the_render_naming_what_to_set(minimal_values, overrides, message):
    with pytest.raises(Exception, match=re.escape(message)):
        render_chart(deep_merge(minimal_values, overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"redisSentinel": {"masterName": ""}},
        {"redisSentinel": {"masterName": "two words"}},
        {"redisSentinel": {"hosts": []}},
    ],
)
def test_the_schema_refuses_a_bad_sentinel_value(minimal_values, overrides):
    with pytest.raises(Exception, match="schema"):
        render_chart(deep_merge(minimal_values, overrides))
