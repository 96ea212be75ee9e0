"""Kill anywhere, lose nothing (issue 15 point 1), under a real `airflow standalone`.

LocalExecutor with task retries runs a two-task DAG whose tasks are the product's own phase
entry point (`run_phase`) for Mission A's `prepare` and `pretrain_base` (a checkpointed training
loop), on a micro config. The full `bem_mission_a` DAG is not used: its four later phases would
multiply the time of every trial without adding a kill point the training loop does not have.

- Trials: an uninterrupted reference run and runs whose training task is SIGKILLed (the task
  process, found by the title Airflow gives it: ``airflow worker -- <task instance id>``) at a
  seeded random point: after a seeded checkpoint plus a seeded delay, so kills land between
  checkpoints, inside a checkpoint write, or just after the phase's manifest (and once the
  supervisor that forked the task process, which lives on as an orphan). Right after each
  kill every visible artifact must be whole; one trial also corrupts the newest checkpoint. The
  retry must resume from the newest checkpoint that verifies (the log says which, and why one
  was refused), and the final weights must be bit-identical to the reference.
- Restart: the whole standalone (every process of its tree, task processes included) is
  SIGKILLed mid-training and started again: the run completes, the finished phase is not
  recomputed, the training phase resumes from its checkpoint.

See docs/reliability.md, section 1, for the measured outcomes.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from bem_tasks.core.checkpoint import verify_checkpoint
from bem_tasks.fleet.api import AirflowApi
from bem_tasks.fleet.cluster import _ours, free_port
from bem_tasks.fleet.embedded import Embedded, wait_for_dag
from bem_tasks.fleet.runs import RunLayout, verify_manifest
from tests.missions.conftest import write_micro_project

pytestmark = pytest.mark.e2e

DAG_ID = "bem_kill_trials"
SEED = 15  # of the kill points
STEPS, EVERY, KEEP = 60, 5, 3
BETWEEN, IN_WRITE = 8, 2  # task processes killed between checkpoints / inside a write: 10

# Test-only speed-ups: a task whose process died (the standalone kill) is found by its missing
# heartbeat after this many seconds instead of Airflow's 300.
FAST = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
}

DAG_FILE = f'''
"""Test DAG of tests/reliability/test_kill_anywhere.py: two phases through the product's runner."""
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task

from bem_tasks.fleet.dags import _run_phase

with DAG(
    dag_id="{DAG_ID}",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=16,
    params={{"profile": Param("smoke")}},
    default_args={{"retries": 3, "retry_delay": timedelta(seconds=3)}},
):

    @task(task_id="prepare")
    def prepare() -> dict:
        return _run_phase("mission_a", "prepare", None)

    @task(task_id="pretrain_base")
    def pretrain_base() -> dict:
        return _run_phase("mission_a", "pretrain_base", None)

    prepare() >> pretrain_base()
'''


def _micro(params: dict) -> None:
    params["model"].update(n_embd=64, max_positions=96)
    params["training"]["pretrain_base"].update(
        steps=STEPS, batch_size=32, checkpoint_every=EVERY, keep_checkpoints=KEEP
    )


@dataclass
class Airflow:
    emb: Embedded
    api: AirflowApi
    artifact_root: Path

    def phase_dir(self, run_id: str, phase: str) -> Path:
        return RunLayout(self.artifact_root, DAG_ID, run_id).phase_dir("mission_a", phase, None)

    def trigger(self) -> str:
        run = self.api.post(f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {}})
        return str(run["dag_run_id"])

    def ti(self, run_id: str, task_id: str) -> dict[str, Any]:
        return self.api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}")

    def wait_finished(self, run_ids: list[str], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {r: self.api.get(f"/dags/{DAG_ID}/dagRuns/{r}")["state"] for r in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(2)
        raise TimeoutError(f"runs not finished after {timeout_s:.0f}s: {states}")

    def log(self, run_id: str, task_id: str, attempt: int) -> str:
        folder = self.emb.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
        path = folder / f"task_id={task_id}" / f"attempt={attempt}.log"
        return path.read_text() if path.exists() else ""

    def start(self) -> None:
        self.emb.start(lambda line: None)
        self.api = self.emb.client()
        wait_for_dag(self.api, DAG_ID)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    project = tmp_path_factory.mktemp("kill_project")
    arch = write_micro_project(project, _micro)
    doc = yaml.safe_load(arch.read_text())
    doc["fleet"]["tracking"]["backend"] = "none"  # a wandb service per task costs a core-second
    arch.write_text(yaml.safe_dump(doc, sort_keys=False))
    (project / "dags").mkdir()
    (project / "dags" / f"{DAG_ID}.py").write_text(DAG_FILE)
    artifact_root = project / "artifacts"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAST.items():
            mp.setenv(key, value)
        mp.setenv("BEM_FLEET_ARTIFACT_ROOT", str(artifact_root))
        mp.setenv("AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT", str(free_port()))
        # its own ports, so the test can run beside a `make run` (log server on 8793)
        emb = Embedded(project, free_port(), log_server_port=free_port())
        af = Airflow(emb, None, artifact_root)  # type: ignore[arg-type]
        try:
            af.start()
            yield af
        finally:
            _kill_tree(emb)


def _kill_tree(emb: Embedded) -> None:
    """SIGKILL the standalone and every process under it. Task processes run in their own
    process groups (Airflow's supervisor calls setpgid), so killing the group is not enough."""
    pid = emb.running_pid()
    if pid is None:
        return
    procs = _ours([pid])
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    emb.pid_file.unlink(missing_ok=True)


def weights(phase_dir: Path) -> dict[str, Any]:
    return load_file(str(phase_dir / "model" / "model.safetensors"))


def bits(tensor: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and raw bytes: equal only when bit-identical (unlike ==, -0.0 != 0.0)."""
    return str(tensor.dtype), tuple(tensor.shape), tensor.contiguous().numpy().tobytes()


def half_written(root: Path) -> list[str]:
    """Visible artifacts under ``root`` that are not whole: every checkpoint verifies, every
    manifest matches its files, every JSON parses, every safetensors file reads and every PNG
    ends with its IEND chunk. Names starting with '.' are temporaries, never read by anyone."""
    problems: list[str] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            if path.is_dir() and path.name.startswith("step-"):
                verify_checkpoint(path)
            elif path.name == "manifest.json" and path.parent.name != "ckpt":
                if not path.parent.name.startswith("step-"):
                    problems += verify_manifest(path.parent)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        f.get_tensor(key)
            elif path.suffix == ".png":
                assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), "truncated PNG"
        except Exception as exc:  # noqa: BLE001 (any failure to read it whole is the finding)
            problems.append(f"{rel}: {exc}")
    return problems


def task_process(ti_id: str) -> psutil.Process | None:
    """The process running task instance ``ti_id``: Airflow titles it `airflow worker -- <id>`.
    Its supervisor (the LocalExecutor worker that forked it) is titled
    `airflow worker -- LocalExecutor: <id>`; killing that one would leave the task running."""
    title = f"airflow worker -- {ti_id}"
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or ()).strip() == title:
            return proc
    return None


@dataclass
class Trial:
    run_id: str
    after: str  # "step-<n>" checkpoint or "manifest"
    delay_s: float
    corrupt: bool = False
    # "task": the task process; "supervisor": the LocalExecutor worker that forked it (the task
    # process lives on as an orphan, in its own process group)
    target: str = "task"
    pid: int | None = None
    interrupted_write: bool = False
    published: list[int] = field(default_factory=list)  # checkpoint steps visible after the kill
    killed: bool = False
    visible_problems: list[str] = field(default_factory=list)
    corrupted: str | None = None
    error: str | None = None


def kill_when(af: Airflow, trial: Trial, timeout_s: float = 600) -> None:
    """Wait for the run's training task to run, then SIGKILL it at the trial's point."""
    try:
        deadline = time.monotonic() + timeout_s
        phase = af.phase_dir(trial.run_id, "pretrain_base")
        proc = None
        while proc is None:
            ti = af.ti(trial.run_id, "pretrain_base")
            if ti["state"] == "running":
                proc = task_process(ti["id"])
            assert time.monotonic() < deadline, "training task never ran"
            time.sleep(0.5 if proc is None else 0)
        ckpt = phase / "ckpt" / "base"
        if trial.after == "manifest":
            reached = (phase / "manifest.json").exists
        elif trial.after.startswith("write:"):  # a checkpoint's temp folder: its write began
            pattern = f".tmp-{trial.after.removeprefix('write:')}-*"
            reached = lambda: any(ckpt.glob(pattern))  # noqa: E731
        else:
            reached = (ckpt / trial.after).exists
        while not reached():
            if not proc.is_running():
                return  # finished before the mark was seen: nothing killed
            time.sleep(0.002)
        time.sleep(trial.delay_s)
        victim = proc.parent() if trial.target == "supervisor" else proc
        assert victim is not None
        try:
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        except psutil.NoSuchProcess:
            return
        trial.killed, trial.pid = True, proc.pid
        trial.interrupted_write = any(phase.rglob(".tmp-*")) or any(phase.rglob(".*.tmp"))
        trial.visible_problems = half_written(phase)
        trial.published = sorted(int(p.name.removeprefix("step-")) for p in ckpt.glob("step-*"))
        if trial.corrupt:
            steps = sorted((phase / "ckpt" / "base").glob("step-*"))
            target = steps[-1] / "model.safetensors"
            data = bytearray(target.read_bytes())
            data[-1] ^= 0xFF  # still a readable file; only its hash tells
            target.write_bytes(bytes(data))
            trial.corrupted = steps[-1].name
    except Exception as exc:  # noqa: BLE001 (reported by the test, not lost in a thread)
        trial.error = repr(exc)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def resumed_step(log: str) -> int | None:
    marker = "resumed base from step "
    at = log.find(marker)
    return int(log[at + len(marker) :].split()[0]) if at >= 0 else None


@pytest.fixture(scope="module")
def reference_run(airflow: Airflow) -> str:
    """The uninterrupted run, triggered first; it runs beside the trials (nothing kills it)."""
    return airflow.trigger()


def reference_weights(airflow: Airflow, run_id: str) -> dict[str, Any]:
    assert airflow.wait_finished([run_id], 600) == {run_id: "success"}
    return weights(airflow.phase_dir(run_id, "pretrain_base"))


def test_sigkilled_training_resumes_from_its_newest_good_checkpoint_bit_identically(
    airflow: Airflow, reference_run: str
) -> None:
    rng = random.Random(SEED)
    trials = []
    for i in range(BETWEEN):
        after = f"step-{EVERY * rng.randint(1, STEPS // EVERY - 2):08d}"
        trials.append(Trial(airflow.trigger(), after, rng.uniform(0, 0.6), corrupt=(i == 3)))
    # inside a checkpoint write: its temp folder exists, the rename has not happened
    for _ in range(IN_WRITE):
        at = EVERY * rng.randint(2, STEPS // EVERY - 2)
        trials.append(Trial(airflow.trigger(), f"write:step-{at:08d}", rng.uniform(0, 0.005)))
    trials.append(Trial(airflow.trigger(), "step-00000010", 0.1, target="supervisor"))
    # just after the phase wrote its manifest, before the task reported success
    trials.append(Trial(airflow.trigger(), "manifest", 0.0))
    killers = [threading.Thread(target=kill_when, args=(airflow, t)) for t in trials]
    for k in killers:
        k.start()
    states = airflow.wait_finished([t.run_id for t in trials], 900)
    for k in killers:
        k.join()
    reference = reference_weights(airflow, reference_run)

    report = []
    for t in trials:
        ti = airflow.ti(t.run_id, "pretrain_base")
        retry_log = airflow.log(t.run_id, "pretrain_base", 2)
        report.append(
            f"{t.run_id} {t.target} after={t.after}+{t.delay_s:.3f}s killed={t.killed} "
            f"mid-write={t.interrupted_write} tries={ti['try_number']} "
            f"published={t.published} resumed={resumed_step(retry_log)} corrupted={t.corrupted} "
            f"waited={'waiting for it to finish' in retry_log} reused={'reusing it' in retry_log}"
        )
    print("\n".join(report))
    assert not [t.error for t in trials if t.error], report
    assert states == {t.run_id: "success" for t in trials}, report
    training = [t for t in trials if t.after != "manifest"]
    assert all(t.killed for t in training), report
    # no task process outlives its run (the supervisor trial's orphan finished, then exited)
    assert not [t.pid for t in trials if t.pid and running(t.pid)], report
    for t in trials:
        assert not t.visible_problems, (t.run_id, t.visible_problems)
        if not t.killed:
            continue
        assert airflow.ti(t.run_id, "pretrain_base")["try_number"] == 2
        retry_log = airflow.log(t.run_id, "pretrain_base", 2)
        final = weights(airflow.phase_dir(t.run_id, "pretrain_base"))
        assert final.keys() == reference.keys()
        for name, tensor in reference.items():
            assert bits(final[name]) == bits(tensor), f"{t.run_id}: {name} differs"
        if t.target == "supervisor":
            # The orphan trained on; the retry took its result if it had finished, else resumed
            # from its checkpoints (had it still been running, the retry would have waited for
            # it: tests/fleet/test_phases.py::test_a_retry_waits_for_a_live_process_...).
            assert "reusing it" in retry_log or resumed_step(retry_log), retry_log[-3000:]
            continue
        if t.after == "manifest":
            assert "already complete" in retry_log and "reusing it" in retry_log, retry_log[-3000:]
            assert resumed_step(retry_log) is None
            continue
        killed_after = int(t.after.split("-")[1])
        if t.after.startswith("write:"):  # that checkpoint may not have been published
            killed_after -= EVERY
        step = resumed_step(retry_log)
        assert step is not None, retry_log[-3000:]
        # the newest checkpoint that verifies: the newest published one, or the one before the
        # corrupted one
        assert killed_after <= t.published[-1] < STEPS, t.published
        if t.corrupt:
            assert f"refused checkpoint {t.corrupted}" in retry_log, retry_log[-3000:]
            assert "sha256 mismatch" in retry_log
            assert step == t.published[-2]
        else:
            assert step == t.published[-1]


def test_a_killed_standalone_restarts_and_completes_the_run_without_recomputing(
    airflow: Airflow, reference_run: str
) -> None:
    reference = reference_weights(airflow, reference_run)
    run_id = airflow.trigger()
    phase = airflow.phase_dir(run_id, "pretrain_base")
    prepared = airflow.phase_dir(run_id, "prepare") / "manifest.json"
    kill_after = phase / "ckpt" / "base" / f"step-{EVERY * 4:08d}"
    deadline = time.monotonic() + 600
    while not kill_after.exists():
        assert time.monotonic() < deadline, f"{kill_after} never appeared"
        time.sleep(0.01)
    _kill_tree(airflow.emb)
    assert half_written(phase) == [] and half_written(prepared.parent) == []
    prepared_before = prepared.read_bytes()

    airflow.start()
    assert airflow.wait_finished([run_id], 600) == {run_id: "success"}
    assert prepared.read_bytes() == prepared_before
    assert airflow.ti(run_id, "prepare")["try_number"] == 1
    tries = airflow.ti(run_id, "pretrain_base")["try_number"]
    assert tries >= 2
    retry_log = airflow.log(run_id, "pretrain_base", tries)
    step = resumed_step(retry_log)
    assert step is not None and EVERY * 4 <= step < STEPS, retry_log[-3000:]
    final = weights(phase)
    assert {n: bits(t) for n, t in final.items()} == {n: bits(t) for n, t in reference.items()}
    assert verify_manifest(phase) == []
