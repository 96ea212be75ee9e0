"""The bad-input zoo (issue 15, point 2): every kind of bad input, one row each.

Each row breaks one thing in a fresh copy of the project and runs what reads it: a command
(`bem-fleet ...`, which must exit 2) or the function a DAG task calls (which must raise: the task
then fails with that message in its log). Either way the message must name the file and the
key or line, or the param. Every row runs beside good artifacts (a complete phase, a registry,
statistical results and a report) and checks that not one byte of them changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bem_tasks.cli import main
from bem_tasks.fleet.runs import RunLayout, write_manifest
from bem_tasks.io import atomic_write_json

ARCH = "configs/bem_fleet_architecture.yml"
EXP_A = "experiments/mission_a_agentic_planner.yml"


@dataclass
class Env:
    project: Path
    root: Path  # the artifact root
    edit_yaml: Callable[..., None]
    good_stats: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def arch(self) -> Path:
        return self.project / ARCH


@dataclass
class Case:
    """``run(env)`` returns what to call and the text its error must contain."""

    name: str
    run: Callable[[Env], tuple[Callable[[], Any], str]]
    command: bool  # True: a CLI call that must exit 2; False: a call that must raise


def _cli(*argv: str | Path) -> Callable[[], Any]:
    return lambda: main([str(a) for a in argv])


def _plan(env: Env, params: dict[str, Any]) -> Callable[[], Any]:
    from bem_tasks.config.loader import load_fleet
    from bem_tasks.fleet.dags import resolve_plan

    return lambda: resolve_plan(load_fleet(env.arch), params)


# ------------------------------------------------------------------------------- the cases


def malformed_yaml(env: Env):
    env.arch.write_text("fleet:\n  name: [unclosed\n")
    return _cli("validate", "--config", env.arch), f"{env.arch}:3: invalid YAML"


def malformed_yaml_in_an_experiment(env: Env):
    exp = env.project / EXP_A
    exp.write_text(exp.read_text() + "\nparams: {oops\n")
    lines = len(exp.read_text().splitlines())
    return _cli("validate", "--config", env.arch), f"{exp}:{lines + 1}: invalid YAML"


def unknown_key(env: Env):
    env.edit_yaml(env.arch, lambda d: d["fleet"].update(colour="blue"))
    return _cli("validate", "--config", env.arch), f"{env.arch}:fleet.colour: unknown key"


def wrong_type(env: Env):
    env.edit_yaml(env.arch, lambda d: d["fleet"].update(retries="many"))
    want = f"{env.arch}:fleet.retries: Input should be a valid integer"
    return _cli("validate", "--config", env.arch), want


def python_object_tag(env: Env):
    marker = env.project / "pwned"
    text = env.arch.read_text()
    env.arch.write_text(text + f'evil: !!python/object/apply:os.system ["touch {marker}"]\n')
    line = len(text.splitlines()) + 1

    def run() -> int:
        code = main(["validate", "--config", str(env.arch)])
        assert not marker.exists()  # refused, not executed
        return code

    tag = "tag:yaml.org,2002:python/object/apply:os.system"
    return run, f"{env.arch}:{line}: invalid YAML: could not determine a constructor for the " + (
        f"tag '{tag}'"
    )


def dependency_cycle(env: Env):
    def cycle(d: dict) -> None:
        d["missions"]["mission_d"].update(enabled=False, depends_on=["mission_e"])
        d["missions"]["mission_e"].update(enabled=False, depends_on=["mission_d"])

    env.edit_yaml(env.arch, cycle)
    want = f"{env.arch}:missions: dependency cycle mission_d -> mission_e -> mission_d"
    return _cli("validate", "--config", env.arch), want


def missing_file(env: Env):
    exp = env.project / "experiments" / "mission_d_sep.yml"
    exp.unlink()
    want = f"{exp}: file not found (named by {env.arch}:missions.mission_d.experiment)"
    return _cli("validate", "--config", env.arch), want


def _rows(env: Env) -> list[dict[str, Any]]:
    """Good Suite A rows, written by the suite's own generator."""
    from bem_tasks.data import SUITES

    suite = SUITES["compositional"]
    files = suite.generate(env.project / "suite_a", seed=0, n_train=5, n_dev=2, n_test=2)
    return [r.model_dump(mode="json") for r in suite.read(files["train"])]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jsonl_row_missing_a_field(env: Env):
    rows = _rows(env)[:3]
    del rows[1]["question"]
    path = _jsonl(env.project / "train.jsonl", rows)
    want = f"{path}:2: question: Field required"
    return _cli("data", "validate", path, "--suite", "compositional"), want


def jsonl_row_with_an_unknown_field(env: Env):
    rows = _rows(env)[:3]
    rows[2]["colour"] = "blue"
    path = _jsonl(env.project / "train.jsonl", rows)
    return _cli("data", "validate", path, "--suite", "compositional"), f"{path}:3: colour"


def jsonl_row_with_a_wrong_type(env: Env):
    rows = _rows(env)[:2]
    rows[0]["facts"] = "many"
    path = _jsonl(env.project / "test.jsonl", rows)
    return _cli("data", "validate", path, "--suite", "compositional"), f"{path}:1: facts"


def model_directory_without_weights(env: Env):
    from bem_tasks.core.models import load_model

    model = env.project / "models" / "anchor"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return (lambda: load_model(model)), f"{model}: no *.safetensors weights"


def checkpoint_from_another_config(env: Env):
    import torch

    from bem_tasks.core.checkpoint import load_weights, save_weights

    path = save_weights(env.project / "other" / "router.safetensors", torch.nn.Linear(4, 4))
    want = (
        f"{path}: weights do not fit Linear (a checkpoint of another config?): bias: checkpoint "
        "[4], model [8]; weight: checkpoint [4, 4], model [8, 4]"
    )
    return (lambda: load_weights(path, torch.nn.Linear(4, 8))), want


def trigger_unknown_mission(env: Env):
    return _plan(env, {"missions": ["mission_zz"]}), (
        "params.missions: unknown mission(s) ['mission_zz'] (known: ['mission_a'"
    )


def trigger_missions_not_a_list(env: Env):
    return _plan(env, {"missions": "mission_a"}), (
        "params.missions: expected a list of mission names, got 'mission_a'"
    )


def trigger_unknown_profile(env: Env):
    return _plan(env, {"profile": "nightly"}), "params.profile: unknown profile 'nightly'"


def trigger_seed_not_an_integer(env: Env):
    return _plan(env, {"seeds": [0, "1.5"]}), (
        "params.seeds[1]: expected an integer seed >= 0, got '1.5'"
    )


def trigger_seed_a_float(env: Env):
    return _plan(env, {"seeds": [1.5]}), "params.seeds[0]: expected an integer seed >= 0, got 1.5"


def trigger_seed_a_bool(env: Env):
    return _plan(env, {"seeds": [True]}), "params.seeds[0]: expected an integer seed >= 0"


def run_command_unknown_mission(env: Env):
    return _cli("run", "--config", env.arch, "--missions", "mission_zz"), (
        "params.missions: unknown mission(s) ['mission_zz']"
    )


def run_command_unknown_profile(env: Env):
    return _cli("run", "--config", env.arch, "--profile", "nightly"), (
        "params.profile: unknown profile 'nightly'"
    )


def run_command_seed_not_an_integer(env: Env):
    return _cli("run", "--config", env.arch, "--seeds", "0,x"), "--seeds: 'x' is not an integer"


def train_command_seed_not_an_integer(env: Env):
    out = env.root / "standalone"
    return _cli("train", "mission_a", "--phase", "prepare", "--seed", "x", "--output", out), (
        "argument --seed: invalid int value: 'x'"
    )


def results_param_outside_the_artifact_root(env: Env):
    from bem_tasks.fleet.promotion import within_artifact_root

    outside = env.project / "elsewhere" / "results.json"
    want = f"params.results[1]: {outside} is outside the artifact root {env.root.resolve()}"
    inside = str(env.root / "bem_fleet" / "r" / "mission_a" / "results.json")
    return (lambda: within_artifact_root(env.root, "params.results", [inside, str(outside)])), want


def results_param_through_a_symlink_out_of_the_root(env: Env):
    from bem_tasks.fleet.promotion import within_artifact_root

    link = env.root / "escape"
    link.symlink_to(env.project)
    path = link / "results.json"
    want = f"params.results[0]: {path} is outside the artifact root"
    return (lambda: within_artifact_root(env.root, "params.results", [str(path)])), want


def statistical_results_param_outside_the_artifact_root(env: Env):
    from bem_tasks.fleet.promotion import path_within_artifact_root

    want = "params.statistical_results: /etc/passwd is outside the artifact root"
    return (
        lambda: path_within_artifact_root(env.root, "params.statistical_results", "/etc/passwd")
    ), want


def gates_command_on_corrupt_statistics(env: Env):
    bad = env.project / "statistical_results.json"
    bad.write_text('{"missions": {}, ')
    argv = ("gates", "check", "--mission", "mission_a", "--stats", bad, "--config", env.arch)
    return _cli(*argv), f"{bad}:1: not valid JSON"


def gates_command_on_statistics_of_the_wrong_shape(env: Env):
    bad = env.project / "statistical_results.json"
    atomic_write_json(bad, {"missions": ["mission_a"], "results": []})
    argv = ("gates", "check", "--mission", "mission_a", "--stats", bad, "--config", env.arch)
    return _cli(*argv), f"{bad}: expected statistical results"


def results_file_missing_its_final_phase(env: Env):
    from bem_tasks.fleet.promotion import mission_records

    path = env.project / "mission_a" / "results.json"
    atomic_write_json(
        path,
        {"mission": "mission_a", "dag_id": "d", "run_id": "r", "profile": "smoke",
         "config_hash": "h", "final_phase": "evaluate", "phases": {"prepare": {}}},
    )  # fmt: skip
    want = f"{path}:phases.evaluate: expected {{seed: {{dir: <path>, ...}}}} for the final phase"
    return (lambda: mission_records(path)), want


def phase_input_changed_after_its_manifest(env: Env):
    from bem_tasks.config.loader import load_fleet
    from bem_tasks.fleet.phases import PhaseContext

    prep = env.project / "inputs" / "prepare"
    atomic_write_json(prep / "train.json", {"rows": 3})
    write_manifest(prep, config_hash="h", seed=None)
    (prep / "train.json").write_text('{"rows": 4}\n')
    cfg = load_fleet(env.arch, "smoke")
    ctx = PhaseContext("mission_a", "pretrain_base", None, cfg, env.project / "out",
                       inputs={"prepare": prep})  # fmt: skip
    want = f"{prep / 'train.json'}: sha256 differs from the manifest"
    return (lambda: ctx.input_dir("prepare")), want


def _task(env: Env, fn: Callable[[], Any], dag_id: str, params: dict[str, Any]):
    """``fn`` as its Airflow task runs it: with the task's context (params, dag, run id)."""
    from types import SimpleNamespace

    from bem_tasks.fleet import dags

    context = {
        "params": {"profile": "smoke", **params},
        "dag": SimpleNamespace(dag_id=dag_id),
        "run_id": "manual__2026-12-01T00:00:00+00:00",
        "triggering_asset_events": {},
    }
    env.monkeypatch.setattr(dags, "get_current_context", lambda: context)
    return fn


def plan_task_with_a_bad_seed(env: Env):
    from bem_tasks.fleet import dags

    run = _task(env, dags.plan.function, "bem_fleet", {"missions": [], "seeds": [0, "one"]})
    return run, "params.seeds[1]: expected an integer seed >= 0, got 'one'"


def validate_task_with_results_outside_the_root(env: Env):
    from bem_tasks.fleet import dags

    results = ["/etc/passwd"]
    run = _task(env, lambda: dags._validate(results), "bem_statistical_validation", {})
    return run, "params.results[0]: /etc/passwd is outside the artifact root"


def gate_task_with_statistics_outside_the_root(env: Env):
    from bem_tasks.fleet import dags

    outside = str(env.project / "statistical_results.json")
    run = _task(env, lambda: dags._gate(outside), "bem_promotion_gates", {})
    return run, f"params.statistical_results: {outside} is outside the artifact root"


CASES = [
    Case("malformed YAML", malformed_yaml, True),
    Case("malformed YAML in an experiment", malformed_yaml_in_an_experiment, True),
    Case("unknown key", unknown_key, True),
    Case("wrong type", wrong_type, True),
    Case("python-object tag", python_object_tag, True),
    Case("dependency cycle", dependency_cycle, True),
    Case("missing file", missing_file, True),
    Case("JSONL row missing a field", jsonl_row_missing_a_field, True),
    Case("JSONL row with an unknown field", jsonl_row_with_an_unknown_field, True),
    Case("JSONL row with a wrong type", jsonl_row_with_a_wrong_type, True),
    Case("model directory without weights", model_directory_without_weights, False),
    Case("checkpoint from another config", checkpoint_from_another_config, False),
    Case("trigger: unknown mission", trigger_unknown_mission, False),
    Case("trigger: missions not a list", trigger_missions_not_a_list, False),
    Case("trigger: unknown profile", trigger_unknown_profile, False),
    Case("trigger: seed '1.5'", trigger_seed_not_an_integer, False),
    Case("trigger: seed 1.5", trigger_seed_a_float, False),
    Case("trigger: seed true", trigger_seed_a_bool, False),
    Case("run --missions unknown", run_command_unknown_mission, True),
    Case("run --profile unknown", run_command_unknown_profile, True),
    Case("run --seeds not integers", run_command_seed_not_an_integer, True),
    Case("train --seed not an integer", train_command_seed_not_an_integer, True),
    Case("results param outside the root", results_param_outside_the_artifact_root, False),
    Case("results param via a symlink", results_param_through_a_symlink_out_of_the_root, False),
    Case(
        "statistical_results param outside the root",
        statistical_results_param_outside_the_artifact_root,
        False,
    ),
    Case("gates on corrupt statistics", gates_command_on_corrupt_statistics, True),
    Case("gates on misshapen statistics", gates_command_on_statistics_of_the_wrong_shape, True),
    Case("task plan: seed 'one'", plan_task_with_a_bad_seed, False),
    Case(
        "task validate: results outside the root",
        validate_task_with_results_outside_the_root,
        False,
    ),
    Case(
        "task gate: statistics outside the root", gate_task_with_statistics_outside_the_root, False
    ),
    Case("results.json without its final phase", results_file_missing_its_final_phase, False),
    Case("a phase input changed after its manifest", phase_input_changed_after_its_manifest, False),
]


# --------------------------------------------------------------------------------- the test


def _good_artifacts(root: Path) -> Path:
    """A complete phase, a registry, statistical results and a gates report."""
    phase = RunLayout(root, "bem_fleet", "manual__2026-01-01T00:00:00+00:00").phase_dir(
        "mission_a", "evaluate", 0
    )
    atomic_write_json(phase / "metrics.json", {"router_em": 42.0})
    write_manifest(phase, config_hash="h", seed=0, extra={"mission": "mission_a"})
    atomic_write_json(root / "registry.json", {"version": 1, "missions": {}})
    stats = root / "bem_statistical_validation" / "s1" / "statistical_results.json"
    atomic_write_json(stats, {"settings": {}, "missions": {}, "results": []})
    atomic_write_json(
        root / "bem_promotion_gates" / "g1" / "promotion_report.json", {"decisions": []}
    )
    return stats


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_error_and_writes_over_nothing(
    case: Case,
    project: Path,
    edit_yaml: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = project / "artifacts"
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(root))
    monkeypatch.setenv("BEM_FLEET_CONFIG", str(project / ARCH))
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(project / "locks"))

    def no_airflow(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the bad params should have been refused before starting Airflow")

    monkeypatch.setattr("bem_tasks.fleet.embedded.run_fleet", no_airflow)
    env = Env(project, root, edit_yaml, _good_artifacts(root), monkeypatch)
    before = _snapshot(root)
    action, expected = case.run(env)
    if case.command:
        try:
            code = action()
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        said = capsys.readouterr()
        assert code == 2, said
        assert expected in said.out + said.err
        assert "Traceback" not in said.out + said.err
    else:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            action()
        assert expected in str(err.value)
    # the symlink case adds a link, nothing else; every good artifact is byte for byte the same
    after = {k: v for k, v in _snapshot(root).items() if not k.startswith("escape")}
    assert after == before
