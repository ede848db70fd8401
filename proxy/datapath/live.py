"""The live snapshot: everything a request reads, frozen, and swapped whole.

Rules:
1. A request reads `Runtime.live` once, as it starts, and carries that snapshot to its end:
   a reload or a rollback that lands meanwhile changes the next request, never this one
   (its fallback, its telemetry, its pools, its mirror).
2. A change (reload, plan, rollback) makes a new snapshot and swaps it with one assignment.
3. Pools are reused across snapshots while their backend's config is the same; a replaced
   one is retired by the caller once its requests had time to finish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config.model import Config
from proxy.datapath.decide import Plan
from proxy.datapath.transport import Meter, Transport
from proxy.datapath.upstream import Pool, make_pool


@dataclass(frozen=True, slots=True)
class Live:
    config: Config
    plan: Plan
    pools: Mapping[str, Pool]  # the clients' traffic, per backend
    mirror_pools: Mapping[str, Pool]  # mirrors (and baselines): their own, so a stall is theirs
    reads_json: bool = False  # a user-id source reads the JSON body (derived from config)


def primary_pool(config: Config, name: str, transport: Transport) -> Pool:
    return make_pool(config.backends[name], max_head_bytes=config.limits.max_header_bytes,
                     transport=transport)


def mirror_pool(config: Config, name: str, transport: Transport, meter: Meter | None) -> Pool:
    return make_pool(config.backends[name], timeout_s=config.shadow.timeout_s,
                     limit=max(1, config.shadow.max_in_flight),
                     max_head_bytes=config.limits.max_header_bytes, transport=transport,
                     meter=meter)


def first(config: Config, plan: Plan, transport: Transport, meter: Meter | None = None) -> Live:
    return Live(config, plan,
                {name: primary_pool(config, name, transport) for name in config.backends},
                {name: mirror_pool(config, name, transport, meter) for name in config.backends},
                config.routing.reads_json)


def reloaded(live: Live, config: Config, transport: Transport,
             meter: Meter | None = None) -> tuple[Live, list[tuple[Pool, float]]]:
    """The snapshot for a new config, and the pools it retires (each with how long its
    requests may still need)."""
    old = live.config
    retired: list[tuple[Pool, float]] = []
    pools, mirrors = dict(live.pools), dict(live.mirror_pools)
    heads_changed = config.limits.max_header_bytes != old.limits.max_header_bytes
    for name, backend in config.backends.items():
        if backend != old.backends.get(name) or heads_changed:
            retired.append((pools[name], backend.timeout_s))
            pools[name] = primary_pool(config, name, transport)
        if backend != old.backends.get(name) or config.shadow != old.shadow or heads_changed:
            retired.append((mirrors[name], config.shadow.timeout_s))
            mirrors[name] = mirror_pool(config, name, transport, meter)
    return Live(config, live.plan, pools, mirrors, config.routing.reads_json), retired
