"""Every metric we export, with its unit in its name (Prometheus naming: `_seconds`, `_total`)
and labels of low cardinality only (mode, warm, outcome, reason, phase — never a sandbox name).

Latency buckets span what we measure here: a warm create is single-digit milliseconds, a cold
one tens, a pull seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip
PULL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# A gauge family is read at scrape time from the process's own state (the registry of agents,
# the agent's sandboxes), so it can never drift from what the process believes.
GaugeReader = Callable[[], Mapping[tuple[str, ...], float]]


@dataclass(frozen=True, slots=True)
class _Gauge:
    name: str
    help: str
    labels: tuple[str, ...]
    read: GaugeReader


class _ScrapeTimeGauges(Collector):
    def __init__(self) -> None:
        self._gauges: list[_Gauge] = []

    def add(self, gauge: _Gauge) -> None:
        self._gauges.append(gauge)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for g in self._gauges:
            family = GaugeMetricFamily(g.name, g.help, labels=list(g.labels))
            for label_values, value in sorted(g.read().items()):
                family.add_metric(list(label_values), value)
            yield family


@dataclass
class Metrics:
    """The metrics of one process. `component` is `server`, `controller` or `agent`."""

    component: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.create_seconds = Histogram(
            "fsb_create_seconds",
            "Create latency: request arrival to the sandbox's process started (Fast: the answer;"
            " Strong: the record Running).",
            ["mode", "warm"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.creates_total = Counter(
            "fsb_creates_total", "Creates answered, by mode and outcome (ok or an error reason).",
            ["mode", "outcome"], registry=r,
        )  # fmt: skip
        self.exec_seconds = Histogram(
            "fsb_exec_seconds",
            "Exec latency: request arrival to the process started inside the sandbox.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.pull_seconds = Histogram(
            "fsb_image_pull_seconds", "Image pulls on agents, start to unpacked.",
            buckets=PULL_BUCKETS, registry=r,
        )  # fmt: skip
        self.warm_slot_claims_total = Counter(
            "fsb_warm_slot_claims_total", "Creates that found (hit) or missed a warm slot.",
            ["result"], registry=r,
        )  # fmt: skip
        self._gauges = _ScrapeTimeGauges()
        r.register(self._gauges)

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...], read: GaugeReader) -> None:
        """Export `read()` (label values → value) as gauge `name` at every scrape."""
        self._gauges.add(_Gauge(name, help_text, labels, read))
