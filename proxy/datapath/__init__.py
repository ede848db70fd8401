"""One request, from the client to a backend and back.

handler.py (aiohttp's edge) reads the live snapshot once (live.py), asks decide.py where the
request goes (the one place a request is decided), fallback.py sends it and obtains the
answer as its plan() says (Forwarder.obtain), through the transport seam (transport.py;
h1.py by default, aiohttp_transport.py beside it; upstream.py makes the pools), and shadow.py
mirrors it;
runtime.py holds the shared objects and record(), where every measured answer goes.
headers.py: what is forwarded; sessions.py: session pins; budget.py: the mirrors' spend cap;
loopshare.py: the mirrors' share of the loop; capture.py: usage patterns kept for replay.
May import: proxy.config, proxy.telemetry, proxy.state, proxy.tasks. decide.py is pure.
Only upstream.py and the transports (h1.py, the pool, over h1wire.py, one connection's framing)
know which HTTP client is used."""
