"""Podman helpers for container tests: private config, the stand-in base image, build and run.

Standard library only, so `python3 tests/container/podman.py env|base|info` works without the venv.

Podman runs here only with the containers.conf below (runc, cgroupfs, ulimits within the host's hard
limits, k8s-file logs). All state lives under CELERY_DEMO_PODMAN_ROOT (default /var/tmp/celery-demo-podman):
outside the work tree, so images and layer caches survive a fresh clone (CI clones into another folder on
the same machine) and pytest/ruff never walk a container root filesystem. Runtime state (runroot, libpod
tmp_dir) goes to /dev/shm so a reboot clears it, as /run would on a normal host.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN_SCRIPT = HERE / "standin_base.sh"
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_LINE = "apt-get update && apt-get install -y podman runc debootstrap"

CONTAINERS_CONF = """\
# Written by tests/container/podman.py. Podman runs on these machines only with these settings:
# runc (crun fails), cgroupfs (no systemd, cgroup v1), ulimits within the hard limits (no CAP_SYS_RESOURCE).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "host"
log_driver = "k8s-file"

[network]
network_config_dir = "{network_dir}"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp_dir}"
"""

STORAGE_CONF = """\
# Written by tests/container/podman.py.
[storage]
driver = "overlay"
graphroot = "{graphroot}"
runroot = "{runroot}"
"""


def state_root() -> Path:
    """The persistent folder holding podman's config, images and layer cache."""
    return Path(os.environ.get("CELERY_DEMO_PODMAN_ROOT", "/var/tmp/celery-demo-podman"))


def _runtime_root() -> Path:
    """A folder a reboot clears (tmpfs /dev/shm when there is one) for podman's runroot and tmp_dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "celery-demo-podman"
    return state_root() / "run"


def _write_if_changed(path: Path, text: str) -> None:
    """Write text atomically, leaving the file alone when it already holds it."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _host_pip_settings() -> dict[str, str]:
    """Index settings from the host's pip config that a container can use too (http/https URLs only)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]
        value = value.strip().strip("'\"")
        if name in ("index-url", "extra-index-url", "find-links"):
            urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
            if urls:
                settings[name] = " ".join(urls)
        elif name in ("trusted-host", "default-timeout", "timeout"):
            settings["timeout" if name == "default-timeout" else name] = value
    return settings


def pip_conf_text() -> str:
    """The pip.conf mounted at /etc/pip.conf during builds: the host's CA bundle plus its remote indexes."""
    settings = _host_pip_settings()
    if HOST_CA_BUNDLE.is_file():
        settings["cert"] = str(HOST_CA_BUNDLE)
    lines = ["# Written by tests/container/podman.py for podman builds.", "[global]"]
    lines += [f"{k} = {v}" for k, v in sorted(settings.items())]
    return "\n".join(lines) + "\n"


@cache
def configure() -> dict[str, str]:
    """Write containers.conf, storage.conf and pip.conf (once per process); return the env vars podman needs."""
    root, runtime = state_root(), _runtime_root()
    for d in (root / "conf", root / "storage", root / "networks", runtime / "run", runtime / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    _write_if_changed(
        root / "conf" / "containers.conf",
        CONTAINERS_CONF.format(tmp_dir=runtime / "tmp", network_dir=root / "networks"),
    )
    _write_if_changed(
        root / "conf" / "storage.conf", STORAGE_CONF.format(graphroot=root / "storage", runroot=runtime / "run")
    )
    _write_if_changed(root / "conf" / "pip.conf", pip_conf_text())
    return {
        "CONTAINERS_CONF": str(root / "conf" / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(root / "conf" / "storage.conf"),
        "CELERY_DEMO_PODMAN_ROOT": str(root),
    }


def podman(
    *args: str, check: bool = True, timeout: float | None = 600, capture: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS` with this module's config; raise with podman's output when check fails."""
    env = {**os.environ, **configure()}
    proc = subprocess.run(
        ["podman", *args],
        env=env,
        text=True,
        timeout=timeout,
        check=False,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {shlex.join(args)} exited {proc.returncode}:\n{(proc.stdout or '')[-6000:]}")
    return proc


def podman_available() -> tuple[bool, str]:
    """(True, "") when podman can run containers here, else (False, why and how to fix)."""
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed; run: {APT_LINE}"
    if os.geteuid() != 0:
        return False, "podman tests run as root here (rootless podman needs subuid maps and is not set up)"
    try:
        proc = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "`podman info` timed out"
    if proc.returncode != 0:
        return False, f"`podman info` failed: {proc.stdout.strip()[-500:]}"
    return True, ""


def ensure_standin_base(force: bool = False) -> float:
    """Build (or find cached) the python:3.11-slim-bookworm stand-in; return the seconds it took."""
    if not force and image_exists(BASE_IMAGE):
        return 0.0
    if shutil.which("debootstrap") is None:
        raise RuntimeError(f"debootstrap not installed; run: {APT_LINE}")
    start = time.monotonic()
    cmd = ["bash", str(STANDIN_SCRIPT), *(["--force"] if force else [])]
    proc = subprocess.run(
        cmd, env={**os.environ, **configure()}, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{STANDIN_SCRIPT.name} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return time.monotonic() - start


def image_exists(image: str) -> bool:
    """Whether the image is in local storage."""
    return podman("image", "exists", image, check=False, timeout=60).returncode == 0


def image_size(image: str) -> int:
    """The image's size in bytes, uncompressed, as `podman images` counts it."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", image, timeout=60).stdout.strip())


def build_flags() -> list[str]:
    """The flags every test build uses: local base only, host network, docker format, host CA for pip."""
    conf = configure()
    flags = ["--pull=never", "--network=host", "--format=docker", "--layers"]
    if HOST_CA_BUNDLE.is_file():
        flags += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    flags += ["--volume", f"{Path(conf['CELERY_DEMO_PODMAN_ROOT']) / 'conf' / 'pip.conf'}:/etc/pip.conf:ro"]
    return flags


def build_image(
    context_dir: str | Path,
    tag: str,
    build_args: dict[str, str] | None = None,
    dockerfile: str | Path | None = None,
    extra: list[str] | None = None,
    timeout: float = 1800,
) -> tuple[float, int]:
    """`podman build` the context into tag; return (seconds, image size in bytes)."""
    args = ["build", *build_flags(), "-t", tag]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    args += [*(extra or []), str(context_dir)]
    start = time.monotonic()
    podman(*args, timeout=timeout)
    return time.monotonic() - start, image_size(tag)


def run_container(
    image: str,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    name: str | None = None,
    read_only: bool = True,
    user: str = "10001:10001",
    extra: list[str] | None = None,
) -> str:
    """Start a detached container the way the cluster runs it (read-only root, non-root, only /tmp writable); return its name."""
    name = name or f"cdp-{os.getpid()}-{time.monotonic_ns()}"
    cmd = ["run", "--detach", "--replace", "--name", name, "--network=host", "--user", user]
    if read_only:
        # --read-only-tmpfs=false: podman would otherwise also make /run and /var/tmp writable.
        cmd += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,nosuid,nodev,exec,mode=1777"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    cmd += [*(extra or []), image, *(args or [])]
    podman(*cmd, timeout=120)
    return name


def logs(name: str) -> str:
    """The container's stdout and stderr so far."""
    return podman("logs", name, check=False, timeout=60).stdout


def stop(name: str, timeout: int = 10) -> float:
    """Send the stop signal (SIGTERM unless the image says otherwise), SIGKILL after timeout; return seconds taken."""
    start = time.monotonic()
    podman("stop", "-t", str(timeout), name, timeout=timeout + 60)
    return time.monotonic() - start


def wait(name: str, timeout: float | None = 300) -> int:
    """Wait for the container to exit and return its exit code."""
    return int(podman("wait", name, timeout=timeout).stdout.strip().splitlines()[-1])


def healthcheck(name: str) -> int:
    """Run the image's HEALTHCHECK once now (no systemd timers here) and return its exit code."""
    return podman("healthcheck", "run", name, check=False, timeout=120).returncode


def rm(name: str) -> None:
    """Remove the container, stopping it first if it runs; no error when it is gone."""
    podman("rm", "--force", "--ignore", "--time", "0", name, check=False, timeout=120)


def _main(argv: list[str]) -> int:
    """CLI: `env` prints export lines, `base [--force]` builds the stand-in, `info` checks podman."""
    command = argv[0] if argv else "env"
    if command == "env":
        for key, value in configure().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if command == "base":
        seconds = ensure_standin_base(force="--force" in argv[1:])
        print(f"{BASE_IMAGE}: ready in {seconds:.1f} s")
        return 0
    if command == "info":
        ok, why = podman_available()
        print("podman is usable" if ok else f"podman is not usable: {why}")
        return 0 if ok else 1
    print(f"usage: {sys.argv[0]} env|base [--force]|info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
