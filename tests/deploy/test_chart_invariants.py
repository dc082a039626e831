"""Invariants of the rendered chart, asserted on the parsed objects for every values file: one image,
resources and probes everywhere, locked-down pods, a singleton beat, stable selectors, grace periods that
cover running tasks, worker pools, the same settings for every role, and migrations before anything."""

import base64
import re
from urllib.parse import urlsplit

import helm_python
import pytest
import yaml

from tests.deploy.conftest import (
    APP_COMPONENTS,
    CHART_DIR,
    CI_FILES,
    COMPONENT_LABEL,
    COMPONENTS,
    LONG_RUNNING_KINDS,
    POOL_LABEL,
    command_line,
    component,
    containers,
    deep_merge,
    env_from_refs,
    labels,
    load_values,
    main_container,
    merged_values,
    name,
    of_kind,
    pod_component,
    pod_labels,
    pod_spec,
    pod_template,
    render_chart,
    selector_matches,
    workloads,
)

DEFAULT_IMAGE = "django-celery-k8s:0.1.0"
APP_UID = 10001
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", COMPONENT_LABEL, POOL_LABEL}


def app_workloads(docs):
    return [w for w in workloads(docs) if pod_component(w) in APP_COMPONENTS]


def app_deployments(docs):
    return [w for w in of_kind(docs, "Deployment") if pod_component(w) in APP_COMPONENTS]


def by_component(docs, wanted):
    return [w for w in workloads(docs) if pod_component(w) == wanted]


def queue_list(queues) -> list[str]:
    return [q.strip() for q in queues.split(",")] if isinstance(queues, str) else list(queues)


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env") or []}


def secret_data(secret: dict) -> dict[str, str]:
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def effective_env(docs, container: dict) -> dict[str, str]:
    """What the process sees: the ConfigMaps and Secrets of envFrom, then env (which wins)."""
    config_maps = {name(d): d.get("data") or {} for d in of_kind(docs, "ConfigMap")}
    secrets = {name(d): secret_data(d) for d in of_kind(docs, "Secret")}
    env = {}
    for kind, ref in sorted(env_from_refs(container)):
        env.update((config_maps if kind == "configMapRef" else secrets).get(ref, {}))
    for item in container.get("env") or []:
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source["configMapKeyRef"]
            found = (secrets if "secretKeyRef" in source else config_maps).get(ref["name"])
            # A key of an object the chart does not render (an existing Secret) is taken on trust.
            env[item["name"]] = found.get(ref["key"]) if found is not None else f"<{ref['name']}/{ref['key']}>"
        elif "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = f"<{next(iter(source), 'empty')}>"
    return env


# --- One image ------------------------------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_role_runs_the_one_image(render_ci, ci_file):
    docs = render_ci(ci_file)
    values = merged_values(load_values(ci_file))

    images = {(pod_component(w), c["name"]): c["image"] for w in app_workloads(docs) for c in containers(w)}
    assert {role for role, _ in images} >= {"web", "worker", "beat", "migrate"}
    assert len(set(images.values())) == 1, images
    image = values["image"]
    if not image.get("digest"):
        assert set(images.values()) == {f"{image['repository']}:{image.get('tag') or '0.1.0'}"}


def test_the_image_defaults_to_the_app_version(render_ci):
    docs = render_ci("minimal-values.yaml")

    assert {c["image"] for w in app_workloads(docs) for c in containers(w)} == {DEFAULT_IMAGE}


def test_the_image_follows_repository_tag_and_pull_policy(minimal_values):
    values = deep_merge(
        minimal_values,
        {"image": {"repository": "registry.example.com/team/app", "tag": "2.3.4", "pullPolicy": "Always"}},
    )

    docs = render_chart(values)

    app_containers = [c for w in app_workloads(docs) for c in containers(w)]
    assert {c["image"] for c in app_containers} == {"registry.example.com/team/app:2.3.4"}
    assert {c.get("imagePullPolicy") for c in app_containers} == {"Always"}


def test_an_image_digest_pins_every_role(minimal_values):
    digest = "sha256:" + "ab" * 32
    docs = render_chart(deep_merge(minimal_values, {"image": {"digest": digest}}))

    images = {c["image"] for w in app_workloads(docs) for c in containers(w)}
    assert len(images) == 1, images
    assert next(iter(images)).endswith("@" + digest), images


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_each_role_passes_its_name_as_the_first_argument(render_ci, ci_file):
    for workload in app_workloads(render_ci(ci_file)):
        role = pod_component(workload)
        container = main_container(workload)
        assert (container.get("args") or [None])[0] == role, f"{name(workload)}: args {container.get('args')}"
        assert not container.get("command"), f"{name(workload)} replaces the image's entrypoint"


# --- Resources, probes, security ------------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_container_and_init_container_has_resources(render_ci, ci_file):
    missing = []
    for workload in workloads(render_ci(ci_file)):
        for container in containers(workload):
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            if not ({"cpu", "memory"} <= set(requests) and "memory" in limits):
                missing.append(f"{name(workload)}/{container['name']}: {resources}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_long_running_container_has_liveness_readiness_and_startup_probes(render_ci, ci_file):
    # Jobs (migrate) run to completion: probes mean nothing there. Bundled redis/postgresql are included.
    missing = []
    for workload in of_kind(render_ci(ci_file), *LONG_RUNNING_KINDS):
        for container in containers(workload, init=False):
            absent = [p for p in ("livenessProbe", "readinessProbe", "startupProbe") if not container.get(p)]
            if absent:
                missing.append(f"{name(workload)}/{container['name']}: no {absent}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_probes_use_only_variables_the_container_has(render_ci, ci_file):
    docs = render_ci(ci_file)
    kubernetes_given = {"HOSTNAME", "HOME", "PATH"}
    unset = []
    for workload in of_kind(docs, *LONG_RUNNING_KINDS):
        for container in containers(workload, init=False):
            env = effective_env(docs, container)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                command = " ".join((container.get(probe) or {}).get("exec", {}).get("command") or [])
                for variable in re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", command):
                    if variable not in env and variable not in kubernetes_given:
                        unset.append(f"{name(workload)}/{container['name']} {probe}: ${variable}")
    assert not unset, "\n".join(unset)


def effective(container: dict, pod: dict, key: str):
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.get("securityContext") or {}).get(key)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_pod_is_locked_down(render_ci, ci_file):
    docs = render_ci(ci_file)
    accounts = {name(d): d for d in of_kind(docs, "ServiceAccount")}
    problems = []
    for workload in workloads(docs):
        spec = pod_spec(workload)
        account = accounts.get(spec.get("serviceAccountName") or "", {})
        if spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken")) is not False:
            problems.append(f"{name(workload)}: the service account token is mounted")
        for container in containers(workload):
            where = f"{name(workload)}/{container['name']}"
            context = container.get("securityContext") or {}
            uid = effective(container, spec, "runAsUser")
            if effective(container, spec, "runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if pod_component(workload) in APP_COMPONENTS and uid != APP_UID:
                problems.append(f"{where}: runs as uid {uid}, the image's user is {APP_UID}")
            if not isinstance(uid, int) or uid == 0:
                problems.append(f"{where}: no numeric non-root runAsUser ({uid})")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation is allowed")
            if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities are not all dropped")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            if (effective(container, spec, "seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccomp is not RuntimeDefault")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_app_pods_get_no_service_link_variables(render_ci, ci_file):
    # Kubernetes injects <SERVICE>_PORT=tcp://... for every Service in the namespace: a Service named
    # `flower` would set FLOWER_PORT, which the image's flower role passes to --port.
    linked = [name(w) for w in app_workloads(render_ci(ci_file)) if pod_spec(w).get("enableServiceLinks") is not False]

    assert not linked, linked


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_app_containers_write_only_to_an_empty_dir_at_tmp(render_ci, ci_file):
    # The image keeps every writable path under /tmp (APP_RUNTIME_DIR, HOME): read-only root needs it mounted.
    problems = []
    for workload in app_workloads(render_ci(ci_file)):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes") or []}
        for container in containers(workload):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
            if "/tmp" not in mounts or "emptyDir" not in volumes.get(mounts["/tmp"], {}):
                problems.append(f"{name(workload)}/{container['name']}: no emptyDir at /tmp ({mounts})")
    assert not problems, "\n".join(problems)


# --- Labels and selectors -------------------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_object_has_the_standard_labels(render_ci, ci_file):
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart_label = f"{chart.metadata['name']}-{chart.metadata['version']}"
    problems = []
    for doc in render_ci(ci_file):
        found = labels(doc)
        expected = {
            "app.kubernetes.io/name": "django-celery-k8s",
            "app.kubernetes.io/instance": "demo",
            "app.kubernetes.io/managed-by": "Helm",
            "helm.sh/chart": chart_label,
        }
        wrong = {key: found.get(key) for key, value in expected.items() if found.get(key) != value}
        if wrong or not found.get("app.kubernetes.io/version"):
            problems.append(f"{doc['kind']} {name(doc)}: {wrong or 'no app.kubernetes.io/version'}")
        if found.get(COMPONENT_LABEL, "web") not in COMPONENTS:
            problems.append(f"{doc['kind']} {name(doc)}: component {found[COMPONENT_LABEL]}")
    for workload in workloads(render_ci(ci_file)):
        if component(workload) not in COMPONENTS or pod_component(workload) != component(workload):
            problems.append(f"{name(workload)}: component label {component(workload)} / pod {pod_component(workload)}")
    assert not problems, "\n".join(problems)


def selectors(docs) -> dict[tuple[str, str], dict]:
    found = {}
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc["kind"] in (
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "PodMonitor",
        ):
            found[(doc["kind"], name(doc))] = spec.get("selector")
        elif doc["kind"] == "Service":
            found[(doc["kind"], name(doc))] = spec.get("selector")
        elif doc["kind"] == "NetworkPolicy":
            found[(doc["kind"], name(doc))] = spec.get("podSelector")
    return found


def selector_keys(selector: dict) -> set[str]:
    if selector is None:
        return set()
    keys = set(selector.get("matchLabels", {}) if "matchLabels" in selector else selector)
    keys |= {e["key"] for e in selector.get("matchExpressions") or []}
    return keys - {"matchExpressions"}


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_selectors_use_only_name_instance_component_and_pool(render_ci, ci_file):
    docs = render_ci(ci_file)
    found = selectors(docs)
    assert found

    wrong = {
        key: sorted(selector_keys(sel) - SELECTOR_KEYS)
        for key, sel in found.items()
        if selector_keys(sel) - SELECTOR_KEYS
    }
    assert not wrong, wrong
    for workload in of_kind(docs, *LONG_RUNNING_KINDS):
        selector = workload["spec"]["selector"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", COMPONENT_LABEL} <= set(selector["matchLabels"])
        assert selector_matches(selector, pod_labels(workload)), f"{name(workload)}: the selector misses its own pods"


def test_selectors_of_the_pools_tell_pools_apart(render_ci):
    docs = render_ci("pools-values.yaml")
    deployments = by_component(docs, "worker")
    assert len(deployments) >= 3

    for deployment in deployments:
        others = [d for d in deployments if d is not deployment]
        assert not any(selector_matches(deployment["spec"]["selector"], pod_labels(o)) for o in others), (
            f"{name(deployment)} would adopt the pods of another pool"
        )


def test_selectors_stay_the_same_across_upgrades(chart_copy):
    values = load_values("production-values.yaml")
    before = selectors(render_chart(values))
    chart_yaml = chart_copy / "Chart.yaml"
    metadata = yaml.safe_load(chart_yaml.read_text())
    metadata.update(version="9.8.7", appVersion="9.8.7")
    chart_yaml.write_text(yaml.safe_dump(metadata))

    after = selectors(render_chart(deep_merge(values, {"image": {"tag": "9.8.7"}}), chart_dir=chart_copy))

    assert before
    assert after == before


# --- Beat -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_beat_is_one_pod_replaced_with_recreate(render_ci, ci_file):
    docs = render_ci(ci_file)
    beats = by_component(docs, "beat")

    assert len(beats) == 1, [name(b) for b in beats]
    beat = beats[0]
    assert beat["kind"] == "Deployment"
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    scalers = of_kind(docs, "HorizontalPodAutoscaler", "ScaledObject")
    assert name(beat) not in {s["spec"]["scaleTargetRef"]["name"] for s in scalers}


# --- Workers --------------------------------------------------------------------------------


def pool_setting(values: dict, pool: dict, key: str):
    return pool[key] if pool.get(key) is not None else values["worker"].get(key)


def worker_deployments_by_pool(docs) -> dict[str, dict]:
    found = {}
    for deployment in by_component(docs, "worker"):
        pool = pod_labels(deployment).get(POOL_LABEL)
        assert pool, f"{name(deployment)} has no {POOL_LABEL} label"
        assert pool not in found, f"two Deployments for pool {pool}"
        found[pool] = deployment
    return found


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_each_worker_pool_is_its_own_deployment_consuming_its_queues(render_ci, ci_file):
    docs = render_ci(ci_file)
    values = merged_values(load_values(ci_file))
    deployments = worker_deployments_by_pool(docs)

    assert set(deployments) == {pool["name"] for pool in values["workerPools"]}
    for pool in values["workerPools"]:
        container = main_container(deployments[pool["name"]])
        env = effective_env(docs, container)
        args = container.get("args") or []
        consumed = None
        for flag in ("--queues", "-Q"):
            if flag in args:
                consumed = args[args.index(flag) + 1]
        consumed = consumed or env.get("CELERY_WORKER_QUEUES")
        assert consumed, f"pool {pool['name']}: no queues in args {args} or env"
        assert queue_list(consumed) == queue_list(pool["queues"]), f"pool {pool['name']} consumes {consumed}"
        concurrency = pool_setting(values, pool, "concurrency")
        if concurrency is not None:
            assert str(concurrency) in (env.get("CELERY_WORKER_CONCURRENCY"), *args), (
                f"pool {pool['name']}: concurrency {concurrency} is not passed"
            )


def test_pools_values_give_three_pools_with_their_own_replicas(render_ci):
    docs = render_ci("pools-values.yaml")
    values = merged_values(load_values("pools-values.yaml"))
    deployments = worker_deployments_by_pool(docs)

    assert len(values["workerPools"]) == 3
    for pool in values["workerPools"]:
        autoscaled = any(
            (pool.get(key) or {}).get("enabled", values["worker"][key]["enabled"]) for key in ("autoscaling", "keda")
        )
        if not autoscaled and pool.get("replicas") is not None:
            assert deployments[pool["name"]]["spec"]["replicas"] == pool["replicas"], pool["name"]


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_worker_grace_period_covers_the_soft_shutdown_and_the_longest_task(render_ci, ci_file):
    docs = render_ci(ci_file)
    values = merged_values(load_values(ci_file))
    deployments = worker_deployments_by_pool(docs)

    for pool in values["workerPools"]:
        soft = pool_setting(values, pool, "softShutdownTimeout")
        longest = pool_setting(values, pool, "longestTaskSeconds")
        grace = pod_spec(deployments[pool["name"]])["terminationGracePeriodSeconds"]
        assert grace >= soft + longest, f"pool {pool['name']}: {grace} < {soft} + {longest}"
        if pool_setting(values, pool, "terminationGracePeriodSeconds") is None:
            assert grace == soft + longest + 30, f"pool {pool['name']}: {grace}"


def test_worker_grace_period_follows_the_values(minimal_values):
    values = deep_merge(minimal_values, {"worker": {"softShutdownTimeout": 120, "longestTaskSeconds": 1800}})

    docs = render_chart(values)

    graces = {
        pool: pod_spec(d)["terminationGracePeriodSeconds"] for pool, d in worker_deployments_by_pool(docs).items()
    }
    # The default pool sets its own longestTaskSeconds (its short tasks' 30 s); the long pool takes the default.
    assert graces == {"default": 120 + 30 + 30, "long": 120 + 1800 + 30}


def pool_environments(docs: list[dict], values: dict) -> list[tuple[dict, dict]]:
    """(pool values, the environment its worker container ends up with) for every pool."""
    deployments = worker_deployments_by_pool(docs)
    return [(pool, effective_env(docs, main_container(deployments[pool["name"]]))) for pool in values["workerPools"]]


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_workers_get_the_soft_shutdown_timeout_and_the_longest_task_covers_the_time_limit(render_ci, ci_file):
    docs = render_ci(ci_file)
    values = merged_values(load_values(ci_file))
    for pool, env in pool_environments(docs, values):
        soft = pool_setting(values, pool, "softShutdownTimeout")
        assert float(env.get("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", 0)) == float(soft), f"pool {pool['name']}: {env}"
        time_limit = int(env.get("CELERY_TASK_TIME_LIMIT", 360))
        assert pool_setting(values, pool, "longestTaskSeconds") >= time_limit, (
            f"pool {pool['name']}: tasks may run {time_limit} s, the grace period is sized for less"
        )


# --- The same settings for every role -------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_deployment_reads_the_same_config_map_and_secret(render_ci, ci_file):
    docs = render_ci(ci_file)
    refs = {
        f"{name(w)}/{c['name']}": env_from_refs(c) for w in app_deployments(docs) for c in containers(w, init=False)
    }

    assert len({frozenset(r) for r in refs.values()}) == 1, refs
    shared = next(iter(refs.values()))
    assert {kind for kind, _ in shared} == {"configMapRef", "secretRef"}, shared


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_role_gets_the_same_settings_from_its_config_map_and_secret(render_ci, ci_file):
    # The migrate hook may read copies made for pre-install; what counts is the settings they hold.
    docs = render_ci(ci_file)
    existing = merged_values(load_values(ci_file))["secrets"]["existingSecret"]
    config_maps = {name(d): d.get("data") or {} for d in of_kind(docs, "ConfigMap")}
    secrets = {name(d): secret_data(d) for d in of_kind(docs, "Secret")}

    settings = {}
    for workload in app_workloads(docs):
        for container in containers(workload, init=False):
            refs = env_from_refs(container)
            config = {k: v for kind, ref in refs if kind == "configMapRef" for k, v in config_maps[ref].items()}
            secret = {k: v for kind, ref in refs if kind == "secretRef" for k, v in secrets.get(ref, {}).items()}
            if existing:
                assert ("secretRef", existing) in refs, f"{name(workload)} does not read {existing}"
            settings[f"{pod_component(workload)} {name(workload)}/{container['name']}"] = (config, secret)

    assert {role.split()[0] for role in settings} >= {"web", "worker", "beat", "migrate"}
    reference_role, reference = next(iter(settings.items()))
    for role, found in settings.items():
        assert found[0] == reference[0], f"{role} and {reference_role} get different ConfigMap settings"
        assert found[1] == reference[1], f"{role} and {reference_role} get different Secret settings"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_no_role_overrides_a_shared_setting(render_ci, ci_file):
    docs = render_ci(ci_file)
    config_maps = {name(d): d.get("data") or {} for d in of_kind(docs, "ConfigMap")}
    overridden = []
    for workload in app_workloads(docs):
        for container in containers(workload, init=False):
            shared = {}
            for kind, ref in env_from_refs(container):
                if kind == "configMapRef":
                    shared.update(config_maps.get(ref, {}))
            for key, value in container_env(container).items():
                if key in shared and shared[key] != value:
                    overridden.append(f"{name(workload)}: {key}={value!r}, the ConfigMap says {shared[key]!r}")
    assert not overridden, "\n".join(overridden)


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_role_gets_the_settings_django_needs(render_ci, ci_file):
    docs = render_ci(ci_file)
    existing = merged_values(load_values(ci_file))["secrets"]["existingSecret"]
    needed = {"DJANGO_SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL"}

    for workload in app_workloads(docs):
        env = effective_env(docs, main_container(workload))
        if existing:
            env |= dict.fromkeys(needed, "from the existing Secret")
        assert needed <= set(env), f"{name(workload)} lacks {needed - set(env)}"
        assert all(env[key] for key in needed), f"{name(workload)}: an empty setting in {needed}"


def test_flower_gets_basic_auth(render_ci):
    docs = render_ci("minimal-values.yaml")
    flowers = by_component(docs, "flower")
    assert flowers, "flower is on by default"

    env = effective_env(docs, main_container(flowers[0]))
    assert re.fullmatch(r"[^:\s]+:\S{12,}", env.get("FLOWER_BASIC_AUTH", "")), "Flower refuses to start without auth"


# --- ConfigMap changes roll the pods; the secrets ------------------------------------------


def pod_annotations(docs) -> dict[str, dict]:
    return {name(d): pod_template(d).get("metadata", {}).get("annotations") or {} for d in app_deployments(docs)}


def test_checksum_config_changes_when_a_setting_changes(minimal_values):
    before = pod_annotations(render_chart(minimal_values))
    after = pod_annotations(render_chart(deep_merge(minimal_values, {"config": {"logLevel": "DEBUG"}})))

    assert before
    assert set(before) == set(after)
    for deployment, annotations in before.items():
        assert annotations.get("checksum/config"), f"{deployment} has no checksum/config annotation"
        assert after[deployment]["checksum/config"] != annotations["checksum/config"], deployment


def test_checksum_config_is_stable_when_nothing_changes(minimal_values):
    # A checksum that changes on every render (a random secret hashed) would restart every pod on each upgrade.
    first = pod_annotations(render_chart(minimal_values))
    second = pod_annotations(render_chart(minimal_values))

    assert {d: a.get("checksum/config") for d, a in first.items()} == {
        d: a.get("checksum/config") for d, a in second.items()
    }


def test_pods_roll_when_a_secret_value_changes(minimal_values):
    changed = deep_merge(minimal_values, {"secrets": {"databaseUrl": "postgres://other:pw@db.example.com:5432/other"}})

    before = pod_annotations(render_chart(minimal_values))
    after = pod_annotations(render_chart(changed))

    for deployment in before:
        checksums = {k: v for k, v in before[deployment].items() if k.startswith("checksum/")}
        assert checksums != {k: v for k, v in after[deployment].items() if k.startswith("checksum/")}, deployment


def all_keys(tree, prefix="") -> list[str]:
    keys = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            keys.append(f"{prefix}{key}")
            keys.extend(all_keys(value, f"{prefix}{key}."))
    elif isinstance(tree, list):
        for item in tree:
            keys.extend(all_keys(item, prefix))
    return keys


def test_the_secret_key_is_not_a_value_but_is_in_the_secret(render_ci):
    with helm_python.Chart.load(CHART_DIR) as chart:
        defaults = chart.values
        sources = [t["data"] for t in chart.templates if "DJANGO_SECRET_KEY" in t["data"]]
    assert not [k for k in all_keys(defaults) if re.search(r"secret_?key", k.split(".")[-1], re.IGNORECASE)]

    secrets = of_kind(render_ci("minimal-values.yaml"), "Secret")
    keys = {secret_data(s).get("DJANGO_SECRET_KEY") for s in secrets if "DJANGO_SECRET_KEY" in secret_data(s)}
    assert len(keys) == 1, "one DJANGO_SECRET_KEY in every Secret that has one"
    keys = list(keys)
    assert len(keys[0]) >= 50, "a short DJANGO_SECRET_KEY"
    assert not any(
        "DJANGO_SECRET_KEY" in (c.get("data") or {}) for c in of_kind(render_ci("minimal-values.yaml"), "ConfigMap")
    )
    assert any("lookup" in source for source in sources), "the key is not kept across upgrades with lookup"


def test_the_secret_key_is_generated_not_fixed(minimal_values):
    def key():
        secrets = of_kind(render_chart(minimal_values), "Secret")
        return next(secret_data(s)["DJANGO_SECRET_KEY"] for s in secrets if "DJANGO_SECRET_KEY" in secret_data(s))

    assert key() != key()


def test_an_existing_secret_replaces_the_chart_secret(render_ci):
    docs = render_ci("existing-secret-values.yaml")
    existing = merged_values(load_values("existing-secret-values.yaml"))["secrets"]["existingSecret"]
    assert existing

    app_secrets = [s for s in of_kind(docs, "Secret") if component(s) not in ("redis", "postgresql")]
    assert not app_secrets, [name(s) for s in app_secrets]
    for workload in app_workloads(docs):
        for container in containers(workload):
            secret_refs = {ref for kind, ref in env_from_refs(container) if kind == "secretRef"}
            secret_refs |= {
                item["valueFrom"]["secretKeyRef"]["name"]
                for item in container.get("env") or []
                if "secretKeyRef" in (item.get("valueFrom") or {})
            }
            assert secret_refs <= {existing}, f"{name(workload)}/{container['name']}: {secret_refs}"
        main = main_container(workload)
        assert ("secretRef", existing) in env_from_refs(main), f"{name(workload)} does not read {existing}"


def test_an_existing_secret_needs_no_url(minimal_values):
    values = deep_merge(minimal_values, {"secrets": {"existingSecret": "app-secrets"}})
    for key in ("databaseUrl", "brokerUrl", "cacheUrl", "flowerBasicAuth", "emailUrl"):
        values["secrets"][key] = ""

    docs = render_chart(values)

    assert by_component(docs, "web")


# --- Migrations -----------------------------------------------------------------------------


def migrate_job(docs) -> dict:
    jobs = [j for j in by_component(docs, "migrate") if j["kind"] == "Job"]
    assert len(jobs) == 1, [name(j) for j in jobs]
    return jobs[0]


def hooks(doc) -> set[str]:
    annotations = doc["metadata"].get("annotations") or {}
    return {h.strip() for h in annotations.get("helm.sh/hook", "").split(",") if h.strip()}


def test_migrate_job_is_a_pre_install_and_pre_upgrade_hook_by_default(render_ci):
    job = migrate_job(render_ci("minimal-values.yaml"))

    assert hooks(job) == {"pre-install", "pre-upgrade"}
    annotations = job["metadata"]["annotations"]
    assert "helm.sh/hook-delete-policy" in annotations
    assert "helm.sh/hook-weight" in annotations
    assert main_container(job)["args"][0] == "migrate"
    assert job["spec"].get("ttlSecondsAfterFinished") is not None
    assert job["spec"].get("activeDeadlineSeconds")


def test_migrate_job_is_a_plain_job_without_hooks(minimal_values):
    job = migrate_job(render_chart(deep_merge(minimal_values, {"migrations": {"hook": False}})))

    annotations = job["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("helm.sh/hook")], annotations


def hook_weight(doc) -> int:
    return int((doc["metadata"].get("annotations") or {}).get("helm.sh/hook-weight", 0))


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_the_migrate_hook_uses_only_what_exists_before_install(render_ci, ci_file):
    # A pre-install hook runs before the release's ordinary objects exist: whatever its pod needs that
    # the chart renders must be a pre-install hook itself, created before the Job (a lower weight).
    docs = render_ci(ci_file)
    job = migrate_job(docs)
    if "pre-install" not in hooks(job):
        pytest.skip("migrations.hook is off in this file")
    rendered = {(d["kind"], name(d)): d for d in docs}
    spec = pod_spec(job)
    needed = set()
    if spec.get("serviceAccountName"):
        needed.add(("ServiceAccount", spec["serviceAccountName"]))
    for container in containers(job):
        for kind, ref in env_from_refs(container):
            needed.add(("ConfigMap" if kind == "configMapRef" else "Secret", ref))
        for item in container.get("env") or []:
            source = item.get("valueFrom") or {}
            if "secretKeyRef" in source:
                needed.add(("Secret", source["secretKeyRef"]["name"]))
            if "configMapKeyRef" in source:
                needed.add(("ConfigMap", source["configMapKeyRef"]["name"]))
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            needed.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            needed.add(("Secret", volume["secret"]["secretName"]))

    missing = [
        f"{kind} {ref}"
        for kind, ref in sorted(needed)
        if (kind, ref) in rendered
        and not (
            "pre-install" in hooks(rendered[(kind, ref)]) and hook_weight(rendered[(kind, ref)]) < hook_weight(job)
        )
    ]
    assert not missing, f"the pre-install migrate Job needs objects that do not exist yet at pre-install: {missing}"


def wait_containers(workload) -> list[dict]:
    return [
        c
        for c in pod_spec(workload).get("initContainers") or []
        if re.search(r"\bmanage\b.*\bmigrate\b.*--check", command_line(c))
    ]


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_every_deployment_waits_for_migrations(render_ci, ci_file):
    docs = render_ci(ci_file)
    if not merged_values(load_values(ci_file))["migrations"]["waitInitContainer"]:
        pytest.skip("migrations.waitInitContainer is off in this file")
    image = main_container(migrate_job(docs))["image"]

    deployments = app_deployments(docs)
    assert {pod_component(d) for d in deployments} >= {"web", "worker", "beat"}
    for deployment in deployments:
        waiting = wait_containers(deployment)
        assert len(waiting) == 1, f"{name(deployment)}: init containers {pod_spec(deployment).get('initContainers')}"
        assert waiting[0]["image"] == image
        assert env_from_refs(waiting[0]) == env_from_refs(main_container(deployment)), (
            f"{name(deployment)}: the wait checks another database than the app uses"
        )


def test_no_deployment_waits_when_the_wait_is_off(minimal_values):
    docs = render_chart(deep_merge(minimal_values, {"migrations": {"waitInitContainer": False}}))

    assert app_deployments(docs)
    assert not [name(d) for d in app_deployments(docs) if wait_containers(d)]


def test_the_migration_wait_is_bounded(minimal_values):
    values = deep_merge(minimal_values, {"migrations": {"waitTimeoutSeconds": 4321}})

    docs = render_chart(values)

    for deployment in app_deployments(docs):
        waiting = wait_containers(deployment)[0]
        assert "4321" in command_line(waiting) or "4321" in str(waiting.get("env")), (
            f"{name(deployment)}: the wait ignores migrations.waitTimeoutSeconds"
        )


# --- NetworkPolicy --------------------------------------------------------------------------


def allowed_egress_ports(policies, pod: dict) -> set:
    """Ports the pod may reach; "any" when a rule has no port list."""
    ports = set()
    for policy in policies:
        spec = policy["spec"]
        if "Egress" not in spec.get("policyTypes", []) or not selector_matches(spec["podSelector"], pod):
            continue
        for rule in spec.get("egress") or []:
            if not rule.get("ports"):
                ports.add("any")
            ports |= {p.get("port") for p in rule.get("ports") or []}
    return ports


def test_network_policy_denies_by_default_and_lets_each_role_reach_what_it_needs(render_ci):
    docs = render_ci("production-values.yaml")
    values = merged_values(load_values("production-values.yaml"))
    policies = of_kind(docs, "NetworkPolicy")
    assert policies, "production-values.yaml enables the NetworkPolicy"
    net = values["networkPolicy"]

    for workload in app_workloads(docs):
        pod = pod_labels(workload)
        selecting = [p for p in policies if selector_matches(p["spec"]["podSelector"], pod)]
        assert any({"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", [])) for p in selecting), (
            f"{name(workload)} is not under a deny-by-default policy"
        )
        ports = allowed_egress_ports(policies, pod)
        assert "any" not in ports, f"{name(workload)} may reach any port"
        needed = {net["dnsPort"], net["broker"]["port"]}
        if pod_component(workload) != "flower":
            needed.add(net["database"]["port"])
        assert needed <= ports, f"{name(workload)} cannot reach {needed - ports}"

    web = by_component(docs, "web")[0]
    web_ingress = [
        rule
        for p in policies
        if "Ingress" in p["spec"].get("policyTypes", []) and selector_matches(p["spec"]["podSelector"], pod_labels(web))
        for rule in p["spec"].get("ingress") or []
    ]
    assert web_ingress, "nothing may reach web"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_http_probes_of_django_send_a_host_django_allows(render_ci, ci_file):
    # The kubelet sends Host: <pod IP>:<port> unless told otherwise; Django answers 400 to a host
    # missing from DJANGO_ALLOWED_HOSTS, and the probe would fail for ever.
    docs = render_ci(ci_file)
    for web in by_component(docs, "web"):
        container = main_container(web)
        allowed = [h.strip() for h in effective_env(docs, container).get("DJANGO_ALLOWED_HOSTS", "").split(",")]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            http_get = container[probe].get("httpGet")
            if not http_get:
                continue
            host = {h["name"].lower(): h["value"] for h in http_get.get("httpHeaders") or []}.get("host")
            assert host, f"{name(web)} {probe} sends the pod IP as Host"
            assert "*" in allowed or host.split(":")[0] in allowed, f"{probe} Host {host} not in {allowed}"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_web_grace_period_covers_the_pre_stop_sleep_and_gunicorns_graceful_timeout(render_ci, ci_file):
    docs = render_ci(ci_file)
    for web in by_component(docs, "web"):
        container = main_container(web)
        graceful = int(effective_env(docs, container).get("GUNICORN_GRACEFUL_TIMEOUT") or 30)
        command = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command") or []
        sleep = int(command[-1]) if command[:1] == ["sleep"] else 0
        grace = pod_spec(web).get("terminationGracePeriodSeconds", 30)
        assert grace >= sleep + graceful, f"{name(web)}: {grace} s < preStop {sleep} s + gunicorn {graceful} s"


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_task_time_limits_and_the_visibility_timeout_fit_together(render_ci, ci_file):
    # Redis redelivers a message not acknowledged within the visibility timeout: a task that may run
    # longer than that is run twice. Unset, each worker derives it from its queues' tasks
    # (app/redelivery.py); set, it must cover the longest task and retry countdown.
    docs = render_ci(ci_file)
    values = merged_values(load_values(ci_file))
    pool_names = []
    for pool, env in pool_environments(docs, values):
        soft, hard = int(env["CELERY_TASK_SOFT_TIME_LIMIT"]), int(env["CELERY_TASK_TIME_LIMIT"])
        long_soft, long_hard = int(env["CELERY_LONG_TASK_SOFT_TIME_LIMIT"]), int(env["CELERY_LONG_TASK_TIME_LIMIT"])
        assert soft < hard, f"pool {pool['name']}: soft limit {soft} >= hard limit {hard}"
        assert long_soft < long_hard, f"pool {pool['name']}: long soft limit {long_soft} >= hard limit {long_hard}"
        longest = pool_setting(values, pool, "longestTaskSeconds")
        runs_long_tasks = env["CELERY_LONG_QUEUE"] in env["CELERY_WORKER_QUEUES"].split(",")
        assert longest >= (long_hard if runs_long_tasks else hard), f"pool {pool['name']}: grace from {longest} s"
        if "CELERY_BROKER_VISIBILITY_TIMEOUT" in env:
            visibility = int(env["CELERY_BROKER_VISIBILITY_TIMEOUT"])
            assert visibility > max(hard, long_hard) + int(env["CELERY_RETRY_BACKOFF_MAX"]), pool["name"]
        pool_names.append(env["WORKER_POOL_NAME"])
    # Each pool's unacknowledged messages under keys of its own.
    assert len(set(pool_names)) == len(pool_names), pool_names


@pytest.mark.parametrize("ci_file", CI_FILES)
def test_topology_spread_counts_only_the_pods_of_the_same_workload(render_ci, ci_file):
    long_running = of_kind(render_ci(ci_file), *LONG_RUNNING_KINDS)
    for workload in long_running:
        for constraint in pod_spec(workload).get("topologySpreadConstraints") or []:
            selector = constraint.get("labelSelector")
            assert selector, f"{name(workload)}: a spread constraint without labelSelector spreads nothing"
            assert selector_matches(selector, pod_labels(workload)), f"{name(workload)}: {selector}"
            others = [w for w in long_running if w is not workload]
            assert not any(selector_matches(selector, pod_labels(o)) for o in others), (
                f"{name(workload)} spreads against other workloads' pods: {selector}"
            )


def test_production_spreads_pods_over_zones(render_ci):
    docs = render_ci("production-values.yaml")

    for deployment in app_deployments(docs):
        assert pod_spec(deployment).get("topologySpreadConstraints"), name(deployment)


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(render_ci):
    # A replicas field in the manifest resets the scaled count to it on every helm upgrade.
    docs = render_ci("production-values.yaml")
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in of_kind(docs, "HorizontalPodAutoscaler", "ScaledObject")}
    assert targets

    pinned = [name(d) for d in of_kind(docs, "Deployment") if name(d) in targets and "replicas" in d["spec"]]
    assert not pinned, f"autoscaled but with spec.replicas: {pinned}"


def test_a_pool_cannot_have_both_an_hpa_and_keda(minimal_values):
    values = deep_merge(minimal_values, {"worker": {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}})

    try:
        docs = render_chart(values)
    except helm_python.HelmError as error:
        refused = str(error)
    else:
        refused = ""
    if refused:
        assert "keda" in refused.lower(), refused
        return
    hpa_targets = {d["spec"]["scaleTargetRef"]["name"] for d in of_kind(docs, "HorizontalPodAutoscaler")}
    keda_targets = {d["spec"]["scaleTargetRef"]["name"] for d in of_kind(docs, "ScaledObject")}
    assert not hpa_targets & keda_targets, f"two autoscalers fight over {hpa_targets & keda_targets}"


# --- Bundled services (local clusters) --------------------------------------------------------


def test_bundled_services_are_wired_to_the_app_settings(render_ci):
    docs = render_ci("local-values.yaml")
    services = {name(d): d for d in of_kind(docs, "Service")}
    statefulsets = {pod_component(s): s for s in of_kind(docs, "StatefulSet")}
    assert set(statefulsets) == {"redis", "postgresql"}
    app_env = effective_env(docs, main_container(by_component(docs, "web")[0]))

    for setting, role, port in (("DATABASE_URL", "postgresql", 5432), ("CELERY_BROKER_URL", "redis", 6379)):
        url = urlsplit(app_env[setting])
        service = services.get(url.hostname)
        assert service, f"{setting} points at {url.hostname}, not a rendered Service"
        assert selector_matches(service["spec"]["selector"], pod_labels(statefulsets[role]))
        assert (url.port or port) in {p["port"] for p in service["spec"]["ports"]}
        server_env = effective_env(docs, pod_spec(statefulsets[role])["containers"][0])
        password = server_env.get("POSTGRES_PASSWORD") or server_env.get("REDIS_PASSWORD")
        assert password, f"the bundled {role} runs without a password"
        assert url.password == password, f"{setting} has another password than the bundled {role}"
        if role == "postgresql":
            assert url.username == server_env["POSTGRES_USER"]
            assert url.path.strip("/") == server_env["POSTGRES_DB"]


def test_bundled_services_keep_their_data_on_a_claim(render_ci):
    for statefulset in of_kind(render_ci("local-values.yaml"), "StatefulSet"):
        claims = {c["metadata"]["name"] for c in statefulset["spec"].get("volumeClaimTemplates") or []}
        container = pod_spec(statefulset)["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        data = [path for volume, path in mounts.items() if volume in claims]
        assert data, f"{name(statefulset)} keeps its data on no PersistentVolumeClaim"
        pgdata = effective_env(render_ci("local-values.yaml"), container).get("PGDATA")
        if pgdata:
            # A fresh volume's root holds lost+found, where initdb refuses to run.
            assert pgdata.startswith(data[0].rstrip("/") + "/"), f"PGDATA {pgdata} is not a folder under {data[0]}"
        assert statefulset["spec"]["replicas"] == 1


def test_ingress_hosts_are_allowed_and_trusted_for_csrf(render_ci):
    docs = render_ci("production-values.yaml")
    hosts = [h["host"] for h in merged_values(load_values("production-values.yaml"))["ingress"]["hosts"]]
    env = effective_env(docs, main_container(by_component(docs, "web")[0]))
    allowed = env["DJANGO_ALLOWED_HOSTS"].split(",")
    trusted = env.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",")

    assert hosts
    for host in hosts:
        assert host in allowed, f"Django answers 400 to {host}: DJANGO_ALLOWED_HOSTS={allowed}"
        assert f"https://{host}" in trusted, f"the admin's forms fail CSRF on https://{host}: {trusted}"
