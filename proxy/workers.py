"""`serve --workers N`: N processes share the listening ports (SO_REUSEPORT).

Each worker is a full proxy; the kernel spreads connections across them. /metrics sums every
worker (Prometheus multiprocess mode); the runtime override is shared through the state file
(each worker adopts another's change within a second). Guards judge each worker's own window.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

WORKER_ENV = "ROLLOUT_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def supervise(config: Path, workers: int, extra: tuple[str, ...] = ()) -> int:
    """Start the workers, pass signals on, wait; 0 when every worker exited 0."""
    metrics_dir = tempfile.mkdtemp(prefix="rollout-metrics-")
    children: list[subprocess.Popen[bytes]] = []
    done = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            done.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        for index in range(workers):
            env = {**os.environ, WORKER_ENV: str(index), MULTIPROC_ENV: metrics_dir}
            children.append(subprocess.Popen(
                [sys.executable, "-m", "proxy.offline.cli", "serve", "--config", str(config),
                 *extra],
                env=env))
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if not done.is_set() and any(codes):
        print(f"a worker exited on its own (exit codes {codes})", file=sys.stderr)
    return 0 if all(code == 0 for code in codes) else 1
