"""Where a sandbox goes: a pure scoring rule, kept apart from the registry's bookkeeping.

Hard filters first (same pool, same namespace, Ready, not draining, a free slot, none of the
requested ports taken on that agent when its sandboxes share its network namespace — a pool with
`networkMode: shared`; private sandboxes each have their own and publish on their own host port),
then the lowest score wins: the agent's load plus a large penalty when the image is not cached, so
image affinity beats load (a pull costs far more than one more neighbour) while the least-loaded
agent wins among equals. Ties break on the name, so placement is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fastsandbox.api.images import normalize_image_ref
from fastsandbox.errors import InvalidArgument

UNCACHED_IMAGE_PENALTY = 1000


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    namespace: str
    pool: str
    capacity: int
    allocated: int
    ports_in_use: frozenset[int]
    images: frozenset[str]
    ready: bool = True
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    namespace: str
    pool: str
    image: str
    ports: frozenset[int]
    # False in a private network (a namespace per sandbox, ports published per sandbox): any
    # number of sandboxes of one agent may declare the same port.
    exclusive_ports: bool = True


def fits(agent: Candidate, request: Request) -> bool:
    return (
        agent.ready
        and not agent.draining
        and agent.pool == request.pool
        and agent.namespace == request.namespace
        and agent.allocated < agent.capacity
        and not (request.exclusive_ports and agent.ports_in_use & request.ports)
    )


def score(agent: Candidate, request: Request) -> int:
    penalty = 0 if image_cached(request.image, agent.images) else UNCACHED_IMAGE_PENALTY
    return agent.allocated + penalty


def choose(agents: Iterable[Candidate], request: Request) -> Candidate | None:
    # The image reference is parsed once per request, not once per agent (a linear scan of
    # thousands of agents: benchmarks/scale.py).
    try:
        normalized = normalize_image_ref(request.image)
    except InvalidArgument:
        normalized = request.image
    best: Candidate | None = None
    best_key: tuple[int, str] | None = None
    for agent in agents:
        if not fits(agent, request):
            continue
        cached = request.image in agent.images or normalized in agent.images
        key = (agent.allocated + (0 if cached else UNCACHED_IMAGE_PENALTY), agent.name)
        if best_key is None or key < best_key:
            best, best_key = agent, key
    return best


def image_cached(image: str, images: frozenset[str]) -> bool:
    if image in images:
        return True
    try:
        return normalize_image_ref(image) in images
    except InvalidArgument:
        return False
