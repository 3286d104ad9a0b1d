"""The task's log URI the agent gives containerd, and the janitor reading the path back."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.runtime.containerd import log_uri
from fastsandbox.janitor.containerd import log_path_of


def test_binary_uri_names_the_logger_and_carries_path_and_cap() -> None:
    spec = ContainerSpec(
        id="sb-1",
        image="busybox",
        log_path="/var/lib/fsb/agents/a 1/logs/sb-1.log",
        log_max_bytes=123456,
        logger_path="/usr/local/libexec/fastsandbox/fsb-logger",
    )
    uri = log_uri(spec)
    parsed = urlparse(uri)
    # What containerd's shim does with it: run the URI's path with the query's pairs as args.
    assert (parsed.scheme, parsed.netloc) == ("binary", "")
    assert parsed.path == "/usr/local/libexec/fastsandbox/fsb-logger"
    assert parse_qs(parsed.query) == {
        "path": ["/var/lib/fsb/agents/a 1/logs/sb-1.log"],
        "max-bytes": ["123456"],
    }
    assert log_path_of(uri) == spec.log_path


def test_without_a_logger_the_file_uri_is_kept() -> None:
    spec = ContainerSpec(id="sb-1", image="busybox", log_path="/logs/sb 1.log")
    assert log_uri(spec) == "file:///logs/sb%201.log"
    assert log_path_of(log_uri(spec)) == "/logs/sb 1.log"
    assert log_path_of("fifo:///run/x") is None
    assert log_path_of("binary:///bin/other-logger?level=debug") is None
