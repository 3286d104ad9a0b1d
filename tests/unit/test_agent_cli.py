"""`fsb agent` flags become one AgentSettings; defaults derive from the name; the command line the
fleets build (`AgentArgs.argv()`) is parsed back by the real `fsb agent` parser unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fastsandbox.agent.args import DEFAULTS, AgentArgs, flag_of
from fastsandbox.agent.cli import main, settings_from_args
from fastsandbox.cli.commands.agent import parse
from fastsandbox.cli.main import app
from fastsandbox.errors import InvalidArgument

EVERY_FLAG = AgentArgs(
    name="a1",
    pool="p1",
    namespace="team",
    listen="127.0.0.1:7001",
    token_file=Path("/etc/fsb/token"),
    insecure_no_token=True,
    tls_cert=Path("/etc/fsb/tls.crt"),
    tls_key=Path("/etc/fsb/tls.key"),
    state_dir=Path("/var/lib/fsb/agents/a1"),
    containerd_socket=Path("/run/c.sock"),
    containerd_namespace="k8s.io",
    capacity=3,
    runtime="gvisor",
    agent_ip="10.0.0.5",
    netns_path="/var/run/netns/a1",
    network_mode="private",
    egress="allow",
    egress_allow=("192.0.2.0/24",),
    forbid=("10.209.0.0/24", "192.0.2.9/32"),
    sandbox_subnet="10.99.0.0/24",
    port_range="30000-30100",
    cgroup_parent="/fsb",
    pod_uid="0b9c-uid",
    insecure_registry=("127.0.0.1:5000", "reg:5001"),
    grace=2.5,
    version="v9",
    init_path="none",
    logger_path="/opt/fsb-logger",
    log_max_bytes=1 << 20,
    metrics_listen="127.0.0.1:9101",
    warm_slots=2,
    warm_image=("registry/a:1", "registry/b:2"),
    warm_recent=3,
    warm_cpu_millis=500,
    warm_memory_bytes=64 << 20,
    warm_pids_limit=100,
    log_level="debug",
    log_format="json",
    log_file=Path("/tmp/a.log"),
)


def test_every_field_is_set_in_the_sample() -> None:
    """The round trip below covers every flag: a new field must be added to the sample."""
    for f in dataclasses.fields(AgentArgs):
        assert getattr(EVERY_FLAG, f.name) != f.default, f.name


@pytest.mark.parametrize(
    "args",
    [
        EVERY_FLAG,
        DEFAULTS,
        AgentArgs(name="$(POD_NAME)", listen="$(POD_IP):7443", grace=0.1 + 0.2, capacity=1),
        AgentArgs(state_dir=Path("/d/agents/p-1"), insecure_registry=("r:1",), version="-odd"),
    ],
)
def test_the_built_command_line_parses_back_unchanged(args: AgentArgs) -> None:
    argv = args.argv()
    assert parse(argv) == args
    assert all(a.startswith("--") for a in argv)  # one token per flag: `--flag=value`


def test_the_flags_are_the_field_names() -> None:
    argv = EVERY_FLAG.argv()
    assert "--insecure-no-token" in argv
    assert f"{flag_of('state_dir')}=/var/lib/fsb/agents/a1" in argv
    assert argv.count("--insecure-registry=127.0.0.1:5000") == 1
    assert "--grace=2.5" in argv


def test_flags_map_to_settings(tmp_path: Path) -> None:
    args = parse(
        [
            "--name=a1",
            "--pool=p1",
            "--namespace=team",
            "--listen=127.0.0.1:7001",
            "--insecure-no-token",
            f"--state-dir={tmp_path}",
            "--containerd-socket=/run/c.sock",
            "--containerd-namespace=k8s.io",
            "--capacity=3",
            "--runtime=gvisor",
            "--agent-ip=10.0.0.5",
            "--netns-path=/var/run/netns/a1",
            "--cgroup-parent=/fsb",
            "--insecure-registry=127.0.0.1:5000",
            "--insecure-registry",
            "reg:5001",
            "--grace=2.5",
            "--version=v9",
            "--log-level=debug",
            "--log-format=json",
            f"--log-file={tmp_path / 'a.log'}",
        ]
    )
    s = settings_from_args(args)
    assert (s.name, s.pool, s.namespace, s.listen) == ("a1", "p1", "team", "127.0.0.1:7001")
    assert (s.state_dir, s.containerd_socket, s.containerd_namespace) == (
        tmp_path,
        Path("/run/c.sock"),
        "k8s.io",
    )
    assert (s.capacity, s.runtime, s.agent_ip) == (3, "gvisor", "10.0.0.5")
    assert (s.netns_path, s.cgroup_parent) == ("/var/run/netns/a1", "/fsb")
    assert s.insecure_registries == ["127.0.0.1:5000", "reg:5001"]
    assert (s.delete_grace_seconds, s.version) == (2.5, "v9")
    assert (s.log.level, s.log.format, s.log.file) == ("debug", "json", tmp_path / "a.log")


def test_defaults_follow_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    s = settings_from_args(parse(["--name=a2"]))
    assert s.state_dir == tmp_path / "fastsandbox" / "agents" / "a2"
    assert s.listen == f"unix://{s.state_dir / 'agent.sock'}"
    assert (s.capacity, s.runtime, s.netns_path, s.delete_grace_seconds) == (5, "runc", None, 10.0)
    assert s.version


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--capacity=0"], "--capacity"),
        (["--grace=-1"], "--grace"),
        (["--runtime=kata"], "--runtime"),
        (["--log-level=loud"], "--log-level"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_fsb_agent_help_lists_the_flags() -> None:
    result = CliRunner().invoke(app, ["agent", "--help"])
    assert result.exit_code == 0, result.output
    for f in dataclasses.fields(AgentArgs):
        assert flag_of(f.name) in result.output


def test_a_network_listen_address_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="--token-file or \\$FSB_AGENT_TOKEN"):
        settings_from_args(parse(["--name=a", "--listen=10.1.2.3:7443"]), environ={})

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    by_file = settings_from_args(
        parse(["--name=a", "--listen=10.1.2.3:7443", f"--token-file={token_file}"]),
        environ={"FSB_AGENT_TOKEN": "from-env"},
    )
    assert (by_file.token, by_file.insecure_no_token) == ("s3cret", False)
    by_env = settings_from_args(
        parse(["--name=a", "--listen=10.1.2.3:7443"]), environ={"FSB_AGENT_TOKEN": "from-env"}
    )
    assert by_env.token == "from-env"
    open_ = settings_from_args(
        parse(["--name=a", "--listen=10.1.2.3:7443", "--insecure-no-token"]), environ={}
    )
    assert (open_.token, open_.insecure_no_token) == (None, True)

    token_file.write_text("\n")
    with pytest.raises(InvalidArgument, match="is empty"):
        settings_from_args(
            parse(["--name=a", "--listen=10.1.2.3:7443", f"--token-file={token_file}"]), {}
        )


def test_a_unix_socket_needs_no_token(tmp_path: Path) -> None:
    args = parse(["--name=a", f"--listen=unix://{tmp_path}/a.sock"])
    assert settings_from_args(args, environ={}).token is None


def test_missing_token_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSB_AGENT_TOKEN", raising=False)
    assert main(["--name=a", "--listen=127.0.0.1:0"]) == 2
    assert "--insecure-no-token" in capsys.readouterr().err


def test_an_ipv6_pod_ip_is_bracketed() -> None:
    args = parse(["--name=a", "--listen=fd00::5:7443", "--insecure-no-token"])
    assert settings_from_args(args, environ={}).listen == "[fd00::5]:7443"
    args = parse(["--name=a", "--listen=10.0.0.5:7443", "--insecure-no-token"])
    assert settings_from_args(args, environ={}).listen == "10.0.0.5:7443"


def test_logger_flags() -> None:
    s = settings_from_args(parse(["--name=a", "--logger-path=/opt/fsb-logger"]), environ={})
    assert (s.logger_path, s.log_max_bytes) == (Path("/opt/fsb-logger"), 10 * 1024 * 1024)
    s = settings_from_args(
        parse(["--name=a", "--logger-path=none", "--log-max-bytes=1048576"]), environ={}
    )
    assert (s.logger_path, s.log_max_bytes) == (None, 1048576)
    with pytest.raises(typer.BadParameter, match="65536"):
        parse(["--log-max-bytes=100"])
