"""AppArmor for runc sandboxes (agent/runtime/apparmor.py). This host's kernel has no AppArmor,
so these unit tests are where it is proved: the profile's rules, the spec field, when it is
applied (runc on an AppArmor host only) and that a failed load fails the create rather than
running a sandbox without it. securityfs and apparmor_parser are stand-ins under tmp_path."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.apparmor import (
    PROFILE_NAME,
    AppArmor,
    host_has_apparmor,
    profile_text,
)
from fastsandbox.agent.runtime.oci_spec import build_oci_spec
from fastsandbox.errors import RuntimeFailure


def _spec(profile: str | None) -> dict[str, object]:
    return build_oci_spec(
        container_id="sb", args=["sh"], env=[], cwd="/", cgroups_path="/x/sb",
        apparmor_profile=profile,
    )  # fmt: skip


def test_spec_names_the_profile_only_when_given() -> None:
    assert _spec(PROFILE_NAME)["process"]["apparmorProfile"] == PROFILE_NAME  # type: ignore[index]
    assert "apparmorProfile" not in _spec(None)["process"]  # type: ignore[operator]


def test_profile_denies_what_a_sandbox_must_not_touch() -> None:
    text = profile_text()
    assert text.count("{") == text.count("}")
    assert f"profile {PROFILE_NAME} flags=(attach_disconnected,mediate_deleted) {{" in text
    for rule in (
        "deny mount,", "deny umount,", "deny pivot_root,", "deny /proc/* w,",
        "deny /proc/sysrq-trigger rwklx,", "deny /proc/kcore rwklx,",
        "deny /sys/firmware/** rwklx,", "deny /sys/kernel/security/** rwklx,",
        f"signal (send, receive) peer={PROFILE_NAME},",
        f"ptrace (trace, read, tracedby, readby) peer={PROFILE_NAME},",
    ):  # fmt: skip
        assert f"  {rule}\n" in text, rule
    # Self-contained: loads without the apparmor-profiles package's includes.
    assert "#include" not in text


class Parser:
    """A stand-in apparmor_parser: records its argv and the profile, and 'loads' it into the
    stand-in securityfs (unless told to fail)."""

    def __init__(self, securityfs: Path, returncode: int = 0) -> None:
        self.securityfs, self.returncode = securityfs, returncode
        self.calls: list[list[str]] = []
        self.sources: list[str] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        self.sources.append(Path(argv[-1]).read_text())
        if self.returncode == 0:
            (self.securityfs / "profiles").write_text(f"{PROFILE_NAME} (enforce)\n")
        return subprocess.CompletedProcess(argv, self.returncode, "", "parser: syntax error")


@pytest.fixture
def securityfs(tmp_path: Path) -> Path:
    fs = tmp_path / "apparmor"
    fs.mkdir()
    (fs / "profiles").write_text("")
    return fs


def test_this_host_without_apparmor_gets_no_profile(tmp_path: Path) -> None:
    absent = tmp_path / "no-apparmor"
    parser = Parser(tmp_path)
    apparmor = AppArmor(securityfs=absent, parser="/bin/true", run=parser)
    assert not host_has_apparmor(absent)
    assert apparmor.profile_for("runc") is None and not apparmor.pending("runc")
    assert parser.calls == []


def test_runc_on_an_apparmor_host_loads_once_and_gvisor_gets_none(securityfs: Path) -> None:
    parser = Parser(securityfs)
    apparmor = AppArmor(securityfs=securityfs, parser="/bin/true", run=parser)
    assert apparmor.pending("runc") and not apparmor.pending("gvisor")
    assert apparmor.profile_for("runc") == PROFILE_NAME
    assert apparmor.profile_for("runc") == PROFILE_NAME
    assert apparmor.profile_for("gvisor") is None
    assert len(parser.calls) == 1 and parser.calls[0][:3] == ["/bin/true", "-r", "-K"]
    assert parser.sources == [profile_text()]
    assert not apparmor.pending("runc")


def test_a_failed_load_fails_the_create_with_the_reason(securityfs: Path) -> None:
    apparmor = AppArmor(securityfs=securityfs, parser="/bin/true", run=Parser(securityfs, 1))
    with pytest.raises(RuntimeFailure, match="syntax error"):
        apparmor.profile_for("runc")
    missing = AppArmor(securityfs=securityfs, parser="fsb-no-such-apparmor-parser")
    with pytest.raises(RuntimeFailure, match="not installed"):
        missing.profile_for("runc")
