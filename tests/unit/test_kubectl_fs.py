"""`kubectl fs` is the `fsb` CLI as a kubectl plugin: run by the real `kubectl` binary from PATH,
it takes its namespace from the current kubeconfig context and its endpoint from `--endpoint` /
`FSB_ENDPOINT` or the controller's Service (looked up in the cluster; a stand-in here: this
tier has no apiserver, the Kubernetes tier's controller test has one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsandbox.cli import plugin
from tests.unit.fastpath_fake import TOKEN, isolate_env
from tests.unit.io_fastpath_fake import Rig, serve_io

KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: team
contexts:
- name: team
  context: {cluster: c, user: u, namespace: team-a}
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: u
  user: {token: t}
"""


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate_env(monkeypatch, tmp_path)
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@pytest.fixture
def rig(tmp_path: Path, kubeconfig: Path) -> Iterator[Rig]:
    with serve_io(tmp_path) as rig:
        rig.fastpath.add_sandbox("box", namespace="team-a")
        yield rig


def test_defaults_come_from_the_context_and_the_service(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plugin, "service_endpoint", lambda config, service="": "10.96.0.7:9090")
    env = dict(os.environ)
    assert plugin.plugin_defaults(env, []) == {
        "FSB_NAMESPACE": "team-a",
        "FSB_ENDPOINT": "10.96.0.7:9090",
    }
    # Flags and FSB_* win: nothing is defaulted over them.
    assert plugin.plugin_defaults(env, ["--endpoint", "x:1"]) == {"FSB_NAMESPACE": "team-a"}
    assert plugin.plugin_defaults(env | {"FSB_NAMESPACE": "b", "FSB_ENDPOINT": "y:2"}, []) == {}


def test_an_unreachable_cluster_leaves_the_usual_defaults(kubeconfig: Path) -> None:
    config = plugin._kubeconfig(dict(os.environ))
    assert plugin.service_endpoint(config) is None  # 127.0.0.1:1 answers nothing
    assert plugin.plugin_defaults({"KUBECONFIG": "/nonexistent"}, []) == {}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl binary")
def test_the_real_kubectl_runs_the_plugin_in_the_context_namespace(rig: Rig) -> None:
    bindir = Path(sys.executable).parent
    assert (bindir / "kubectl-fs").exists(), "pip install -e . makes the console script"
    env = dict(os.environ) | {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "FSB_ENDPOINT": rig.endpoint,
        "FSB_TOKEN": TOKEN,
    }
    result = subprocess.run(
        ["kubectl", "fs", "exec", "box", "--", "sh", "-c", "echo in-team-a; exit 4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    assert result.stdout == "in-team-a\n"
    listed = subprocess.run(
        ["kubectl", "plugin", "list"], capture_output=True, text=True, env=env, timeout=30
    )
    assert "kubectl-fs" in listed.stdout
    wrong = subprocess.run(
        ["kubectl", "fs", "exec", "-n", "other", "box", "--", "true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert wrong.returncode == 3  # -n wins over the context: no box in `other`
