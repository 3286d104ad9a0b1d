"""`fsb agent` flags become one AgentSettings; defaults derive from the name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsandbox.agent.cli import UsageError, build_parser, main, settings_from_args


def test_flags_map_to_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(
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
            "--insecure-registry=reg:5001",
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
    s = settings_from_args(build_parser().parse_args(["--name=a2"]))
    assert s.state_dir == tmp_path / "fastsandbox" / "agents" / "a2"
    assert s.listen == f"unix://{s.state_dir / 'agent.sock'}"
    assert (s.capacity, s.runtime, s.netns_path, s.delete_grace_seconds) == (5, "runc", None, 10.0)
    assert s.version


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--capacity=0"])
    assert exit_.value.code == 2
    assert "--capacity" in capsys.readouterr().err


def test_a_network_listen_address_needs_a_token(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    with pytest.raises(UsageError, match="--token-file or \\$FSB_AGENT_TOKEN"):
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
    with pytest.raises(UsageError, match="is empty"):
        settings_from_args(
            parse(["--name=a", "--listen=10.1.2.3:7443", f"--token-file={token_file}"]), {}
        )


def test_a_unix_socket_needs_no_token(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--name=a", f"--listen=unix://{tmp_path}/a.sock"])
    assert settings_from_args(args, environ={}).token is None


def test_missing_token_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSB_AGENT_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--name=a", "--listen=127.0.0.1:0"])
    assert exit_.value.code == 2
    assert "--insecure-no-token" in capsys.readouterr().err


def test_an_ipv6_pod_ip_is_bracketed() -> None:
    parse = build_parser().parse_args
    args = parse(["--name=a", "--listen=fd00::5:7443", "--insecure-no-token"])
    assert settings_from_args(args, environ={}).listen == "[fd00::5]:7443"
    args = parse(["--name=a", "--listen=10.0.0.5:7443", "--insecure-no-token"])
    assert settings_from_args(args, environ={}).listen == "10.0.0.5:7443"


def test_logger_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parse = build_parser().parse_args
    s = settings_from_args(parse(["--name=a", "--logger-path=/opt/fsb-logger"]), environ={})
    assert (s.logger_path, s.log_max_bytes) == (Path("/opt/fsb-logger"), 10 * 1024 * 1024)
    s = settings_from_args(
        parse(["--name=a", "--logger-path=none", "--log-max-bytes=1048576"]), environ={}
    )
    assert (s.logger_path, s.log_max_bytes) == (None, 1048576)
    with pytest.raises(SystemExit):
        parse(["--log-max-bytes=100"])
    assert "--log-max-bytes" in capsys.readouterr().err
