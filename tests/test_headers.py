"""Header rules at the proxy boundary: hop-by-hop, X-Forwarded-*, Via, X-Request-Id."""

from __future__ import annotations

import os
import re

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.datapath.headers import (
    IDS_PER_READ,
    downstream_headers,
    replacing,
    request_id,
    upstream_headers,
)

HOP_BY_HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Proxy-Authenticate", "Proxy-Authorization"]
GENERATED_ID = re.compile(r"\A[0-9a-f]{32}\Z")


def incoming(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Headers as aiohttp hands them over: a read-only, case-insensitive multidict."""
    return CIMultiDictProxy(CIMultiDict(pairs))


def upstream(*pairs: tuple[str, str], trusted_hops: int = 0, peer: str = "203.0.113.7",
             scheme: str = "https", host: str | None = "api.example") -> CIMultiDict[str]:
    return upstream_headers(incoming(*pairs), peer=peer, scheme=scheme, host=host,
                            trusted_hops=trusted_hops)


# Hop-by-hop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_hop_by_hop_header_never_reaches_the_backend(name: str) -> None:
    out = upstream((name, "x"), ("Accept", "application/json"))

    assert name not in out
    assert out["Accept"] == "application/json"


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_hop_by_hop_header_never_reaches_the_client(name: str) -> None:
    out = downstream_headers(incoming((name, "x"), ("Content-Type", "application/json")))

    assert name not in out
    assert out["Content-Type"] == "application/json"


def test_headers_named_in_connection_never_reach_the_backend() -> None:
    out = upstream(("Connection", "close, X-Session-Secret"), ("Connection", "X-Debug"),
                   ("X-Session-Secret", "s"), ("X-Debug", "1"), ("X-Kept", "k"))

    assert "X-Session-Secret" not in out
    assert "X-Debug" not in out
    assert out["X-Kept"] == "k"


def test_headers_named_in_connection_never_reach_the_client() -> None:
    out = downstream_headers(incoming(("Connection", "X-Backend-Internal"),
                                      ("X-Backend-Internal", "1"), ("X-Kept", "k")))

    assert "X-Backend-Internal" not in out
    assert out["X-Kept"] == "k"


@pytest.mark.parametrize("name", ["proxy-connection", "transfer-encoding", "keep-alive",
                                  "content-length", "host", "expect"])
def test_lower_case_hop_by_hop_and_framing_headers_never_reach_the_backend(name: str) -> None:
    out = upstream((name, "x"))

    assert name not in out


def test_connection_named_header_is_dropped_whatever_its_case() -> None:
    out = upstream(("Connection", "X-Session-Secret"), ("x-session-secret", "s"))

    assert "X-Session-Secret" not in out


def test_end_to_end_headers_reach_the_backend_unchanged() -> None:
    out = upstream(("Authorization", "Bearer t"), ("Cookie", "a=1"), ("Cookie", "b=2"),
                   ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                   ("tracestate", "congo=t61rcWkgMzE"), ("X-User-Id", "alice"))

    assert out["Authorization"] == "Bearer t"
    assert out.getall("Cookie") == ["a=1", "b=2"]
    assert out["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert out["tracestate"] == "congo=t61rcWkgMzE"
    assert out["X-User-Id"] == "alice"


def test_end_to_end_headers_reach_the_client_unchanged() -> None:
    out = downstream_headers(incoming(("Content-Encoding", "gzip"), ("Set-Cookie", "a=1"),
                                      ("Set-Cookie", "b=2"), ("X-Tokens-Used", "12")))

    assert out["Content-Encoding"] == "gzip"
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["X-Tokens-Used"] == "12"


@pytest.mark.parametrize("name", ["Content-Length", "Expect", "Host"])
def test_framing_and_host_headers_are_never_copied_upstream(name: str) -> None:
    out = upstream((name, "100-continue" if name == "Expect" else "12"))

    assert name not in out


# X-Forwarded-* -------------------------------------------------------------------------------


def test_untrusted_client_forwarded_headers_are_replaced_by_this_connection() -> None:
    out = upstream(("X-Forwarded-For", "10.9.9.9"), ("X-Forwarded-Proto", "http"),
                   ("X-Forwarded-Host", "evil.example"), ("Forwarded", "for=10.9.9.9"),
                   trusted_hops=0)

    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["api.example"]
    assert "Forwarded" not in out


def test_forwarded_headers_are_set_when_the_client_sent_none() -> None:
    out = upstream(trusted_hops=0, scheme="http")

    assert out["X-Forwarded-For"] == "203.0.113.7"
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "api.example"


def test_behind_a_trusted_hop_forwarded_for_is_kept_and_the_peer_appended() -> None:
    out = upstream(("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "https"),
                   ("X-Forwarded-Host", "www.example"), trusted_hops=1, peer="10.0.0.2",
                   scheme="http", host="internal:8080")

    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 10.0.0.2"]
    assert out["X-Forwarded-Proto"] == "https"
    assert out["X-Forwarded-Host"] == "www.example"


def test_behind_a_trusted_hop_without_forwarded_for_the_peer_is_used() -> None:
    out = upstream(trusted_hops=1, peer="10.0.0.2")

    assert out["X-Forwarded-For"] == "10.0.0.2"


def test_behind_a_trusted_hop_every_forwarded_for_line_is_kept() -> None:
    out = upstream(("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.0.0.1"),
                   trusted_hops=1, peer="10.0.0.2")

    assert out["X-Forwarded-For"] == "198.51.100.1, 10.0.0.1, 10.0.0.2"


# Via -----------------------------------------------------------------------------------------


def test_via_names_the_proxy_when_the_client_sent_none() -> None:
    assert upstream().getall("Via") == ["1.1 rollout-proxy"]


def test_via_is_appended_to_the_clients() -> None:
    assert upstream(("Via", "1.1 edge")).getall("Via") == ["1.1 edge, 1.1 rollout-proxy"]


def test_via_keeps_every_earlier_hop() -> None:
    out = upstream(("Via", "1.0 cdn"), ("Via", "1.1 edge"))

    assert ", ".join(out.getall("Via")) == "1.0 cdn, 1.1 edge, 1.1 rollout-proxy"


# X-Request-Id --------------------------------------------------------------------------------


def test_sane_request_id_is_kept() -> None:
    assert request_id(incoming(("X-Request-Id", "req-42.abc_DEF"))) == "req-42.abc_DEF"


def test_request_id_is_generated_when_absent() -> None:
    first, second = request_id(incoming()), request_id(incoming())

    assert GENERATED_ID.match(first)
    assert first != second


def test_generated_request_ids_never_repeat_across_many_reads_of_randomness() -> None:
    ids = [request_id(incoming()) for _ in range(IDS_PER_READ * 3 + 7)]

    assert all(GENERATED_ID.match(rid) for rid in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_never_hands_out_its_parents_request_ids() -> None:
    request_id(incoming())  # the parent holds randomness not yet handed out
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: write its next id and leave at once
        os.write(writer, request_id(incoming()).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    childs = os.read(reader, 64).decode()
    os.close(reader)

    assert GENERATED_ID.match(childs)
    assert childs != request_id(incoming())


@pytest.mark.parametrize("garbage", ["", "x" * 201, "caf\u00e9", "a\x00b", "line\nbreak",
                                     "tab\there"])
def test_garbage_request_id_is_replaced(garbage: str) -> None:
    assert GENERATED_ID.match(request_id({"X-Request-Id": garbage}))


def test_request_id_header_name_is_case_insensitive() -> None:
    assert request_id(incoming(("x-request-id", "abc"))) == "abc"


def test_upstream_request_carries_exactly_the_chosen_request_id() -> None:
    out = upstream(("X-Request-Id", "from-client"))

    assert out.getall("X-Request-Id") == ["from-client"]
    (chosen,) = upstream(("X-Request-Id", "bad\x01id")).getall("X-Request-Id")
    assert GENERATED_ID.match(chosen)  # the client's, replaced: still exactly one


def test_extra_headers_replace_client_headers_of_the_same_name() -> None:
    out = replacing(upstream_headers(incoming(("X-Rollout-Shadow", "0"), ("Accept", "*/*")),
                                     peer="203.0.113.7", scheme="http", host=None,
                                     trusted_hops=0), [("X-Rollout-Shadow", "1")])

    assert out.getall("X-Rollout-Shadow") == ["1"]
    assert "X-Forwarded-Host" not in out
