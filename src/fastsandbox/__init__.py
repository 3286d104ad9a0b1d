"""Fast Sandbox: isolated containers running in milliseconds, from warm pools of agents."""

# The one version string: the wheel's (pyproject reads it, [tool.hatch.version]), `fsb
# --version`, the image tag (scripts/build-image) and the default agent image; the manifests in
# deploy/ and the Helm chart spell it too, and tests/unit/test_version.py keeps them equal.
__version__ = "0.1.0"
