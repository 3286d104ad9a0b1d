"""The runsc wrapper (agent/runtime/runsc_wrapper.py): argv parsing, the spec's namespace, and
the generated /bin/sh front run for real with stand-ins for runsc and nsenter that print their
argv (so nothing here needs root or runsc)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fastsandbox.agent.runtime import runsc_wrapper as w

# What the runc v2 shim (go-runc) passes.
ROOT = ["--root", "/run/containerd/runc/fastsandbox", "--log", "/b/log.json", "--log-format",
        "json"]  # fmt: skip


def test_parse_finds_root_subcommand_id_and_bundle() -> None:
    argv = [*ROOT, "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "sb-1"]
    assert w.parse(argv) == ("/run/containerd/runc/fastsandbox", "create", "sb-1", "/b")
    assert w.parse(["--root=/r", "kill", "--all", "sb-2", "9"]) == ("/r", "kill", "sb-2", "")
    assert w.parse(["-root", "/r", "run", "-b=/x", "c"]) == ("/r", "run", "c", "/x")
    assert w.parse(["state", "c"]) == (w.DEFAULT_ROOT, "state", "c", "")
    assert w.log_path(argv) == "/b/log.json"
    assert w.log_path(["--log=/l", "start", "c"]) == "/l"
    assert w.log_path(["start", "--log", "/not-global", "c"]) is None


def test_netns_path_of_a_spec() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/n/a"}]}}
    assert w.netns_path(spec) == "/n/a"
    assert w.netns_path({"linux": {"namespaces": [{"type": "network"}]}}) is None
    assert w.netns_path({"linux": {}}) is None
    assert w.netns_path([]) is None


def _bundle(tmp_path: Path, netns: str | None) -> Path:
    ns: dict[str, str] = {"type": "network"}
    if netns:
        ns["path"] = netns
    (tmp_path / "config.json").write_text(json.dumps({"linux": {"namespaces": [ns]}}))
    return tmp_path


def test_create_enters_the_spec_namespace_and_other_calls_do_not_parse(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "/var/run/netns/sb-1")
    argv = [*ROOT, "create", "--bundle", str(bundle), "sb-1"]
    cmd, path = w.create_command("/usr/bin/runsc", argv, "/")
    assert path == "/var/run/netns/sb-1"
    assert cmd == ["nsenter", "--net=/var/run/netns/sb-1", "--", "/usr/bin/runsc",
                   *w.EXTRA_FLAGS, *argv]  # fmt: skip
    # No path in the spec: runsc where the shim is; the working dir is the default bundle.
    _bundle(tmp_path, None)
    cmd, path = w.create_command("runsc", [*ROOT, "create", "sb-1"], str(tmp_path))
    assert path is None and cmd == ["runsc", *w.EXTRA_FLAGS, *ROOT, "create", "sb-1"]
    cmd, path = w.create_command("runsc", ["state", "create"], "/nonexistent")
    assert path is None and cmd[-2:] == ["state", "create"]


@pytest.fixture
def front(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The sh front with an echoing runsc and nsenter; returns (wrapper, runsc root, env)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("runsc", "nsenter"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        fake.chmod(0o755)
    script = Path(w.__file__)
    wrapper = tmp_path / "runsc-wrapper"
    wrapper.write_text(w.shell_wrapper(str(bin_dir / "runsc"), "python3", str(script)))
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return wrapper, tmp_path / "root", env


def _run(wrapper: Path, env: dict[str, str], *argv: str) -> list[str]:
    done = subprocess.run([str(wrapper), *argv], env=env, capture_output=True, text=True,
                          check=True, timeout=30)  # fmt: skip
    return done.stdout.split()


def test_front_enters_the_recorded_namespace_for_later_calls(
    front: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    wrapper, root, env = front
    runsc = str(tmp_path / "bin" / "runsc")
    netns = tmp_path / "netns-sb-1"
    netns.write_text("")
    bundle = _bundle(tmp_path, str(netns))
    top = ["--root", str(root), "--log", str(tmp_path / "log.json")]
    out = _run(wrapper, env, *top, "create", "--bundle", str(bundle), "sb-1")
    assert out[:2] == ["nsenter", f"--net={netns}"] and out[3] == runsc
    record = root / w.RECORD_DIR / "sb-1"
    assert record.read_text().strip() == str(netns)
    # Later calls naming the container: in its namespace (the control socket is abstract).
    assert _run(wrapper, env, *top, "start", "sb-1")[:2] == ["nsenter", f"--net={netns}"]
    kill = _run(wrapper, env, *top, "kill", "--all", "sb-1", "9")
    assert kill[:2] == ["nsenter", f"--net={netns}"] and kill[-2:] == ["sb-1", "9"]
    # Another container, or no container: runsc directly, with the flags.
    # (the stand-in runsc prints its name, then its argv)
    direct = ["runsc", *w.EXTRA_FLAGS, *top, "state", "sb-2"]
    assert _run(wrapper, env, *top, "state", "sb-2") == direct
    # The namespace gone: outside it (a dead sandbox can still be deleted); delete drops the
    # record once runsc succeeded.
    netns.unlink()
    assert _run(wrapper, env, *top, "delete", "--force", "sb-1")[0] == "runsc"
    assert not record.exists()


def test_front_create_fails_closed_with_the_reason_in_the_shim_log(
    front: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    wrapper, root, env = front
    bundle = _bundle(tmp_path, "/var/run/netns/fsb-gone")
    log = tmp_path / "log.json"
    done = subprocess.run(
        [str(wrapper), "--root", str(root), "--log", str(log), "create", "--bundle",
         str(bundle), "sb-1"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "/var/run/netns/fsb-gone" in entry["msg"]


def _annotated_bundle(tmp_path: Path, netns: str | None, annotation: str | None) -> Path:
    ns: dict[str, str] = {"type": "network"}
    if netns:
        ns["path"] = netns
    spec = w.annotate({"linux": {"namespaces": [ns]}, "process": {"env": ["A=1"]}})
    if annotation is not None:
        spec["annotations"] = {w.NETNS_ANNOTATION: annotation}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


@pytest.fixture
def sh_front(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The front with a stand-in for the Python that runs the script (it prints "script")."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("runsc", "nsenter", "script"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        fake.chmod(0o755)
    wrapper = tmp_path / "runsc-wrapper"
    python = bin_dir / "script"
    wrapper.write_text(w.shell_wrapper(str(bin_dir / "runsc"), str(python), "wrapper.py"))
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return wrapper, tmp_path / "root", env


def test_annotate_names_only_plain_paths() -> None:
    spec = {"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/fsb-a1-3"}]}}
    assert w.annotate(spec)["annotations"] == {w.NETNS_ANNOTATION: "/var/run/netns/fsb-a1-3"}
    odd = {"linux": {"namespaces": [{"type": "network", "path": '/n/"x y'}]}}
    assert "annotations" not in w.annotate(odd)
    assert "annotations" not in w.annotate({"linux": {"namespaces": [{"type": "network"}]}})


def test_front_creates_in_the_annotated_namespace_without_python(
    sh_front: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    wrapper, root, env = sh_front
    netns = tmp_path / "netns-sb-1"
    netns.write_text("")
    (tmp_path / "b").mkdir()
    bundle = _annotated_bundle(tmp_path / "b", str(netns), None)
    top = ["--root", str(root), "--log", str(tmp_path / "log.json")]
    out = _run(wrapper, env, *top, "create", "--bundle", str(bundle), "--pid-file", "p", "sb-1")
    assert out[:3] == ["nsenter", f"--net={netns}", "--"] and out[4:6] == list(w.EXTRA_FLAGS)
    assert (root / w.RECORD_DIR / "sb-1").read_text().strip() == str(netns)
    # The namespace gone: fails closed with the reason where the shim reads it.
    netns.unlink()
    log = tmp_path / "log.json"
    argv = [str(wrapper), *top, "create", "--bundle", str(bundle), "sb-2"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and done.stdout == ""
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and str(netns) in entry["msg"]


@pytest.mark.parametrize(
    ("netns", "annotation"),
    [
        ("/var/run/netns/real", "/var/run/netns/other"),  # disagrees with the namespaces
        ("/var/run/netns/real", ""),  # no annotation value
    ],
)
def test_front_leaves_what_it_cannot_read_to_the_script(
    sh_front: tuple[Path, Path, dict[str, str]],
    tmp_path: Path,
    netns: str | None,
    annotation: str | None,
) -> None:
    wrapper, root, env = sh_front
    bundle = _annotated_bundle(tmp_path, netns, annotation)
    out = _run(wrapper, env, "--root", str(root), "create", "--bundle", str(bundle), "sb-1")
    assert out[:4] == ["script", "-I", "-S", "wrapper.py"] and out[4].endswith("runsc")


def test_front_runs_a_pathless_create_itself(
    sh_front: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    """An agent Pod's spec (a `network` entry without a path): runsc directly, no record."""
    wrapper, root, env = sh_front
    bundle = _annotated_bundle(tmp_path, None, None)
    out = _run(wrapper, env, "--root", str(root), "create", "--bundle", str(bundle), "sb-1")
    assert out[0] == "runsc" and out[1:3] == list(w.EXTRA_FLAGS)
    assert not (root / w.RECORD_DIR / "sb-1").exists()
    # A Go-style spelling, or no network entry at all: left to the script.
    for spec in ({"linux": {"namespaces": [{"type": "pid"}]}},):
        (tmp_path / "config.json").write_text(json.dumps(spec, separators=(",", ":")))
        out = _run(wrapper, env, "--root", str(root), "create", "--bundle", str(bundle), "sb-2")
        assert out[0] == "script"
    go = {"linux": {"namespaces": [{"type": "network"}]}}
    (tmp_path / "config.json").write_text(json.dumps(go, separators=(",", ":")))
    assert _run(wrapper, env, "--root", str(root), "create", "--bundle", str(bundle), "x")[0] == (
        "script"
    )
