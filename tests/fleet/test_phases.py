"""The phase runner: run-scoped folders, manifests, idempotent reruns, explicit inputs."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bem_tasks.config.loader import load_fleet
from bem_tasks.fleet.phases import PhaseContext, execute, run_phase
from bem_tasks.fleet.results import publish_mission_results
from bem_tasks.fleet.runs import RunLayout, verify_manifest


@pytest.fixture
def toy_env(project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("BEM_FLEET_CONFIG", str(project / "configs" / "bem_fleet_architecture.yml"))
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path / "locks"))
    return tmp_path / "artifacts"


def test_phases_chain_through_the_run_layout(toy_env: Path) -> None:
    kw = {
        "profile": "smoke",
        "dag_id": "bem_mission_toy",
        "run_id": "manual__2026-01-01T00:00:00+00:00",
    }
    prep = run_phase("mission_toy", "prepare", **kw, seed=3)
    assert prep["seed"] is None  # not a per-seed phase: the seed is ignored
    fits = [run_phase("mission_toy", "fit", **kw, seed=s) for s in (0, 1)]
    evals = [run_phase("mission_toy", "evaluate", **kw, seed=s) for s in (0, 1)]
    assert [f["metrics"]["mean"] for f in fits] == [4.5, 4.5]  # mean of 0..9 (smoke n=10)
    assert [e["metrics"]["seed"] for e in evals] == [0, 1]

    layout = RunLayout(toy_env, "bem_mission_toy", kw["run_id"])
    fit_dir = layout.phase_dir("mission_toy", "fit", 1)
    assert Path(fits[1]["dir"]) == fit_dir
    assert (
        fit_dir
        == toy_env
        / "bem_mission_toy"
        / "manual__2026-01-01T00~3a00~3a00~2b00~3a00"
        / "mission_toy"
        / "fit"
        / "seed_1"
    )
    manifest = json.loads((fit_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.json", "metrics.json"}
    assert manifest["seed"] == 1 and manifest["status"] == "complete"
    assert manifest["lease"]["device_class"] == "cpu" and manifest["lease"]["indices"] == []
    assert {"config_hash", "git_sha", "packages", "duration_s"} <= set(manifest)
    assert verify_manifest(fit_dir) == []

    summary = publish_mission_results(
        "mission_toy", profile="smoke", dag_id="bem_mission_toy", run_id=kw["run_id"]
    )
    results = json.loads(Path(summary["results"]).read_text())
    assert results["final_phase"] == "evaluate"
    assert sorted(results["phases"]["evaluate"]) == ["seed_0", "seed_1"]


def test_rerun_reuses_complete_output_and_redoes_tampered_output(toy_env: Path) -> None:
    kw = {"profile": "smoke", "dag_id": "d", "run_id": "r"}
    run_phase("mission_toy", "prepare", **kw)
    first = run_phase("mission_toy", "fit", **kw, seed=0)
    again = run_phase("mission_toy", "fit", **kw, seed=0)
    assert (first["reused"], again["reused"]) == (False, True)
    model = Path(first["dir"]) / "model.json"
    model.write_text('{"mean": 99}')
    assert verify_manifest(Path(first["dir"])) == [f"{model}: sha256 differs from the manifest"]
    redone = run_phase("mission_toy", "fit", **kw, seed=0)
    assert redone["reused"] is False
    assert json.loads(model.read_text())["mean"] == 4.5


def test_a_changed_input_fails_the_downstream_phase_naming_the_file(toy_env: Path) -> None:
    """A manifest is not enough: the files it lists must still have its sha256."""
    from bem_tasks.fleet.runs import InputMismatch

    kw = {"profile": "smoke", "dag_id": "d", "run_id": "r5"}
    prep = Path(run_phase("mission_toy", "prepare", **kw)["dir"])
    (changed,) = [
        p for p in prep.iterdir() if p.name not in ("manifest.json", "metrics.json", ".phase.lock")
    ]
    changed.write_text(changed.read_text() + " ")
    with pytest.raises(InputMismatch) as err:
        run_phase("mission_toy", "fit", **kw, seed=0)
    assert f"mission_toy.fit: input 'prepare' at {prep} does not match its manifest" in str(
        err.value
    )
    assert f"{changed}: sha256 differs from the manifest" in str(err.value)
    assert not (
        RunLayout(toy_env, "d", "r5").phase_dir("mission_toy", "fit", 0) / "manifest.json"
    ).exists()
    # explicit inputs with a manifest are checked the same way
    cfg = load_fleet(None, "smoke")
    ctx = PhaseContext("mission_toy", "fit", 0, cfg, toy_env / "x", inputs={"prepare": prep})
    with pytest.raises(InputMismatch, match="sha256 differs"):
        ctx.input_dir("prepare")
    changed.unlink()
    fresh = PhaseContext("mission_toy", "fit", 0, cfg, toy_env / "x", inputs={"prepare": prep})
    with pytest.raises(InputMismatch, match="listed in the manifest but missing"):
        fresh.input_dir("prepare")


def test_a_run_folder_of_another_run_id_is_refused(toy_env: Path) -> None:
    from bem_tasks.fleet.runs import RUN_ID_MARKER, RunFolderClaimed

    layout = RunLayout(toy_env, "d", "r6")
    layout.run_dir.mkdir(parents=True)
    (layout.run_dir / RUN_ID_MARKER).write_text("r6-other")  # e.g. left by an older naming rule
    with pytest.raises(RunFolderClaimed, match="belongs to run id 'r6-other', not 'r6'"):
        run_phase("mission_toy", "prepare", profile="smoke", dag_id="d", run_id="r6")
    assert not (layout.phase_dir("mission_toy", "prepare") / "manifest.json").exists()


def test_missing_upstream_names_the_phase(toy_env: Path) -> None:
    with pytest.raises(FileNotFoundError, match="output of phase 'prepare' .* is missing"):
        run_phase("mission_toy", "fit", profile="smoke", dag_id="d", run_id="r2", seed=0)


def test_explicit_inputs_run_a_phase_without_a_dag_run(toy_env: Path, tmp_path: Path) -> None:
    cfg = load_fleet(None, "smoke")
    prep_dir = tmp_path / "prep"
    execute(PhaseContext("mission_toy", "prepare", None, cfg, prep_dir), config_hash="h")
    ctx = PhaseContext("mission_toy", "fit", 7, cfg, tmp_path / "fit", inputs={"prepare": prep_dir})
    out = execute(ctx, config_hash="h")
    assert out["metrics"]["mean"] == 4.5
    no_inputs = PhaseContext("mission_toy", "fit", 7, cfg, tmp_path / "fit2")
    with pytest.raises(
        FileNotFoundError, match="needs the output of phase .prepare.. Outside a DAG"
    ):
        execute(no_inputs, config_hash="h")


def test_each_phase_is_tracked_in_an_offline_wandb_run(toy_env: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = run_phase("mission_toy", "prepare", profile="smoke", dag_id="d", run_id="r3")
    phase_dir = Path(out["dir"])
    (run_dir,) = (phase_dir.parent / ".tracking-prepare" / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")  # wandb's binary log, uploadable with `wandb sync`
    data = records.read_bytes()
    assert b"config_hash" in data and b"mission_toy.prepare" in data
    # tracking files stay out of the phase folder, so the manifest covers results only
    assert not (phase_dir / "wandb").exists()


def test_devices_are_leased_by_the_deployment_layout(toy_env: Path, monkeypatch) -> None:
    """A smoke run on a `full` deployment holds the GPU class its task was pooled and queued on."""
    monkeypatch.setenv("BEM_FLEET_DEPLOYMENT_PROFILE", "full")
    kw = {"profile": "smoke", "dag_id": "d", "run_id": "r4"}
    run_phase("mission_toy", "prepare", **kw)
    out = run_phase("mission_toy", "fit", **kw, seed=0)
    lease = json.loads((Path(out["dir"]) / "manifest.json").read_text())["lease"]
    assert lease["device_class"] == "h100_80gb"
    assert lease["indices"] == [0, 1]  # the toy's full profile asks for 2 GPUs of that class
    assert out["metrics"]["mean"] == 4.5  # sizes still come from the run's (smoke) profile


def test_a_mapped_phase_runs_per_variant_into_its_own_folder(
    toy_env: Path, project: Path, edit_yaml
) -> None:
    """`fit` mapped over variants: one folder and manifest per (variant, seed), found by
    input_dir(..., variant=...), collected as <variant>/seed_N, shown as fit[<variant>]."""
    from bem_tasks.fleet.phases import check_variant
    from bem_tasks.fleet.results import collect_phase_outputs
    from bem_tasks.fleet.summary import phase_rows

    edit_yaml(
        project / "experiments" / "mission_toy.yml",
        lambda d: d["phases"]["fit"].update(variants=["a", "b"]),
    )
    kw = {"profile": "smoke", "dag_id": "bem_mission_toy", "run_id": "r1"}
    run_phase("mission_toy", "prepare", **kw)
    for v in ("a", "b"):
        out = run_phase("mission_toy", "fit", **kw, seed=0, variant=v)
        assert out["variant"] == v
    with pytest.raises(ValueError, match=r"variant 'c' is not one of its variants \['a', 'b'\]"):
        run_phase("mission_toy", "fit", **kw, seed=0, variant="c")
    with pytest.raises(ValueError, match="not a mapped phase"):
        check_variant("mission_toy", "prepare", None, "a")
    layout = RunLayout(toy_env, "bem_mission_toy", "r1")
    fit_b = layout.phase_dir("mission_toy", "fit", 0, "b")
    assert fit_b == layout.mission_dir("mission_toy") / "fit" / "b" / "seed_0"
    manifest = json.loads((fit_b / "manifest.json").read_text())
    assert manifest["variant"] == "b" and manifest["seed"] == 0
    cfg = load_fleet(None, "smoke")
    ctx = PhaseContext("mission_toy", "evaluate", 0, cfg, toy_env / "x", layout=layout)
    assert ctx.input_dir("fit", 0, variant="a") == layout.phase_dir("mission_toy", "fit", 0, "a")
    explicit = PhaseContext(
        "mission_toy", "evaluate", 0, cfg, toy_env / "x", inputs={"fit": fit_b.parent.parent}
    )
    assert explicit.input_dir("fit", 0, variant="b") == fit_b
    with pytest.raises(FileNotFoundError, match="variant 'z'"):
        explicit.input_dir("fit", 0, variant="z")
    out = collect_phase_outputs(layout.mission_dir("mission_toy"), ["fit"], {"fit": ["a", "b"]})
    assert sorted(out["fit"]) == ["a/seed_0", "b/seed_0"]
    assert {r[1] for r in phase_rows(layout.run_dir)} == {"prepare", "fit[a]", "fit[b]"}


def test_phase_spec_variants_are_validated() -> None:
    from pydantic import ValidationError

    from bem_tasks.config.schema import PhaseSpec

    assert PhaseSpec(device_class="cpu", per_seed=True, variants=["pt1", "pt2"]).variants
    for bad, msg in (
        ({"variants": ["pt1"]}, "needs `per_seed: true`"),
        ({"per_seed": True, "variants": []}, "at least one variant"),
        ({"per_seed": True, "variants": ["a", "a"]}, "duplicate"),
        ({"per_seed": True, "variants": ["a/b"]}, "name folders"),
    ):
        with pytest.raises(ValidationError, match=msg):
            PhaseSpec(device_class="cpu", **bad)


def _orphan_fit(kw: dict, ready: Path, go: Path) -> None:
    """An earlier attempt's task process that outlived its supervisor: it holds the fit folder
    (the lock is taken before the phase function runs) and finishes when ``go`` appears."""
    from bem_tasks.fleet import phases

    real = phases.phase_function

    def slow(mission: str, phase: str):  # type: ignore[no-untyped-def]
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
        return real(mission, phase)

    phases.phase_function = slow  # type: ignore[assignment]
    phases.run_phase("mission_toy", "fit", **kw, seed=0)


@pytest.mark.parametrize("holder_ends", ["finishes", "is_killed"])
def test_a_retry_waits_for_a_live_process_in_its_phase_folder(
    toy_env: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path, holder_ends: str
) -> None:
    """Two processes never write one phase folder: a retry started while an orphan of the earlier
    attempt runs waits, then reuses the orphan's result, or computes it if the orphan died."""
    kw = {"profile": "smoke", "dag_id": "d", "run_id": "r_lock"}
    run_phase("mission_toy", "prepare", **kw)
    ready, go = tmp_path / "ready", tmp_path / "go"
    orphan = multiprocessing.get_context("fork").Process(target=_orphan_fit, args=(kw, ready, go))
    orphan.start()
    while not ready.exists():
        assert orphan.is_alive(), "the orphan died before taking the folder"
        time.sleep(0.01)
    results: list[dict] = []
    retry = threading.Thread(target=lambda: results.append(run_phase("mission_toy", "fit", **kw, seed=0)))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="bem_fleet.phase"):
        retry.start()
        time.sleep(0.5)
        assert retry.is_alive() and not results  # waiting, not writing beside the orphan
        fit_dir = RunLayout(toy_env, "d", "r_lock").phase_dir("mission_toy", "fit", 0)
        assert not (fit_dir / "manifest.json").exists()
        if holder_ends == "finishes":
            go.touch()
        else:
            os.kill(orphan.pid, signal.SIGKILL)  # type: ignore[arg-type]
        retry.join(30)
    orphan.join(30)
    assert not retry.is_alive()
    assert results[0]["reused"] is (holder_ends == "finishes")
    assert results[0]["metrics"]["mean"] == 4.5
    assert verify_manifest(fit_dir) == []
    held = [r.getMessage() for r in caplog.records if "waiting for it to finish" in r.getMessage()]
    assert len(held) == 1 and f"held by pid {orphan.pid} on " in held[0], held
