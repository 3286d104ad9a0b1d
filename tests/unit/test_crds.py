"""The CRDs are generated from the models, committed to deploy/crds/, and structurally sound."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError, field_validator

from fastsandbox.api import crds
from fastsandbox.api.models import Sandbox, SandboxPool
from fastsandbox.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "deploy" / "crds"
CHART_CRDS = ROOT / "deploy" / "helm" / "fast-sandbox" / "crds"
REGENERATE = "run `python -m fastsandbox.api.crds` (or `fsb crds --out deploy/crds`) and commit"


def schema_of(kind: str) -> dict[str, Any]:
    manifest = next(m for m in crds.crd_manifests() if m["spec"]["names"]["kind"] == kind)
    schema: dict[str, Any] = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def node(kind: str, path: str) -> dict[str, Any]:
    """`spec.env[].name` → that node of the kind's schema."""
    current = schema_of(kind)
    for part in path.split("."):
        if part.endswith("[]"):
            current = current["properties"][part[:-2]]["items"]
        else:
            current = current["properties"][part]
    return current


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += walk(sub, f"{path}.{name}")
    if "items" in schema:
        out += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += walk(schema["additionalProperties"], f"{path}.*")
    return out


# -- the committed files ---------------------------------------------------------------------------
@pytest.mark.parametrize("directory", [COMMITTED, CHART_CRDS], ids=["deploy", "helm-chart"])
def test_committed_crds_match_the_models(directory: Path) -> None:
    expected = crds.rendered()
    where = directory.relative_to(ROOT)
    committed = {p.name: p.read_text() for p in directory.glob("*.yaml")}
    assert sorted(committed) == sorted(expected), f"{where} has other files: {REGENERATE}"
    for name, text in expected.items():
        assert committed[name] == text, f"{where}/{name} differs from the models: {REGENERATE}"


def test_generation_is_deterministic() -> None:
    assert crds.rendered() == crds.rendered()
    assert crds.crd_manifests() == crds.crd_manifests()


def test_committed_yaml_parses_to_the_manifests() -> None:
    for manifest in crds.crd_manifests():
        loaded = yaml.safe_load((COMMITTED / crds.file_name(manifest)).read_text())
        assert loaded == manifest


def test_module_writes_the_files(tmp_path: Path) -> None:
    assert crds.main(["--out", str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == crds.rendered()


def test_fsb_crds_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert docs == crds.crd_manifests()

    assert main(["crds", "--out", str(tmp_path / "out")]) == 0
    written = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert written == crds.rendered()
    assert "fastsandbox.io_sandboxes.yaml" in capsys.readouterr().out


# -- names, scope, subresources, columns -----------------------------------------------------------
def test_names_and_scope() -> None:
    by_kind = {m["spec"]["names"]["kind"]: m for m in crds.crd_manifests()}
    assert set(by_kind) == {"Sandbox", "SandboxPool"}
    for kind, manifest in by_kind.items():
        spec = manifest["spec"]
        assert manifest["metadata"]["name"] == f"{crds.PLURALS[kind]}.{crds.GROUP}"
        assert spec["group"] == "fastsandbox.io" == crds.GROUP
        assert spec["scope"] == "Namespaced"
        (version,) = spec["versions"]
        assert version["name"] == crds.VERSION == "v1alpha1"
        assert version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
    assert by_kind["Sandbox"]["spec"]["names"]["shortNames"] == ["sbx"]
    assert by_kind["SandboxPool"]["spec"]["names"]["shortNames"] == ["sbxpool"]
    assert crds.PLURALS == {"Sandbox": "sandboxes", "SandboxPool": "sandboxpools"}


def columns(kind: str) -> dict[str, dict[str, Any]]:
    manifest = next(m for m in crds.crd_manifests() if m["spec"]["names"]["kind"] == kind)
    return {c["name"]: c for c in manifest["spec"]["versions"][0]["additionalPrinterColumns"]}


def test_printer_columns_point_at_real_fields() -> None:
    assert list(columns("Sandbox"))[:2] == ["Phase", "Agent"]
    assert columns("Sandbox")["Age"]["type"] == "date"
    assert {"Ready", "Agents", "Slots", "Age"} <= set(columns("SandboxPool"))
    for kind in ("Sandbox", "SandboxPool"):
        for column in columns(kind).values():
            path = column["jsonPath"].lstrip(".")
            if path.startswith("metadata."):
                continue
            assert node(kind, path)["type"] == column["type"], column


# -- structural schema -----------------------------------------------------------------------------
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "$schema"}


@pytest.mark.parametrize("kind", ["Sandbox", "SandboxPool"])
def test_schema_is_structural(kind: str) -> None:
    for path, sub in walk(schema_of(kind)):
        assert not FORBIDDEN & set(sub), f"{path}: {sorted(FORBIDDEN & set(sub))}"
        if not sub.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in sub, f"{path} has no type"
        assert not ("properties" in sub and "additionalProperties" in sub), path
        assert sub.get("default", 0) is not None, f"{path}: null default"


def test_only_free_form_fields_keep_unknown_fields() -> None:
    preserved = [
        f"{kind}{path}"
        for kind in ("Sandbox", "SandboxPool")
        for path, sub in walk(schema_of(kind))
        if sub.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert preserved == [
        "SandboxPool.spec.agentTemplate.spec.affinity.nodeAffinity",
        "SandboxPool.spec.agentTemplate.spec.affinity.podAffinity",
        "SandboxPool.spec.agentTemplate.spec.affinity.podAntiAffinity",
    ]


def test_optionals_are_nullable_and_required_fields_are_required() -> None:
    assert node("Sandbox", "spec")["required"] == ["image", "poolRef"]
    assert schema_of("Sandbox")["required"] == ["spec"]
    assert "required" not in schema_of("SandboxPool")
    assert node("Sandbox", "spec.expireTime") == {
        "type": "string",
        "format": "date-time",
        "nullable": True,
    }
    assert node("Sandbox", "status.timings")["nullable"] is True
    assert node("SandboxPool", "spec.agentTemplate")["nullable"] is True


# -- the models' rules, enforced by the apiserver too ----------------------------------------------
def test_enums_and_ranges() -> None:
    assert node("Sandbox", "spec.failurePolicy")["enum"] == ["Manual", "AutoRecreate"]
    assert node("Sandbox", "spec.failurePolicy")["default"] == "Manual"
    assert node("SandboxPool", "spec.runtime")["enum"] == ["runc", "gvisor"]
    assert "Terminating" in node("Sandbox", "status.phase")["enum"]
    ports = node("Sandbox", "spec.exposedPorts")
    assert ports["items"] == {"type": "integer", "minimum": 1, "maximum": 65535}
    assert ports["x-kubernetes-list-type"] == "set"  # the models' "ports must be unique"
    per_agent = node("SandboxPool", "spec.maxSandboxesPerAgent")
    assert (per_agent["minimum"], per_agent["maximum"]) == (1, 1000)
    assert node("Sandbox", "spec.recoveryTimeoutSeconds")["minimum"] == 1


def test_capacity_ordering_is_a_cel_rule() -> None:
    rules = node("SandboxPool", "spec.capacity")["x-kubernetes-validations"]
    assert [r["fieldPath"] for r in rules] == [".poolMax", ".bufferMax"]
    # The same rule in the model: a CEL rule the model would not enforce would be a lie.
    with pytest.raises(ValidationError, match="poolMax must be at least poolMin"):
        SandboxPool.model_validate(
            {"metadata": {"name": "p"}, "spec": {"capacity": {"poolMin": 3}}}
        )


def search(pattern: str, value: str) -> bool:
    # OpenAPI patterns are unanchored (ECMA 262 semantics), like re.search.
    return re.search(pattern, value) is not None


def sandbox(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "s"}, "spec": {"image": "busybox", "poolRef": "p", **spec}}


def model_accepts(data: dict[str, Any]) -> bool:
    try:
        Sandbox.model_validate(data)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", ["PATH", "_x", "a.b-c", "1BAD", "A=B", "", " ", "white space"])
def test_env_name_pattern_agrees_with_the_model(name: str) -> None:
    schema = node("Sandbox", "spec.env[].name")
    crd_accepts = len(name) >= schema["minLength"] and search(schema["pattern"], name)
    assert crd_accepts == model_accepts(sandbox(env=[{"name": name, "value": "v"}]))


@pytest.mark.parametrize(
    "value", ["500m", "2", "0.5", "256Mi", "1Gi", "lots", "1.5.1", "-1", "1Zi"]
)
def test_quantity_pattern_agrees_with_the_model(value: str) -> None:
    pattern = node("Sandbox", "spec.resources.cpu")["pattern"]
    assert search(pattern, value) == model_accepts(sandbox(resources={"cpu": value}))


@pytest.mark.parametrize("value", ["", "/", "/work", "work", "./x"])
def test_working_dir_pattern_agrees_with_the_model(value: str) -> None:
    pattern = node("Sandbox", "spec.workingDir")["pattern"]
    assert search(pattern, value) == model_accepts(sandbox(workingDir=value))


@pytest.mark.parametrize("value", ["busybox", "", "   "])
def test_required_strings_reject_blank(value: str) -> None:
    schema = node("Sandbox", "spec.image")
    crd_accepts = len(value) >= schema["minLength"] and search(schema["pattern"], value)
    assert crd_accepts == model_accepts(sandbox(image=value))


def test_metadata_name_is_a_dns_label() -> None:
    name = schema_of("Sandbox")["properties"]["metadata"]["properties"]["name"]
    assert name["maxLength"] == 63
    assert search(name["pattern"], "demo-1")
    assert not search(name["pattern"], "Demo_1")


def test_a_validator_without_a_crd_rule_fails_generation() -> None:
    class Odd(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def _even(cls, value: int) -> int:
            return value

    with pytest.raises(TypeError, match="no CRD counterpart"):
        crds.json_schema(Odd)


def test_json_schema_constructs_become_their_openapi_equivalents() -> None:
    from typing import Literal

    from pydantic import Field

    class Odd(BaseModel):
        tags: set[str]
        positive: int = Field(gt=0, lt=10)
        mode: Literal["only"] = "only"

    schema = crds._structural(crds.json_schema(Odd), {}, "odd")
    assert schema["properties"]["tags"] == {
        "type": "array",
        "x-kubernetes-list-type": "set",
        "items": {"type": "string"},
    }
    positive = schema["properties"]["positive"]
    assert (positive["minimum"], positive["exclusiveMinimum"]) == (0, True)
    assert (positive["maximum"], positive["exclusiveMaximum"]) == (10, True)
    assert schema["properties"]["mode"]["enum"] == ["only"]


def test_unions_other_than_optional_are_refused() -> None:
    class Either(BaseModel):
        value: int | str

    with pytest.raises(TypeError, match=re.escape("only `X | None` unions")):
        crds._structural(crds.json_schema(Either), {}, "either")
