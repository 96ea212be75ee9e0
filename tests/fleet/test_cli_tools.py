"""`bem-fleet data validate` and `bem-fleet devices` (the manual's data and GPU checks), and
`run`'s error when the Airflow API goes away."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from bem_tasks.cli import main
from bem_tasks.data import generate_compositional
from bem_tasks.fleet.lease import device_usage, gpu_lease

CTX = mp.get_context("fork")


@pytest.fixture
def splits(tmp_path: Path) -> dict[str, Path]:
    return generate_compositional(tmp_path / "data", seed=0, n_train=30, n_dev=5, n_test=5)


def test_valid_splits_pass_with_row_counts(splits: dict[str, Path], capsys) -> None:
    files = [str(splits[s]) for s in ("train", "dev", "test")]
    assert main(["data", "validate", *files, "--mission", "mission_a"]) == 0
    out = capsys.readouterr().out
    assert f"OK  {splits['train']}: 30 CompositionalItem rows (compositional suite)" in out
    assert "OK  3 files share no example" in out


def test_a_broken_row_names_file_and_line(splits: dict[str, Path], capsys) -> None:
    lines = splits["dev"].read_text().splitlines()
    lines[2] = lines[2].replace('"answer"', '"answr"', 1)
    splits["dev"].write_text("\n".join(lines) + "\n")
    assert main(["data", "validate", str(splits["dev"]), "--suite", "compositional"]) == 2
    assert f"{splits['dev']}:3:" in capsys.readouterr().err


def test_overlapping_splits_are_refused(splits: dict[str, Path], capsys) -> None:
    first = splits["train"].read_text().splitlines()[0]
    splits["test"].write_text(splits["test"].read_text() + first + "\n")
    files = [str(splits["train"]), str(splits["test"])]
    assert main(["data", "validate", *files, "--suite", "compositional"]) == 2
    assert "splits overlap" in capsys.readouterr().err


def test_unknown_mission_is_a_clear_error(splits: dict[str, Path], capsys) -> None:
    assert main(["data", "validate", str(splits["dev"]), "--mission", "mission_z"]) == 2
    assert "--mission 'mission_z': expected one of" in capsys.readouterr().err


def _hold(lock_dir: str, ready: Event, done: Event) -> None:
    with gpu_lease("h100_80gb", 1, devices=[0, 1], lock_dir=lock_dir, holder="mission_a.x"):
        ready.set()
        done.wait(20)


def test_device_usage_shows_who_holds_a_device(tmp_path: Path) -> None:
    assert device_usage("h100_80gb", [0, 1], lock_dir=tmp_path) == [
        {"index": 0, "state": "free", "holder": None},
        {"index": 1, "state": "free", "holder": None},
    ]
    ready, done = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(str(tmp_path), ready, done))
    p.start()
    try:
        assert ready.wait(10)
        held, free = device_usage("h100_80gb", [0, 1], lock_dir=tmp_path)
        assert held["state"] == "held" and "mission_a.x" in held["holder"]
        assert free == {"index": 1, "state": "free", "holder": None}
        # probing did not take the device away from its holder
        assert device_usage("h100_80gb", [0, 1], lock_dir=tmp_path)[0]["state"] == "held"
    finally:
        done.set()
        p.join(10)
    assert device_usage("h100_80gb", [0, 1], lock_dir=tmp_path)[0]["state"] == "free"


def test_devices_command_lists_classes_and_checks_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("BEM_FLEET_DEPLOYMENT_PROFILE", "full")
    assert main(["devices", "--check"]) == 0
    out = capsys.readouterr().out
    assert "deployment profile full" in out
    assert "h100_80gb" in out and "rtx4090_24gb" in out
    assert "check h100_80gb: leased CUDA_VISIBLE_DEVICES=0" in out


def test_log_level_from_the_environment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import logging

    monkeypatch.setenv("BEM_FLEET_LOG_LEVEL", "debug")
    assert main(["validate"]) == 0
    assert logging.getLogger("bem_tasks").level == logging.DEBUG
    monkeypatch.setenv("BEM_FLEET_LOG_LEVEL", "chatty")
    assert main(["validate"]) == 2
    assert "BEM_FLEET_LOG_LEVEL='CHATTY': expected DEBUG" in capsys.readouterr().err
    logging.getLogger("bem_tasks").setLevel(logging.NOTSET)
    logging.getLogger("bem_fleet").setLevel(logging.NOTSET)


def test_run_says_so_when_the_airflow_api_stops_answering(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import httpx

    from bem_tasks.fleet import embedded

    def api_gone(*args: object, **kwargs: object) -> int:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.chdir(project)
    monkeypatch.setattr(embedded, "run_fleet", api_gone)
    assert main(["run", "--port", "8123"]) == 1
    err = capsys.readouterr().err
    assert "run: the Airflow API at http://127.0.0.1:8123 stopped answering" in err
    assert "Connection refused" in err
    assert f"Airflow is no longer running: see {project / '.airflow' / 'standalone.log'}" in err
