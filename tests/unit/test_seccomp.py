"""The sandbox seccomp profile is an allowlist: an evaluator with the kernel's semantics (a rule
matches when its name matches and all its argument conditions hold; otherwise the default action)
decides what ordinary and hostile calls get. tests/integration/test_confinement.py checks the same
from inside a real container.

The evaluator gives the profile's own answer. Under runc one more thing happens, measured by
tests/integration/test_confinement.py: a syscall numbered above the newest one the profile names
(`futex_requeue`, 456 on x86_64) gets ENOSYS from runc's stub before the filter runs, so libc
falls back (docs/security.md, "What a newer syscall gets")."""

from __future__ import annotations

from typing import Any

import pytest

from fastsandbox.agent.runtime.seccomp import (
    ALLOWED_SYSCALLS,
    CLONE_NAMESPACE_FLAGS,
    REFUSED_SYSCALLS,
    SOCKET_FAMILIES,
    seccomp_profile,
)

EPERM, ENOSYS = 1, 38
ALLOW = "allow"
CLONE_THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes (VM|FS|FILES|SIGHAND|...)
SIGCHLD = 17


def _holds(cond: dict[str, Any], args: tuple[int, ...]) -> bool:
    value = args[cond["index"]] if cond["index"] < len(args) else 0
    op = cond["op"]
    if op == "SCMP_CMP_EQ":
        return bool(value == cond["value"])
    if op == "SCMP_CMP_MASKED_EQ":
        return bool(value & cond["value"] == cond["valueTwo"])
    raise AssertionError(f"evaluator does not know {op}")


def decide(name: str, *args: int, profile: dict[str, Any] | None = None) -> str | int:
    """ALLOW, or the errno the call fails with."""
    p = profile or seccomp_profile("x86_64")
    for rule in p["syscalls"]:
        if name in rule["names"] and all(_holds(c, args) for c in rule.get("args", [])):
            return ALLOW if rule["action"] == "SCMP_ACT_ALLOW" else int(rule["errnoRet"])
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    return int(p["defaultErrnoRet"])


def test_default_refuses_with_eperm_and_only_the_native_abi_is_listed() -> None:
    p = seccomp_profile("x86_64")
    assert (p["defaultAction"], p["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", EPERM)
    # The native ABI only: a 32-bit (or x32) syscall matches no listed architecture and is
    # killed (tests/integration/test_confinement.py proves it from inside a sandbox).
    assert p["architectures"] == ["SCMP_ARCH_X86_64"]
    assert seccomp_profile("aarch64")["architectures"] == ["SCMP_ARCH_AARCH64"]


@pytest.mark.parametrize("name", ["listmount", "statmount", "mseal", "setxattrat", "no_such"])
def test_a_syscall_newer_than_the_profile_is_refused(name: str) -> None:
    assert decide(name) == EPERM


def test_the_newest_named_syscall_is_futex_requeue() -> None:
    # What runc's ENOSYS stub keys on: naming a newer syscall (statmount, 457, ...) would move
    # the line, and the integration test's expectations with it.
    named = {n for rule in seccomp_profile("x86_64")["syscalls"] for n in rule["names"]}
    assert "futex_requeue" in named
    assert not named & {"statmount", "listmount", "lsm_get_self_attr", "mseal", "setxattrat"}


@pytest.mark.parametrize(
    "name",
    ["read", "write", "openat", "execve", "mmap", "futex", "epoll_wait", "rt_sigaction",
     "wait4", "getrandom", "statx", "rseq", "prlimit64", "accept4", "chroot", "arch_prctl",
     "pipe", "pipe2"],
)  # fmt: skip
def test_ordinary_syscalls_are_allowed(name: str) -> None:
    assert decide(name) == ALLOW


@pytest.mark.parametrize(
    "name", sorted(set(REFUSED_SYSCALLS) - {"clone", "clone3", "socket", "personality"})
)
def test_dangerous_syscalls_are_refused(name: str) -> None:
    assert decide(name) == EPERM


def test_lists_are_disjoint_and_without_duplicates() -> None:
    assert len(ALLOWED_SYSCALLS) == len(set(ALLOWED_SYSCALLS))
    assert not set(ALLOWED_SYSCALLS) & set(REFUSED_SYSCALLS)


def test_clone_without_namespace_flags_only() -> None:
    assert decide("clone", CLONE_THREAD_FLAGS) == ALLOW
    assert decide("clone", SIGCHLD) == ALLOW  # fork()
    for flag in CLONE_NAMESPACE_FLAGS.values():
        assert decide("clone", SIGCHLD | flag) == EPERM, hex(flag)
    assert decide("clone3") == ENOSYS  # libc falls back to clone, whose flags are checked
    assert decide("unshare", CLONE_NAMESPACE_FLAGS["CLONE_NEWUSER"]) == EPERM


def test_personality_only_safe_personas() -> None:
    for value in (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert decide("personality", value) == ALLOW
    for value in (0x0040000, 0x0400000, 0x0200000, 0x8000000):  # ADDR_NO_RANDOMIZE, ...
        assert decide("personality", value) == EPERM


def test_socket_families() -> None:
    for family in SOCKET_FAMILIES.values():
        assert decide("socket", family, 1) == ALLOW
    for family in (17, 40, 38, 15, 31):  # AF_PACKET, AF_VSOCK, AF_ALG, AF_KEY, AF_BLUETOOTH
        assert decide("socket", family, 3) == EPERM
    assert decide("socketcall", 1) == EPERM


def test_no_syscall_has_both_an_unconditional_and_a_conditional_rule() -> None:
    plain: set[str] = set()
    conditional: set[str] = set()
    for rule in seccomp_profile("x86_64")["syscalls"]:
        (conditional if rule.get("args") else plain).update(rule["names"])
    assert not plain & conditional
