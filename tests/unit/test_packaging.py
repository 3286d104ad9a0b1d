"""Packaging: every package the code imports is declared, and one version string,
`fastsandbox.__version__`, is what the wheel, `fsb --version`, the default agent image and the
manifests say (YAML cannot import it, so this keeps them equal)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import yaml

from fastsandbox import __version__
from fastsandbox.cli.main import main
from fastsandbox.settings import ControllerSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGE = f"fastsandbox/fastsandbox:{__version__}"


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["hatch"]["version"]["path"] == "src/fastsandbox/__init__.py"


def test_fsb_version_prints_it(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fsb {__version__}"


def test_the_manifests_and_the_default_agent_image_name_it() -> None:
    assert ControllerSettings().agent_image == IMAGE
    for name in ("controller.yaml", "janitor.yaml"):
        text = (ROOT / "deploy" / name).read_text()
        images = set(re.findall(r"fastsandbox/fastsandbox:[\w.\-]+", text))
        assert images == {IMAGE}, (name, images)
    chart = yaml.safe_load((ROOT / "deploy/helm/fast-sandbox/Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"]) == (__version__, __version__)


def _imported_top_levels() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "fastsandbox").rglob("*.py"):
        if "_proto" in path.parts:
            continue  # generated
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"fastsandbox", "__future__"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_package_the_code_imports_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_levels()):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported but not in [project] dependencies: {missing}"
