"""The chart's KEDA ScaledObjects: one per pool on its own Deployment, scaling on the pool's real
backlog. On Redis a Prometheus query adds the tasks waiting in the pool's queues (beat's
celery_queue_length, every priority list) to those running on its workers
(celery_worker_tasks_active), and promtool proves the number it returns; on RabbitMQ one trigger
sums ready plus unacknowledged messages of the pool's queues. A pod KEDA removes finishes its
tasks: its grace period covers the longest time limit of any task its queues carry."""

import re
import subprocess

import helm_python
import pytest
import yaml

from tests.deploy.conftest import (
    NAMESPACE,
    POOL_LABEL,
    PROMTOOL,
    deep_merge,
    labels,
    load_values,
    main_container,
    merged_values,
    name,
    needs_promtool,
    of_kind,
    pod_labels,
    pod_spec,
    render_chart,
)

KEDA_ON = {"worker": {"keda": {"enabled": True}}}
RABBITMQ = {
    "secrets": {"brokerUrl": "amqp://celery:broker-password@rabbitmq.example.internal:5672/app"},
    "worker": {"keda": {"enabled": True, "authenticationRef": "rabbitmq-management"}},
}


def scaled_objects_by_pool(docs: list[dict]) -> dict[str, dict]:
    """Each ScaledObject by the pool of the worker Deployment it scales."""
    deployments = {name(d): d for d in of_kind(docs, "Deployment")}
    found = {}
    for scaled in of_kind(docs, "ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        found[pod_labels(target)[POOL_LABEL]] = scaled
    return found


def only_trigger(scaled: dict) -> dict:
    # Several triggers would not add up: the HPA scales on each alone and takes the largest.
    (trigger,) = scaled["spec"]["triggers"]
    return trigger


def pools(values: dict) -> dict[str, dict]:
    return {pool["name"]: pool for pool in merged_values(values)["workerPools"]}


def pool_keda(values: dict, pool: dict) -> dict:
    return deep_merge(merged_values(values)["worker"]["keda"], pool.get("keda") or {})


def refusal(values: dict) -> str:
    with pytest.raises(helm_python.HelmError) as raised:
        render_chart(values)
    return str(raised.value)


@pytest.fixture(scope="module")
def pools_on_redis() -> tuple[dict, list[dict]]:
    """Three pools, one of them on two queues, every one scaled by KEDA, on a Redis broker."""
    values = deep_merge(load_values("pools-values.yaml"), KEDA_ON)
    return values, render_chart(values)


# --- Every pool, its own Deployment -----------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_every_pool_is_scaled_by_one_scaled_object_of_its_own(pools_on_redis, broker):
    values, docs = pools_on_redis
    if broker == "rabbitmq":
        values = deep_merge(values, RABBITMQ)
        docs = render_chart(values)

    scaled = scaled_objects_by_pool(docs)

    assert set(scaled) == set(pools(values))
    assert len(of_kind(docs, "ScaledObject")) == len(scaled)
    for pool, doc in scaled.items():
        assert labels(doc)[POOL_LABEL] == pool
        keda = pool_keda(values, pools(values)[pool])
        assert doc["spec"]["minReplicaCount"] == keda["minReplicaCount"]
        assert doc["spec"]["maxReplicaCount"] == keda["maxReplicaCount"]
        assert doc["spec"]["pollingInterval"] == keda["pollingInterval"]
        assert doc["spec"]["cooldownPeriod"] == keda["cooldownPeriod"]
        behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == keda["scaleDownStabilizationSeconds"]


# --- Redis (and any broker): the project's metrics through Prometheus ---------------------------


def test_on_redis_the_trigger_is_one_prometheus_query_per_pool(render_ci):
    values = load_values("production-values.yaml")
    scaled = scaled_objects_by_pool(render_ci("production-values.yaml"))
    assert scaled

    for pool_name, doc in scaled.items():
        keda = pool_keda(values, pools(values)[pool_name])
        trigger = only_trigger(doc)
        assert trigger["type"] == "prometheus"
        metadata = trigger["metadata"]
        assert metadata["serverAddress"] == keda["prometheus"]["serverAddress"]
        assert metadata["threshold"] == str(keda["tasksPerReplica"])
        # An empty answer (beat down) must not read as an empty backlog.
        assert metadata["ignoreNullValues"] == "false"
        assert "celery_queue_length" in metadata["query"]
        assert "celery_worker_tasks_active" in metadata["query"]


def test_the_query_selects_the_release_namespace_and_the_pod_monitors_job_names(pools_on_redis):
    values, docs = pools_on_redis
    monitors = render_chart(deep_merge(values, {"metrics": {"podMonitor": {"enabled": True}}}))
    jobs = {
        labels(monitor)["app.kubernetes.io/component"]: relabel["replacement"]
        for monitor in of_kind(monitors, "PodMonitor")
        for relabel in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
        if relabel["targetLabel"] == "job"
    }

    for doc in scaled_objects_by_pool(docs).values():
        query = only_trigger(doc)["metadata"]["query"]
        assert f'celery_queue_length{{namespace="{NAMESPACE}", job="{jobs["beat"]}",' in query
        assert f'celery_worker_tasks_active{{namespace="{NAMESPACE}", job="{jobs["worker"]}",' in query


def test_the_query_selects_the_worker_names_of_its_own_pool_only(pools_on_redis):
    # celery_worker_tasks_active is labelled with the worker's name, which the image's entrypoint
    # makes ${CELERY_WORKER_NAME}@<pod hostname>; the chart sets CELERY_WORKER_NAME to the pool.
    from tests.processes import REPO_ROOT

    entrypoint = (REPO_ROOT / "deploy" / "image" / "entrypoint.sh").read_text()
    assert '--hostname "${CELERY_WORKER_NAME:-worker}@%h"' in entrypoint
    _, docs = pools_on_redis
    deployments = {name(d): d for d in of_kind(docs, "Deployment")}

    for pool_name, doc in scaled_objects_by_pool(docs).items():
        deployment = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        env = {item["name"]: item.get("value") for item in main_container(deployment)["env"]}
        hostname = f"{env['CELERY_WORKER_NAME']}@{name(deployment)}-7d9f-a"
        (selector,) = re.findall(r'hostname=~"([^"]+)"', only_trigger(doc)["metadata"]["query"])
        assert re.fullmatch(selector, hostname), (selector, hostname)
        others = [f"{other}@{name(deployment)}-7d9f-a" for other in scaled_objects_by_pool(docs) if other != pool_name]
        assert not any(re.fullmatch(selector, other) for other in others), (selector, others)


def test_a_queue_name_is_matched_literally(minimal_values):
    values = deep_merge(minimal_values, {**KEDA_ON, "workerPools": [{"name": "reports", "queues": ["reports.high"]}]})

    (doc,) = of_kind(render_chart(values), "ScaledObject")

    assert r'queue_name=~"reports\\.high"' in only_trigger(doc)["metadata"]["query"]


def test_prometheus_credentials_come_from_a_trigger_authentication(minimal_values):
    auth = {"authenticationRef": "prometheus-auth", "prometheus": {"authModes": "bearer"}}
    values = deep_merge(minimal_values, {"worker": {"keda": {"enabled": True, **auth}}})

    for doc in of_kind(render_chart(values), "ScaledObject"):
        trigger = only_trigger(doc)
        assert trigger["authenticationRef"] == {"name": "prometheus-auth"}
        assert trigger["metadata"]["authModes"] == "bearer"


def test_without_beat_the_prometheus_trigger_is_refused(minimal_values):
    message = refusal(deep_merge(minimal_values, {**KEDA_ON, "beat": {"enabled": False}}))

    assert "celery_queue_length" in message, message
    assert "beat" in message, message


def write_promtool_test(directory, queries: dict[str, str], input_series: list[dict], cases: list[dict]):
    """A promtool unit test file evaluating each pool's query over the series at each case's time."""
    tests = [
        {
            "name": case["name"],
            "interval": "1m",
            "input_series": input_series,
            "promql_expr_test": [
                {
                    "expr": queries[pool],
                    "eval_time": case["at"],
                    "exp_samples": [] if expected is None else [{"labels": "{}", "value": expected}],
                }
                for pool, expected in case["expected"].items()
            ],
        }
        for case in cases
    ]
    path = directory / "keda-backlog.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    return path


@needs_promtool
def test_promtool_proves_the_number_keda_sees_is_waiting_plus_running_tasks_of_the_pool(tmp_path, pools_on_redis):
    # The series as the PodMonitors label them: beat's queue lengths (already the sum of every
    # priority list of a Redis queue) and each worker's running tasks by its <pool>@<pod> name.
    _, docs = pools_on_redis
    queries = {pool: only_trigger(doc)["metadata"]["query"] for pool, doc in scaled_objects_by_pool(docs).items()}
    assert set(queries) == {"default", "long", "reports"}

    def waiting(queue: str, values: str, namespace: str = NAMESPACE, pod: str = "beat-a") -> dict:
        labels_ = f'namespace="{namespace}", job="celery-exporter", pod="{pod}", queue_name="{queue}"'
        return {"series": f"celery_queue_length{{{labels_}}}", "values": values}

    def running(hostname: str, values: str, namespace: str = NAMESPACE) -> dict:
        labels_ = (
            f'namespace="{namespace}", job="celery", worker_pool="{hostname.split("@")[0]}", hostname="{hostname}"'
        )
        return {"series": f"celery_worker_tasks_active{{{labels_}}}", "values": values}

    series = [
        # Minutes 0-4: a backlog; from 10: no worker series (the pool scaled to zero; a series
        # gone is still read for Prometheus's 5-minute lookback); from 20: beat gone too.
        waiting("default", "7x14"),
        waiting("default", "7x4", pod="beat-b"),  # beat's replacement, scraped beside it: not twice
        waiting("long", "3x14"),
        waiting("reports", "4x14"),
        waiting("default.dead-letter", "100x30"),  # other queues, whatever their names share
        waiting("defaults", "50x30"),
        waiting("default", "1000x30", namespace="other"),
        running("default@demo-django-celery-k8s-worker-default-7d9f-a", "2x4"),
        running("default@demo-django-celery-k8s-worker-default-7d9f-b", "1x4"),
        running("long@demo-django-celery-k8s-worker-long-5c4b-a", "1x4"),
        running("reports@demo-django-celery-k8s-worker-reports-6f8d-a", "2x4"),
        running("default-eu@demo-django-celery-k8s-worker-default-eu-1a2b-a", "5x30"),
        running("default@someone-elses-worker", "9x30", namespace="other"),
    ]
    cases = [
        # default: 7 waiting + 2 + 1 running; long: 3 + 1; reports: its two queues (4 + 3) + 2.
        {"name": "waiting plus running, per pool", "at": "3m", "expected": {"default": 10, "long": 4, "reports": 9}},
        {"name": "a pool at zero pods: its waiting tasks", "at": "11m", "expected": {"default": 7, "long": 3, "reports": 7}},
        {"name": "no queue lengths: no answer, not 0", "at": "25m", "expected": dict.fromkeys(queries)},
    ]  # fmt: skip
    test_file = write_promtool_test(tmp_path, queries, series, cases)

    run = subprocess.run([PROMTOOL, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout, run.stdout


# --- RabbitMQ: its own count of ready plus unacknowledged messages -----------------------------


@pytest.mark.parametrize(
    ("broker_url", "management_url"),
    [
        (
            "amqp://celery:broker-password@rabbitmq.example.internal:5672/app",
            "http://rabbitmq.example.internal:15672/app",
        ),
        (
            "amqps://celery:broker-password@rabbitmq.example.internal:5671/app",
            "https://rabbitmq.example.internal:15671/app",
        ),
        ("amqp://celery:broker-password@rabbitmq.example.internal", "http://rabbitmq.example.internal:15672/"),
    ],
)
def test_on_rabbitmq_one_trigger_counts_ready_and_unacknowledged_messages_of_the_pools_queues(
    pools_on_redis, broker_url, management_url
):
    values = deep_merge(deep_merge(pools_on_redis[0], RABBITMQ), {"secrets": {"brokerUrl": broker_url}})

    scaled = scaled_objects_by_pool(render_chart(values))

    for pool_name, doc in scaled.items():
        pool = pools(values)[pool_name]
        trigger = only_trigger(doc)
        metadata = trigger["metadata"]
        assert trigger["type"] == "rabbitmq"
        # The management API: its count is ready + unacknowledged (the AMQP protocol sees ready only).
        assert metadata["protocol"] == "http"
        assert metadata["mode"] == "QueueLength"
        assert metadata["excludeUnacknowledged"] == "false"
        assert metadata["value"] == str(pool_keda(values, pool)["tasksPerReplica"])
        assert (metadata["useRegex"], metadata["operation"]) == ("true", "sum")
        queue_regex = re.compile(metadata["queueName"])
        for queue in pool["queues"]:
            assert queue_regex.search(queue), (pool_name, queue)
            assert not queue_regex.search(f"{queue}.dead-letter"), "a dead-letter queue is not backlog"
        assert not queue_regex.search("celeryev.2f1c"), "Celery's event queues are not backlog"
        others = {q for other in pools(values).values() for q in other["queues"]} - set(pool["queues"])
        assert not any(queue_regex.search(queue) for queue in others), (pool_name, others)
        # The address holds no password: that comes from the TriggerAuthentication.
        assert metadata["host"] == management_url
        assert trigger["authenticationRef"] == {"name": "rabbitmq-management"}


def test_rabbitmq_management_url_can_be_given(minimal_values):
    url = "https://rabbitmq-mgmt.example.internal/api-vhost"
    values = deep_merge(
        deep_merge(minimal_values, RABBITMQ), {"worker": {"keda": {"rabbitmq": {"managementUrl": url}}}}
    )

    for doc in of_kind(render_chart(values), "ScaledObject"):
        assert only_trigger(doc)["metadata"]["host"] == url


def test_rabbitmq_without_a_trigger_authentication_is_refused(minimal_values):
    values = deep_merge(minimal_values, RABBITMQ)
    values["worker"]["keda"]["authenticationRef"] = ""

    assert "keda.authenticationRef" in refusal(values)


def test_rabbitmq_from_an_existing_secret_needs_the_management_url():
    values = deep_merge(
        load_values("existing-secret-values.yaml"),
        {"worker": {"keda": {**RABBITMQ["worker"]["keda"], "trigger": "rabbitmq"}}},
    )

    assert "keda.rabbitmq.managementUrl" in refusal(values)


def test_the_prometheus_trigger_can_be_chosen_on_rabbitmq(minimal_values):
    values = deep_merge(deep_merge(minimal_values, RABBITMQ), {"worker": {"keda": {"trigger": "prometheus"}}})

    for doc in of_kind(render_chart(values), "ScaledObject"):
        assert only_trigger(doc)["type"] == "prometheus"


@pytest.mark.parametrize(
    "keda",
    [
        {"listLength": 10},
        {"trigger": "redis"},
        {"tasksPerReplica": 0},
        {"rabbitmq": {"managementUrl": "http://u:p@h/"}},
    ],
    ids=["the-old-listLength", "unknown-trigger", "zero-tasks-per-replica", "credentials-in-the-url"],
)
def test_the_schema_refuses_a_wrong_keda_value(minimal_values, keda):
    message = refusal(deep_merge(minimal_values, {"worker": {"keda": keda}}))

    assert "/worker/keda" in message, message


# --- Scale-down never cuts a running task -------------------------------------------------------


def longest_time_limit(queues: list[str]) -> tuple[float, str]:
    """The longest hard time limit of a task these queues may carry: any task sent to them by
    name gets the default limit, and the tasks routed to them their own."""
    from app.routing import routed_queue
    from project.celery import app

    app.loader.import_default_modules()
    longest, which = float(app.conf.task_time_limit), "the default time limit"
    for task_name, task in app.tasks.items():
        if routed_queue(task_name) in queues and (task.time_limit or 0) > longest:
            longest, which = float(task.time_limit), task_name
    return longest, which


@pytest.mark.parametrize("values_file", ["production-values.yaml", "pools-values.yaml"])
def test_a_pod_keda_removes_has_the_time_to_finish_its_longest_task(values_file):
    # KEDA's HPA removes a pod with SIGTERM: Celery's warm shutdown stops taking tasks and waits
    # for the running ones, each of which ends by its own time limit at the latest (the soft one
    # first). Kubernetes must not SIGKILL the pod before that.
    from django.conf import settings

    values = deep_merge(load_values(values_file), KEDA_ON)
    docs = render_chart(values)
    config = next(d for d in of_kind(docs, "ConfigMap") if "CELERY_TASK_TIME_LIMIT" in (d.get("data") or {}))
    # The app's task registry carries these limits: the release's must be the same.
    for setting in ("CELERY_TASK_TIME_LIMIT", "CELERY_LONG_TASK_TIME_LIMIT", "CELERY_LONG_QUEUE"):
        assert config["data"][setting] == str(getattr(settings, setting)), setting
    deployments = {name(d): d for d in of_kind(docs, "Deployment")}
    scaled = scaled_objects_by_pool(docs)
    assert scaled

    for pool_name, doc in scaled.items():
        deployment = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        longest, task = longest_time_limit(pools(values)[pool_name]["queues"])
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace >= longest, f"pool {pool_name}: {grace} s of grace, but {task} may run {longest} s"


def test_a_pool_whose_grace_period_would_cut_its_tasks_is_refused(minimal_values):
    pool = {"name": "long", "queues": ["long"], "longestTaskSeconds": 60, "keda": {"enabled": True}}

    message = refusal(deep_merge(minimal_values, {"workerPools": [pool]}))

    assert "longestTaskSeconds" in message, message
