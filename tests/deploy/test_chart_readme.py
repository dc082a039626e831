"""The chart README's values table is generated from values.yaml and up to date, and values.yaml
documents every value with a `## @param` line that names a real key."""

import re
import subprocess
import sys

import pytest
import yaml

from tests.deploy.conftest import CHART_DIR

VALUES = CHART_DIR / "values.yaml"
PARAM = re.compile(r"^\s*##\s*@param\s+(\S+)\s")
SKIP = re.compile(r"^\s*##\s*@skip\s+(\S+)")


def documented() -> list[str]:
    return [m.group(1) for line in VALUES.read_text().splitlines() if (m := PARAM.match(line + " "))]


def skipped() -> list[str]:
    return [m.group(1) for line in VALUES.read_text().splitlines() if (m := SKIP.match(line))]


def leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is not a non-empty map (lists and empty maps are leaves)."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths.extend(leaf_paths(value, path + "."))
        else:
            paths.append(path)
    return paths


def resolve(tree, path: str) -> bool:
    node = tree
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, list) or index >= len(node):
                return False
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def run_generator(chart_dir, *args):
    return subprocess.run(
        [sys.executable, str(chart_dir / "generate_readme.py"), *args],
        cwd=chart_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.subprocess
def test_readme_values_table_is_up_to_date():
    run = run_generator(CHART_DIR, "--check")

    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.subprocess
def test_readme_check_fails_on_a_stale_readme(chart_copy):
    readme = chart_copy / "README.md"
    readme.write_text(readme.read_text().replace("| `web.replicas`", "| `web.replicaz`", 1))

    run = run_generator(chart_copy, "--check")

    assert "web.replicaz" in readme.read_text(), "the README has no row for web.replicas"
    assert run.returncode == 1, run.stdout + run.stderr


@pytest.mark.subprocess
def test_readme_check_fails_when_a_value_is_documented_but_not_in_the_readme(chart_copy):
    values = chart_copy / "values.yaml"
    values.write_text(
        values.read_text() + "\n## @param addedLater A value the README does not list yet\naddedLater: 1\n"
    )

    run = run_generator(chart_copy, "--check")

    assert run.returncode == 1, run.stdout + run.stderr


def test_readme_lists_every_documented_value():
    readme = (CHART_DIR / "README.md").read_text()

    missing = [path for path in documented() if f"`{path}`" not in readme]
    assert not missing, missing


def test_every_param_names_a_real_key():
    values = yaml.safe_load(VALUES.read_text())

    params = documented()
    assert len(params) > 50, "values.yaml documents almost nothing"
    assert not [p for p in params if not resolve(values, p)], "## @param lines naming no key in values.yaml"
    duplicates = sorted({p for p in params if params.count(p) > 1})
    assert not duplicates, duplicates


def test_every_value_has_a_param():
    values = yaml.safe_load(VALUES.read_text())
    covered = set(documented()) | set(skipped())

    def is_covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:n]) in covered for n in range(1, len(parts) + 1))

    undocumented = [path for path in leaf_paths(values) if not is_covered(path)]
    assert not undocumented, f"values without a ## @param line: {undocumented}"
