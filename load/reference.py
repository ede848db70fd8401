"""nginx and haproxy, configured as a fixed-JSON backend or as reference reverse proxies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None


def write_config(workdir: str | Path, name: str, text: str) -> str:
    path = Path(workdir) / name
    path.write_text(text)
    return str(path)


def _nginx_main(workdir: str | Path) -> str:
    # As root nginx's workers would drop to `nobody`, who cannot write our temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; multi_accept on; }}
"""


def _nginx_http(workdir: str | Path) -> str:
    temp = " ".join(f"{kind}_temp_path {workdir}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""access_log off;
    {temp}
    keepalive_requests 10000000;
    keepalive_timeout 75s;"""


def nginx_backend_config(host: str, port: int, workdir: str | Path, body: bytes,
                         tokens: int) -> str:
    """nginx answering every request with `body` as JSON, like load.backend's fast mode."""
    text = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    return f"""{_nginx_main(workdir)}http {{
    {_nginx_http(workdir)}
    server {{
        listen {host}:{port} backlog=8192 reuseport;
        location / {{
            default_type application/json;
            add_header X-Tokens-Used {tokens};
            return 200 '{text}';
        }}
    }}
}}
"""


def nginx_proxy_config(host: str, port: int, upstream: str, workdir: str | Path) -> str:
    """nginx as a plain keep-alive reverse proxy to `upstream` (host:port)."""
    return f"""{_nginx_main(workdir)}http {{
    {_nginx_http(workdir)}
    upstream backend {{ server {upstream}; keepalive 256; keepalive_requests 10000000; }}
    server {{
        listen {host}:{port} backlog=8192;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_command(conf_path: str, workdir: str | Path) -> list[str]:
    return ["nginx", "-c", conf_path, "-p", str(workdir), "-e", "stderr"]


def haproxy_config(host: str, port: int, upstream: str) -> str:
    """haproxy (one thread) as a plain keep-alive reverse proxy to `upstream` (host:port)."""
    return f"""global
    maxconn 8000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend front
    bind {host}:{port}
    default_backend back
backend back
    http-reuse always
    server s1 {upstream} maxconn 8000
"""


def haproxy_command(conf_path: str) -> list[str]:
    return ["haproxy", "-f", conf_path, "-db"]
