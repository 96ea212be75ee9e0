"""Static checks of docker-compose.yaml and .env.example.

No Docker engine is available where this suite runs (the `docker` client is installed but has no
daemon and no `compose` plugin), so nothing here builds an image or starts a container. The file
is read with yaml.safe_load (which resolves the anchors and `<<` merges the way Compose does) and
checked against configs/bem_fleet_architecture.yml; `${VAR}` interpolation is emulated for the
forms the file uses. airflow-init's script is run for real with stand-ins for `airflow` and
`bem-fleet`.
"""

from __future__ import annotations

import base64
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
ARCH = ROOT / "configs" / "bem_fleet_architecture.yml"

# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
_INTERP = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|API_KEY|BASIC_AUTH|REDISCLI_AUTH")
# What a secret's value may be: a required variable, or an optional one that defaults to empty.
_REFERENCE = re.compile(r"\$\{[A-Z0-9_]+(:\?[^}]*|:-)\}")
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "BEM_FLEET_ADMIN_PASSWORD",
    "BEM_FLEET_CI_USERNAME",
    "BEM_FLEET_CI_PASSWORD",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "FLOWER_BASIC_AUTH",
}
AIRFLOW_CORE = [
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
]


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation for the forms above; raises like Compose on a missing required var."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and empty:
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op and op.endswith("-") and empty:
            return arg
        return value or ""

    return _INTERP.sub(sub, text)


def required_vars(text: str) -> set[str]:
    return {m.group(1) for m in _INTERP.finditer(text) if m.group(2) in (":?", "?")}


def all_vars(text: str) -> set[str]:
    return {m.group(1) for m in _INTERP.finditer(text) if m.group(1)}


def env_example() -> dict[str, str]:
    """Active `KEY=value` lines and commented-out optional `# KEY=value` lines."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def filled_env() -> dict[str, str]:
    env = {k: f"value-of-{k.lower()}" for k in REQUIRED_SECRETS}
    env["AIRFLOW_UID"] = "1234"
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(interpolate(COMPOSE.read_text(), filled_env()))
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def device_classes() -> dict[str, dict[str, Any]]:
    classes = yaml.safe_load(ARCH.read_text())["device_classes"]
    assert classes, f"{ARCH}: device_classes is empty"
    return dict(classes)


def command_list(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def workers(services: dict[str, Any]) -> dict[str, list[str]]:
    """service name -> queues it serves, for every `celery worker` service."""
    out = {}
    for name, svc in services.items():
        cmd = command_list(svc)
        if cmd[:2] == ["celery", "worker"]:
            out[name] = cmd[cmd.index("--queues") + 1].split(",")
    return out


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_required_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ["postgres", "redis", "airflow-init", *AIRFLOW_CORE, "flower"]:
        assert name in services, f"docker-compose.yaml: service {name} is missing"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7.2")
    assert command_list(services["airflow-apiserver"]) == ["api-server"]
    assert command_list(services["airflow-scheduler"]) == ["scheduler"]
    assert command_list(services["airflow-dag-processor"]) == ["dag-processor"]
    assert command_list(services["airflow-triggerer"]) == ["triggerer"]
    assert services["flower"]["profiles"] == ["flower"]
    assert command_list(services["flower"]) == ["celery", "flower"]


def test_every_airflow_container_shares_executor_connections_and_secrets(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    airflow = [n for n in services if n.startswith("airflow-") or n == "flower"]
    envs = {n: services[n]["environment"] for n in airflow}
    ref = envs["airflow-scheduler"]
    assert ref["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    pw = "value-of-postgres_password"
    assert ref["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == (
        f"postgresql+psycopg2://airflow:{pw}@postgres:5432/airflow"
    )
    assert (
        ref["AIRFLOW__CELERY__RESULT_BACKEND"]
        == f"db+postgresql://airflow:{pw}@postgres:5432/airflow"
    )
    assert ref["AIRFLOW__CELERY__BROKER_URL"] == "redis://:value-of-redis_password@redis:6379/0"
    assert (
        ref["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    )
    assert ref["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert ref["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"
    assert ref["BEM_FLEET_DEPLOYMENT_PROFILE"] == "full"
    shared = [
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "BEM_FLEET_ARTIFACT_ROOT",
        "BEM_FLEET_CONFIG",
        "BEM_FLEET_DEPLOYMENT_PROFILE",
    ]
    for name, env in envs.items():
        for key in shared:
            assert env.get(key) == ref[key], f"service {name}: {key} differs from the scheduler's"
    # The artifact tree is one shared volume at the same path everywhere.
    root = ref["BEM_FLEET_ARTIFACT_ROOT"]
    for name in airflow:
        mounts = [v for v in services[name]["volumes"] if v.split(":")[1] == root]
        assert len(mounts) == 1, f"service {name}: no artifacts volume at {root}"
        assert mounts[0].split(":")[0] in compose["volumes"]
    # The users' passwords reach only airflow-init, which stores them in the metadata DB.
    for secret in ("BEM_FLEET_ADMIN_PASSWORD", "BEM_FLEET_CI_PASSWORD"):
        holders = [n for n, env in envs.items() if secret in env]
        assert holders == ["airflow-init"], secret


def test_every_airflow_container_uses_the_fab_auth_manager(compose: dict[str, Any]) -> None:
    fab = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
    services = compose["services"]
    for name in [n for n in services if n.startswith("airflow-") or n == "flower"]:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__AUTH_MANAGER"] == fab, name
        assert not [k for k in env if "SIMPLE_AUTH_MANAGER" in k], name
    # The provider is pinned where the images get their packages.
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    assert "apache-airflow-providers-fab==3.10.2" in pins
    assert "apache-airflow-providers-fab==3.10.2" in (ROOT / "constraints.txt").read_text().split()


def test_no_password_on_a_command_line(compose: dict[str, Any]) -> None:
    # `airflow users create --password X` would show X to anyone running `ps` in the container.
    for name, svc in compose["services"].items():
        cmd = " ".join(command_list(svc)) if isinstance(svc.get("command"), list) else ""
        cmd += " " + str(svc.get("command", "")) + " " + str(svc.get("entrypoint", ""))
        assert "--password" not in cmd and "users create" not in cmd, name


def test_one_worker_per_device_class(
    compose: dict[str, Any], device_classes: dict[str, dict[str, Any]]
) -> None:
    services = compose["services"]
    serving = workers(services)
    for cls, spec in device_classes.items():
        names = [n for n, queues in serving.items() if cls in queues]
        assert len(names) == 1, f"device class {cls}: {len(names)} workers serve queue {cls}"
        svc = services[names[0]]
        cmd = command_list(svc)
        assert cmd[cmd.index("--celery-hostname") + 1] == f"{cls}@%h"
        assert int(cmd[cmd.index("--concurrency") + 1]) == spec["devices"]
        # after interpolation $$ is the container shell's $: HOSTNAME is what %h expands to
        assert f'-d "{cls}@${{HOSTNAME}}"' in healthcheck_text(svc)
        assert svc["environment"]["BEM_FLEET_WORKER_QUEUES"] == cls
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if spec["kind"] == "gpu":
            assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
            assert devices is not None, f"worker {names[0]}: no GPU reservation"
            (gpu,) = devices
            assert gpu["driver"] == "nvidia"
            assert gpu["count"] == spec["devices"]
            assert "gpu" in gpu["capabilities"]
            # default lease list: the indices the container sees, 0..count-1
            env_key = "BEM_FLEET_DEVICES_" + cls.upper()
            assert svc["environment"][env_key] == ",".join(str(i) for i in range(spec["devices"]))
        else:
            assert svc["build"]["dockerfile"] == "docker/Dockerfile"
            assert devices is None, f"worker {names[0]} of a CPU class reserves GPUs"
    extra = {q for qs in serving.values() for q in qs} - set(device_classes)
    assert not extra, f"workers serve queues that are not device classes: {extra}"
    # tasks without an explicit queue go to a queue that a worker serves
    default_queue = services["airflow-scheduler"]["environment"][
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE"
    ]
    assert default_queue in device_classes


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        if name == "airflow-init":  # runs once; the others wait for it to complete
            continue
        assert "healthcheck" in svc, f"service {name} has no healthcheck"
        assert svc.get("restart") == "always", f"service {name}: restart is not always"
    checks = {n: healthcheck_text(s) for n, s in services.items() if "healthcheck" in s}
    assert "curl --fail http://localhost:8080/api/v2/version" in checks["airflow-apiserver"]
    assert "http://localhost:8974/health" in checks["airflow-scheduler"]
    assert "--job-type DagProcessorJob" in checks["airflow-dag-processor"]
    assert "--job-type TriggererJob" in checks["airflow-triggerer"]
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    for name in workers(services):
        assert "celery_executor.app inspect ping" in checks[name]
    for name in AIRFLOW_CORE:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"


def test_secrets_are_required_variables_never_literals() -> None:
    text = COMPOSE.read_text()
    assert required_vars(text) >= REQUIRED_SECRETS
    assert find_literal_secrets(text) == []
    # Compose refuses to start without a secret, naming it.
    env = filled_env()
    del env["REDIS_PASSWORD"]
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(text, env)
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(text, {**filled_env(), "POSTGRES_PASSWORD": ""})


def find_literal_secrets(text: str) -> list[str]:
    """Password-like keys whose value is not a `${VAR}` reference, and URLs with inline passwords."""
    problems = []
    doc = yaml.safe_load(text)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
                secret_key = _SECRET_KEY.search(str(key)) and not str(key).endswith("_FILE")
                if secret_key and isinstance(value, str) and not _REFERENCE.fullmatch(value):
                    problems.append(f"{path}.{key}: literal value")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, str):
            for m in re.finditer(r"[a-z+]+://[^:/@\s]*:([^@\s]+)@", node):
                if not m.group(1).startswith("${"):
                    problems.append(f"{path}: URL with a literal password")

    walk(doc, "")
    return problems


def test_secret_scanner_catches_literals() -> None:
    bad = """
services:
  postgres:
    environment:
      POSTGRES_PASSWORD: airflow
      OK_PASSWORD: "${OK_PASSWORD:?set it}"
  app:
    environment:
      DB: "postgresql://airflow:hunter2@postgres/airflow"
      GOOD: "postgresql://airflow:${PW:?x}@postgres/airflow"
"""
    assert find_literal_secrets(bad) == [
        ".services.postgres.environment.POSTGRES_PASSWORD: literal value",
        ".services.app.environment.DB: URL with a literal password",
    ]


def test_env_example_lists_every_variable_without_values() -> None:
    text = COMPOSE.read_text()
    example = env_example()
    missing = all_vars(text) - set(example)
    assert not missing, f".env.example does not mention {sorted(missing)}"
    for name in required_vars(text):
        assert re.search(rf"^{name}=$", ENV_EXAMPLE.read_text(), re.M), (
            f".env.example: {name} must be an active, empty line (no placeholder secret)"
        )
    for name, value in example.items():
        if _SECRET_KEY.search(name):
            assert value == "", f".env.example: {name} has a value"
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_init(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["airflow-init"]
    assert raw["entrypoint"] == "/bin/bash" and raw["command"][0] == "-c"
    script = interpolate(raw["command"][1], {})  # only $$ escapes: no compose variables inside
    calls = tmp_path / "calls.log"
    _fake_bin(tmp_path, "airflow", f'echo "airflow $*" >> {calls}\n')
    _fake_bin(tmp_path, "bem-fleet", f'echo "bem-fleet $* (cwd $PWD)" >> {calls}\n')
    path = f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(
        ["bash", "-c", script],
        env={"PATH": path, "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_readme_shell_examples_keep_passwords_and_tokens_off_command_lines() -> None:
    # An argument of a command is visible to every user of the machine (`ps`); the examples
    # pass the password through jq's env and curl's stdin, the token through a file descriptor.
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        for line in block.splitlines():
            assert not re.search(r"\$\{?[A-Z_]*PASSWORD", line), line
            assert not re.search(r"Bearer \$", line), line
    assert "env.BEM_FLEET_CI_PASSWORD" in text


def test_airflow_init_script_checks_settings_and_creates_the_users(
    tmp_path: Path, compose: dict[str, Any]
) -> None:
    init_env = compose["services"]["airflow-init"]["environment"]
    env = {
        **{k: str(v) for k, v in init_env.items()},
        # a real Fernet key: 32 bytes, url-safe base64
        "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(bytes(range(32))).decode(),
        "AIRFLOW_HOME": str(tmp_path),
    }
    assert env["BEM_FLEET_ADMIN_USERNAME"] == "admin"  # the default when .env names none
    done = _run_init(tmp_path, env)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0] == "airflow version"
    assert calls[1] == "airflow db migrate"
    # after the migration, which makes FAB's tables; it reads the passwords from the
    # environment (tests/deploy/test_fab_auth.py runs the real one against FAB)
    assert calls[2].startswith("bem-fleet users sync (cwd ")
    assert calls[3] == f"bem-fleet pools sync (cwd {tmp_path})"
    assert calls[4] == "airflow pools list"

    bad_key = _run_init(tmp_path, {**env, "AIRFLOW__CORE__FERNET_KEY": "not-a-key"})
    assert bad_key.returncode != 0
    assert "AIRFLOW__CORE__FERNET_KEY is not a Fernet key" in bad_key.stderr
    no_secret = _run_init(tmp_path, {**env, "AIRFLOW__API__SECRET_KEY": ""})
    assert no_secret.returncode == 1
    assert "empty required setting(s): AIRFLOW__API__SECRET_KEY" in no_secret.stderr
    no_ci = _run_init(tmp_path, {**env, "BEM_FLEET_CI_USERNAME": "", "BEM_FLEET_CI_PASSWORD": ""})
    assert no_ci.returncode == 1
    assert "setting(s): BEM_FLEET_CI_USERNAME BEM_FLEET_CI_PASSWORD" in no_ci.stderr


def test_compose_builds_from_repository_files(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert svc["build"]["context"] == "."
            assert (ROOT / svc["build"]["dockerfile"]).is_file(), name


def test_shell_healthchecks_and_commands_are_valid_shell(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        scripts = [test[1]] if test[:1] == ["CMD-SHELL"] else []
        cmd = command_list(svc) if isinstance(svc.get("command"), list) else []
        if cmd[:2] == ["sh", "-c"]:
            scripts.append(cmd[2])
        for script in scripts:
            done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert done.returncode == 0, f"service {name}: {script!r}: {done.stderr}"
