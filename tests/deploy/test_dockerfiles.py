"""Static checks of docker/Dockerfile, docker/Dockerfile.gpu and .dockerignore.

No Docker engine is available where this suite runs, so the images are never built here: these
tests read the Dockerfiles as text and check that both install exactly the pins of
requirements.txt through constraints.txt, on the Airflow and Python versions the project pins.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "docker" / "Dockerfile"
GPU = ROOT / "docker" / "Dockerfile.gpu"
Instruction = tuple[str, str]


def parse(path: Path) -> list[Instruction]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def args_of(instrs: list[Instruction]) -> dict[str, str]:
    out = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def pip_installs(instrs: list[Instruction]) -> list[list[str]]:
    """Argument lists of every `pip install` in RUN instructions."""
    out = []
    for word, rest in instrs:
        if word != "RUN":
            continue
        for part in re.split(r"&&|\|\|", rest):
            if part.strip().startswith("pip install"):
                out.append(shlex.split(part)[2:])
    return out


def python_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'requires-python\s*=\s*">=(\d+\.\d+)', text)
    assert m, "pyproject.toml: requires-python not found"
    return m.group(1)


@pytest.fixture(params=[CPU, GPU], ids=["cpu", "gpu"])
def dockerfile(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_cpu_image_is_the_pinned_airflow_on_the_pinned_python() -> None:
    instrs = parse(CPU)
    args = args_of(instrs)
    froms = [expand(rest, args) for word, rest in instrs if word == "FROM"]
    assert froms == [f"apache/airflow:{pins()['apache-airflow']}-python{python_version()}"]
    assert args["AIRFLOW_VERSION"] == pins()["apache-airflow"]


def test_gpu_image_is_cuda_with_the_pinned_python_and_airflow() -> None:
    instrs = parse(GPU)
    args = args_of(instrs)
    (base,) = [expand(rest, args) for word, rest in instrs if word == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", base), base
    assert args["AIRFLOW_VERSION"] == pins()["apache-airflow"]
    py = python_version()
    run = " ".join(rest for word, rest in instrs if word == "RUN")
    assert f"python{py}-venv" in run and f"python{py} -m venv /opt/venv" in run


def test_images_install_the_same_pins_through_the_constraints(dockerfile: Path) -> None:
    instrs = parse(dockerfile)
    args = args_of(instrs)
    pinned = pins()
    torch_pin = pinned["torch"].split("+")[0]
    assert args["TORCH_VERSION"] == torch_pin, f"{dockerfile}: TORCH_VERSION is not the pin"
    copies = [rest for word, rest in instrs if word == "COPY"]
    assert any("requirements.txt constraints.txt" in c for c in copies)

    installs = pip_installs(instrs)
    assert any(
        "-r" in a
        and a[a.index("-r") + 1] == "requirements.txt"
        and a[a.index("-c") + 1] == "constraints.txt"
        for a in installs
        if "-c" in a
    ), f"{dockerfile}: no `pip install -c constraints.txt -r requirements.txt`"
    # Nothing else sneaks in an unpinned or different version.
    for a in installs:
        packages = [
            t
            for t in a
            if not t.startswith("-") and t not in ("requirements.txt", "constraints.txt")
        ]
        packages = [
            p for p in packages if not (a.index(p) > 0 and a[a.index(p) - 1] == "--index-url")
        ]
        for p in packages:
            if p.startswith("/"):  # the project itself, whose dependencies are pinned above
                assert "--no-deps" in a, f"{dockerfile}: {p} installed with its dependencies"
            elif p == "pip":
                assert "--upgrade" in a
            else:
                assert re.fullmatch(r"torch==\$\{TORCH_VERSION\}(\+cpu)?", p), (
                    f"{dockerfile}: installs {p!r} outside requirements.txt"
                )
    # the build itself refuses a TORCH_VERSION that is not the requirements pin
    assert 'grep -Eq "^torch==${TORCH_VERSION}' in dockerfile.read_text()


def test_pins_agree_with_constraints_and_images_carry_no_dev_tools() -> None:
    def pinned(name: str) -> dict[str, str]:
        out = {}
        for line in (ROOT / name).read_text().splitlines():
            if m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line):
                out[m.group(1).lower().replace("_", "-")] = m.group(2)
        return out

    runtime, dev, frozen = (
        pinned(n) for n in ("requirements.txt", "requirements-dev.txt", "constraints.txt")
    )
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    for name, version in {**runtime, **dev}.items():
        assert frozen.get(name) == version, (
            f"{name}=={version} but constraints.txt has {frozen.get(name)}"
        )
    assert not {"pytest", "ruff", "mypy"} & set(runtime), "dev tools belong in requirements-dev.txt"
    assert {"pytest", "ruff", "mypy"} <= set(dev)


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    (torch_install,) = [
        a for a in pip_installs(parse(CPU)) if any(t.startswith("torch==") for t in a)
    ]
    assert (
        torch_install[torch_install.index("--index-url") + 1]
        == "https://download.pytorch.org/whl/cpu"
    )
    assert "--no-deps" in torch_install


def test_gpu_image_takes_torch_with_cuda_from_pypi() -> None:
    installs = pip_installs(parse(GPU))
    assert not any("--index-url" in a for a in installs)
    assert not any("--extra-index-url" in a for a in installs)
    text = GPU.read_text()
    assert "assert torch.version.cuda" in text  # a CPU-only torch fails the build


def test_images_carry_the_project_and_run_unprivileged(dockerfile: Path) -> None:
    instrs = parse(dockerfile)
    copies = " ".join(rest for word, rest in instrs if word == "COPY")
    for src, dst in [
        ("bem_tasks", "/opt/airflow/bem_fleet_build/src/bem_tasks"),
        ("dags", "/opt/airflow/dags"),
        ("plugins", "/opt/airflow/plugins"),
        ("configs", "/opt/airflow/configs"),
        ("experiments", "/opt/airflow/experiments"),
    ]:
        assert f"{src} {dst}" in copies, f"{dockerfile}: {src} is not copied to {dst}"
    users = [rest for word, rest in instrs if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{dockerfile}: runs as root"
    envs = " ".join(rest for word, rest in instrs if word == "ENV")
    assert "BEM_FLEET_ARTIFACT_ROOT=/opt/airflow/artifacts" in envs
    assert "BEM_FLEET_CONFIG=/opt/airflow/configs/bem_fleet_architecture.yml" in envs


def test_gpu_image_entrypoint_takes_airflow_subcommands() -> None:
    instrs = parse(GPU)
    (entry,) = [rest for word, rest in instrs if word == "ENTRYPOINT"]
    assert entry == '["/usr/bin/tini", "--", "airflow"]'
    run = " ".join(rest for word, rest in instrs if word == "RUN")
    assert '--uid "${AIRFLOW_UID}" --gid 0' in run
    assert args_of(instrs)["AIRFLOW_UID"] == "50000"  # the official image's uid: shared volumes


def test_dockerignore_keeps_secrets_out_and_what_images_copy_in() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(name: str) -> bool:
        result = False
        for p in patterns:  # later patterns win, `!` re-includes (Docker's rule)
            if fnmatch.fnmatch(name, p.lstrip("!")):
                result = not p.startswith("!")
        return result

    for secret in [".env", ".env.local", ".venv", ".git", "artifacts"]:
        assert ignored(secret), f".dockerignore lets {secret} into the build context"
    copied: set[str] = set()
    for path in (CPU, GPU):
        for word, rest in parse(path):
            if word == "COPY":
                copied.update(t for t in rest.split()[:-1] if not t.startswith("--"))
    assert copied >= {"requirements.txt", "constraints.txt", "pyproject.toml", "README.md"}
    for src in copied:
        assert not ignored(src), f".dockerignore drops {src}, which an image copies"
        assert (ROOT / src).exists(), f"an image copies {src}, which the repository lacks"


def test_run_instructions_are_valid_shell(dockerfile: Path) -> None:
    # RUN is `/bin/sh -c`: check the syntax the way sh will read it (no execution).
    for word, rest in parse(dockerfile):
        if word == "RUN":
            done = subprocess.run(["sh", "-n", "-c", rest], capture_output=True, text=True)
            assert done.returncode == 0, f"{dockerfile}: RUN {rest[:60]}...: {done.stderr}"
