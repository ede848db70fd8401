"""Figures: what one answer measured (observe.py, events.py for event streams), how legacy's
and next_gen's answers compare (compare.py), the guards' rolling windows and verdicts
(guards.py), Prometheus metrics (families.py: every family in one table, built by
metrics.py for one process or for --workers), the comparison trace's schema
(record.py) and its writer (trace.py).
May import: proxy.config, proxy.tasks. compare.py, guards.py and families.py are pure: no
aiohttp, no sockets, no file I/O (tests/test_layers.py)."""
