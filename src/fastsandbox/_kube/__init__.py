"""Kubernetes plumbing shared by the Kubernetes shape (private: only that shape imports it).

- `config`: a lightkube `AsyncClient` from a kubeconfig, `$KUBECONFIG` or the Pod's service
  account, and a plain httpx2 client on the same credentials for the calls lightkube's typed API
  does not cover.
- `resources`: the generic lightkube resources for our CRDs and the one translation between the
  pydantic models and Kubernetes manifests.
- `errors`: apiserver and transport failures translated into `fastsandbox.errors`, in one place.
- `lease`: leader election on a coordination.k8s.io Lease.

Why lightkube (docs/architecture.md, "Kubernetes client"): a small httpx-based async client with
typed core models, generic resources for CRDs without code generation, and watches that resume
from a resourceVersion. `fastsandbox.control` never imports this package (import-linter).
"""
