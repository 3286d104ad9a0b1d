"""`fsb` imports only what the verb it runs needs: scripts and agents call `fsb exec` once per
command, and every module imported at start-up is paid each time (issue 11, item 4). A test of
imports, not of time: the numbers are benchmarks/cli_start.py's."""

from __future__ import annotations

import json
import subprocess
import sys

# Heavy for a client start-up, and none is needed to parse a command line.
HEAVY = ("grpc", "pydantic", "rich", "fastsandbox.sdk", "fastsandbox.api.models")
# The servers' code: no client verb needs it.
SERVERS = ("fastsandbox.control", "fastsandbox.agent", "fastsandbox.store", "fastsandbox.server")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def _under(loaded: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == r or m.startswith(r + ".") for r in roots))


def test_importing_the_cli_entry_point_imports_no_heavy_module() -> None:
    loaded = _loaded_after("import fastsandbox.cli.main")
    assert _under(loaded, (*HEAVY, *SERVERS)) == []


def test_building_the_exec_and_run_verbs_imports_no_server_code() -> None:
    loaded = _loaded_after(
        "from fastsandbox.cli.main import build_app\nbuild_app(['exec']); build_app(['run'])"
    )
    assert _under(loaded, (*SERVERS, "fastsandbox.sdk", "grpc")) == []


def test_every_verb_is_listed_by_the_whole_app() -> None:
    from fastsandbox.cli import main

    names = {c.name for c in main.build_app().registered_commands}
    groups = {g.name for g in main.build_app().registered_groups}
    assert names | groups == set(main._VERBS)


def test_the_entry_point_and_version_do_not_import_typer() -> None:
    """`fsb exec`/`fsb run`'s common forms and `fsb --version` are answered before any app is
    built (cli/exec_fast.py, cli/run_fast.py): the entry point must not pay for typer."""
    loaded = _loaded_after(
        "import contextlib, io\nfrom fastsandbox.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--version'])"
    )
    assert _under(loaded, ("typer", "click", "pydantic", "yaml", "grpc", "asyncio")) == []
