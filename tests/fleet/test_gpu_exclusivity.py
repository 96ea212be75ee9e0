"""The exclusivity check the Celery integration test applies to a run's manifests, shown to
fail when the lease is bypassed (issue 15, point 4): a check that cannot fail proves nothing."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.fleet import lease as lease_mod
from bem_tasks.fleet.lease import (
    Hold,
    Lease,
    concurrent_holds,
    devices_env_var,
    manifest_holds,
    shared_devices,
)
from bem_tasks.fleet.phases import run_phase
from bem_tasks.fleet.runs import RunLayout
from bem_tasks.io import utc_now

# fork: the children inherit the monkeypatched toy mission and lease (no re-import).
CTX = mp.get_context("fork")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def toy_env(
    project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    """The toy mission in a copy of the project, its own artifact root and lock directory."""
    monkeypatch.setenv("BEM_FLEET_CONFIG", str(project / "configs" / "bem_fleet_architecture.yml"))
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "artifacts"


def _hold(index: int, start_s: float, end_s: float, holder: str, cls: str = "h100") -> Hold:
    return Hold(cls, index, T0 + timedelta(seconds=start_s), T0 + timedelta(seconds=end_s), holder)


def test_the_checks_on_known_spans() -> None:
    a, b = _hold(0, 0, 10, "a"), _hold(0, 5, 15, "b")  # index 0 twice, overlapping 5..10
    handed_over = _hold(0, 15, 20, "c")  # starts when b ends: a hand-over, not a share
    other_index = _hold(1, 2, 4, "d")  # during a, on index 1
    other_class = _hold(0, 0, 10, "e", cls="rtx")  # index 0 of another class
    two_devices = [_hold(0, 30, 40, "f"), _hold(1, 30, 40, "f")]  # one phase, two devices
    holds = [a, b, handed_over, other_index, other_class, *two_devices]
    assert shared_devices(holds) == [(a, b)]
    assert concurrent_holds(holds) == [(a, other_index)]  # b (5..15) starts after d ends
    assert shared_devices([a, handed_over, other_index]) == []


def test_manifest_holds_reads_the_lease_span() -> None:
    manifest: dict[str, Any] = {
        "created_at": "2026-01-01T00:00:09.500000+00:00",
        "lease": {"device_class": "h100", "indices": [0, 1], "acquired_at": T0.isoformat()},
    }
    assert manifest_holds(manifest, "p") == [
        Hold("h100", 0, T0, T0 + timedelta(seconds=9.5), "p"),
        Hold("h100", 1, T0, T0 + timedelta(seconds=9.5), "p"),
    ]
    cpu = {"created_at": T0.isoformat(), "lease": {**manifest["lease"], "indices": []}}
    assert manifest_holds(cpu, "q") == []


@contextlib.contextmanager
def _bypass(device_class: str, gpus: int, **_: Any) -> Iterator[Lease]:
    """A lease that locks nothing and hands index 0 to everyone: what the check must catch."""
    yield Lease(device_class, list(range(gpus)), 0.0, None, utc_now())


def _fit(seed: int) -> None:
    run_phase("mission_toy", "fit", profile="smoke", dag_id="d", run_id="r", seed=seed)


def _two_fits_at_once(
    toy_env: Path, project: Path, edit_yaml: Any, monkeypatch: pytest.MonkeyPatch
) -> list[Hold]:
    """Run the toy's `fit` for seeds 0 and 1 in two processes through run_phase (the path an
    Airflow task takes), each waiting inside its phase until the other is inside too, so the two
    phases overlap by construction. Returns the holds their manifests record."""
    from tests.fixtures import toy_mission

    monkeypatch.setenv("BEM_FLEET_DEPLOYMENT_PROFILE", "full")
    monkeypatch.delenv(devices_env_var("h100_80gb"), raising=False)  # the config's 2 devices
    # One GPU each of h100_80gb's two devices: the real lease can let both in at once.
    edit_yaml(
        project / "experiments" / "mission_toy.yml",
        lambda d: d["profiles"]["full"]["phases"]["fit"].update(gpus=1),
    )
    run_phase("mission_toy", "prepare", profile="smoke", dag_id="d", run_id="r")
    both_inside = CTX.Barrier(2, timeout=20)
    real_fit = toy_mission.fit

    def fit(ctx: Any) -> dict:
        both_inside.wait()
        return real_fit(ctx)

    monkeypatch.setattr(toy_mission, "fit", fit)
    procs = [CTX.Process(target=_fit, args=(seed,)) for seed in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, "a fit process failed (see its output above)"
    holds = []
    for seed in (0, 1):
        path = RunLayout(toy_env, "d", "r").phase_dir("mission_toy", "fit", seed) / "manifest.json"
        holds += manifest_holds(json.loads(path.read_text()), f"fit seed={seed}")
    return holds


def test_with_the_lease_two_concurrent_phases_hold_different_devices(
    toy_env: Path, project: Path, edit_yaml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    holds = _two_fits_at_once(toy_env, project, edit_yaml, monkeypatch)
    assert sorted(h.index for h in holds) == [0, 1]
    assert shared_devices(holds) == []
    assert len(concurrent_holds(holds)) == 1  # they did overlap: the check above was live


def test_the_check_fails_when_the_lease_is_bypassed(
    toy_env: Path, project: Path, edit_yaml: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative control: the same two phases with the lease replaced by one that hands out
    index 0 to both. The check the integration test runs reports the pair."""
    monkeypatch.setattr(lease_mod, "gpu_lease", _bypass)
    holds = _two_fits_at_once(toy_env, project, edit_yaml, monkeypatch)
    assert [h.index for h in holds] == [0, 0]
    shared = shared_devices(holds)
    assert [(a.holder, b.holder) for a, b in shared] == [("fit seed=0", "fit seed=1")]
    assert concurrent_holds(holds) == []
