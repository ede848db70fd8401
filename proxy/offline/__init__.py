"""Tools run beside the proxy: the CLI (cli.py: serve, check, assign, the admin verbs),
report (report*.py, over the comparison trace), replay (captured traffic against a backend),
demo. May import every other folder; nothing imports these but the `rollout-proxy` entry
point (and app, for none: serve lives in proxy/app.py)."""
