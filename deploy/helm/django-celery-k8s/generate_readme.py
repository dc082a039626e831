#!/usr/bin/env python3
"""Write the Parameters table of README.md from the `## @section` and `## @param` lines of values.yaml.

python generate_readme.py          rewrites the table between the params markers
python generate_readme.py --check  exits 1 when README.md is stale or a value is undocumented
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
START, END = "<!-- params:start -->", "<!-- params:end -->"
MAX_INLINE = 60


def parse_params(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section, [(path, description), ...]), ...] in file order."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("## @section "):
            sections.append((stripped.removeprefix("## @section ").strip(), []))
        elif stripped.startswith("## @param "):
            path, _, description = stripped.removeprefix("## @param ").strip().partition(" ")
            if not sections:
                sections.append(("Parameters", []))
            sections[-1][1].append((path, description.strip()))
    return sections


def lookup(values: dict, path: str):
    node = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


def leaf_paths(node, prefix: str = ""):
    """The key path of every value that is not a non-empty object."""
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path)
        else:
            yield path


def problems(values: dict, sections) -> list[str]:
    documented = [path for _, params in sections for path, _ in params]
    found = []
    for path in documented:
        try:
            lookup(values, path)
        except KeyError:
            found.append(f"@param {path} names no value in values.yaml")
    duplicates = {path for path in documented if documented.count(path) > 1}
    found += [f"@param {path} is documented twice" for path in sorted(duplicates)]
    covered = set(documented)
    for path in leaf_paths(values):
        parts = path.split(".")
        if not any(".".join(parts[:i]) in covered for i in range(1, len(parts) + 1)):
            found.append(f"{path} in values.yaml has no ## @param line (nor has any parent of it)")
    return found


def cell(value) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"))
    if len(text) > MAX_INLINE:
        return "see values.yaml"
    return "`" + text.replace("|", "\\|") + "`"


def table(values: dict, sections) -> str:
    out = []
    for title, params in sections:
        out += [f"### {title}", "", "| Name | Description | Value |", "|---|---|---|"]
        for path, description in params:
            escaped = description.replace("|", "\\|")
            out.append(f"| `{path}` | {escaped} | {cell(lookup(values, path))} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render(readme: str, generated: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md needs the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{generated}{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md is not up to date")
    parser.add_argument("--chart", type=Path, default=HERE, help="chart folder (default: this script's)")
    args = parser.parse_args(argv)

    values_text = (args.chart / "values.yaml").read_text()
    values = yaml.safe_load(values_text) or {}
    sections = parse_params(values_text)
    found = problems(values, sections)
    if found:
        print("values.yaml documentation problems:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1

    readme_path = args.chart / "README.md"
    current = readme_path.read_text()
    wanted = render(current, table(values, sections))
    if args.check:
        if wanted != current:
            print(
                f"{readme_path} is stale: run python {Path(__file__).name} to regenerate its Parameters table",
                file=sys.stderr,
            )
            return 1
        return 0
    if wanted != current:
        readme_path.write_text(wanted)
        print(f"updated {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
