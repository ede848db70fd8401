"""Header rules: hop-by-hop stripping (RFC 9110 7.6.1), X-Forwarded-*, Via and request ids.

Rules:
1. Hop-by-hop headers, and every header a `Connection` header names, never cross the proxy.
2. Content-Length / Transfer-Encoding are never copied onto a request: aiohttp frames it.
3. With trusted_hops 0 the client's X-Forwarded-* are replaced by this connection's values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy, istr

# Lower-cased plain strings: multidict's istr hashes case-sensitively, so a set of istr
# would miss `proxy-connection` written in lower case.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Proxy-Authenticate", "Proxy-Authorization",
))
# Request headers we never forward besides hop-by-hop ones: framing is aiohttp's, Expect is
# answered by aiohttp itself, and X-Forwarded-* are rebuilt by forwarded().
REQUEST_DROP = HOP_BY_HOP | frozenset(h.lower() for h in (
    "Content-Length", "Expect", "Host", "X-Forwarded-For", "X-Forwarded-Proto",
    "X-Forwarded-Host", "Forwarded",
    # Markers only the proxy may set: a client must not pass a real request off as a copy.
    "X-Rollout-Shadow", "X-Rollout-Replay",
))
RESPONSE_DROP = HOP_BY_HOP | frozenset({"content-length"})
REQUEST_ID = istr("X-Request-Id")
VIA = "1.1 rollout-proxy"


def connection_named(headers: Mapping[str, str]) -> frozenset[str]:
    """Header names listed in Connection: they are hop-by-hop for this message only."""
    values = headers.getall("Connection", ()) if isinstance(headers, CIMultiDictProxy) else (
        [headers["Connection"]] if "Connection" in headers else [])
    names = {token.strip().lower() for value in values for token in value.split(",")}
    names.discard("")
    return frozenset(names)


def copy_end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str],
                    drop: frozenset[str]) -> CIMultiDict[str]:
    # Copied whole in C, then the few names to drop removed: cheaper than a Python loop
    # over every header, and the order of the rest is kept.
    result = CIMultiDict(headers)
    for name in drop:
        if name in result:
            del result[name]
    if "Connection" in headers:
        for name in connection_named(headers):
            result.popall(name, None)
    return result


def request_id(headers: Mapping[str, str]) -> str:
    """Keep a sane client id (ASCII, bounded), else make one."""
    given = headers.get(REQUEST_ID)
    if given and len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return new_id()


IDS_PER_READ = 256
_random_hex = ""  # IDS_PER_READ ids' worth of the OS's randomness, as hex
_taken = 0


def new_id() -> str:
    """128 random bits as 32 hex digits, as uuid4().hex but without its object. The OS's
    randomness is read for IDS_PER_READ ids at once: a system call per 256 requests, not
    one per request (it was a few microseconds of each request's latency)."""
    global _random_hex, _taken
    if _taken >= len(_random_hex):
        _random_hex, _taken = os.urandom(16 * IDS_PER_READ).hex(), 0
    _taken += 32
    return _random_hex[_taken - 32:_taken]


def _forget_ids() -> None:
    """A forked child must not hand out the ids its parent will."""
    global _random_hex, _taken
    _random_hex, _taken = "", 0


os.register_at_fork(after_in_child=_forget_ids)


def upstream_headers(incoming: CIMultiDictProxy[str], *, peer: str, scheme: str,
                     host: str | None, trusted_hops: int) -> CIMultiDict[str]:
    """The headers sent upstream. They carry the request id (`out["X-Request-Id"]`): the
    client's own if sane, else a new one (request_id)."""
    out = copy_end_to_end(incoming, REQUEST_DROP)
    out[REQUEST_ID] = request_id(incoming)
    forwarded(out, incoming, peer=peer, scheme=scheme, host=host, trusted_hops=trusted_hops)
    via = ", ".join(incoming.getall("Via", ()))
    out["Via"] = f"{via}, {VIA}" if via else VIA
    return out


def replacing(headers: CIMultiDict[str], configured: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """A copy of `headers` in which each configured header (a backend's or the mirrors': feature
    flags and the like) replaces the client's of the same name."""
    copy = CIMultiDict(headers)
    for name, value in configured:
        copy[name] = value
    return copy


def forwarded(out: CIMultiDict[str], incoming: Mapping[str, str], *, peer: str, scheme: str,
              host: str | None, trusted_hops: int) -> None:
    given_for = ", ".join(incoming.getall("X-Forwarded-For", ())) if isinstance(
        incoming, CIMultiDictProxy | CIMultiDict) else incoming.get("X-Forwarded-For", "")
    if trusted_hops > 0 and given_for:
        out["X-Forwarded-For"] = f"{given_for}, {peer}"
        out["X-Forwarded-Proto"] = incoming.get("X-Forwarded-Proto", scheme)
        forwarded_host = incoming.get("X-Forwarded-Host", host)
    else:
        out["X-Forwarded-For"] = peer
        out["X-Forwarded-Proto"] = scheme
        forwarded_host = host
    if forwarded_host:
        out["X-Forwarded-Host"] = forwarded_host


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return copy_end_to_end(upstream, RESPONSE_DROP)
