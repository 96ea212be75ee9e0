"""DAG factory: builds `bem_fleet` and one `bem_mission_<x>` DAG per implemented mission from config.

This is the only part of ``bem_tasks`` that imports Airflow, and it imports nothing heavy: the
phase work (torch, transformers) is imported inside the running task. Resource attributes (pool,
pool_slots, queue) come from the deployment profile because they are fixed at parse time; the run's
``profile`` param picks sizes (docs/decisions.md).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, AssetAny, Param, TaskGroup, get_current_context, task

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.runs import (
    FLEET_DAG_ID,
    GATES_DAG_ID,
    MAINTENANCE_DAG_ID,
    STATS_DAG_ID,
    RunLayout,
    mission_dag_id,
)

STATS_ASSET = Asset(uri="bem://statistics/results", name="statistical_results")
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def mission_asset(mission: str) -> Asset:
    return Asset(uri=f"bem://missions/{mission}/results", name=f"{mission}_results")


def params_for(cfg: FleetConfig, missions_default: list[str]) -> dict[str, Param]:
    return {
        "profile": Param(
            cfg.arch.fleet.default_profile,
            enum=sorted(cfg.arch.profiles),
            description="smoke: CPU, tiny models, minutes. full: GPU, real sizes. load: every "
            "mission disabled, trains nothing (bench/load_test.py: the orchestration path only).",
        ),
        "missions": Param(
            missions_default,
            type="array",
            items={"type": "string", "enum": list(cfg.arch.missions)},
            description="Missions to run (their dependencies are added). Only enabled ones.",
        ),
        "seeds": Param(
            None,
            type=["null", "array"],
            items={"type": "integer"},
            description="Training seeds; empty means the profile's seeds from config.",
        ),
    }


def _default_args(cfg: FleetConfig) -> dict[str, Any]:
    fleet = cfg.arch.fleet
    # Orchestration tasks (plan, gates, publishing) run on the CPU class so that every task has
    # a pool and a queue that some worker serves.
    return {
        "owner": "bem-fleet",
        "pool": cfg.orchestration_class,
        "queue": cfg.orchestration_class,
        "retries": fleet.retries,
        "retry_delay": timedelta(seconds=fleet.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=fleet.max_retry_delay_s),
        "on_failure_callback": _alert_task_failure,
    }


def _alert_task_failure(context: Any) -> None:
    """Log a failed task and post it to the configured webhook (docs/operations.md)."""
    from bem_tasks.fleet.alerts import task_failure_alert

    task_failure_alert(context)


# ----------------------------------------------------------------------------- task callables


def resolve_plan(cfg: FleetConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Check the trigger params and close the mission selection over dependencies. Each error
    names the param (``params.seeds[1]: ...``); the schema of the Params says the same, but a
    trigger through the REST API or `dags test` may bypass the form."""
    profile = params.get("profile") or cfg.arch.fleet.default_profile
    if not isinstance(profile, str) or profile not in cfg.arch.profiles:
        raise ValueError(
            f"params.profile: unknown profile {profile!r} (known: {list(cfg.arch.profiles)})"
        )
    run_cfg = cfg.for_profile(profile)  # every profile is validated already; no reload
    wanted = params.get("missions") or run_cfg.enabled_missions
    if not isinstance(wanted, list) or not all(isinstance(m, str) for m in wanted):
        raise ValueError(f"params.missions: expected a list of mission names, got {wanted!r}")
    unknown = [m for m in wanted if m not in cfg.arch.missions]
    if unknown:
        raise ValueError(
            f"params.missions: unknown mission(s) {unknown} (known: {list(cfg.arch.missions)})"
        )
    not_enabled = [m for m in wanted if m not in run_cfg.enabled_missions]
    if not_enabled:
        raise ValueError(
            f"params.missions: {not_enabled} not enabled in {cfg.path} "
            f"(enabled: {run_cfg.enabled_missions or 'none'})"
        )
    seeds = params.get("seeds") or run_cfg.arch.fleet.seeds
    if not isinstance(seeds, list):
        raise ValueError(f"params.seeds: expected a list of integer seeds, got {seeds!r}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"params.seeds[{i}]: expected an integer seed >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"params.seeds: duplicate seeds in {seeds}")
    return {
        "profile": profile,
        "missions": run_cfg.topological_missions(wanted),
        "seeds": list(seeds),
    }


def _run_phase(mission: str, phase: str, seed: int | None, variant: str | None = None) -> dict:
    from bem_tasks.fleet.phases import run_phase

    ctx = get_current_context()
    return run_phase(
        mission,
        phase,
        profile=ctx["params"]["profile"],
        dag_id=ctx["dag"].dag_id,
        run_id=ctx["run_id"],
        seed=seed,
        variant=variant,
    )


def _publish(mission: str) -> dict:
    from bem_tasks.fleet.results import publish_mission_results

    ctx = get_current_context()
    summary = publish_mission_results(
        mission, profile=ctx["params"]["profile"], dag_id=ctx["dag"].dag_id, run_id=ctx["run_id"]
    )
    ctx["outlet_events"][mission_asset(mission)].extra = {
        "results": summary["results"],
        "dag_id": ctx["dag"].dag_id,
        "run_id": ctx["run_id"],
        "profile": ctx["params"]["profile"],
    }
    return summary


@task
def plan() -> list[int]:
    """Check the trigger params, log the plan, and hand the seeds to the mapped phases."""
    cfg = load_fleet()
    resolved = resolve_plan(cfg, get_current_context()["params"])
    print(f"plan: {resolved}")
    if not resolved["missions"]:
        print(
            "No mission is enabled in the fleet config: nothing to train. "
            f"Enable an implemented mission in {cfg.path}."
        )
    seeds: list[int] = resolved["seeds"]
    return seeds


# ----------------------------------------------------------------------------- builders


def _mission_pipeline(cfg: FleetConfig, mission: str, seeds: Any) -> tuple[Any, Any]:
    """One task per phase, chained in config order; per-seed phases are mapped over seeds, and a
    phase with variants over seeds x variants (map_index = seed position x len(variants) +
    variant position: Airflow's cross product varies the last keyword fastest)."""
    exp = cfg.experiments[mission]
    classes = cfg.arch.device_classes
    first = last = None
    for phase, spec in exp.phases.items():
        device = classes[spec.device_class]
        operator_kwargs: dict[str, Any] = {
            "task_id": phase,
            "pool": spec.device_class,
            "pool_slots": spec.gpus if device.kind == "gpu" else 1,
            "queue": spec.device_class,
            "execution_timeout": timedelta(minutes=spec.timeout_minutes),
            "doc_md": f"**{mission}.{phase}** on `{spec.device_class}` "
            f"({spec.gpus} GPU). {spec.doc}",
        }
        if spec.retries is not None:
            operator_kwargs["retries"] = spec.retries

        def run(seed: int | None = None, variant: str | None = None, _phase: str = phase) -> dict:
            return _run_phase(mission, _phase, seed, variant)

        phase_task = task(**operator_kwargs)(run)
        if spec.variants:
            node = phase_task.expand(seed=seeds, variant=list(spec.variants))
        elif spec.per_seed:
            node = phase_task.expand(seed=seeds)
        else:
            node = phase_task()
        if last is not None:
            last >> node
        first = first if first is not None else node
        last = node

    @task(task_id="publish_results", outlets=[mission_asset(mission)])
    def publish_results() -> dict:
        return _publish(mission)

    publish = publish_results()
    assert last is not None, f"{mission}: an experiment has at least one phase"
    last >> publish
    return first, publish


def build_mission_dag(cfg: FleetConfig, mission: str) -> DAG:
    ref = cfg.arch.missions[mission]
    exp = cfg.experiments[mission]
    with DAG(
        dag_id=mission_dag_id(mission),
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        params=params_for(cfg, [mission]),
        default_args=_default_args(cfg),
        tags=["bem-fleet", "mission", mission],
        doc_md=f"# {mission}: {ref.title}\n\n{exp.description}\n\n"
        f"Phases: {' → '.join(exp.phases)}. Emits `bem://missions/{mission}/results`.",
    ) as dag:
        seeds = plan()
        first, _ = _mission_pipeline(cfg, mission, seeds)
        seeds >> first
    return dag


def build_fleet_dag(cfg: FleetConfig) -> DAG:
    enabled = cfg.topological_missions()
    with DAG(
        dag_id=FLEET_DAG_ID,
        schedule=cfg.arch.fleet.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        params=params_for(cfg, enabled),
        default_args=_default_args(cfg),
        tags=["bem-fleet", "fleet"],
        doc_md="# BEM fleet\n\nRuns every enabled mission (or the `missions` param's subset and "
        "their dependencies) in dependency order; each emits its results Asset, which "
        "schedules statistical validation and promotion gating.\n\n"
        f"Enabled: {', '.join(enabled) or 'none'}.",
    ) as dag:
        seeds = plan()
        ends: dict[str, Any] = {}
        for mission in enabled:
            with TaskGroup(group_id=mission, tooltip=cfg.arch.missions[mission].title):

                @task.short_circuit(task_id="selected")
                def selected(_mission: str = mission) -> bool:
                    return (
                        _mission in resolve_plan(cfg, get_current_context()["params"])["missions"]
                    )

                gate = selected()
                first, ends[mission] = _mission_pipeline(cfg, mission, seeds)
                seeds >> gate >> first
            for dep in cfg.arch.missions[mission].depends_on:
                ends[dep] >> gate
    return dag


def _statistics_run() -> tuple[Any, FleetConfig, RunLayout]:
    """Context, config of the run's profile, and this run's layout (claim it once the params
    are checked, so that refused params leave no folder behind)."""
    ctx = get_current_context()
    cfg = load_fleet(None, ctx["params"]["profile"])
    return ctx, cfg, RunLayout(cfg.artifact_root, ctx["dag"].dag_id, ctx["run_id"])


def _validate(results: list[str]) -> dict:
    from bem_tasks.fleet.promotion import validate_results, within_artifact_root

    ctx, cfg, layout = _statistics_run()
    paths = within_artifact_root(cfg.artifact_root, "params.results", results)
    for asset, events in ctx["triggering_asset_events"].items():
        paths += [e.extra["results"] for e in events if "results" in (e.extra or {})]
        print(f"triggered by {asset.uri}: {len(events)} event(s)")
    if not paths:
        raise ValueError(
            "nothing to validate: no triggering mission asset event and no `results` param "
            "(paths to missions' results.json)"
        )
    out = layout.claim()
    stats = cfg.arch.statistics
    doc = validate_results(
        [Path(p) for p in dict.fromkeys(paths)],
        gates_path=cfg.resolve(stats.gates),
        out_path=out / "statistical_results.json",
        confidence=stats.confidence,
        n_resamples=stats.n_resamples,
    )
    path = str(out / "statistical_results.json")
    ctx["outlet_events"][STATS_ASSET].extra = {"statistical_results": path}
    return {"statistical_results": path, "missions": sorted(doc["missions"])}


def _gate(statistical_results: str | None) -> dict:
    from bem_tasks.fleet.promotion import gate_results, path_within_artifact_root

    ctx, cfg, layout = _statistics_run()
    path = statistical_results
    if path:
        path = path_within_artifact_root(cfg.artifact_root, "params.statistical_results", path)
    for events in ctx["triggering_asset_events"].values():
        for e in events:
            path = (e.extra or {}).get("statistical_results", path)
    if not path:
        raise ValueError(
            "nothing to gate: no triggering statistics asset event and no "
            "`statistical_results` param"
        )
    out = layout.claim()
    stats = cfg.arch.statistics
    report = gate_results(
        Path(path),
        gates_path=cfg.resolve(stats.gates),
        out_dir=out,
        registry_path=cfg.artifact_root / "registry.json",
    )
    for d in report["decisions"]:
        print(f"{d['mission']}: {d['decision']}" + (f" ({d['error']})" if d.get("error") else ""))
        for g in d["gates"]:
            print(f"  {g['gate']:<24} {g['status']:<13} {g['reason']}")
    from bem_tasks.fleet.alerts import promotion_alerts

    promotion_alerts(cfg.arch.operations.alerts, report, run_id=ctx["run_id"])
    return {
        "report": str(out / "promotion_report.md"),
        "decisions": {d["mission"]: d["decision"] for d in report["decisions"]},
    }


def build_statistics_dags(cfg: FleetConfig) -> dict[str, DAG]:
    """Validation runs when any mission publishes results; gating when validation publishes."""
    assets = [mission_asset(m) for m in cfg.topological_missions()]
    profile = Param(cfg.arch.fleet.default_profile, enum=sorted(cfg.arch.profiles))
    with DAG(
        dag_id=STATS_DAG_ID,
        schedule=AssetAny(*assets) if assets else None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=_default_args(cfg),
        params={
            "profile": profile,
            "results": Param(
                [],
                type="array",
                items={"type": "string"},
                description="results.json paths to validate (manual runs; asset events add theirs)",
            ),
        },
        tags=["bem-fleet", "statistics"],
        doc_md="# Statistical validation\n\nPaired, example-level BCa bootstrap CIs (cluster "
        "bootstrap over examples with several seeds), p-values consistent with the CIs and "
        "Benjamini-Hochberg within the gates' families. Writes `statistical_results.json` and "
        "emits `bem://statistics/results`.",
    ) as stats_dag:

        @task(task_id="validate", outlets=[STATS_ASSET])
        def validate_task() -> dict:
            return _validate(get_current_context()["params"]["results"])

        validate_task()

    with DAG(
        dag_id=GATES_DAG_ID,
        schedule=[STATS_ASSET],
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=_default_args(cfg),
        params={
            "profile": profile,
            "statistical_results": Param(
                None, type=["null", "string"], description="statistical_results.json (manual runs)"
            ),
        },
        tags=["bem-fleet", "gates"],
        doc_md="# Promotion gates\n\nApplies `configs/gates_bem2.yaml` to the statistical "
        "results: PROMOTED only when every gate passes, else REJECTED or INSUFFICIENT_EVIDENCE "
        "(with the sample size needed). Writes `promotion_report.json`/`.md`, forest plots, "
        "and records promoted candidates in `<artifact_root>/registry.json`.",
    ) as gates_dag:

        @task(task_id="check_gates")
        def check_gates() -> dict:
            return _gate(get_current_context()["params"]["statistical_results"])

        check_gates()
    return {STATS_DAG_ID: stats_dag, GATES_DAG_ID: gates_dag}


# ----------------------------------------------------------------------------- maintenance


def build_maintenance_dag(cfg: FleetConfig) -> DAG:
    """Daily: health check, retention, metadata and log cleanup, the weekly report
    (docs/operations.md)."""
    ops = cfg.arch.operations.maintenance
    with DAG(
        dag_id=MAINTENANCE_DAG_ID,
        schedule=ops.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=_default_args(cfg),
        params={
            "weekly_report": Param(
                "auto",
                enum=["auto", "always", "never"],
                description=f"auto: on weekday {ops.weekly_report_weekday} (Monday = 0) only",
            )
        },
        tags=["bem-fleet", "maintenance"],
        doc_md="# Fleet maintenance\n\nHealth check (disk, pools, workers, metadata DB), "
        "retention (`bem-fleet cleanup`), `airflow db clean` and task-log rotation, and the "
        "weekly report of gated metrics across runs. See docs/operations.md.",
    ) as dag:

        @task(task_id="health_check")
        def health() -> dict:
            from bem_tasks.fleet.maintenance import check_health

            return check_health(load_fleet())

        @task(task_id="retention", trigger_rule="all_done")
        def retention() -> dict:
            from bem_tasks.fleet.maintenance import apply_retention

            return apply_retention(load_fleet())

        @task(task_id="metadata_and_logs", trigger_rule="all_done")
        def metadata_and_logs() -> dict:
            from airflow.configuration import conf

            from bem_tasks.fleet.maintenance import clean_metadata_db, rotate_task_logs

            cfg = load_fleet()
            days = cfg.arch.operations.maintenance.db_clean_days
            return {
                "db_clean_before": clean_metadata_db(cfg),
                "log_bytes_freed": rotate_task_logs(
                    Path(conf.get("logging", "base_log_folder")), days
                ),
            }

        @task(task_id="weekly_report", trigger_rule="all_done")
        def weekly_report() -> str | None:
            from bem_tasks.fleet.maintenance import write_weekly_report

            ctx = get_current_context()
            return write_weekly_report(
                load_fleet(), ctx["dag_run"].run_after, force=ctx["params"]["weekly_report"]
            )

        health() >> retention() >> metadata_and_logs() >> weekly_report()
    return dag


def build_all(config_path: str | None = None) -> dict[str, DAG]:
    cfg = load_fleet(config_path).deployment()
    dags = {FLEET_DAG_ID: build_fleet_dag(cfg), **build_statistics_dags(cfg)}
    for mission in cfg.topological_missions():
        dags[mission_dag_id(mission)] = build_mission_dag(cfg, mission)
    dags[MAINTENANCE_DAG_ID] = build_maintenance_dag(cfg)
    return dags
