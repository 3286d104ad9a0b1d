"""Where API objects live: the `ObjectStore` seam (see `base.py` for its semantics).

Only the Protocol and its event types are exported; a backend (`store.sqlite`, `store.memory`,
`store.kubernetes`) is imported by the composition root alone, so the core never depends on one.
"""

from fastsandbox.store.base import EventType, ObjectStore, WatchEvent

__all__ = ["EventType", "ObjectStore", "WatchEvent"]
