"""GPU lease on simulated device lists: no GPU needed, only flock and processes."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.fleet.lease import Lease, devices_env_var, gpu_lease, resolve_devices

# fork keeps the children cheap (no re-import); the lease itself is Linux/Unix-only (flock).
CTX = mp.get_context("fork")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BEM_FLEET_DEVICES_") or name == "BEM_FLEET_LOCK_DIR":
            monkeypatch.delenv(name)
    yield


def _hold(lock_dir: str, gpus: int, out: str, go: Event, hold_s: float) -> None:
    go.wait()
    with gpu_lease(
        "rtx4090_24gb", gpus, devices=[0, 1, 2], lock_dir=lock_dir, timeout_s=20, poll_s=0.01
    ) as lease:
        t0 = (
            time.monotonic()
        )  # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes
        time.sleep(hold_s)
        cvd = os.environ["CUDA_VISIBLE_DEVICES"]
        t1 = time.monotonic()
    Path(out).write_text(json.dumps({"indices": lease.indices, "cvd": cvd, "t0": t0, "t1": t1}))


def _hold_briefly(lock_dir: str, ready: Event, hold_s: float, out: str = "") -> None:
    with gpu_lease("h100_80gb", 1, devices=[3], lock_dir=lock_dir, timeout_s=5, poll_s=0.01):
        ready.set()
        time.sleep(hold_s)
        held_until = datetime.now(UTC)
    if out:
        Path(out).write_text(held_until.isoformat())


def _lease_once(device_class: str, gpus: int, **kwargs: Any) -> Lease:
    with gpu_lease(device_class, gpus, **kwargs) as lease:
        return lease


def _hold_forever(lock_dir: str, ready: Event) -> None:
    with gpu_lease("h100_80gb", 1, devices=1, lock_dir=lock_dir, timeout_s=5, poll_s=0.01):
        ready.set()
        time.sleep(60)


def test_concurrent_leases_never_share_a_device(tmp_path: Path) -> None:
    go = CTX.Event()
    wants = [1, 2, 1, 1, 2, 1, 1]
    procs = []
    for i, gpus in enumerate(wants):
        out = str(tmp_path / f"holder{i}.json")
        procs.append(CTX.Process(target=_hold, args=(str(tmp_path / "locks"), gpus, out, go, 0.15)))
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    holds = [json.loads((tmp_path / f"holder{i}.json").read_text()) for i in range(len(wants))]

    for gpus, h in zip(wants, holds, strict=True):
        assert len(h["indices"]) == gpus
        assert set(h["indices"]) <= {0, 1, 2}
        assert h["cvd"] == ",".join(map(str, h["indices"]))
    overlapping = 0
    for i, a in enumerate(holds):
        for b in holds[i + 1 :]:
            if a["t0"] < b["t1"] and b["t0"] < a["t1"]:  # held at the same time
                overlapping += 1
                assert not set(a["indices"]) & set(b["indices"]), (a, b)
    # 3 devices, 1-2 per holder: the run really had simultaneous holders to compare.
    assert overlapping >= 1


def test_killed_holder_frees_its_device_promptly(tmp_path: Path) -> None:
    lock_dir = str(tmp_path)
    ready = CTX.Event()
    p = CTX.Process(target=_hold_forever, args=(lock_dir, ready))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(TimeoutError):
            _lease_once("h100_80gb", 1, devices=1, lock_dir=lock_dir, timeout_s=0.1, poll_s=0.02)
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=10)
        assert p.exitcode == -signal.SIGKILL
        start = time.monotonic()
        with gpu_lease(
            "h100_80gb", 1, devices=1, lock_dir=lock_dir, timeout_s=5, poll_s=0.02
        ) as lease:
            assert lease.indices == [0]
        assert time.monotonic() - start < 1.0
    finally:
        if p.is_alive():
            p.kill()
            p.join()


def test_timeout_when_all_busy_logs_and_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bem_tasks.fleet.lease")
    with gpu_lease("h100_80gb", 2, devices=2, lock_dir=tmp_path, holder="mission_a.train") as outer:
        assert outer.indices == [0, 1]
        start = time.monotonic()
        with pytest.raises(TimeoutError) as err:
            _lease_once("h100_80gb", 1, devices=2, lock_dir=tmp_path, timeout_s=0.3, poll_s=0.05)
        assert 0.3 <= time.monotonic() - start < 2.0
    msg = str(err.value)
    assert "'h100_80gb'" in msg and "needs 1 of device(s) [0, 1]" in msg
    assert f"0 (pid {os.getpid()}" in msg and "mission_a.train" in msg
    waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert waits, "a waiting lease must say so in the log"
    assert "class 'h100_80gb' wants 1 of 2 device(s) [0, 1]; busy: 0 (pid" in waits[0]
    assert "1 (pid" in waits[0]


def test_waiter_gets_the_device_when_the_holder_finishes(tmp_path: Path) -> None:
    ready = CTX.Event()
    out = tmp_path / "holder.txt"
    p = CTX.Process(target=_hold_briefly, args=(str(tmp_path), ready, 0.4, str(out)))
    p.start()
    try:
        assert ready.wait(10)
        lease = _lease_once(
            "h100_80gb", 1, devices=[3], lock_dir=tmp_path, timeout_s=5, poll_s=0.02
        )
        assert lease.indices == [3]
        assert 0.2 <= lease.waited_s < 3.0  # it waited for the holder, then got the device
    finally:
        p.join(timeout=10)
    assert p.exitcode == 0
    # the recorded acquisition time is after the holder stopped using the device
    acquired = datetime.fromisoformat(lease.to_manifest()["acquired_at"])
    assert acquired.tzinfo is not None
    assert acquired >= datetime.fromisoformat(out.read_text())


def test_lease_sets_and_restores_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with (
        pytest.raises(RuntimeError, match="phase failed"),
        gpu_lease("rtx4090_24gb", 2, devices=3, lock_dir=tmp_path) as lease,
    ):
        assert lease.indices == [0, 1]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        raise RuntimeError("phase failed")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    # the failed phase released its devices
    with gpu_lease("rtx4090_24gb", 3, devices=3, lock_dir=tmp_path, timeout_s=0) as lease:
        assert lease.indices == [0, 1, 2]
        manifest = lease.to_manifest()
    assert manifest["indices"] == [0, 1, 2]
    assert manifest["cuda_visible_devices"] == "0,1,2"
    assert manifest["device_class"] == "rtx4090_24gb"


def test_cpu_phase_is_a_noop_that_hides_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with gpu_lease("cpu", 0, devices=2, lock_dir=tmp_path) as lease:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
        assert lease.indices == [] and lease.lock_dir is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert list(tmp_path.iterdir()) == []  # nothing was locked


def test_over_ask_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"'h100_80gb' has 2 device\(s\) \[0, 1\].*gpus=3"):
        _lease_once("h100_80gb", 3, devices=2, lock_dir=tmp_path, timeout_s=30)
    monkeypatch.setenv("BEM_FLEET_DEVICES_RTX4090_24GB", "4")
    with pytest.raises(ValueError, match=r"has 1 device\(s\) \[4\]"):
        _lease_once("rtx4090_24gb", 2, count=3, lock_dir=tmp_path, timeout_s=30)
    with pytest.raises(ValueError, match="gpus=-1"):
        _lease_once("h100_80gb", -1, devices=2, lock_dir=tmp_path)
    with pytest.raises(ValueError, match="lock directory"):
        _lease_once("../etc", 1, devices=2, lock_dir=tmp_path)
    assert time.monotonic() - start < 1.0
    assert list(tmp_path.iterdir()) == []


def test_device_discovery_order(monkeypatch: pytest.MonkeyPatch) -> None:
    env = devices_env_var("rtx4090_24gb")
    assert env == "BEM_FLEET_DEVICES_RTX4090_24GB"
    monkeypatch.delenv(env, raising=False)
    assert resolve_devices("rtx4090_24gb", 3) == [0, 1, 2]
    assert resolve_devices("rtx4090_24gb", count=2) == [0, 1]
    monkeypatch.setenv(env, " 1, 3 ")
    assert resolve_devices("rtx4090_24gb", 3) == [1, 3]  # env beats the count
    assert resolve_devices("rtx4090_24gb", [2]) == [2]  # an explicit list beats the env
    monkeypatch.setenv(env, "0,x")
    with pytest.raises(ValueError, match="BEM_FLEET_DEVICES_RTX4090_24GB='0,x'"):
        resolve_devices("rtx4090_24gb", 3)
    monkeypatch.setenv(env, "1,1")
    with pytest.raises(ValueError, match="unique"):
        resolve_devices("rtx4090_24gb", 3)
    monkeypatch.delenv(env)
    with pytest.raises(ValueError, match="no device list"):
        resolve_devices("rtx4090_24gb")


def test_lock_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path))
    with gpu_lease("h100_80gb", 1, devices=[1]) as lease:
        assert lease.lock_dir == str(tmp_path)
        info = json.loads((tmp_path / "h100_80gb" / "1.lock").read_text())
        assert info["pid"] == os.getpid()
