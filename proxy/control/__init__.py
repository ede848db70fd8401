"""Changes to the rollout. rollback.py is the one place a rollback is made (by a person, or
by a guard the moment next_gen's answer crosses it); controller.py makes every other change
(set-percentage, promote, pause, resume, reset, the schedule, the reload) and runs the loop;
admin.py is the HTTP API over both (/admin/*, /metrics, /healthz, /readyz).
May import: proxy.config, proxy.telemetry, proxy.state, proxy.datapath, proxy.tasks."""
