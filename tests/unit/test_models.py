"""The API models: validation messages name the field, and the wire shape is camelCase.

Users see these messages verbatim (CLI exit 2, gRPC INVALID_ARGUMENT), so they are pinned here
through the one function that renders them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from fastsandbox.api.models import (
    API_VERSION,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    describe_validation_error,
)

VALID: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "Sandbox",
    "metadata": {"name": "demo", "namespace": "default"},
    "spec": {"image": "busybox", "poolRef": "default-pool"},
}


def with_spec(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data["spec"].update(changes)
    return data


def message_for(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        Sandbox.model_validate(data)
    return describe_validation_error(caught.value)


def test_valid_sandbox_passes() -> None:
    sb = Sandbox.model_validate(VALID)
    assert sb.spec.image == "busybox"
    assert sb.spec.pool_ref == "default-pool"


def test_missing_image_is_required() -> None:
    data = copy.deepcopy(VALID)
    del data["spec"]["image"]
    assert message_for(data) == "spec.image: required"


def test_empty_image_is_required() -> None:
    assert message_for(with_spec(image="")) == "spec.image: required"


@pytest.mark.parametrize("pool", ["", "   "])
def test_empty_pool_ref_is_required(pool: str) -> None:
    assert message_for(with_spec(poolRef=pool)) == "spec.poolRef: required"


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range_names_the_index(port: int) -> None:
    assert message_for(with_spec(exposedPorts=[port])) == "spec.exposedPorts[0]: must be 1..65535"


def test_port_index_points_at_the_bad_one() -> None:
    message = message_for(with_spec(exposedPorts=[8080, 70000]))
    assert message == "spec.exposedPorts[1]: must be 1..65535"


def test_ports_at_the_edges_are_fine() -> None:
    assert Sandbox.model_validate(with_spec(exposedPorts=[1, 65535])).spec.exposed_ports == [
        1,
        65535,
    ]


@pytest.mark.parametrize("second", [{"value": "x"}, {"name": "", "value": "x"}])
def test_env_without_name_is_required(second: dict[str, str]) -> None:
    data = with_spec(env=[{"name": "A", "value": "1"}, second])
    assert message_for(data) == "spec.env[1].name: required"


@pytest.mark.parametrize("policy", ["Bogus", "manual", None, 3, ["Manual"], {"a": 1}])
def test_bad_failure_policy_lists_the_choices(policy: Any) -> None:
    message = message_for(with_spec(failurePolicy=policy))
    assert message == "spec.failurePolicy: must be Manual or AutoRecreate"


def test_several_problems_are_all_reported() -> None:
    data = with_spec(image="", exposedPorts=[0])
    assert message_for(data) == "spec.image: required; spec.exposedPorts[0]: must be 1..65535"


def test_unknown_field_is_named() -> None:
    assert message_for(with_spec(imagePullPolicy="Always")) == "spec.imagePullPolicy: unknown field"


def test_bad_pool_runtime_lists_the_choices() -> None:
    with pytest.raises(ValidationError) as caught:
        SandboxPool.model_validate({"metadata": {"name": "p"}, "spec": {"runtime": ["runc"]}})
    assert describe_validation_error(caught.value) == "spec.runtime: must be runc or gvisor"


def test_json_round_trip_uses_camel_case() -> None:
    data = with_spec(exposedPorts=[8080], workingDir="/work")
    data["metadata"]["resourceVersion"] = "7"
    data["status"] = {
        "phase": "Running",
        "containerID": "c-123",
        "agentIP": "10.88.0.5",
        "assignedAgent": "default-pool-0",
        "endpoints": ["10.88.0.5:8080"],
    }
    sb = Sandbox.model_validate(data)
    assert sb.status.container_id == "c-123"
    assert sb.status.agent_ip == "10.88.0.5"
    assert sb.status.phase is SandboxPhase.RUNNING
    assert sb.metadata.resource_version == "7"

    wire = sb.model_dump(mode="json", by_alias=True)
    assert wire["apiVersion"] == API_VERSION
    assert wire["kind"] == "Sandbox"
    assert wire["status"]["containerID"] == "c-123"
    assert wire["status"]["agentIP"] == "10.88.0.5"
    assert wire["status"]["assignedAgent"] == "default-pool-0"
    assert wire["spec"]["exposedPorts"] == [8080]
    assert wire["spec"]["poolRef"] == "default-pool"
    assert wire["spec"]["workingDir"] == "/work"
    assert wire["metadata"]["resourceVersion"] == "7"
    assert "container_id" not in wire["status"]

    assert Sandbox.model_validate_json(sb.model_dump_json(by_alias=True)) == sb
