"""The chart's TLS to Redis and RabbitMQ (values: tls): the CA and the client certificate come from
existing Secrets, mounted read-only in every container of the app image, at the paths the
settings read (TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE); half a setting fails the render."""

import helm_python
import pytest

from tests.deploy.conftest import containers, deep_merge, name, of_kind, pod_spec, render_chart, workloads
from tests.deploy.test_chart_invariants import effective_env

TLS_VARIABLES = ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE")


def mounted_secret_file(workload: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The (volume mount, secret volume source) that put `path` into the container."""
    directory, file_name = path.rsplit("/", 1)
    (mount,) = [mount for mount in container.get("volumeMounts") or [] if mount["mountPath"] == directory]
    (volume,) = [volume for volume in pod_spec(workload)["volumes"] if volume["name"] == mount["name"]]
    assert file_name in {item["path"] for item in volume["secret"]["items"]}, f"{file_name} not in {volume}"
    return mount, volume["secret"]


def test_every_app_container_reads_the_ca_and_client_certificate_from_read_only_secret_mounts(render_ci):
    docs = render_ci("tls-values.yaml")

    app = [workload for workload in workloads(docs) if workload["kind"] in ("Deployment", "Job")]
    assert {pod_spec(workload)["containers"][0]["args"][0] for workload in app} >= {"web", "worker", "beat", "flower"}
    for workload in app:
        for container in containers(workload):
            env = effective_env(docs, container)
            assert set(TLS_VARIABLES) <= set(env), f"{name(workload)}/{container['name']}"
            ca_mount, ca = mounted_secret_file(workload, container, env["TLS_CA_FILE"])
            cert_mount, cert = mounted_secret_file(workload, container, env["TLS_CERT_FILE"])
            key_mount, key = mounted_secret_file(workload, container, env["TLS_KEY_FILE"])
            assert all(mount["readOnly"] for mount in (ca_mount, cert_mount, key_mount))
            assert ca["secretName"] == "services-ca"
            assert cert["secretName"] == key["secretName"] == "services-client-certificate"
            # The private key: the pod's group (fsGroup) may read it, nobody else.
            assert key["defaultMode"] == 0o440
            assert pod_spec(workload)["securityContext"]["fsGroup"]


def test_without_tls_values_nothing_is_mounted_and_no_tls_file_is_set(minimal_values):
    docs = render_chart(minimal_values)

    for config in of_kind(docs, "ConfigMap"):
        assert not set(TLS_VARIABLES) & set(config.get("data") or {})
    for workload in workloads(docs):
        assert not [volume for volume in pod_spec(workload).get("volumes") or [] if "secret" in volume]


def test_only_a_client_certificate_sets_no_ca_file(minimal_values):
    values = {
        "secrets": {"brokerUrl": "rediss://:pw@redis.example.internal:6380/0"},
        "tls": {"clientCertSecret": "client", "certKey": "cert.pem", "keyKey": "key.pem"},
    }
    docs = render_chart(deep_merge(minimal_values, values))

    (config, *_) = of_kind(docs, "ConfigMap")
    assert config["data"]["TLS_CERT_FILE"] == "/etc/tls/client/cert.pem"
    assert config["data"]["TLS_KEY_FILE"] == "/etc/tls/client/key.pem"
    assert "TLS_CA_FILE" not in config["data"]


@pytest.mark.parametrize("tls", [{"caSecret": "services-ca"}, {"clientCertSecret": "client"}])
def test_tls_files_with_plain_urls_fail_the_render(minimal_values, tls):
    with pytest.raises(helm_python.HelmError, match=r"none of secrets\.brokerUrl"):
        render_chart(deep_merge(minimal_values, {"tls": tls}))


def test_with_an_existing_secret_the_urls_are_taken_on_trust(minimal_values):
    values = {"secrets": {"existingSecret": "app-secrets"}, "tls": {"caSecret": "services-ca"}}
    docs = render_chart(deep_merge(minimal_values, values))

    assert {config["data"].get("TLS_CA_FILE") for config in of_kind(docs, "ConfigMap")} == {"/etc/tls/ca/ca.crt"}


def test_a_client_certificate_needs_an_fs_group_to_be_readable(minimal_values):
    values = {
        "secrets": {"brokerUrl": "rediss://redis.example.internal:6380/0"},
        "tls": {"clientCertSecret": "client"},
        "podSecurityContext": {"fsGroup": None},
    }
    with pytest.raises(helm_python.HelmError, match="fsGroup"):
        render_chart(deep_merge(minimal_values, values))


@pytest.mark.parametrize(
    "tls",
    [{"caSecert": "typo"}, {"caSecret": "Not_A_Name"}, {"caKey": ""}, {"keyKey": "a/b"}],
)
def test_the_schema_refuses_unknown_tls_keys_and_bad_names(minimal_values, tls):
    with pytest.raises(helm_python.HelmError, match="schema"):
        render_chart(deep_merge(minimal_values, {"tls": tls}))
