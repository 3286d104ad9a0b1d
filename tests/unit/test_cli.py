"""The `fsb` CLI against a fake Fast-Path server: output shapes, exit codes, auth, `-f` files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from fastsandbox.cli.main import app, main
from tests.unit.fastpath_fake import TOKEN, FakeFastPath, free_port, isolate_env, serve

runner = CliRunner()
WIRE_KEYS = ["apiVersion", "kind", "metadata", "spec", "status"]


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def fake() -> FakeFastPath:
    return FakeFastPath()


@pytest.fixture
def endpoint(fake: FakeFastPath, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with serve(fake) as address:
        monkeypatch.setenv("FSB_ENDPOINT", address)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield address


def fsb(*args: str) -> Any:
    return runner.invoke(app, list(args))


# ---------------------------------------------------------------- output shapes


def test_run_json_prints_exactly_the_api_object(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb(
        "run", "demo", "--image", "busybox", "-e", "V=1", "-e", "W=a=b", "-w", "/tmp",
        "-p", "8080", "--ttl", "60", "--mode", "strong", "-o", "json", "--", "sh", "-c", "echo $V",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert list(obj) == WIRE_KEYS
    assert obj["apiVersion"] == "fastsandbox.io/v1alpha1"
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["assignedAgent"] == "default-pool-a1"
    assert obj["status"]["containerID"] == "ctr-demo"
    assert obj["status"]["endpoints"] == ["10.88.0.2:8080"]
    assert obj["status"]["timings"]["runtimeReadyMs"] == 42.0
    assert obj["spec"]["workingDir"] == "/tmp"

    req = fake.calls[-1].request
    assert (req.namespace, req.name, req.image, req.pool_ref) == (
        "default", "demo", "busybox", "default-pool"
    )  # fmt: skip
    assert list(req.command) == ["sh", "-c", "echo $V"]
    assert list(req.args) == []
    assert [(e.name, e.value) for e in req.env] == [("V", "1"), ("W", "a=b")]
    assert list(req.exposed_ports) == [8080]
    assert (req.ttl_seconds, req.mode) == (60, "strong")


def test_run_prints_a_human_summary(endpoint: str) -> None:
    result = fsb("run", "demo", "--image", "busybox", "-p", "80")
    assert result.exit_code == 0, result.output
    for expected in ("default/demo", "uid-demo", "default-pool-a1", "ctr-demo", "10.88.0.2:80"):
        assert expected in result.stdout
    assert "runtime ready 42.0 ms" in result.stdout


def test_run_yaml(endpoint: str) -> None:
    result = fsb("run", "demo", "--image", "busybox", "-o", "yaml")
    assert result.exit_code == 0, result.output
    assert list(yaml.safe_load(result.stdout)) == WIRE_KEYS


def test_list_empty_json_is_items(endpoint: str) -> None:
    result = fsb("list", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"items": []}


def test_list_json_and_table(fake: FakeFastPath, endpoint: str) -> None:
    fake.add_sandbox("a", exposedPorts=[8080])
    fake.add_sandbox("b", namespace="other")

    result = fsb("list", "-o", "json")
    assert [i["metadata"]["name"] for i in json.loads(result.stdout)["items"]] == ["a"]
    assert fake.calls[-1].request.namespace == "default"

    result = fsb("list", "-A")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "PHASE", "AGENT", "ENDPOINTS", "AGE"]
    assert lines[1].split()[:5] == ["default", "a", "Running", "default-pool-a1", "10.88.0.2:8080"]
    assert fake.calls[-1].request.namespace == ""

    result = fsb("list", "-n", "other")
    assert result.stdout.splitlines()[0].split()[0] == "NAME"
    assert "b" in result.stdout and " a " not in result.stdout


def test_get_json_and_readable(fake: FakeFastPath, endpoint: str) -> None:
    from fastsandbox.api.models import to_wire

    sb = fake.add_sandbox("demo", env=[{"name": "V", "value": "1"}])
    result = fsb("get", "demo", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == to_wire(sb)

    result = fsb("get", "demo")
    assert result.exit_code == 0
    assert "Phase:" in result.stdout and "Running" in result.stdout
    assert "V=1" in result.stdout and "ctr-demo" in result.stdout


def test_delete(fake: FakeFastPath, endpoint: str) -> None:
    fake.add_sandbox("demo")
    result = fsb("delete", "demo", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "sandbox demo deleted"
    assert fake.calls[-1].request.wait is True


def test_logs_writes_raw_bytes(fake: FakeFastPath, endpoint: str) -> None:
    fake.add_sandbox("demo")
    result = fsb("logs", "demo", "-f")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b"hello\n\x00\xff raw\n"
    assert fake.calls[-1].request.follow is True


def test_logs_keep_stderr_apart_and_pass_tail_and_since(fake: FakeFastPath, endpoint: str) -> None:
    from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2

    fake.add_sandbox("demo")
    fake.log_chunks = [
        fastpath_pb2.LogChunk(data=b"out\n", stream="stdout", timestamp=1796155200.0),
        fastpath_pb2.LogChunk(data=b"err\n", stream="stderr", timestamp=1796155201.0),
    ]
    result = fsb("logs", "demo", "--tail", "3", "--since", "2026-12-01T20:00:00Z", "-t")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b"2026-12-01T20:00:00.000000Z out\n"
    assert result.stderr_bytes == b"2026-12-01T20:00:01.000000Z err\n"
    req = fake.calls[-1].request
    assert (req.tail_lines, req.since_unix) == (3, 1796155200.0)
    result = fsb("logs", "demo", "--since", "soon")
    assert result.exit_code == 2 and "--since" in result.stderr


def test_pool_verbs(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb(
        "pool", "create", "p1", "--min", "2", "--max", "3", "--buffer-min", "1",
        "--buffer-max", "4", "--per-agent", "7", "--runtime", "gvisor", "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["kind"] == "SandboxPool"
    assert obj["spec"]["capacity"] == {"poolMin": 2, "poolMax": 3, "bufferMin": 1, "bufferMax": 4}
    assert (obj["spec"]["maxSandboxesPerAgent"], obj["spec"]["runtime"]) == (7, "gvisor")

    assert json.loads(fsb("pool", "get", "p1", "-o", "json").stdout)["metadata"]["name"] == "p1"
    listed = fsb("pool", "list")
    assert listed.stdout.split()[:2] == ["NAME", "RUNTIME"] and "p1" in listed.stdout
    assert fsb("pool", "delete", "p1").stdout.strip() == "pool p1 deleted"
    assert json.loads(fsb("pool", "list", "-o", "json").stdout) == {"items": []}


# ---------------------------------------------------------------- validation: exit 2, no RPC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "demo"], "spec.image: required"),
        (["run", "demo", "--image", "x", "-p", "0"], "spec.exposedPorts[0]: must be 1..65535"),
        (["run", "demo", "--image", "x", "-p", "65536"], "spec.exposedPorts[0]: must be 1..65535"),
        (["run", "demo", "--image", "x", "-e", "=x"], "spec.env[0].name: required"),
        (["run", "demo", "--image", "x", "-e", "NOVALUE"], "expected K=V"),
        (
            ["run", "demo", "--image", "x", "--failure-policy", "Bogus"],
            "spec.failurePolicy: must be Manual or AutoRecreate",
        ),
        (["run", "demo", "--image", "x", "--pool", ""], "spec.poolRef"),
        (["run", "demo", "--image", "x", "--expire-time", "tomorrow"], "spec.expireTime"),
        (["run", "demo", "--image", "x", "--ttl", "0"], "spec.ttlSeconds: must be positive"),
        (["run", "demo", "--image", "x", "--mode", "eventual"], "mode: must be fast or strong"),
        (["run", "Bad_Name", "--image", "x"], "metadata.name"),
        (["run", "demo", "--image", "x", "-w", "rel"], "spec.workingDir: must be an absolute"),
        (["run", "demo", "--image", "x", "-p", "abc"], "--port"),
        (["run", "demo", "--image", "x", "--no-such-flag"], "--no-such-flag"),
        (["pool", "create", "p", "--min", "3", "--max", "1"], "poolMax must be at least poolMin"),
        (["pool", "create", "p", "--runtime", "kata"], "spec.runtime: must be runc or gvisor"),
    ],
)
def test_validation_exits_2_before_any_rpc(
    fake: FakeFastPath, endpoint: str, args: list[str], message: str
) -> None:
    result = fsb(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    assert fake.calls == []


def test_validation_comes_before_token_check() -> None:
    result = fsb("run", "demo", "--endpoint", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 2
    assert "spec.image: required" in result.stderr


# ---------------------------------------------------------------- -f FILE.yaml


def test_run_file_flat_keys(fake: FakeFastPath, endpoint: str, tmp_path: Path) -> None:
    spec = tmp_path / "sb.yaml"
    spec.write_text(
        "image: busybox\npool_ref: p2\ncommand: [sleep]\nargs: ['60']\n"
        "env: {A: '1'}\nworkingDir: /srv\nexposed_ports: [80]\nconsistency_mode: strong\n"
    )
    result = fsb("run", "demo", "-f", str(spec), "-e", "B=2")
    assert result.exit_code == 0, result.output
    req = fake.calls[-1].request
    assert (req.image, req.pool_ref, req.working_dir, req.mode) == (
        "busybox",
        "p2",
        "/srv",
        "strong",
    )
    assert (list(req.command), list(req.args), list(req.exposed_ports)) == (["sleep"], ["60"], [80])
    assert [(e.name, e.value) for e in req.env] == [("A", "1"), ("B", "2")]


def test_run_file_sandbox_object_and_flags_override(
    fake: FakeFastPath, endpoint: str, tmp_path: Path
) -> None:
    spec = tmp_path / "sb.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "fastsandbox.io/v1alpha1",
                "kind": "Sandbox",
                "metadata": {"name": "ignored", "labels": {"team": "a"}},
                "spec": {
                    "image": "busybox:old",
                    "poolRef": "default-pool",
                    "env": [{"name": "A", "value": "file"}],
                    "failurePolicy": "AutoRecreate",
                },
                "status": {"phase": "Running"},
            }
        )
    )
    result = fsb("run", "demo", "-f", str(spec), "--image", "busybox:new", "-e", "A=flag",
                 "-o", "json", "--", "echo", "hi")  # fmt: skip
    assert result.exit_code == 0, result.output
    req = fake.calls[-1].request
    assert (req.name, req.image, req.failure_policy) == ("demo", "busybox:new", "AutoRecreate")
    assert [(e.name, e.value) for e in req.env] == [("A", "flag")]
    assert dict(req.labels) == {"team": "a"}
    assert list(req.command) == ["echo", "hi"]


def test_run_file_unknown_key_is_exit_2(fake: FakeFastPath, endpoint: str, tmp_path: Path) -> None:
    spec = tmp_path / "sb.yaml"
    spec.write_text("image: busybox\nimagePullPolicy: Always\n")
    result = fsb("run", "demo", "-f", str(spec))
    assert result.exit_code == 2
    assert "unknown key 'imagePullPolicy'" in result.stderr
    assert fake.calls == []


def test_run_file_missing_is_exit_2(tmp_path: Path) -> None:
    result = fsb("run", "demo", "-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


# ---------------------------------------------------------------- server errors → exit codes


@pytest.mark.parametrize(
    ("method", "code", "args", "exit_code"),
    [
        ("Get", grpc.StatusCode.NOT_FOUND, ["get", "x"], 3),
        ("Create", grpc.StatusCode.RESOURCE_EXHAUSTED, ["run", "x", "--image", "b"], 5),
        ("Create", grpc.StatusCode.ALREADY_EXISTS, ["run", "x", "--image", "b"], 4),
        ("Create", grpc.StatusCode.INVALID_ARGUMENT, ["run", "x", "--image", "b"], 2),
        ("Create", grpc.StatusCode.NOT_FOUND, ["run", "x", "--image", "b", "--pool", "nope"], 3),
        ("Delete", grpc.StatusCode.UNAVAILABLE, ["delete", "x"], 7),
        ("Delete", grpc.StatusCode.DEADLINE_EXCEEDED, ["delete", "x"], 7),
        ("Get", grpc.StatusCode.PERMISSION_DENIED, ["get", "x"], 6),
        ("Get", grpc.StatusCode.UNAUTHENTICATED, ["get", "x"], 6),
        ("Update", grpc.StatusCode.ABORTED, ["update", "x", "--ttl", "5"], 4),
        ("Update", grpc.StatusCode.FAILED_PRECONDITION, ["update", "x", "--ttl", "5"], 4),
        ("List", grpc.StatusCode.INTERNAL, ["list"], 1),
        ("List", grpc.StatusCode.UNKNOWN, ["list"], 1),
        ("Logs", grpc.StatusCode.NOT_FOUND, ["logs", "x"], 3),
        ("CreatePool", grpc.StatusCode.ALREADY_EXISTS, ["pool", "create", "p"], 4),
    ],
)
def test_server_errors_map_to_exit_codes(
    fake: FakeFastPath,
    endpoint: str,
    method: str,
    code: grpc.StatusCode,
    args: list[str],
    exit_code: int,
) -> None:
    fake.fail(method, code, f"the server says {code.name}")
    result = fsb(*args)
    assert result.exit_code == exit_code, result.output
    assert result.stderr == f"error: the server says {code.name}\n"


def test_real_not_found_message(endpoint: str) -> None:
    result = fsb("get", "ghost")
    assert result.exit_code == 3
    assert result.stderr == "error: sandbox default/ghost not found\n"


def test_wrong_token_is_exit_6(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSB_TOKEN", "wrong")
    result = fsb("list")
    assert result.exit_code == 6
    assert "invalid API token" in result.stderr


def test_a_token_on_argv_is_refused_pointing_to_token_file(
    fake: FakeFastPath, endpoint: str, tmp_path: Path
) -> None:
    for argv in (["list", "--token", TOKEN], ["get", "x", f"--token={TOKEN}"]):
        result = fsb(*argv)
        assert result.exit_code == 2
        assert "--token-file" in result.stderr and TOKEN not in result.stderr
    assert fake.calls == []
    # After `--` the words are the sandbox's command: not ours to refuse.
    file = tmp_path / "tok"
    file.write_text(TOKEN + "\n")
    result = fsb("list", "--token-file", str(file))
    assert result.exit_code == 0, result.output
    assert fake.calls[-1].metadata["authorization"] == f"Bearer {TOKEN}"


def test_server_down_is_exit_7_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: the one case that says "cannot reach" (worth a retry)."""
    monkeypatch.setenv("FSB_TOKEN", "t")
    address = f"127.0.0.1:{free_port()}"
    result = fsb("list", "--endpoint", address)
    assert result.exit_code == 7
    assert result.stderr == (
        f"error: cannot reach fsb server at {address}: is `fsb server` running?\n"
    )


def test_no_socket_is_exit_7_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSB_TOKEN", "t")
    address = f"unix://{tmp_path}/nobody.sock"
    result = fsb("get", "x", "--endpoint", address)
    assert result.exit_code == 7
    assert result.stderr == (
        f"error: cannot reach fsb server at {address}: is `fsb server` running?\n"
    )


def test_an_unavailable_server_answer_keeps_the_servers_reason(
    fake: FakeFastPath, endpoint: str
) -> None:
    """The server answered UNAVAILABLE: exit 7 like an unreachable one, but the user reads the
    server's reason, even when it quotes a connection failure of its own (to an agent)."""
    reason = (
        "agent at unix:///d/agents/a1/agent.sock is unreachable: failed to connect to all "
        "addresses; connection refused"
    )
    fake.fail("Create", grpc.StatusCode.UNAVAILABLE, reason)
    result = fsb("run", "x", "--image", "busybox")
    assert result.exit_code == 7, result.output
    assert result.stderr == f"error: {reason}\n"
    assert "cannot reach" not in result.stderr


# ---------------------------------------------------------------- token, endpoint, namespace


def test_token_is_sent_as_bearer_metadata(fake: FakeFastPath, endpoint: str) -> None:
    assert fsb("list").exit_code == 0
    assert fake.calls[-1].metadata["authorization"] == f"Bearer {TOKEN}"


def test_token_read_from_data_dir(
    fake: FakeFastPath, endpoint: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSB_TOKEN")
    fake.token = "from-the-file"
    data_dir.mkdir(parents=True)
    (data_dir / "token").write_text("from-the-file\n")
    result = fsb("list")
    assert result.exit_code == 0, result.output
    assert fake.calls[-1].metadata["authorization"] == "Bearer from-the-file"


def test_no_token_anywhere_is_exit_6_naming_the_file(
    fake: FakeFastPath, endpoint: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSB_TOKEN")
    result = fsb("list")
    assert result.exit_code == 6
    assert "no API token: use --token-file, set FSB_TOKEN" in result.stderr
    assert str(data_dir / "token") in result.stderr
    assert fake.calls == []


def test_config_file_gives_endpoint_token_and_namespace(
    fake: FakeFastPath, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FSB_ENDPOINT")
    monkeypatch.delenv("FSB_TOKEN")
    config = tmp_path / "home" / ".config" / "fastsandbox" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"endpoint: {endpoint}\ntoken: {TOKEN}\nnamespace: team-a\n")
    result = fsb("list")
    assert result.exit_code == 0, result.output
    assert fake.calls[-1].request.namespace == "team-a"
    # a flag beats the config file
    assert fsb("list", "-n", "team-b").exit_code == 0
    assert fake.calls[-1].request.namespace == "team-b"


def test_namespace_from_env(
    fake: FakeFastPath, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSB_NAMESPACE", "ns-env")
    assert fsb("run", "demo", "--image", "b").exit_code == 0
    assert fake.calls[-1].request.namespace == "ns-env"


# ---------------------------------------------------------------- entry point


def test_main_returns_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "demo"]) == 2
    assert "spec.image: required" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert main(["no-such-verb"]) == 2


def test_server_flags_are_validated_before_starting(tmp_path: Path) -> None:
    result = fsb("server", "--data-dir", str(tmp_path), "--network", "bogus")
    assert result.exit_code == 2
    assert "--network: must be cni or host" in result.stderr
