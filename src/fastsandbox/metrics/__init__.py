"""Prometheus metrics and the health/readiness endpoints of every server process.

Why one small package shared by `control` and `agent` (which never import each other): the metric
names, units and labels are part of our operational API, so they are defined once (`names.py`),
and every process (fsb server, fsb controller, each agent) serves them the same way (`http.py`).
Each process builds its own `Metrics` on its own `CollectorRegistry` — never the global default
registry — so tests can run many servers in one interpreter.
"""

from fastsandbox.metrics.http import HealthState, MetricsServer, serve_metrics
from fastsandbox.metrics.names import Metrics

__all__ = ["HealthState", "Metrics", "MetricsServer", "serve_metrics"]
