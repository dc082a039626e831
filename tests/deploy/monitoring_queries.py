"""Every PromQL expression the project ships or must satisfy, as (source, expression) pairs: the chart's
alerts and dashboard panels, and the celery-mixin's compiled alerts and dashboards. Dashboards carry
Grafana variables ($job, $queue_name, $__rate_interval...): `substitute` makes them plain PromQL, so the
chart tests can parse each one with promtool and a live Prometheus can run each one."""

import json
import re
from pathlib import Path

import yaml

from tests.deploy.conftest import CHART_DIR, deep_merge, load_values, of_kind, render_chart

DASHBOARDS_DIR = CHART_DIR / "files" / "dashboards"
# The celery-mixin as compiled upstream, unchanged (its SOURCE.md names the commit; MIT licence).
MIXIN_DIR = Path(__file__).resolve().parent / "celery-mixin"

# Values the chart's rules are rendered with: every alert on. allNamespaces drops the namespace
# matcher, so the expressions also select series scraped without the operator (no namespace label).
ALERT_VALUES = {"metrics": {"prometheusRule": {"enabled": True, "allNamespaces": True}}}

# Grafana variables as regexes selecting what the chart scrapes (the job names of its monitors); any
# cluster and namespace, or none: a Prometheus without the operator adds neither label.
DEFAULT_VARIABLES = {
    "datasource": "prometheus",
    "cluster": ".*",
    "namespace": ".*",
    "job": ".*celery.*",
    "celery_job": ".*celery.*",
    "web_job": "web",
    "queue_name": ".*",
    "task": ".+",
}
# Grafana's interval variables.
DEFAULT_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300"}

# label op "$var" (or "${var}", "${var:format}") where the whole value is one variable.
_WHOLE_VALUE = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"\$\{?(\w+)(?::\w+)?\}?"')
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expression: str, variables: dict | None = None, intervals: dict | None = None) -> str:
    """A dashboard expression as plain PromQL: each variable replaced by a regex, and an equality
    matcher on a variable (`namespace="$namespace"`) turned into a regex matcher, since the value is one."""
    values = DEFAULT_VARIABLES | (variables or {})
    durations = DEFAULT_INTERVALS | (intervals or {})

    def whole(match: re.Match) -> str:
        label, op, name = match.groups()
        if name not in values:
            return match.group(0)
        regex_op = {"=": "=~", "!=": "!~"}.get(op, op)
        return f'{label}{regex_op}"{values[name]}"'

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name.isdigit():  # a regex group reference ($1 in label_replace), not a variable
            return match.group(0)
        if name in durations:
            return durations[name]
        if name in values:
            return values[name]
        raise KeyError(f"no value for the Grafana variable ${name} in {expression!r}")

    return _VARIABLE.sub(one, _WHOLE_VALUE.sub(whole, expression))


# --- Alerts ------------------------------------------------------------------------------------


def chart_rule_groups(values: dict | None = None) -> dict:
    """The chart's PrometheusRule .spec (`groups: [...]`), as promtool and Prometheus read a rule file."""
    merged = deep_merge(deep_merge(load_values("minimal-values.yaml"), ALERT_VALUES), values or {})
    (rule,) = of_kind(render_chart(merged), "PrometheusRule")
    return rule["spec"]


def rule_queries(groups: dict, source: str) -> list[tuple[str, str]]:
    return [
        (f"{source}: {rule.get('alert') or rule.get('record')}", rule["expr"].strip())
        for group in groups["groups"]
        for rule in group["rules"]
    ]


def chart_alert_queries(values: dict | None = None) -> list[tuple[str, str]]:
    return rule_queries(chart_rule_groups(values), "chart alert")


def mixin_alert_queries(mixin_dir: Path = MIXIN_DIR) -> list[tuple[str, str]]:
    return rule_queries(yaml.safe_load((mixin_dir / "prometheus_alerts.yaml").read_text()), "celery-mixin alert")


# --- Dashboards --------------------------------------------------------------------------------


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels and the old `rows` layout included; rows themselves left out."""
    found = []
    pending = list(dashboard.get("panels") or []) + [p for row in dashboard.get("rows") or [] for p in row["panels"]]
    while pending:
        panel = pending.pop(0)
        pending.extend(panel.get("panels") or [])
        if panel.get("type") != "row":
            found.append(panel)
    return found


def dashboard_queries(path: Path, source: str) -> list[tuple[str, str]]:
    """(source, raw expression with Grafana variables) of every target of every panel."""
    dashboard = json.loads(path.read_text())
    return [
        (f"{source} {path.name}: {panel.get('title')} [{target.get('refId')}]", target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def chart_dashboard_queries() -> list[tuple[str, str]]:
    return [q for path in sorted(DASHBOARDS_DIR.glob("*.json")) for q in dashboard_queries(path, "chart dashboard")]


def mixin_dashboard_queries(mixin_dir: Path = MIXIN_DIR) -> list[tuple[str, str]]:
    return [
        q
        for path in sorted((mixin_dir / "dashboards").glob("*.json"))
        for q in dashboard_queries(path, "celery-mixin dashboard")
    ]


def all_queries(variables: dict | None = None, intervals: dict | None = None) -> list[tuple[str, str]]:
    """Every expression, dashboards' already substituted: what a live Prometheus must answer with data."""
    dashboards = chart_dashboard_queries() + mixin_dashboard_queries()
    return (
        chart_alert_queries()
        + mixin_alert_queries()
        + [(source, substitute(expression, variables, intervals)) for source, expression in dashboards]
    )
