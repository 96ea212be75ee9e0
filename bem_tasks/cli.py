"""`bem-fleet`: the command line counterpart of the operational manual.

Each sub-command runs the same library functions the DAGs run, without Airflow where it can.
Heavy imports (torch, Airflow) happen inside the sub-command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from functools import partial
from pathlib import Path
from typing import Any

from bem_tasks.config.loader import ConfigError, FleetConfig, load_fleet, validate
from bem_tasks.fleet.runs import FLEET_DAG_ID, STATS_DAG_ID
from bem_tasks.fleet.summary import fmt_num

_num = partial(fmt_num, missing="-")


def _project_root() -> Path:
    return Path.cwd() if (Path.cwd() / "configs").is_dir() else Path(__file__).resolve().parents[1]


def use_embedded_airflow_home(
    project: Path, environ: MutableMapping[str, str] = os.environ
) -> str | None:
    """Point Airflow at `make run`'s metadata DB unless the shell chose one.

    `status` and `pools sync` read the metadata DB of AIRFLOW_HOME. A deployment sets it; on a
    workstation it is usually unset, and Airflow's own default (~/airflow) is not where `make run`
    ran, so use the project's `.airflow/` once `make run` has initialised it. Call this before
    Airflow is imported (it reads AIRFLOW_HOME once). Returns the home chosen, None if left as is.
    """
    if environ.get("AIRFLOW_HOME"):
        return None
    from bem_tasks.fleet.embedded import Embedded

    home = Embedded(project).home
    if not (home / "airflow.cfg").exists():
        return None
    environ["AIRFLOW_HOME"] = str(home)
    return str(home)


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate(args.config)
    if problems:
        print("\n".join(problems))
        return 2
    print("OK")
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    use_embedded_airflow_home(_project_root())
    from bem_tasks.fleet.pools import sync_pools

    cfg = load_fleet(args.config)
    actions = sync_pools(cfg, dry_run=args.dry_run)
    print("\n".join(actions) if actions else "pools already in sync")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.users import sync_users

    for line in sync_users():
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import httpx

    from bem_tasks.fleet.dags import resolve_plan
    from bem_tasks.fleet.embedded import Embedded, run_fleet

    conf: dict[str, Any] = {"profile": args.profile}
    if args.missions:
        conf["missions"] = args.missions.split(",")
    if args.seeds:
        conf["seeds"] = [_int_arg("--seeds", s) for s in args.seeds.split(",")]
    from bem_tasks.missions.soak import parse_duration

    timeout_s = parse_duration(args.timeout)
    # The plan task would refuse these params too, but only after Airflow has started.
    resolve_plan(load_fleet(args.config), conf)
    try:
        return run_fleet(_project_root(), conf, port=args.port, timeout_s=timeout_s)
    except httpx.TransportError as exc:
        emb = Embedded(_project_root(), args.port)
        print(f"run: the Airflow API at {emb.url} stopped answering ({exc}); Airflow is "
              f"{'still' if emb.running_pid() else 'no longer'} running: see {emb.log_file}",
              file=sys.stderr)  # fmt: skip
        return 1


def _int_arg(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not an integer") from None


def cmd_stop(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.embedded import Embedded

    Embedded(_project_root(), args.port).stop(print)
    return 0


def _ops_api(args: argparse.Namespace) -> Any:
    """The API of --url (credentials from BEM_FLEET_ADMIN_USERNAME/_PASSWORD), else `make run`'s
    (the password file its Airflow wrote)."""
    from bem_tasks.fleet.api import AirflowApi
    from bem_tasks.fleet.embedded import Embedded

    if args.url:
        return AirflowApi.from_env(args.url)
    return Embedded(_project_root(), args.port).api()


def _run_ops(args: argparse.Namespace, action: Any) -> int:
    """``action(api)``; exit 2 when nothing matched, 1 when the API failed or is unreachable."""
    import httpx

    from bem_tasks.fleet.api import AirflowApiError
    from bem_tasks.fleet.ops import NothingToDo

    with _ops_api(args) as api:
        try:
            action(api)
        except NothingToDo as exc:
            print(f"{args.command}: {exc}", file=sys.stderr)
            return 2
        except AirflowApiError as exc:
            print(f"{args.command}: the Airflow API refused: {exc}", file=sys.stderr)
            return 1
        except httpx.TransportError as exc:
            print(f"{args.command}: cannot reach the Airflow API at {api.url} ({exc}); is it "
                  "running (`make run`), or is --url right?", file=sys.stderr)  # fmt: skip
            return 1
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.ops import recover

    return _run_ops(
        args,
        lambda api: recover(
            api, args.mission, run_id=args.run_id, dag_id=args.dag_id, dry_run=args.dry_run
        ),
    )


def cmd_emergency_shutdown(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.ops import emergency_shutdown

    def confirm(prompt: str) -> bool:
        return sys.stdin.isatty() and input(prompt).strip().lower() in ("y", "yes")

    return _run_ops(args, lambda api: emergency_shutdown(api, yes=args.yes, confirm=confirm))


def cmd_status(args: argparse.Namespace) -> int:
    use_embedded_airflow_home(_project_root())
    from bem_tasks.fleet.status import status

    return status(
        dag_id=args.dag_id, mission=args.mission, detailed=args.detailed, config=args.config
    )


def _explicit_inputs(
    phases: list[str],
    phase: str,
    seed: int,
    checkpoint: str | None,
    inputs_from: str | None,
    output: str,
) -> dict[str, Path]:
    """Earlier phases' folders, found under --inputs-from (default: beside --output) as
    ``<phase>/seed_<seed>`` or ``<phase>``; --checkpoint names the previous phase's folder.

    The default lets a chain of standalone runs (``--output RUN/prepare``, ``--output
    RUN/pretrain_base`` ...) find each other the way a DAG run's phase folders do.
    """
    earlier = phases[: phases.index(phase)]
    inputs: dict[str, Path] = {}
    root = Path(inputs_from) if inputs_from else Path(output).resolve().parent
    for q in earlier:
        for cand in (root / q / f"seed_{seed}", root / q):
            # a mapped phase's folder holds <variant>/seed_N folders (ctx.input_dir picks one)
            if (cand / "manifest.json").exists() or any(cand.glob(f"*/seed_{seed}/manifest.json")):
                inputs[q] = cand
                break
    if checkpoint and earlier:
        path = Path(checkpoint)
        inputs[earlier[-1]] = path if path.is_dir() else path.parent
    return inputs


def _run_phase_standalone(args: argparse.Namespace, phase: str | None) -> int:
    """One phase of ``args.mission`` without Airflow; ``phase=None`` is the mission's last."""
    mission = args.mission
    cfg = load_fleet(args.config, args.profile)
    if mission not in cfg.experiments:
        raise ValueError(f"unknown mission '{mission}' (known: {', '.join(cfg.experiments)})")
    phases = list(cfg.experiments[mission].phases)
    phase = phase or phases[-1]
    if phase not in phases:
        raise ValueError(f"{mission} has no phase '{phase}' (phases: {', '.join(phases)})")
    if mission not in cfg.enabled_missions:
        raise ValueError(f"{mission} is not enabled (no implementation or enabled: false)")
    seed = args.seed
    inputs = _explicit_inputs(phases, phase, seed, args.checkpoint, args.inputs_from, args.output)
    options = _phase_options(args, cfg, mission, phase)
    spec = cfg.experiments[mission].phases[phase]
    # A mapped phase runs the chosen variants in turn, each into <output>/<variant>/seed_N (the
    # DAG run's layout), so a later phase finds them with --inputs-from as it would in a run.
    variants = _choose(getattr(args, "variants", None), spec.variants, "--variants")
    if variants is None and getattr(args, "variants", None):
        raise ValueError(f"--variants: {mission}.{phase} is not a mapped phase")
    runs: list[str | None] = list(variants) if variants else [None]
    for variant in runs:
        out = Path(args.output)
        if variant is not None:
            out = out / variant / f"seed_{seed}"
        result = _execute_standalone(
            cfg, phase, seed, out, inputs, mission=mission, variant=variant, options=options
        )
        print(json.dumps(result, indent=2))
    return 0


def _choose(given: str | None, allowed: list[str] | None, option: str) -> list[str] | None:
    """A comma-separated choice out of ``allowed`` (None: all of them)."""
    if allowed is None:
        return None
    if not given:
        return list(allowed)
    chosen = [v.strip() for v in given.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise ValueError(f"{option} {given!r}: expected a comma-separated subset of {allowed}")
    return chosen


def _phase_options(
    args: argparse.Namespace, cfg: FleetConfig, mission: str, phase: str
) -> dict[str, Any]:
    """CLI choices a phase reads from ``ctx.options`` (recorded in the manifest's hash)."""
    suites = getattr(args, "test_suite", None)
    if suites:
        if mission != "mission_c" or phase != "safety_evaluation":
            raise ValueError("--test-suite: only mission_c's safety_evaluation has test suites")
        from bem_tasks.missions.mission_c_params import SUITES

        return {"suites": _choose(suites, list(SUITES), "--test-suite")}
    lengths = getattr(args, "context_lengths", None)
    if lengths:
        if mission != "mission_e" or phase != "prepare":
            raise ValueError(
                "--context-lengths: only mission_e's prepare draws items at chosen lengths "
                "(train_memory_coupling trains on data.train_lengths and streams any length)"
            )
        return {"context_lengths": _token_counts(lengths)}
    suite = getattr(args, "long_context_suite", None)
    if suite:
        if mission != "mission_e" or phase != "long_context_evaluation":
            raise ValueError("--long-context-suite: only mission_e's long_context_evaluation")
        from bem_tasks.data.suites.long_context import read_long_context
        from bem_tasks.io import sha256_file

        path = Path(suite).resolve()
        read_long_context(path)  # every row validated, file:line in the error
        return {"suite": str(path), "suite_sha256": sha256_file(path)}
    given = getattr(args, "ood_suite", None)
    if not given:
        return {}
    if mission != "mission_d" or phase != "ood_evaluation":
        raise ValueError("--ood-suite: only mission_d's ood_evaluation has OOD splits")
    from bem_tasks.missions.mission_d_params import OOD_SPLITS

    return {"ood_splits": _choose(given, list(OOD_SPLITS), "--ood-suite")}


def _token_counts(given: str) -> list[int]:
    """``1024,128k`` -> [1024, 131072] (k = 1024 tokens)."""
    out = []
    for part in (p.strip().lower() for p in given.split(",")):
        digits, k = (part[:-1], 1024) if part.endswith("k") else (part, 1)
        if not digits.isdigit() or int(digits) == 0:
            raise ValueError(
                f"--context-lengths {given!r}: expected comma-separated positive token counts "
                "such as 1024,2048 or 128k,256k"
            )
        out.append(int(digits) * k)
    return out


def _execute_standalone(
    cfg: FleetConfig, phase: str, seed: int, output: Path, inputs: dict[str, Path], *,
    mission: str, variant: str | None = None, options: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    """Run ``mission.phase`` into ``output`` with ``inputs`` recorded in its manifest. A complete
    folder is reused on config and seed alone, so one made from other inputs (a canary gate
    decided on another shadow) is refused instead of handed back."""
    from bem_tasks.fleet.phases import PhaseContext, check_variant, execute, options_hash
    from bem_tasks.fleet.runs import is_complete, read_manifest

    spec = cfg.experiments[mission].phases[phase]
    check_variant(mission, phase, spec.variants, variant)
    seed_or_none = seed if spec.per_seed else None
    config_hash = cfg.mission_hash(mission)
    used = {name: str(path.resolve()) for name, path in sorted(inputs.items())}
    if is_complete(output, options_hash(config_hash, options or {}), seed_or_none):
        made_from = (read_manifest(output) or {}).get("inputs")
        if made_from != used:
            raise ValueError(
                f"{output}: a complete {mission} {phase} made from inputs "
                f"{made_from if made_from is not None else '(not recorded)'}, not from {used}; "
                "reusing it would report a result of other inputs: choose another --output or "
                "delete that folder"
            )
    ctx = PhaseContext(
        mission, phase, seed_or_none, cfg, output, inputs=inputs, variant=variant,
        options=dict(options or {}),
    )  # fmt: skip
    return execute(ctx, config_hash=config_hash, extra={"inputs": used})


def cmd_train(args: argparse.Namespace) -> int:
    return _run_phase_standalone(args, args.phase)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The mission's final phase, with --model as the previous phase's output; with
    --test-suite, mission_c's safety_evaluation (--model: its train_safety_basis output)."""
    args.checkpoint = args.model
    suite = getattr(args, "test_suite", None)
    if suite and args.mission != "mission_c":
        raise ValueError("--test-suite: only mission_c's safety_evaluation has test suites")
    return _run_phase_standalone(args, "safety_evaluation" if suite else None)


ONLINE_MISSION = "mission_b"  # the one mission with an online learner to stream and soak


def _online_config(args: argparse.Namespace, profile: str | None) -> FleetConfig:
    if args.mission != ONLINE_MISSION:
        raise ValueError(
            f"--mission {args.mission}: only {ONLINE_MISSION} (Living Model) has an online "
            f"learner to {args.command}"
        )
    cfg = load_fleet(args.config, profile)
    if ONLINE_MISSION not in cfg.enabled_missions:
        raise ValueError(f"{ONLINE_MISSION} is not enabled in {cfg.path}")
    return cfg


def _phase_root(path: Path) -> Path:
    """The folder holding a phase's folder: ``X`` for ``X/shadow`` and ``X/shadow/seed_0``."""
    path = path.resolve()
    return path.parent.parent if path.name.startswith("seed_") else path.parent


def cmd_stream(args: argparse.Namespace) -> int:
    """The manual's `run_stream.py --mode shadow` (prepare when not found, then shadow) and
    `online_learner.py --mode online` (canary_gate into ``<output>_canary_gate`` beside
    --output, so each online run's gate decides on its own --checkpoint, then online into
    --output)."""
    cfg = _online_config(args, args.profile)
    phases = list(cfg.experiments[ONLINE_MISSION].phases)
    out = Path(args.output)
    if args.mode == "shadow":
        steps = ["prepare", "shadow"]
        root = Path(args.inputs_from) if args.inputs_from else _phase_root(out)
    else:
        if not args.checkpoint:
            raise ValueError("--mode online needs --checkpoint: the output folder of --mode shadow")
        steps = ["canary_gate", "online"]
        root = Path(args.inputs_from) if args.inputs_from else _phase_root(Path(args.checkpoint))
    inputs = _explicit_inputs(phases, steps[-1], args.seed, None, str(root), str(out))
    if args.checkpoint:
        inputs["shadow"] = Path(args.checkpoint)
    for phase in steps:
        if phase == "prepare" and phase in inputs:
            print(f"prepare: using {inputs[phase]}")
            continue
        if phase == steps[-1]:
            where = out
        elif phase == "canary_gate":
            where = out.parent / f"{out.name}_canary_gate"
        else:
            where = _phase_root(out) / phase
        result = _execute_standalone(
            cfg, phase, args.seed, where, dict(inputs), mission=ONLINE_MISSION
        )
        print(json.dumps(result, indent=2))
        inputs[phase] = where
    return 0


def _newest_online_run(root: Path, seed: int) -> Path | None:
    """The mission folder of the newest run (any DAG) with a complete online/seed_<seed>."""
    found = root.glob(f"*/*/{ONLINE_MISSION}/online/seed_{seed}/manifest.json")
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    return newest.parent.parent.parent if newest else None


def cmd_soak(args: argparse.Namespace) -> int:
    """Continue the promoted learner of a run's `online` phase on the replayed stream for
    --duration and report steady-state rollbacks and memory growth (bem_tasks.missions.soak)."""
    from bem_tasks.fleet.runs import read_manifest
    from bem_tasks.missions.soak import parse_duration

    duration_s = parse_duration(args.duration)
    cfg = _online_config(args, args.profile)
    seed, phases = args.seed, list(cfg.experiments[ONLINE_MISSION].phases)
    out = Path(args.output or cfg.artifact_root / "soak" / ONLINE_MISSION / f"seed_{seed}")
    mission_dir = Path(args.inputs_from) if args.inputs_from else None
    mission_dir = mission_dir or _newest_online_run(cfg.artifact_root, seed)
    if mission_dir is None:
        mission_dir = out / "phases"
        upto = phases[: phases.index("online") + 1]
        print(
            f"no run under {cfg.artifact_root} has a complete {ONLINE_MISSION}/online/seed_{seed}"
            f": running {', '.join(upto)} standalone into {mission_dir} first (a `bem_fleet` or "
            f"`bem_mission_b` DAG run, or `bem-fleet train {ONLINE_MISSION} --phase <phase>`, "
            "leaves one to soak instead)"
        )
        inputs: dict[str, Path] = {}
        for phase in upto:
            where = mission_dir / phase
            if cfg.experiments[ONLINE_MISSION].phases[phase].per_seed:
                where /= f"seed_{seed}"
            result = _execute_standalone(
                cfg, phase, seed, where, dict(inputs), mission=ONLINE_MISSION
            )
            print(f"{phase}: {'reused' if result['reused'] else 'done'} in {where}")
            inputs[phase] = where
    inputs = _explicit_inputs([*phases, "soak"], "soak", seed, None, str(mission_dir), str(out))
    if "online" not in inputs:
        raise FileNotFoundError(
            f"{mission_dir}: no complete online/seed_{seed} (or online/) to soak; run the "
            f"`bem_mission_b` DAG or `bem-fleet train {ONLINE_MISSION} --phase online` first"
        )
    # The learner was built with the run's profile; soak it with the same sizes.
    run_profile = (read_manifest(inputs["online"]) or {}).get("profile")
    if args.profile is None and run_profile and run_profile != cfg.profile:
        cfg = cfg.for_profile(run_profile)
    from importlib import import_module

    from bem_tasks.fleet.phases import PhaseContext
    from bem_tasks.missions.registry import IMPLEMENTED

    gpus = cfg.experiments[ONLINE_MISSION].phases["online"].gpus
    device = "cuda" if gpus and _cuda_device_count() else "cpu"
    ctx = PhaseContext(ONLINE_MISSION, "soak", seed, cfg, out, inputs=inputs, device=device)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"soaking {inputs['online']} for {args.duration} ({duration_s:.0f}s) on {device} -> {out}"
    )
    print("inputs: " + ", ".join(f"{k}={v}" for k, v in inputs.items()))
    soak = import_module(IMPLEMENTED[ONLINE_MISSION].module).soak
    # passed only when given: mission_b.soak's own default is soak.LEAK_MIN_MIB_PER_1K_PROMPTS
    leak_min = {} if args.leak_min is None else {"leak_min_mib_per_1k_prompts": args.leak_min}
    report = soak(ctx, duration_s=duration_s, canary_every=args.canary_every, **leak_min)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.promotion import latest, validate_results

    cfg = load_fleet(args.config, args.profile)
    if args.results:
        paths = [Path(p) for p in args.results]
    else:
        run_dir = latest(cfg.artifact_root / FLEET_DAG_ID, "*/*/results.json").parent.parent
        paths = sorted(run_dir.glob("*/results.json"))
    stats = cfg.arch.statistics
    doc = validate_results(
        paths,
        gates_path=cfg.resolve(args.gates or stats.gates),
        out_path=Path(args.output),
        confidence=stats.confidence,
        n_resamples=args.samples or stats.n_resamples,
    )
    from bem_tasks.fleet.summary import format_table

    rows = [
        [r["mission"], r["metric"], r["slice"], r["family"], r["statistic"], r["n"],
         _num(r["estimate"]), f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]", _num(r["p_adjusted"])]
        for r in doc["results"]
    ]  # fmt: skip
    print(format_table(
        ["mission", "metric", "slice", "family", "stat", "n", "estimate", "95% CI", "p_adj"], rows
    ))  # fmt: skip
    failed = {m: info["error"] for m, info in doc["missions"].items() if "error" in info}
    for mission, error in failed.items():
        print(f"\n{mission}: ERROR {error}")
    print(f"\nwrote {args.output}")
    return 1 if failed else 0


def _gates_report(args: argparse.Namespace, missions: list[str] | None) -> dict:
    from bem_tasks.fleet.promotion import gate_results, latest

    cfg = load_fleet(args.config, args.profile)
    stats_path = (
        Path(args.stats)
        if args.stats
        else latest(cfg.artifact_root / STATS_DAG_ID, "*/statistical_results.json")
    )
    out = Path(args.output) if args.output else stats_path.parent
    return gate_results(
        stats_path,
        gates_path=cfg.resolve(args.gates or cfg.arch.statistics.gates),
        out_dir=out,
        registry_path=cfg.artifact_root / "registry.json",
        missions=missions,
        register=False,
    )


def cmd_gates(args: argparse.Namespace) -> int:
    report = _gates_report(args, [args.mission])
    print(report["markdown"])
    (decision,) = report["decisions"]
    return 0 if decision["decision"] == "PROMOTED" else 1


def cmd_report(args: argparse.Namespace) -> int:
    report = _gates_report(args, None if args.all_missions else args.mission)
    print(report["markdown"])
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Validate data files against a suite's row schema, then check that no two rows (in one
    file or across files: the splits of one suite must be disjoint) share a content key, i.e.
    are the same problem however their text is ordered. Each overlap is listed as file:line of
    both rows."""
    from bem_tasks.data import SUITES
    from bem_tasks.data.splits import find_overlaps

    by_mission = {f"mission_{s.mission.lower()}": s for s in SUITES.values()}
    suite = SUITES[args.suite] if args.suite else by_mission.get(args.mission or "")
    if suite is None:
        raise ValueError(f"--mission {args.mission!r}: expected one of {sorted(by_mission)}")
    rows = {path: suite.read(path) for path in args.files}  # DataFileError names file:line
    for path, items in rows.items():
        print(f"OK  {path}: {len(items)} {suite.row.__name__} rows ({suite.name} suite)")
    overlaps = find_overlaps(rows)  # positions are line numbers: read_jsonl allows no blanks
    for key, first, again in overlaps:
        print(f"OVERLAP  {again} has the content of {first}: {key}", file=sys.stderr)
    if overlaps:
        raise ValueError(
            f"splits overlap: {len(overlaps)} row(s) share content with an earlier row "
            "(listed above as file:line)"
        )
    if len(rows) > 1:
        print(f"OK  {len(rows)} files share no example by content, nor repeat one")
    else:
        print(f"OK  {args.files[0]}: no two rows share content")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    """Each device class of the deployment layout, its pool, and who holds each device now."""
    from bem_tasks.fleet.lease import device_usage, gpu_lease, lock_root
    from bem_tasks.fleet.summary import format_table

    cfg = load_fleet(args.config).deployment()
    rows = []
    for name, dc in cfg.arch.device_classes.items():
        if dc.kind == "cpu":
            rows.append([name, "cpu", "-", f"{dc.devices} pool slots", "-"])
            continue
        for use in device_usage(name, dc.devices):
            who = use.get("holder") or "-"
            rows.append([name, "gpu", use["index"], use["state"], who])
    print(f"deployment profile {cfg.profile}; lock dir {lock_root()}")
    print(format_table(["class", "kind", "device", "state", "held by"], rows))
    if not args.check:
        return 0
    failed = 0
    for name, dc in cfg.arch.device_classes.items():
        if dc.kind != "gpu":
            continue
        try:
            with gpu_lease(name, 1, devices=dc.devices, timeout_s=0, holder="bem-fleet devices"):
                print(f"check {name}: leased CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}"
                      f", torch sees {_cuda_device_count()} CUDA device(s)")  # fmt: skip
        except (TimeoutError, ValueError) as exc:
            failed += 1
            print(f"check {name}: {exc}")
    return 1 if failed else 0


def _cuda_device_count() -> int:
    import torch

    return int(torch.cuda.device_count())


def cmd_power(args: argparse.Namespace) -> int:
    """Examples needed: for a given paired effect size, else for each of the mission's gates
    from its latest statistical results (the effect each gate observed)."""
    from bem_tasks.stats.power import achieved_power, required_n

    if args.effect_size is None:
        from bem_tasks.fleet.summary import format_table

        report = _gates_report(args, [args.mission])
        (decision,) = report["decisions"]
        rows = [
            [g["gate"], g["status"], g["n"] or "-", _num(g["achieved_power"]), g["n_needed"] or "-"]
            for g in decision["gates"]
            if g["kind"] != "absolute"
        ]
        print(f"{args.mission}: {decision['decision']} (power target {decision['power']:.0%})")
        print(format_table(["gate", "status", "n", "power now", "n needed"], rows))
        return 0
    alpha = args.alpha
    n = required_n(args.effect_size, power=args.power, alpha=alpha)
    print(
        f"{args.mission}: a paired standardized effect d_z={args.effect_size} needs n={n} "
        f"examples for power {args.power} at alpha={alpha} (two-sided paired t approximation)"
    )
    for have in (50, 100, 200, 500, 1000, 5000):
        print(f"  n={have:<5} power={achieved_power(args.effect_size, have, alpha):.3f}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Apply the retention policy (operations.retention) to the artifact root."""
    from bem_tasks.fleet.retention import run_cleanup

    use_embedded_airflow_home(_project_root())  # to ask the metadata DB which runs are active
    run_cleanup(load_fleet(args.config), dry_run=args.dry_run, say=print)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """The maintenance DAG's health check, printed; exit 1 when a check fails."""
    use_embedded_airflow_home(_project_root())
    from bem_tasks.fleet.health import health_check
    from bem_tasks.fleet.summary import format_table

    checks = health_check(load_fleet(args.config))
    print(format_table(["check", "ok", "detail"], [[c.name, c.ok, c.detail] for c in checks]))
    return 0 if all(c.ok for c in checks) else 1


def cmd_backup(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.backup import backup

    backup(load_fleet(args.config), Path(args.to), say=print)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from bem_tasks.fleet.backup import restore

    cfg = load_fleet(args.config)
    restore(
        Path(args.source),
        artifact_root=cfg.artifact_root,
        configs_to=Path(args.configs_to) if args.configs_to else cfg.artifact_root / "configs",
        overwrite=args.overwrite,
        say=print,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bem-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", default=None, help="architecture YAML (default: configs/...)")
        p.set_defaults(fn=fn)
        return p

    add("validate", cmd_validate, "check every config file; print OK or each problem")

    pools = add("pools", cmd_pools, "Airflow pools: one per device class")
    pools.add_argument("action", choices=["sync"])
    pools.add_argument("--dry-run", action="store_true")

    users = add("users", cmd_users, "cluster users and the CI role from .env (FAB auth manager)")
    users.add_argument("action", choices=["sync"])

    run = add("run", cmd_run, "run the fleet on the embedded Airflow (what `make run` does)")
    run.add_argument("--profile", default="smoke")
    run.add_argument("--missions", default="", help="comma-separated subset")
    run.add_argument("--seeds", default="", help="comma-separated seeds")
    run.add_argument("--port", type=int, default=8080)
    run.add_argument(
        "--timeout",
        default="24h",
        help="stop following the runs after this long (e.g. 90m, 24h; the runs go on)",
    )

    stop = add("stop", cmd_stop, "stop the background embedded Airflow")
    stop.add_argument("--port", type=int, default=8080)

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default=None,
            help="an Airflow API server, e.g. http://airflow:8080 (user and password from "
            "BEM_FLEET_ADMIN_USERNAME, default admin, and BEM_FLEET_ADMIN_PASSWORD); default: "
            "the embedded one of `make run`",
        )
        p.add_argument("--port", type=int, default=8080, help="the embedded Airflow's port")

    recover = add(
        "recover", cmd_recover, "clear a mission's failed tasks in its newest run: they resume"
    )
    recover.add_argument("--mission", required=True)
    recover.add_argument(
        "--run-id", default=None, help="default: the newest run that ran the mission"
    )
    recover.add_argument(
        "--dag-id",
        default=None,
        help="bem_fleet or bem_mission_<x> (default: whichever ran the mission last)",
    )
    recover.add_argument(
        "--dry-run", action="store_true", help="show what would be cleared, clear nothing"
    )
    server_args(recover)

    shutdown = add(
        "emergency-shutdown",
        cmd_emergency_shutdown,
        "pause every fleet DAG, fail its running and queued tasks (nothing deleted)",
    )
    shutdown.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    server_args(shutdown)

    status = add("status", cmd_status, "fleet status from the metadata DB and the artifacts")
    status.add_argument(
        "--summary", action="store_true", help="one line per run (the default view)"
    )
    status.add_argument("--mission", default=None)
    status.add_argument("--detailed", action="store_true")
    status.add_argument("--dag-id", default=FLEET_DAG_ID)

    cleanup = add(
        "cleanup", cmd_cleanup, "retention: delete old run folders, prune older checkpoints"
    )
    cleanup.add_argument(
        "--dry-run", action="store_true", help="print what would go and the bytes freed"
    )

    add("health", cmd_health, "disk, pools, workers and metadata DB; exit 1 if one fails")
    backup = add("backup", cmd_backup, "copy the registry, promoted runs and configs to --to")
    backup.add_argument("--to", required=True, help="a new, empty folder")
    restore = add("restore", cmd_restore, "verify a backup's hashes, then restore it")
    restore.add_argument("--from", dest="source", required=True, help="a `backup --to` folder")
    restore.add_argument(
        "--configs-to",
        default=None,
        help="where the backed-up config files go (default: <artifact_root>/configs; the "
        "project's own configs are never overwritten)",
    )
    restore.add_argument(
        "--overwrite", action="store_true", help="replace files that differ from the backup"
    )

    def phase_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", required=True, help="folder for this phase's artifacts")
        p.add_argument(
            "--inputs-from",
            default=None,
            help="folder holding earlier phases' outputs as <phase>[/seed_N], e.g. a run's "
            "<artifacts>/<dag>/<run>/<mission> (default: the folder that holds --output)",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--profile", default=None, help="smoke or full (default: config's)")

    train = add("train", cmd_train, "run one mission phase without Airflow")
    train.add_argument("mission")
    train.add_argument("--phase", required=True)
    train.add_argument("--checkpoint", default=None, help="output folder of the previous phase")
    train.add_argument(
        "--variants",
        default=None,
        help="a mapped phase's variants to run in turn, comma-separated (default: all), each "
        "into <output>/<variant>/seed_N; e.g. mission_d --phase pretrain --variants pt1,pt4",
    )
    train.add_argument(
        "--context-lengths",
        default=None,
        help="mission_e --phase prepare: the lengths (tokens) the evaluation items are drawn "
        "at, comma-separated, k = 1024 (e.g. 1024,2048,4096 or 128k,256k); default "
        "data.eval_lengths",
    )
    phase_args(train)

    evaluate = add("evaluate", cmd_evaluate, "run a mission's evaluation phase without Airflow")
    evaluate.add_argument("--mission", required=True)
    evaluate.add_argument("--model", required=True, help="output folder of the trained model")
    evaluate.add_argument(
        "--ood-suite",
        default=None,
        help="mission_d: OOD splits to evaluate, comma-separated out of ood_synonym, "
        "ood_entity, ood_template (default: the config's)",
    )
    evaluate.add_argument(
        "--long-context-suite",
        default=None,
        help="mission_e: a Suite E JSONL file (e.g. a prepare folder's test.jsonl or one made by "
        "`--context-lengths`) to evaluate instead of prepare's test split",
    )
    evaluate.add_argument(
        "--test-suite",
        default=None,
        help="mission_c: run safety_evaluation on these suites, comma-separated out of test "
        "(gated) and red_team (held out by template, reported); --model: the "
        "train_safety_basis output",
    )
    phase_args(evaluate)

    stream = add("stream", cmd_stream, "Mission B's stream without Airflow: shadow or online")
    stream.add_argument("--mission", required=True)
    stream.add_argument("--mode", required=True, choices=["shadow", "online"])
    stream.add_argument(
        "--checkpoint", default=None, help="--mode online: output folder of --mode shadow"
    )
    phase_args(stream)

    soak = add("soak", cmd_soak, "replay Mission B's stream for a duration: rollbacks, memory")
    soak.add_argument("--mission", required=True)
    soak.add_argument("--duration", required=True, help="e.g. 5m, 24h, 90s")
    soak.add_argument(
        "--inputs-from",
        default=None,
        help="a run's <artifacts>/<dag>/<run>/mission_b folder (default: the newest run with a "
        "complete online/seed_N; none: the phases run standalone into <output>/phases first)",
    )
    soak.add_argument(
        "--output", default=None, help="default: <artifact_root>/soak/mission_b/seed_N"
    )
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument(
        "--canary-every", type=int, default=None, help="prompts between canaries (default: config)"
    )
    soak.add_argument(
        "--leak-min-mib-per-1k-prompts",
        dest="leak_min",
        type=float,
        default=None,
        help="memory growth (MiB per 1000 prompts) the floor's CI must exceed to be called a "
        "leak (default 0.05: about 50 bytes kept per prompt)",
    )
    soak.add_argument("--profile", default=None, help="default: the soaked run's profile")

    stats = add("stats", cmd_stats, "paired BCa CIs, p-values, BH-FDR of missions' results")
    stats.add_argument("--results", nargs="*", help="results.json files (default: latest run)")
    stats.add_argument("--output", default="statistical_results.json")
    stats.add_argument("--gates", default=None)
    stats.add_argument("--samples", type=int, default=None, help="bootstrap resamples")
    stats.add_argument("--profile", default=None)

    def report_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gates", default=None, help="gates YAML (default: from config)")
        p.add_argument("--stats", default=None, help="statistical_results.json (default: latest)")
        p.add_argument("--output", default=None, help="folder for the report files")
        p.add_argument("--profile", default=None)

    gates = add("gates", cmd_gates, "check one mission's promotion gates (exit 0 iff PROMOTED)")
    gates.add_argument("action", choices=["check"])
    gates.add_argument("--mission", required=True)
    report_args(gates)

    report = add("report", cmd_report, "promotion report (markdown + JSON) for missions")
    group = report.add_mutually_exclusive_group(required=True)
    group.add_argument("--all-missions", action="store_true")
    group.add_argument("--mission", action="append")
    report_args(report)

    data = add("data", cmd_data, "validate data files against a suite's row schema")
    data.add_argument("action", choices=["validate"])
    data.add_argument(
        "files",
        nargs="+",
        help="JSONL files (rows checked disjoint by content, in and across files)",
    )
    which = data.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", choices=["compositional", "feedback_stream", "safety",
                                           "scramble", "long_context"])  # fmt: skip
    which.add_argument("--mission", help="mission_a .. mission_e: that mission's suite")

    devices = add("devices", cmd_devices, "device classes, pools and current GPU leases")
    devices.add_argument(
        "--check",
        action="store_true",
        help="also lease one device of each GPU class and release it",
    )

    power = add("power", cmd_power, "examples needed: for an effect size, or per gate from results")
    power.add_argument("--mission", required=True)
    power.add_argument(
        "--effect-size", type=float, default=None,
        help="paired standardized effect d_z (default: each gate's observed effect, latest stats)",
    )  # fmt: skip
    power.add_argument("--power", type=float, default=0.8)
    power.add_argument("--alpha", type=float, default=0.05)
    report_args(power)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = os.environ.get("BEM_FLEET_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        print(f"error: BEM_FLEET_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR",
              file=sys.stderr)  # fmt: skip
        return 2
    # Our own loggers at the chosen level; libraries (wandb, transformers) stay at WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bem_fleet", "bem_tasks"):
        logging.getLogger(name).setLevel(level)
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
