"""DAG integrity: the DAG files import cleanly, fast, without torch, and carry what ops needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"


def dagbag(config: Path, monkeypatch: pytest.MonkeyPatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("BEM_FLEET_CONFIG", str(config))
    return DagBag(str(DAGS))


@pytest.fixture
def toy_bag(project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch):
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    return bag


def test_shipped_config_imports_without_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    bag = dagbag(ROOT / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    assert "bem_fleet" in bag.dags
    for mission in ("mission_a", "mission_b", "mission_c", "mission_d", "mission_e"):
        assert f"bem_mission_{mission.removeprefix('mission_')}" in bag.dags
    # B and E run after A: A's tasks are among the upstream tasks of their first phase
    fleet = bag.dags["bem_fleet"]
    for mission in ("mission_b", "mission_e"):
        upstream = fleet.get_task(f"{mission}.prepare").get_flat_relative_ids(upstream=True)
        assert "mission_a.evaluate" in upstream, (mission, sorted(upstream))
    assert "mission_a.evaluate" not in fleet.get_task("mission_d.prepare").get_flat_relative_ids(
        upstream=True
    )


def test_parses_under_a_second_without_importing_torch() -> None:
    code = (
        "import sys, time, runpy\n"
        "import airflow.sdk, pendulum, pydantic, yaml\n"  # Airflow itself is not ours to time
        "t = time.perf_counter()\n"
        f"runpy.run_path({str(DAGS / 'bem_fleet.py')!r})\n"
        "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    seconds, torch_loaded, transformers_loaded = float(out[-3]), out[-2], out[-1]
    assert torch_loaded == "False" and transformers_loaded == "False"
    assert seconds < 1.0, f"parsing took {seconds:.2f}s"


def test_fleet_dag_schedule_and_params(toy_bag) -> None:
    dag = toy_bag.dags["bem_fleet"]
    assert dag.timetable.expression == "0 2 * * *"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert set(dag.params) == {"profile", "missions", "seeds"}
    assert dag.params["profile"] == "smoke"
    assert "mission_toy" in dag.params["missions"]
    assert dag.tags == {"bem-fleet", "fleet"} or set(dag.tags) == {"bem-fleet", "fleet"}
    assert dag.doc_md


def test_mission_dag_has_one_task_per_phase_in_order(toy_bag) -> None:
    dag = toy_bag.dags["bem_mission_toy"]
    assert set(dag.task_ids) == {"plan", "prepare", "fit", "evaluate", "publish_results"}
    assert dag.get_task("fit").upstream_task_ids == {"prepare", "plan"}
    assert dag.get_task("evaluate").upstream_task_ids == {"fit", "plan"}
    assert dag.get_task("publish_results").upstream_task_ids == {"evaluate"}
    assert set(dag.params) == {"profile", "missions", "seeds"}
    assert dag.timetable.__class__.__name__ == "NullTimetable"


def test_final_task_emits_the_mission_asset(toy_bag) -> None:
    for dag_id, task_id in (
        ("bem_mission_toy", "publish_results"),
        ("bem_fleet", "mission_toy.publish_results"),
    ):
        outlets = toy_bag.dags[dag_id].get_task(task_id).outlets
        assert [o.uri for o in outlets] == ["bem://missions/mission_toy/results"]


def test_every_task_has_a_configured_pool_retries_and_backoff(toy_bag, project: Path) -> None:
    arch = yaml.safe_load((project / "configs" / "bem_fleet_architecture.yml").read_text())
    pools = set(arch["device_classes"])
    for dag in toy_bag.dags.values():
        for t in dag.tasks:
            assert t.pool in pools, f"{dag.dag_id}.{t.task_id} uses unknown pool {t.pool}"
            assert t.queue == t.pool, f"{dag.dag_id}.{t.task_id}: queue {t.queue} != pool"
            assert t.retries >= 1, f"{dag.dag_id}.{t.task_id} has no retries"
            assert t.retry_exponential_backoff == 2.0
            assert "bem-fleet" in dag.tags


def test_phase_tasks_get_pool_slots_and_queue_from_device_class(
    project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEM_FLEET_DEPLOYMENT_PROFILE", "full")
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    dag = bag.dags["bem_mission_toy"]
    fit, evaluate, prepare = (dag.get_task(t) for t in ("fit", "evaluate", "prepare"))
    assert (fit.pool, fit.pool_slots, fit.queue) == ("h100_80gb", 2, "h100_80gb")
    assert (evaluate.pool, evaluate.pool_slots, evaluate.queue) == (
        "rtx4090_24gb",
        1,
        "rtx4090_24gb",
    )
    assert (prepare.pool, prepare.pool_slots, prepare.queue) == ("cpu", 1, "cpu")
    assert evaluate.retries == 1  # the phase's own retries override the fleet default


def test_per_seed_phases_are_mapped(toy_bag) -> None:
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = toy_bag.dags["bem_mission_toy"]
    assert isinstance(dag.get_task("fit"), MappedOperator)
    assert isinstance(dag.get_task("evaluate"), MappedOperator)
    assert not isinstance(dag.get_task("prepare"), MappedOperator)


def test_mission_dependencies_are_dag_dependencies(
    project: Path, toy_mission: str, monkeypatch: pytest.MonkeyPatch, edit_yaml
) -> None:
    from bem_tasks.missions import registry

    # a second toy mission that depends on the first
    monkeypatch.setitem(registry.IMPLEMENTED, "mission_toy2", registry.IMPLEMENTED["mission_toy"])
    (project / "experiments" / "mission_toy2.yml").write_text(
        (project / "experiments" / "mission_toy.yml")
        .read_text()
        .replace("mission_toy", "mission_toy2")
    )

    def add(d: dict) -> None:
        d["missions"]["mission_toy2"] = {
            "title": "Toy 2",
            "enabled": True,
            "experiment": "experiments/mission_toy2.yml",
            "depends_on": ["mission_toy"],
        }

    edit_yaml(project / "configs" / "bem_fleet_architecture.yml", add)
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    fleet = bag.dags["bem_fleet"]
    assert (
        "mission_toy.publish_results" in fleet.get_task("mission_toy2.selected").upstream_task_ids
    )
    # no cycles: a topological sort covers every task
    assert len(fleet.topological_sort()) == len(fleet.tasks)


def test_bad_config_is_an_import_error_with_the_message(
    project: Path, monkeypatch: pytest.MonkeyPatch, edit_yaml
) -> None:
    edit_yaml(
        project / "configs" / "bem_fleet_architecture.yml",
        lambda d: d["missions"]["mission_b"].update(depends_on=["mission_x"]),
    )
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    (error,) = bag.import_errors.values()
    assert "missions.mission_b.depends_on.0: unknown mission 'mission_x'" in error
    # the message is the point, not a stack trace from inside the loader
    assert "loader.py" not in error
    assert bag.dags == {}


def test_no_enabled_mission_gives_a_fleet_of_just_the_plan(
    project: Path, monkeypatch: pytest.MonkeyPatch, edit_yaml
) -> None:
    def disable_all(d: dict) -> None:
        for ref in d["missions"].values():
            ref["enabled"] = False

    edit_yaml(project / "configs" / "bem_fleet_architecture.yml", disable_all)
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    assert bag.dags["bem_fleet"].task_ids == ["plan"]
    assert bag.dags["bem_statistical_validation"].timetable.__class__.__name__ == "NullTimetable"


def test_plan_closes_the_selection_over_dependencies(
    project: Path, toy_mission: str, edit_yaml
) -> None:
    from bem_tasks.config.loader import load_fleet
    from bem_tasks.fleet.dags import resolve_plan

    arch = project / "configs" / "bem_fleet_architecture.yml"
    edit_yaml(arch, lambda d: d["missions"]["mission_e"].update(enabled=False))
    cfg = load_fleet(project / "configs" / "bem_fleet_architecture.yml")
    plan = resolve_plan(cfg, {"profile": "full", "missions": ["mission_toy"], "seeds": None})
    assert plan == {"profile": "full", "missions": ["mission_toy"], "seeds": [0, 1, 2, 3, 4]}
    with pytest.raises(ValueError, match="params.missions: \\['mission_e'\\] not enabled"):
        resolve_plan(cfg, {"profile": "smoke", "missions": ["mission_e"], "seeds": None})
    with pytest.raises(ValueError, match="duplicate seeds"):
        resolve_plan(cfg, {"profile": "smoke", "missions": [], "seeds": [1, 1]})
    assert json.dumps(plan)


def test_statistics_dags_are_scheduled_on_assets(toy_bag) -> None:
    stats = toy_bag.dags["bem_statistical_validation"]
    gates = toy_bag.dags["bem_promotion_gates"]
    assert "bem://missions/mission_toy/results" in repr(stats.timetable.asset_condition)
    assert [o.uri for o in stats.get_task("validate").outlets] == ["bem://statistics/results"]
    assert "bem://statistics/results" in repr(gates.timetable.asset_condition)
    assert set(gates.params) == {"profile", "statistical_results"}


B_PHASES = ["prepare", "shadow", "canary_gate", "online", "evaluate"]


@pytest.fixture
def b_bag(project: Path, monkeypatch: pytest.MonkeyPatch):
    """The DAGs of the shipped configs, Mission A and Mission B enabled."""
    from bem_tasks.missions import registry

    assert list(registry.IMPLEMENTED["mission_b"].phases) == B_PHASES
    bag = dagbag(project / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    return bag


def test_mission_b_runs_after_mission_a_in_the_fleet(b_bag) -> None:
    fleet = b_bag.dags["bem_fleet"]
    chain = [f"mission_b.{p}" for p in [*B_PHASES, "publish_results"]]
    assert set(chain) | {"mission_b.selected"} <= set(fleet.task_ids)
    for before, after in zip(chain, chain[1:], strict=False):
        assert before in fleet.get_task(after).upstream_task_ids, (before, after)
    # B starts only once A has published (selecting B adds A: resolve_plan closes over deps)
    assert "mission_a.publish_results" in fleet.get_task("mission_b.selected").upstream_task_ids
    assert fleet.get_task("mission_b.prepare").upstream_task_ids == {"mission_b.selected"}
    assert [o.uri for o in fleet.get_task("mission_b.publish_results").outlets] == [
        "bem://missions/mission_b/results"
    ]
    order = [t.task_id for t in fleet.topological_sort()]
    assert order.index("mission_a.publish_results") < order.index("mission_b.prepare")
    enabled = fleet.params["missions"]  # other enabled missions (C, D) come in too
    assert enabled.index("mission_a") < enabled.index("mission_b")


def test_mission_b_dag_alone_and_statistics_on_both_assets(b_bag) -> None:
    dag = b_bag.dags["bem_mission_b"]
    assert set(dag.task_ids) == {"plan", *B_PHASES, "publish_results"}  # no Mission A tasks
    for before, after in zip(B_PHASES, B_PHASES[1:], strict=False):
        assert before in dag.get_task(after).upstream_task_ids
    assert dag.get_task("publish_results").upstream_task_ids == {"evaluate"}
    condition = repr(b_bag.dags["bem_statistical_validation"].timetable.asset_condition)
    assert "bem://missions/mission_a/results" in condition
    assert "bem://missions/mission_b/results" in condition


def test_plan_for_mission_b_adds_mission_a(project: Path, b_bag) -> None:
    from bem_tasks.config.loader import load_fleet
    from bem_tasks.fleet.dags import resolve_plan

    cfg = load_fleet(project / "configs" / "bem_fleet_architecture.yml")
    plan = resolve_plan(cfg, {"profile": "smoke", "missions": ["mission_b"], "seeds": None})
    assert plan["missions"] == ["mission_a", "mission_b"]


def test_mission_d_pretrain_is_mapped_over_seed_x_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config: mission_d's pretrain expands over seeds (from plan) and the phase's
    variants (a literal list fixed at parse time), in both the mission DAG and the fleet."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    bag = dagbag(ROOT / "configs" / "bem_fleet_architecture.yml", monkeypatch)
    assert bag.import_errors == {}
    exp = yaml.safe_load((ROOT / "experiments" / "mission_d_sep.yml").read_text())
    variants = exp["phases"]["pretrain"]["variants"]
    for dag_id, prefix in (("bem_mission_d", ""), ("bem_fleet", "mission_d.")):
        dag = bag.dags[dag_id]
        pretrain = dag.get_task(f"{prefix}pretrain")
        assert isinstance(pretrain, MappedOperator)
        mapped = pretrain._get_specified_expand_input().value
        # seed first, variant last: map_index = seed position * len(variants) + variant position
        assert list(mapped) == ["seed", "variant"]
        assert mapped["variant"] == variants
        assert isinstance(dag.get_task(f"{prefix}ood_evaluation"), MappedOperator)
        assert not isinstance(dag.get_task(f"{prefix}prepare"), MappedOperator)
        assert f"{prefix}pretrain" in dag.get_task(f"{prefix}ood_evaluation").upstream_task_ids
