"""project/environment.py declares every variable the code reads; the README's configuration
tables and .env.sample are generated from it and up to date; read() parses as declared."""

import re
import shutil
import subprocess
import sys

import pytest

from project import environment
from tests.processes import REPO_ROOT

ENTRYPOINT = REPO_ROOT / "deploy" / "image" / "entrypoint.sh"
# Python expressions that read a variable by its literal name.
PYTHON_READS = re.compile(
    r"""(?:environ\.get|os\.getenv|os\.environ\[|\benv\.\w+|environment\.read|port_from_env)\(?\s*"([A-Z][A-Z0-9_]*)"|"""
    r""""([A-Z][A-Z0-9_]*)"\s+in\s+os\.environ"""
)
SHELL_READS = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")
SHELL_DEFAULTS = re.compile(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}")
# Read or written by the code, but not settings of the project.
NOT_SETTINGS = {
    "PROMETHEUS_MULTIPROC_DIR": "set by web and worker for prometheus-client, to their own folder",
    "DJANGO_SETTINGS_MODULE": "Django's own",
    "PYTHONUNBUFFERED": "make run sets it for its servers",
    "CELERY_RESULT_BACKEND": "refused at start-up (RESULT_BACKEND_URL's help says why)",
    "IFS": "the shell's own",
}


def python_sources():
    for folder in ("app", "project"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path != REPO_ROOT / "project" / "environment.py":
                yield path


def names_read() -> dict[str, str]:
    """Every variable name the code reads, with a file that reads it."""
    found = {}
    for path in python_sources():
        for match in PYTHON_READS.finditer(path.read_text()):
            found.setdefault(match.group(1) or match.group(2), str(path.relative_to(REPO_ROOT)))
    for match in SHELL_READS.finditer(ENTRYPOINT.read_text()):
        found.setdefault(match.group(1), str(ENTRYPOINT.relative_to(REPO_ROOT)))
    return found


def run_generator(*args):
    return subprocess.run(
        [sys.executable, "-m", "project.environment", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def checkout_copy(tmp_path):
    for name in ("README.md", ".env.sample"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    return tmp_path


@pytest.mark.subprocess
def test_readme_tables_and_env_sample_are_up_to_date():
    run = run_generator("--check")

    assert run.returncode == 0, run.stderr


@pytest.mark.subprocess
def test_check_fails_on_a_stale_readme_and_names_the_command(checkout_copy):
    readme = checkout_copy / "README.md"
    readme.write_text(
        readme.read_text().replace("| `CELERY_METRICS_PORT` | `9808`", "| `CELERY_METRICS_PORT` | `9809`", 1)
    )

    run = run_generator("--check", "--root", str(checkout_copy))

    assert "`9809`" in readme.read_text(), "the README has no row for CELERY_METRICS_PORT"
    assert run.returncode == 1
    assert "README.md is stale: run `make settings-docs`" in run.stderr


@pytest.mark.subprocess
def test_check_fails_on_a_stale_env_sample(checkout_copy):
    sample = checkout_copy / ".env.sample"
    sample.write_text(sample.read_text().replace("CELERY_TASK_TIME_LIMIT=30\n", ""))

    run = run_generator("--check", "--root", str(checkout_copy))

    assert run.returncode == 1
    assert ".env.sample is stale" in run.stderr


@pytest.mark.subprocess
def test_generating_rewrites_only_between_the_markers(checkout_copy):
    readme = checkout_copy / "README.md"
    before = readme.read_text()
    head, rest = before.split(environment.START, 1)
    _, tail = rest.split(environment.END, 1)
    readme.write_text(f"{head}{environment.START}\nold rows\n{environment.END}{tail}")

    run = run_generator("--root", str(checkout_copy))

    assert run.returncode == 0, run.stderr
    assert readme.read_text() == before


def test_every_variable_the_code_reads_is_declared():
    undeclared = {
        name: where
        for name, where in names_read().items()
        if name not in environment.VARIABLES and name not in NOT_SETTINGS
    }

    assert len(names_read()) > 80, "the scan finds almost nothing: are the patterns still right?"
    assert not undeclared, f"declare these in project/environment.py: {undeclared}"


def test_every_declared_variable_is_read_by_the_code():
    sources = "\n".join(path.read_text() for path in python_sources()) + ENTRYPOINT.read_text()

    unread = [name for name in environment.VARIABLES if not re.search(rf"\b{name}\b", sources)]

    assert not unread, f"declared but read nowhere: {unread}"


def test_the_entrypoint_defaults_are_the_declared_ones():
    mismatches = []
    for name, shell_default in SHELL_DEFAULTS.findall(ENTRYPOINT.read_text()):
        declared = environment.VARIABLES[name].default
        if isinstance(declared, environment.InRuntimeDir):
            expected = f"$runtime_dir/{declared.leaf}"
        elif isinstance(declared, environment.Derived):
            continue  # described in words: the image's value is part of the text
        else:
            expected = environment.literal(declared)
        if shell_default != expected:
            mismatches.append(f"{name}: entrypoint {shell_default!r}, declared {expected!r}")

    assert not mismatches, mismatches


def test_every_variable_has_help_and_is_declared_once():
    assert not [v.name for v in environment.VARIABLES.values() if not v.help.strip()], "variables without help"
    names = [v.name for section in environment.SECTIONS for v in section.variables]
    assert len(names) == len(set(names)), "a variable is declared twice"


def test_read_parses_the_declared_kind(monkeypatch):
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "45")
    monkeypatch.setenv("DJANGO_DEBUG", "true")
    monkeypatch.setenv("DJANGO_ALLOWED_HOSTS", "a.example,b.example")

    assert environment.read("CELERY_TASK_TIME_LIMIT") == 45
    assert environment.read("DJANGO_DEBUG") is True
    assert environment.read("DJANGO_ALLOWED_HOSTS") == ["a.example", "b.example"]


def test_an_empty_number_is_unset_but_an_empty_list_is_a_value(monkeypatch):
    monkeypatch.setenv("GUNICORN_TIMEOUT", "")
    monkeypatch.setenv("DJANGO_ALLOWED_HOSTS", "")

    assert environment.read("GUNICORN_TIMEOUT") == 30
    assert environment.read("DJANGO_ALLOWED_HOSTS") == []


def test_an_empty_variable_with_a_derived_default_takes_the_default(monkeypatch):
    monkeypatch.setenv("RESULT_BACKEND_URL", "")

    assert environment.read("RESULT_BACKEND_URL", default="django-db") == "django-db"


def test_a_computed_default_is_passed_exactly_when_declared_so(monkeypatch):
    monkeypatch.delenv("RESULT_BACKEND_URL", raising=False)

    with pytest.raises(TypeError):
        environment.read("RESULT_BACKEND_URL")
    with pytest.raises(TypeError):
        environment.read("CELERY_TASK_TIME_LIMIT", default=31)


def test_runtime_files_default_inside_app_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("APP_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_BASE_DIR", raising=False)

    assert environment.read("PROMETHEUS_MULTIPROC_BASE_DIR") == str(tmp_path / "prometheus-multiproc")


def test_app_runtime_dir_defaults_inside_the_checkout(monkeypatch):
    monkeypatch.delenv("APP_RUNTIME_DIR", raising=False)

    assert environment.read("APP_RUNTIME_DIR") == str(REPO_ROOT / "var" / "runtime")
