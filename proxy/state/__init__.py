"""What outlives the process: the rollout override, pause, guard trips, complaints and
feedback (store.py, in a file, or in Redis with redis_store.py), the active-user sketches
(users.py), the request ids remembered for complaints (recent.py).
May import: proxy.config, proxy.telemetry, proxy.tasks."""
