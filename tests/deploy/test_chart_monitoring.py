"""The chart's monitoring: every Celery role and web expose a `metrics` port that a PodMonitor or the
ServiceMonitor scrapes under a fixed job name (the celery-mixin selects `job=~".*celery.*"`), the
NetworkPolicy lets only metricsFrom reach it, the alerts pass `promtool check rules` and the unit tests
in tests/deploy/promtool/, each has a runbook, and every dashboard panel has a query that parses."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import monitoring_queries
from tests.deploy.conftest import (
    CHART_DIR,
    COMPONENT_LABEL,
    NAMESPACE,
    PROMTOOL,
    deep_merge,
    labels,
    load_values,
    main_container,
    merged_values,
    name,
    needs_promtool,
    of_kind,
    parse_manifests,
    pod_labels,
    render_chart,
    selector_matches,
    workloads,
)
from tests.processes import REPO_ROOT

PROMTOOL_DIR = Path(__file__).parent / "promtool"
RUNBOOKS = CHART_DIR / "RUNBOOKS.md"
DASHBOARDS = sorted(monitoring_queries.DASHBOARDS_DIR.glob("*.json"))

# The scrape job names of the shared contract; the celery-mixin's selector must match the Celery ones.
JOBS = {"worker": "celery", "beat": "celery-exporter", "flower": "celery-flower", "web": "web"}
MIXIN_JOB = re.compile(r".*celery.*")
ALERTS = {
    "CeleryWorkerDown",
    "CeleryTaskHighFailRate",
    "CeleryQueueBacklogGrowing",
    "CeleryTasksDeadLettered",
    "CeleryTaskRuntimeP95High",
    "CeleryBeatNotTicking",
    "CeleryTaskHistoryBehind",
    "CeleryHealthCheckCanaryFailing",
    "WebHighErrorRate",
    "WebHighLatencyP95",
}
# What the processes export (app/monitoring/metrics.py, the beat and web metrics; django-prometheus for web).
EXPORTED = {
    *(f"celery_task_{event}_total" for event in ("sent", "received", "started", "succeeded", "failed", "retried")),
    *(f"celery_task_{event}_total" for event in ("revoked", "rejected")),
    "celery_task_runtime",
    "celery_task_queue_wait_time",
    "celery_worker_tasks_active",
    "celery_worker_up",
    "celery_queue_length",
    "django_celery_k8s_beat_last_tick_timestamp_seconds",
    "django_celery_k8s_beat_schedule_runs_total",
    "django_celery_k8s_beat_schedule_errors_total",
    "django_celery_k8s_health_check_last_success_timestamp_seconds",
    "django_http_requests_total_by_method_total",
    "django_http_responses_total_by_status_total",
    "django_http_requests_latency_seconds_by_view_method",
}
MONITORING_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboards": {"enabled": True},
    }
}


def render(overrides: dict | None = None, base: str = "production-values.yaml") -> list[dict]:
    return render_chart(deep_merge(deep_merge(load_values(base), MONITORING_ON), overrides or {}))


@pytest.fixture(scope="module")
def production():
    return render()


def monitor_of(docs: list[dict], component: str) -> dict:
    kind = "ServiceMonitor" if component == "web" else "PodMonitor"
    (monitor,) = [doc for doc in of_kind(docs, kind) if labels(doc).get(COMPONENT_LABEL) == component]
    return monitor


def endpoints(monitor: dict) -> list[dict]:
    return monitor["spec"].get("podMetricsEndpoints") or monitor["spec"].get("endpoints")


def job_relabel(endpoint: dict) -> str:
    """The fixed job an endpoint's relabeling sets (no source labels: a constant replacement)."""
    (rule,) = [r for r in endpoint.get("relabelings") or [] if r.get("targetLabel") == "job"]
    assert not rule.get("sourceLabels"), rule
    assert rule.get("action", "replace") == "replace", rule
    return rule["replacement"]


def env_of(container: dict) -> dict:
    return {item["name"]: item.get("value") for item in container.get("env") or []}


def port_named(container: dict, port_name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port_name), None)


def rule_spec(docs: list[dict]) -> dict:
    (rule,) = of_kind(docs, "PrometheusRule")
    return rule["spec"]


def alerts(spec: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- Ports and environment ------------------------------------------------------------------------


def test_workers_and_beat_serve_metrics_on_a_named_port_from_celery_metrics_port(production):
    port = merged_values(load_values("production-values.yaml"))["metrics"]["port"]
    celery = workloads(production, "worker", "beat")
    assert {pod_labels(w)[COMPONENT_LABEL] for w in celery} == {"worker", "beat"}

    for workload in celery:
        container = main_container(workload)
        assert port_named(container, "metrics") == port, name(workload)
        assert env_of(container)["CELERY_METRICS_PORT"] == str(port), name(workload)


def test_web_serves_metrics_on_a_second_port_that_its_service_names(production):
    port = merged_values(load_values("production-values.yaml"))["metrics"]["port"]
    (web,) = workloads(production, "web")
    container = main_container(web)
    (service,) = [s for s in of_kind(production, "Service") if labels(s).get(COMPONENT_LABEL) == "web"]

    assert port_named(container, "metrics") == port
    assert port_named(container, "http") != port
    assert env_of(container)["WEB_METRICS_PORT"] == str(port)
    assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]


def test_the_web_service_gets_the_metrics_port_only_for_the_service_monitor():
    docs = render({"metrics": {"serviceMonitor": {"enabled": False}}})
    (service,) = [s for s in of_kind(docs, "Service") if labels(s).get(COMPONENT_LABEL) == "web"]

    # A NodePort or LoadBalancer web Service would publish every port it has.
    assert [port["name"] for port in service["spec"]["ports"]] == ["http"]


def test_metrics_port_follows_the_value():
    docs = render({"metrics": {"port": 9911}})

    for workload in workloads(docs, "worker", "beat", "web"):
        assert port_named(main_container(workload), "metrics") == 9911, name(workload)


# --- Monitors -------------------------------------------------------------------------------------


def test_the_worker_pod_monitor_scrapes_every_pool_on_its_metrics_port(production):
    pools = {pool["name"] for pool in merged_values(load_values("production-values.yaml"))["workerPools"]}
    monitor = monitor_of(production, "worker")
    selected = [w for w in workloads(production) if selector_matches(monitor["spec"]["selector"], pod_labels(w))]

    assert {pod_labels(w)[COMPONENT_LABEL] for w in selected} == {"worker"}
    assert {pod_labels(w)["app.kubernetes.io/worker-pool"] for w in selected} == pools
    assert [e["port"] for e in endpoints(monitor)] == ["metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@pytest.mark.parametrize("component", ["beat", "flower"])
def test_beat_and_flower_pod_monitors_select_only_their_pod_and_its_metrics_port(production, component):
    monitor = monitor_of(production, component)
    selected = [w for w in workloads(production) if selector_matches(monitor["spec"]["selector"], pod_labels(w))]
    (endpoint,) = endpoints(monitor)

    assert [pod_labels(w)[COMPONENT_LABEL] for w in selected] == [component]
    # Flower's too: its metrics listener (FLOWER_METRICS_PORT) serves /metrics without credentials
    # and without FLOWER_URL_PREFIX; its public port's /metrics asks for them.
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert port_named(main_container(selected[0]), "metrics")


def test_the_web_service_monitor_scrapes_the_metrics_port_not_the_public_one(production):
    monitor = monitor_of(production, "web")
    services = [s for s in of_kind(production, "Service") if selector_matches(monitor["spec"]["selector"], labels(s))]

    assert [labels(s)[COMPONENT_LABEL] for s in services] == ["web"]
    assert [e["port"] for e in endpoints(monitor)] == ["metrics"]


@pytest.mark.parametrize("component", sorted(JOBS))
def test_each_monitor_sets_the_contract_job_name(production, component):
    (endpoint,) = endpoints(monitor_of(production, component))

    job = job_relabel(endpoint)

    assert job == JOBS[component]
    assert bool(MIXIN_JOB.fullmatch(job)) == (component != "web")


def test_job_names_do_not_depend_on_the_release_name():
    import helm_python

    with helm_python.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(
            deep_merge(load_values("minimal-values.yaml"), MONITORING_ON), name="shop", namespace="a"
        )
    docs = parse_manifests(manifests)

    assert {job_relabel(e) for m in of_kind(docs, "PodMonitor", "ServiceMonitor") for e in endpoints(m)} == set(
        JOBS.values()
    )


def test_a_celery_job_name_without_celery_is_refused_at_install():
    with pytest.raises(Exception, match="celery"):
        render({"metrics": {"podMonitor": {"worker": {"job": "workers"}}}})


@pytest.mark.parametrize(
    "overrides",
    [
        {"metrics": {"prometheusRule": {"alerts": {"webHighErrorRate": {"for": "5 minutes"}}}}},
        {"metrics": {"prometheusRule": {"alerts": {"webHighErrorRate": {"ratio": 5}}}}},
        {"metrics": {"prometheusRule": {"alerts": {"celeryWorkerDown": {"severity": "page"}}}}},
        {"metrics": {"podMonitor": {"beat": {"jobName": "celery-exporter"}}}},
    ],
    ids=["duration", "ratio", "severity", "typo"],
)
def test_the_schema_refuses_a_malformed_monitoring_value(overrides):
    with pytest.raises(Exception, match="schema"):
        render(overrides)


def test_the_worker_pool_becomes_a_label_of_the_workers_series(production):
    (endpoint,) = endpoints(monitor_of(production, "worker"))

    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_worker_pool"],
        "targetLabel": "worker_pool",
    } in endpoint["relabelings"]


def test_without_beat_and_flower_their_monitors_and_beat_alerts_are_not_rendered():
    # KEDA off too: its Prometheus trigger reads beat's queue lengths (refused without beat).
    no_keda = {"worker": {"keda": {"enabled": False}}}
    docs = render({"beat": {"enabled": False}, "flower": {"enabled": False}, **no_keda})

    components = {labels(m).get(COMPONENT_LABEL) for m in of_kind(docs, "PodMonitor")}
    assert components == {"worker"}
    # celery_worker_up and celery_queue_length come only from beat, and beat sends the canary.
    assert set(alerts(rule_spec(docs))) & ALERTS == ALERTS - {
        "CeleryWorkerDown",
        "CeleryQueueBacklogGrowing",
        "CeleryTasksDeadLettered",
        "CeleryBeatNotTicking",
        "CeleryTaskHistoryBehind",
        "CeleryHealthCheckCanaryFailing",
    }


def test_the_canary_alert_follows_the_canary_interval_and_switch():
    slow = alerts(rule_spec(render({"canary": {"interval": 120}})))["CeleryHealthCheckCanaryFailing"]
    set_age = alerts(
        rule_spec(
            render(
                {"metrics": {"prometheusRule": {"alerts": {"celeryHealthCheckCanaryFailing": {"maxAgeSeconds": 90}}}}}
            )
        )
    )
    without = alerts(rule_spec(render({"canary": {"enabled": False}})))

    assert "> 600\n" in slow["expr"]
    assert "> 90\n" in set_age["CeleryHealthCheckCanaryFailing"]["expr"]
    assert "CeleryHealthCheckCanaryFailing" not in without


def test_each_role_can_be_left_unscraped():
    docs = render({"metrics": {"podMonitor": {"worker": {"enabled": False}, "flower": {"enabled": False}}}})

    assert {labels(m).get(COMPONENT_LABEL) for m in of_kind(docs, "PodMonitor")} == {"beat"}


# --- NetworkPolicy --------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["worker", "beat", "web", "flower"])
def test_network_policy_opens_the_metrics_port_to_metrics_from_only(production, component):
    values = merged_values(load_values("production-values.yaml"))
    port, metrics_from = values["metrics"]["port"], values["networkPolicy"]["metricsFrom"]
    assert metrics_from
    policies = [p for p in of_kind(production, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]]

    for workload in workloads(production, component):
        rules = [
            rule
            for policy in policies
            if selector_matches(policy["spec"]["podSelector"], pod_labels(workload))
            for rule in policy["spec"].get("ingress") or []
            if any(p.get("port") == port for p in rule.get("ports") or [])
        ]
        assert rules, f"{name(workload)}: nothing may reach port {port}"
        assert all(rule.get("from") == metrics_from for rule in rules), rules


# --- Alerts ---------------------------------------------------------------------------------------


def test_the_chart_ships_every_alert_with_summary_description_severity_and_runbook(production):
    rules = alerts(rule_spec(production))

    assert ALERTS <= set(rules)
    for alert in ALERTS:
        rule = rules[alert]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, alert
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), alert
        assert rule["annotations"]["runbook_url"].endswith(f"RUNBOOKS.md#{alert.lower()}"), alert


def test_runbooks_have_one_section_per_alert_with_the_four_parts():
    text = RUNBOOKS.read_text()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))

    assert set(sections) == ALERTS
    for alert, body in sections.items():
        for part in ("What it means", "How to confirm", "Likely causes", "What to do"):
            assert f"**{part}.**" in body, f"{alert}: no '{part}'"


def test_alerts_select_the_release_namespace_unless_all_namespaces(production):
    scoped = alerts(rule_spec(production))
    unscoped = alerts(rule_spec(render({"metrics": {"prometheusRule": {"allNamespaces": True}}})))

    for alert in ALERTS:
        assert f'namespace="{NAMESPACE}"' in scoped[alert]["expr"], alert
        assert "namespace=" not in unscoped[alert]["expr"], alert


def test_thresholds_durations_and_severities_come_from_values():
    docs = render(
        {
            "metrics": {
                "prometheusRule": {
                    "alerts": {
                        "webHighErrorRate": {"ratio": 0.2, "window": "15m", "for": "1m", "severity": "warning"},
                        "celeryBeatNotTicking": {"maxTickAgeSeconds": 600},
                        "celeryTaskRuntimeP95High": {"enabled": False},
                    }
                }
            }
        }
    )
    rules = alerts(rule_spec(docs))

    web = rules["WebHighErrorRate"]
    assert "> 0.2" in web["expr"]
    assert "[15m]" in web["expr"]
    assert (web["for"], web["labels"]["severity"]) == ("1m", "warning")
    assert "> 600" in rules["CeleryBeatNotTicking"]["expr"]
    assert "CeleryTaskRuntimeP95High" not in rules


def test_own_rules_are_added_as_a_second_group(production):
    own = merged_values(load_values("production-values.yaml"))["metrics"]["prometheusRule"]["rules"]
    groups = rule_spec(production)["groups"]

    assert own
    assert groups[-1]["name"].endswith("-custom")
    assert groups[-1]["rules"] == own


@needs_promtool
@pytest.mark.parametrize("overrides", [{}, {"metrics": {"prometheusRule": {"allNamespaces": True}}}])
def test_rendered_rules_pass_promtool_check_rules(tmp_path, overrides):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule_spec(render(overrides))))

    run = promtool("check", "rules", str(rules_file))

    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(ALERTS) + 1} rules found" in run.stdout


@needs_promtool
def test_alerts_fire_when_they_should_and_stay_quiet_otherwise(tmp_path):
    # The default thresholds, release "demo" in namespace "apps": what the fixture's cases are written for.
    spec = monitoring_queries.chart_rule_groups({"metrics": {"prometheusRule": {"allNamespaces": False}}})
    (tmp_path / "prometheus-rules.yaml").write_text(yaml.safe_dump(spec))
    fixture = shutil.copy(PROMTOOL_DIR / "chart-alerts.test.yaml", tmp_path)
    tested = {
        case["alertname"]
        for test in yaml.safe_load(Path(fixture).read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == ALERTS

    run = promtool("test", "rules", Path(fixture).name, cwd=tmp_path)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


# --- Dashboards -----------------------------------------------------------------------------------


def test_the_dashboards_exist_as_json_with_unique_uids():
    boards = [json.loads(path.read_text()) for path in DASHBOARDS]

    assert {path.name for path in DASHBOARDS} == {"django-celery-overview.json", "django-celery-task.json"}
    assert len({board["uid"] for board in boards}) == len(boards)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_uses_a_datasource_variable_and_job_regexes(path):
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert MIXIN_JOB.fullmatch(variables["celery_job"]["allValue"])
    assert "celery" in variables["celery_job"]["regex"]
    for panel in monitoring_queries.panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_task_dashboard_drills_down_by_task_and_queue():
    path = monitoring_queries.DASHBOARDS_DIR / "django-celery-task.json"
    variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}

    assert variables["task"]["definition"] == "label_values(celery_task_started_total, name)"
    assert "queue_name" in variables
    for source, expression in monitoring_queries.dashboard_queries(path, "task"):
        assert 'name=~"$task"' in expression, source
        assert 'queue_name=~"$queue_name"' in expression, source


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_every_dashboard_panel_has_a_query(path):
    for panel in monitoring_queries.panels(json.loads(path.read_text())):
        assert [t for t in panel.get("targets") or [] if t.get("expr", "").strip()], panel["title"]


def test_dashboards_and_alerts_use_only_metrics_the_project_exports(production):
    queries = monitoring_queries.chart_dashboard_queries() + [
        ("alert", rule["expr"]) for rule in alerts(rule_spec(production)).values()
    ]
    names = {
        re.sub(r"_(bucket|sum|count)$", "", found)
        for _source, expression in queries
        for found in re.findall(r"(?<![\w$])((?:celery|django)_[a-z_]+)\b", expression)  # not $celery_job
    }

    assert names <= EXPORTED, names - EXPORTED


def test_the_dashboards_config_map_ships_every_dashboard_file(production):
    grafana = merged_values(load_values("production-values.yaml"))["metrics"]["grafanaDashboards"]
    (config_map,) = [
        doc
        for doc in of_kind(production, "ConfigMap")
        if labels(doc).get(grafana["sidecarLabel"]) == str(grafana["sidecarLabelValue"])
    ]

    assert set(config_map["data"]) == {path.name for path in DASHBOARDS}
    for path in DASHBOARDS:
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())


# --- Every query parses ---------------------------------------------------------------------------


def assert_all_parse(queries: list[tuple[str, str]], directory: Path) -> None:
    """promtool has no parse-only command for an expression: one recording rule per query does it."""
    rules = [{"record": f"query_{index}", "expr": expression} for index, (_source, expression) in enumerate(queries)]
    rules_file = directory / "queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))

    run = promtool("check", "rules", str(rules_file))

    if run.returncode != 0:
        failing = [
            source for index, (source, _expression) in enumerate(queries) if f"query_{index}" in run.stdout + run.stderr
        ]
        pytest.fail(f"{failing or 'queries'} do not parse:\n{run.stdout}{run.stderr}")
    assert f"SUCCESS: {len(queries)} rules found" in run.stdout


def test_substitute_leaves_plain_promql():
    expression = 'sum(rate(x{namespace="$namespace", job=~"$job", q=~"${queue_name:regex}"}[$__rate_interval]))'

    assert monitoring_queries.substitute(expression) == (
        'sum(rate(x{namespace=~".*", job=~".*celery.*", q=~".*"}[1m]))'
    )
    assert "$1" in monitoring_queries.substitute('label_replace(up, "a", "$1", "job", "(.*)")')


@needs_promtool
def test_every_chart_dashboard_query_and_alert_parses(tmp_path):
    queries = monitoring_queries.chart_alert_queries() + [
        (source, monitoring_queries.substitute(expression))
        for source, expression in monitoring_queries.chart_dashboard_queries()
    ]
    assert len(queries) > len(ALERTS)

    assert_all_parse(queries, tmp_path)


SHARED_MIXIN_DIR = REPO_ROOT.parent / "shared" / "peers" / "celery-mixin"


@pytest.mark.skipif(not SHARED_MIXIN_DIR.is_dir(), reason="no shared copy of the celery-mixin beside the repo")
def test_the_vendored_celery_mixin_is_the_shared_one_unchanged():
    vendored = sorted(
        p.relative_to(monitoring_queries.MIXIN_DIR) for p in monitoring_queries.MIXIN_DIR.rglob("*") if p.is_file()
    )
    shared = sorted(p.relative_to(SHARED_MIXIN_DIR) for p in SHARED_MIXIN_DIR.rglob("*") if p.is_file())
    assert vendored == shared
    for path in vendored:
        assert (monitoring_queries.MIXIN_DIR / path).read_bytes() == (SHARED_MIXIN_DIR / path).read_bytes(), path


@needs_promtool
def test_every_celery_mixin_query_parses_after_substitution(tmp_path):
    queries = monitoring_queries.mixin_alert_queries() + [
        (source, monitoring_queries.substitute(expression))
        for source, expression in monitoring_queries.mixin_dashboard_queries()
    ]
    assert queries

    assert_all_parse(queries, tmp_path)
