"""rollout-proxy: a traffic-splitting reverse proxy that carries a live service from a legacy
backend to a next-generation one.

The folders, lowest first; a folder imports only from those above it in this list:
- config/     the config model (pure: text in, Config out) and reading it from a file
- telemetry/  what an answer measured, how two answers compare, the guards' windows and
              verdicts, metrics, the comparison trace
- state/      what outlives the process: the rollout override, complaints, users
- datapath/   one request: decided (datapath/decide.py), forwarded through the transport
              seam, answered, mirrored, with fallback planned and carried out in
              datapath/fallback.py
- control/    changes to the rollout: rollbacks (control/rollback.py), promote, schedule,
              reload, the admin API
- offline/    tools beside the proxy: the CLI, report, replay, demo
app.py wires one process from all of them; workers.py runs several; tasks.py keeps tasks.
tests/test_layers.py holds the folders to this order.
"""
