"""deploy/ against a real kube-apiserver: the generated CRDs, the plain manifests and the rendered
Helm chart all `kubectl apply`; the apiserver enforces the models' rules and shows our printer
columns; the RBAC grants what each component needs and nothing else.

kubectl is built by scripts/build-kube-apiserver (same Kubernetes version as the apiserver) and
helm by scripts/build-helm, both cached in ~/.cache/fastsandbox/. Without Go and without a
cached binary the tests skip. Every test works in namespaces of its own (`fsbdeploy-<random>`),
and removes the cluster-scoped objects it made; namespaces are left to the session's apiserver
(there is no namespace controller to finish deleting them).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastsandbox.api import crds
from tests.infra import cannot_run

pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "fast-sandbox"
PLAIN = [DEPLOY / "rbac.yaml", DEPLOY / "controller.yaml", DEPLOY / "janitor.yaml"]
DEFAULT_NAMESPACE = "fastsandbox-system"
KUBE_VERSION = "1.35.4"
# Labels only the chart sets (release bookkeeping); everything else must be the same.
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}
_BUILD_TIMEOUT = 45 * 60


def _built(script: str, key: str) -> Path:
    """Run an idempotent build script and return the path it reports as `KEY=path`."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / script)],
        capture_output=True,
        text=True,
        timeout=_BUILD_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        if "go is missing" in proc.stderr:
            cannot_run(f"{script}: not cached and Go is missing")
        raise RuntimeError(f"{script} exited {proc.returncode}: {proc.stderr[-1500:]}")
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Path(found[key])


@dataclass(frozen=True, slots=True)
class Kubectl:
    binary: Path
    kubeconfig: Path

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        argv = [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv[3:]!r} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def fails(self, *args: str, stdin: str | None = None) -> str:
        """Run a command that must be refused; return its stderr."""
        argv = [str(self.binary), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode != 0, f"{argv[3:]!r} succeeded: {proc.stdout}"
        return proc.stderr

    def apply(self, docs: list[dict[str, Any]], *extra: str) -> str:
        text = yaml.safe_dump_all(docs, sort_keys=False)
        return self.run(
            "apply", "--server-side", "--field-manager=fsb-deploy-test", "-f", "-", *extra,
            stdin=text,
        )  # fmt: skip

    def delete(self, docs: list[dict[str, Any]]) -> None:
        text = yaml.safe_dump_all(docs, sort_keys=False)
        self.run("delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=text, check=False)


@pytest.fixture(scope="module")
def kubectl_binary() -> Path:
    return _built("build-kube-apiserver", "KUBECTL")


@pytest.fixture(scope="module")
def helm() -> Path:
    return _built("build-helm", "HELM")


@pytest.fixture
def kubectl(kube_apiserver: Any, kubectl_binary: Path) -> Kubectl:
    return Kubectl(kubectl_binary, Path(kube_apiserver.kubeconfig))


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"fsbdeploy-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def relocated(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The manifests with `fastsandbox-system` replaced by a test namespace."""
    text = json.dumps(docs).replace(f'"{DEFAULT_NAMESPACE}"', json.dumps(namespace))
    out: list[dict[str, Any]] = json.loads(text)
    return out


def helm_template(helm: Path, namespace: str, *args: str) -> list[dict[str, Any]]:
    argv = [
        str(helm), "template", "fast-sandbox", str(CHART), "--namespace", namespace,
        "--kube-version", KUBE_VERSION, *args,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def can_i(kubectl: Kubectl, home: str, sa: str, namespace: str, *args: str) -> bool:
    """`kubectl auth can-i` in `namespace` as ServiceAccount `sa` of namespace `home`."""
    out = kubectl.run(
        "auth", "can-i", *args, "-n", namespace, f"--as=system:serviceaccount:{home}:{sa}",
        check=False,
    )  # fmt: skip
    return out.strip().splitlines()[0] == "yes"


def crds_applied(kubectl: Kubectl) -> None:
    kubectl.run(
        "apply", "--server-side", "--field-manager=fsb-deploy-test", "-f", str(DEPLOY / "crds")
    )
    kubectl.run(
        "wait", "--for=condition=Established", "--timeout=60s",
        *(f"crd/{crds.PLURALS[k]}.{crds.GROUP}" for k in ("Sandbox", "SandboxPool")),
    )  # fmt: skip


# -- CRDs ------------------------------------------------------------------------------------------
def test_the_committed_crds_apply_and_are_structural(kubectl: Kubectl) -> None:
    crds_applied(kubectl)
    for plural in crds.PLURALS.values():
        crd = json.loads(kubectl.run("get", "crd", f"{plural}.{crds.GROUP}", "-o", "json"))
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert "NonStructuralSchema" not in conditions, crd["status"]["conditions"]


def test_kubectl_get_shows_the_printer_columns(kubectl: Kubectl, namespace: str) -> None:
    crds_applied(kubectl)
    samples = load([DEPLOY / "samples" / "sandboxpool.yaml", DEPLOY / "samples" / "sandbox.yaml"])
    kubectl.apply(samples, "-n", namespace)
    kubectl.run(
        "patch", "sandbox", "hello", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"phase": "Running", "assignedAgent": "default-pool-x1y2z"}}),
    )  # fmt: skip
    kubectl.run(
        "patch", "sandboxpool", "default-pool", "-n", namespace, "--subresource=status",
        "--type=merge",
        "-p", json.dumps({"status": {"agents": {"total": 2, "ready": 1},
                                     "slots": {"total": 10, "allocated": 1}}}),
    )  # fmt: skip

    sandboxes = kubectl.run("get", "sandboxes", "-n", namespace).splitlines()
    assert sandboxes[0].split() == ["NAME", "PHASE", "AGENT", "AGE"]
    assert sandboxes[1].split()[:3] == ["hello", "Running", "default-pool-x1y2z"]
    wide = kubectl.run("get", "sbx", "-n", namespace, "-o", "wide").splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "AGENT", "POOL", "IMAGE", "AGE"]
    assert wide[1].split()[3:5] == ["default-pool", "docker.io/library/busybox:latest"]

    pools = kubectl.run("get", "sandboxpools", "-n", namespace).splitlines()
    assert pools[0].split() == ["NAME", "READY", "AGENTS", "SLOTS", "ALLOCATED", "AGE"]
    assert pools[1].split()[:5] == ["default-pool", "1", "2", "10", "1"]
    assert "default-pool" in kubectl.run("get", "sbxpool", "-n", namespace)
    both = kubectl.run("get", "fastsandbox", "-n", namespace, "-o", "name").split()
    assert sorted(both) == [
        "sandbox.fastsandbox.io/hello",
        "sandboxpool.fastsandbox.io/default-pool",
    ]
    # The apiserver filled the models' defaults in.
    stored = json.loads(kubectl.run("get", "sandboxpool", "default-pool", "-n", namespace,
                                    "-o", "json"))  # fmt: skip
    assert (stored["spec"]["warmSlots"], stored["spec"]["agentVersion"]) == (0, "")


GOOD = {"image": "busybox", "poolRef": "default-pool"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"poolRef": "p"}, ['spec.image: Required value']),
        ({**GOOD, "image": ""}, ["spec.image"]),
        ({**GOOD, "exposedPorts": [8080, 70000]}, ["spec.exposedPorts[1]", "65535"]),
        ({**GOOD, "exposedPorts": [80, 80]}, ["spec.exposedPorts[1]: Duplicate value"]),
        ({**GOOD, "env": [{"name": "1BAD", "value": "x"}]}, ["spec.env[0].name"]),
        ({**GOOD, "env": [{"name": "A=B", "value": "x"}]}, ["spec.env[0].name"]),
        (
            {**GOOD, "failurePolicy": "Sometimes"},
            ['spec.failurePolicy: Unsupported value: "Sometimes"', '"AutoRecreate"'],
        ),
        ({**GOOD, "workingDir": "relative"}, ["spec.workingDir"]),
        ({**GOOD, "resources": {"memory": "lots"}}, ["spec.resources.memory"]),
        ({**GOOD, "imagePullPolicy": "Always"}, ['unknown field "spec.imagePullPolicy"']),
    ],
    ids=[
        "missing-image", "blank-image", "port-70000", "duplicate-port", "env-digit",
        "env-equals", "failure-policy", "relative-workdir", "memory", "unknown-field",
    ],
)  # fmt: skip
def test_an_invalid_sandbox_is_rejected_with_the_field_named(
    kubectl: Kubectl, namespace: str, spec: dict[str, Any], expected: list[str]
) -> None:
    crds_applied(kubectl)
    doc = {
        "apiVersion": "fastsandbox.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": spec,
    }
    err = kubectl.fails("apply", "-f", "-", stdin=yaml.safe_dump(doc))
    for text in expected:
        assert text in err, err
    assert "not found" in kubectl.run("get", "sandbox", "bad", "-n", namespace, check=False)


def test_an_inverted_pool_capacity_is_rejected(kubectl: Kubectl, namespace: str) -> None:
    crds_applied(kubectl)
    doc = {
        "apiVersion": "fastsandbox.io/v1alpha1",
        "kind": "SandboxPool",
        "metadata": {"name": "inverted", "namespace": namespace},
        "spec": {"capacity": {"poolMin": 3, "poolMax": 2}, "maxSandboxesPerAgent": 0},
    }
    err = kubectl.fails("apply", "-f", "-", stdin=yaml.safe_dump(doc))
    assert "spec.capacity.poolMax: Invalid value" in err
    assert "poolMax must be at least poolMin" in err
    assert "spec.maxSandboxesPerAgent" in err


# -- plain manifests and the Helm chart -------------------------------------------------------
def check_rbac(kubectl: Kubectl, namespace: str) -> None:
    """What each ServiceAccount may and may not do (least privilege, checked by the apiserver):
    exactly the calls store/kubernetes.py, fleet/kubernetes.py, _kube/lease.py, controller.py
    and janitor/kubernetes.py make."""
    ctl, jan = "fastsandbox-controller", "fastsandbox-janitor"
    pool_ns = "default"  # any namespace a pool (and so its agent Pods and Secrets) lives in
    allowed = [
        (ctl, pool_ns, ("create", "pods")), (ctl, pool_ns, ("delete", "pods")),
        (ctl, pool_ns, ("watch", "pods")), (ctl, pool_ns, ("list", "pods")),
        (ctl, namespace, ("list", "sandboxes", "-A")),
        (ctl, pool_ns, ("update", "sandboxes.fastsandbox.io")),
        (ctl, pool_ns, ("delete", "sandboxpools.fastsandbox.io")),
        (ctl, pool_ns, ("update", "sandboxes.fastsandbox.io", "--subresource=status")),
        (ctl, pool_ns, ("update", "sandboxpools.fastsandbox.io", "--subresource=status")),
        (ctl, pool_ns, ("update", "sandboxpools.fastsandbox.io", "--subresource=finalizers")),
        (ctl, pool_ns, ("create", "events")), (ctl, pool_ns, ("update", "events")),
        (ctl, pool_ns, ("delete", "events")), (ctl, pool_ns, ("list", "events")),
        (ctl, pool_ns, ("create", "secrets")), (ctl, pool_ns, ("delete", "secrets")),
        (ctl, namespace, ("get", "secrets/fastsandbox-agent-ca")),
        (ctl, namespace, ("create", "secrets")),
        (ctl, namespace, ("create", "tokenreviews.authentication.k8s.io")),
        (ctl, namespace, ("create", "subjectaccessreviews.authorization.k8s.io")),
        (ctl, namespace, ("create", "leases.coordination.k8s.io")),
        (ctl, namespace, ("get", "leases.coordination.k8s.io/fastsandbox-controller")),
        (ctl, namespace, ("update", "leases.coordination.k8s.io/fastsandbox-controller")),
        (ctl, namespace, ("get", "secrets/fastsandbox-api-token")),
        (ctl, namespace, ("get", "secrets/fastsandbox-fastpath-tls")),
        (ctl, namespace, ("get", "secrets/fsb-token-0123456789ab")),
        (ctl, namespace, ("list", "secrets")), (ctl, namespace, ("delete", "secrets")),
        (jan, namespace, ("list", "pods", "-A")),
        (jan, namespace, ("list", "sandboxes.fastsandbox.io", "-A")),
    ]  # fmt: skip
    denied = [
        (ctl, pool_ns, ("get", "secrets/someone-elses")), (ctl, pool_ns, ("list", "secrets")),
        (ctl, pool_ns, ("get", "secrets/fastsandbox-api-token")),
        (ctl, pool_ns, ("get", "secrets/fastsandbox-agent-ca")),
        (ctl, pool_ns, ("get", "secrets/p-abcde-credentials")),
        (ctl, pool_ns, ("watch", "secrets")), (ctl, pool_ns, ("patch", "secrets")),
        (ctl, pool_ns, ("update", "pods")), (ctl, pool_ns, ("patch", "pods")),
        (ctl, pool_ns, ("create", "pods", "--subresource=exec")),
        (ctl, pool_ns, ("create", "deployments.apps")),
        (ctl, pool_ns, ("create", "leases.coordination.k8s.io")),
        (ctl, namespace, ("update", "leases.coordination.k8s.io/another-lease")),
        (ctl, namespace, ("create", "customresourcedefinitions.apiextensions.k8s.io")),
        (jan, namespace, ("delete", "pods")), (jan, namespace, ("watch", "pods")),
        (jan, namespace, ("get", "secrets")), (jan, namespace, ("list", "sandboxpools")),
        (jan, namespace, ("update", "sandboxes.fastsandbox.io")),
        (jan, namespace, ("create", "events")),
    ]  # fmt: skip
    wrong = [
        ("allowed", sa, ns, a) for sa, ns, a in allowed if not can_i(kubectl, namespace, sa, ns, *a)
    ]
    wrong += [
        ("denied", sa, ns, a) for sa, ns, a in denied if can_i(kubectl, namespace, sa, ns, *a)
    ]
    assert not wrong, f"RBAC differs from the intent: {wrong}"


def check_workloads(kubectl: Kubectl, namespace: str) -> None:
    deploy = json.loads(
        kubectl.run("get", "deployment", "fastsandbox-controller", "-n", namespace, "-o", "json")
    )
    assert deploy["spec"]["replicas"] == 2
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "controller"
    service = json.loads(
        kubectl.run("get", "service", "fastsandbox-controller", "-n", namespace, "-o", "json")
    )
    assert [p["port"] for p in service["spec"]["ports"]] == [9090]
    ds = json.loads(
        kubectl.run("get", "daemonset", "fastsandbox-janitor", "-n", namespace, "-o", "json")
    )
    pod = ds["spec"]["template"]["spec"]
    (janitor,) = pod["containers"]
    assert janitor["args"][:3] == ["janitor", "--node", "$(NODE_NAME)"]
    assert janitor["securityContext"]["privileged"] is False
    assert janitor["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    sockets = [v for v in pod["volumes"] if v.get("hostPath", {}).get("type") == "Socket"]
    assert [v["hostPath"]["path"] for v in sockets] == ["/run/containerd/containerd.sock"]


def cluster_scoped(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_the_plain_manifests_apply(kubectl: Kubectl, namespace: str) -> None:
    crds_applied(kubectl)
    namespace_doc = load([DEPLOY / "namespace.yaml"])
    assert [key(d) for d in namespace_doc] == [("Namespace", DEFAULT_NAMESPACE)]
    kubectl.run("apply", "--dry-run=server", "-f", str(DEPLOY / "namespace.yaml"))
    docs = relocated(load(PLAIN), namespace)
    try:
        out = kubectl.apply(docs)
        assert out.count("serverside-applied") == len(docs), out
        check_rbac(kubectl, namespace)
        check_workloads(kubectl, namespace)
        # The samples too, in the same namespace.
        samples = load(sorted((DEPLOY / "samples").glob("*.yaml")))
        kubectl.apply(samples, "-n", namespace)
        kubectl.run("get", "sandbox/hello", "sandboxpool/default-pool", "-n", namespace)
    finally:
        kubectl.delete(cluster_scoped(docs))


def test_the_helm_chart_renders_the_plain_manifests(helm: Path) -> None:
    rendered = {key(d): d for d in helm_template(helm, DEFAULT_NAMESPACE)}
    plain = {key(d): d for d in load(PLAIN)}
    assert sorted(rendered) == sorted(plain)
    for k, doc in rendered.items():
        labels = doc["metadata"].get("labels", {})
        assert set(labels) >= HELM_LABELS, k
        doc["metadata"]["labels"] = {n: v for n, v in labels.items() if n not in HELM_LABELS}
        assert doc == plain[k], f"{k}: the chart and deploy/ differ"
    # The chart's CRDs are the generated ones.
    with_crds = helm_template(helm, DEFAULT_NAMESPACE, "--include-crds")
    assert [d for d in with_crds if d["kind"] == "CustomResourceDefinition"] == (
        crds.crd_manifests()
    )


def test_the_helm_chart_lints_and_its_values_work(helm: Path) -> None:
    proc = subprocess.run(
        [str(helm), "lint", str(CHART), "--kube-version", KUBE_VERSION],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = helm_template(
        helm, "elsewhere",
        "--set", "janitor.enabled=false", "--set", "controller.replicas=3",
        "--set", "image.tag=dev", "--set", "janitor.orphanTimeoutSeconds=60",
    )  # fmt: skip
    kinds = {key(d) for d in docs}
    assert ("DaemonSet", "fastsandbox-janitor") not in kinds
    assert ("ClusterRole", "fastsandbox-janitor") not in kinds
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["metadata"]["namespace"] == "elsewhere"
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":dev")
    tuned = helm_template(helm, "x", "--set", "janitor.orphanTimeoutSeconds=60")
    (ds,) = [d for d in tuned if d["kind"] == "DaemonSet"]
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--orphan-timeout") + 1] == "60"


def test_the_rendered_helm_chart_applies(kubectl: Kubectl, helm: Path, namespace: str) -> None:
    docs = helm_template(helm, namespace, "--include-crds")
    try:
        out = kubectl.apply(docs)
        assert out.count("serverside-applied") == len(docs), out
        kubectl.run(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/sandboxes.fastsandbox.io", "crd/sandboxpools.fastsandbox.io",
        )  # fmt: skip
        check_rbac(kubectl, namespace)
        check_workloads(kubectl, namespace)
    finally:
        kubectl.delete(cluster_scoped(docs))


def test_the_helm_chart_can_confine_agents_to_listed_namespaces(
    kubectl: Kubectl, helm: Path, namespace: str
) -> None:
    """`rbac.poolNamespaces`: Pods and Secrets only there (a RoleBinding each); watching
    sandboxes and pools and the identity checks stay cluster-wide."""
    team = f"{namespace}-team"
    kubectl.run("create", "namespace", team)
    docs = helm_template(helm, namespace, "--set", f"rbac.poolNamespaces={{{team}}}")
    kinds = {key(d): d for d in docs}
    assert ("ClusterRoleBinding", "fastsandbox-controller-agents") not in kinds
    binding = kinds[("RoleBinding", "fastsandbox-controller-agents")]
    assert binding["metadata"]["namespace"] == team
    ctl = "fastsandbox-controller"
    try:
        kubectl.apply(docs)
        for verb in ("create", "delete"):
            assert can_i(kubectl, namespace, ctl, team, verb, "pods")
            assert can_i(kubectl, namespace, ctl, team, verb, "secrets")
            assert not can_i(kubectl, namespace, ctl, "default", verb, "pods")
            assert not can_i(kubectl, namespace, ctl, "default", verb, "secrets")
        assert not can_i(kubectl, namespace, ctl, team, "get", "secrets")
        assert can_i(kubectl, namespace, ctl, "default", "list", "sandboxpools", "-A")
        assert can_i(kubectl, namespace, ctl, "default", "watch", "pods")
        assert can_i(kubectl, namespace, ctl, "default", "create", "tokenreviews")
    finally:
        kubectl.delete(cluster_scoped(docs))
        kubectl.run("delete", "namespace", team, "--wait=false", check=False)
