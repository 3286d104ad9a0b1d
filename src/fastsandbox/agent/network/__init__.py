"""A private network per sandbox (DESIGN.md §6b): `plan` says what (pure), `private` does it.

The manager's interface is `PrivateNetwork.acquire/publish/release` and `SandboxNet.path`, the
namespace that goes into the sandbox's OCI spec (runc and gVisor alike).
"""
