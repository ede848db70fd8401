"""Reading a config file: the one place the config touches the disk (the model in
proxy/config/model.py is pure: text in, Config or ConfigError out)."""

from __future__ import annotations

from pathlib import Path

from proxy.config.model import Config, parse_config
from proxy.config.yamlsource import ConfigError, Problem


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError lists every problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from exc
    return parse_config(data, base=path.resolve().parent, source=path)
