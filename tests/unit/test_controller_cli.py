"""`fsb controller`'s flags are checked before anything connects to a cluster."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastsandbox.cli.main import app
from fastsandbox.controller import default_identity, token_hint

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lease-duration", "1"], "--lease-duration: must be >= 2 seconds"),
        (["--heartbeat", "0"], "--heartbeat: must be > 0 seconds"),
        (["--log-level", "loud"], "--log-level: must be debug, info, warning or error"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "is not a file"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["controller", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.mark.parametrize(
    ("command", "later_error"),
    [
        (["controller", "--lease-duration", "1"], "--lease-duration: must be >= 2 seconds"),
        (["server", "--network", "bogus"], "--network: must be cni or host"),
    ],
)
def test_the_shared_serving_flags_parse_in_both_commands(
    command: list[str], later_error: str
) -> None:
    # One definition (cli/options.py) serves `fsb server` and `fsb controller`: repeated list
    # flags and --listen parse in both, so the command gets as far as its own later check.
    shared = ["--listen", "127.0.0.1:0"]
    shared += ["--insecure-registry", "r:5000", "--insecure-registry", "s:5000"]
    shared += ["--allowed-registry", "docker.io", "--allowed-registry", "r:5000"]
    result = runner.invoke(app, [*command, *shared])
    assert result.exit_code == 2, result.output
    assert later_error in result.stderr, result.stderr


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`fsb controller` configures the root logger for its process: undo that after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_an_unusable_kubeconfig_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    result = runner.invoke(app, ["controller", "--kubeconfig", str(config)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "error:" in result.stderr


def test_identities_are_unique_per_process_start() -> None:
    assert default_identity() != default_identity()


def test_the_token_hint_is_a_kubectl_command() -> None:
    hint = token_hint("fsb-system")
    assert hint.startswith("kubectl -n fsb-system get secret fastsandbox-api-token")
    assert "base64 -d" in hint
