"""Load, overlay and validate the fleet configuration.

Every problem is reported as ``file:key.path: message`` so a user can go straight to the line that
is wrong. `validate(path)` collects all problems; `load_fleet(path, profile)` raises ConfigError
with the same lines. Relative paths inside the config (experiments, gates, artifact_root) are
relative to the project root: the parent of the folder holding the architecture file.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bem_tasks.config.schema import Architecture, Experiment, GenericParams, check_local_path
from bem_tasks.missions.registry import IMPLEMENTED

PROFILES_REQUIRED = ("smoke", "full")


class ConfigError(ValueError):
    """A configuration that cannot be used; ``problems`` holds one ``file:key: message`` each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid BEM Fleet configuration:\n" + "\n".join(problems))


def default_config_path() -> Path:
    if env := os.environ.get("BEM_FLEET_CONFIG"):
        return Path(env)
    here = Path.cwd() / "configs" / "bem_fleet_architecture.yml"
    if here.exists():
        return here
    return Path(__file__).resolve().parents[2] / "configs" / "bem_fleet_architecture.yml"


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by the overlay."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    """yaml.safe_load a mapping, or raise ConfigError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: expected a mapping at the top level, got {type(data).__name__}"]
        )
    return data


def error_message(err: Any) -> str:
    """One pydantic error as this project prints it: "unknown key", "required key is missing",
    else pydantic's message (with the offending input unless it is a value_error)."""
    msg: str = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    if err["type"] not in ("extra_forbidden", "missing", "value_error") and "input" in err:
        msg += f" (got {err['input']!r})"
    return msg


def _validate_with_profiles(
    file: Path, raw: dict[str, Any], model: type[BaseModel], problems: list[str]
) -> dict[str, BaseModel]:
    """Validate the base document and each profile overlay merged onto it.

    Returns the models that validated, keyed by profile name ("" for the base).
    A problem that comes from an overlay is reported at its place in the file (`profiles.P.key`).
    """
    seen: set[str] = set()
    out: dict[str, BaseModel] = {}

    def check(name: str, doc: dict[str, Any], overlay: dict[str, Any]) -> None:
        try:
            out[name] = model.model_validate(doc)
        except ValidationError as exc:
            for err in exc.errors():
                loc = [str(p) for p in err["loc"]]
                in_overlay = _has_path(overlay, loc)
                where = f"profiles.{name}." if in_overlay else ""
                key = f"{file}:{where}{'.'.join(loc) or '<root>'}: {error_message(err)}"
                if key not in seen:
                    seen.add(key)
                    problems.append(key + (f" [profile {name}]" if name and not in_overlay else ""))

    check("", raw, {})
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        return out
    for name, overlay in profiles.items():
        if not isinstance(overlay, dict):
            problems.append(f"{file}:profiles.{name}: expected a mapping (an overlay of the base)")
            continue
        if "profiles" in overlay:
            problems.append(f"{file}:profiles.{name}.profiles: an overlay cannot define profiles")
            continue
        # The merged document keeps the overlays so it still knows which profiles exist.
        check(name, {**deep_merge(raw, overlay), "profiles": profiles}, overlay)
    return out


def _has_path(doc: Any, loc: list[str]) -> bool:
    for part in loc:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return False
    return True


def _find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _check_missions(path: Path, missions: Any, problems: list[str]) -> None:
    if not isinstance(missions, dict):
        return
    graph: dict[str, list[str]] = {}
    for name, ref in missions.items():
        ref = ref if isinstance(ref, dict) else {}
        deps = ref.get("depends_on") or []
        deps = deps if isinstance(deps, list) else []
        graph[name] = [d for d in deps if isinstance(d, str)]
        enabled = ref.get("enabled") is True
        for i, dep in enumerate(graph[name]):
            if dep not in missions:
                problems.append(
                    f"{path}:missions.{name}.depends_on.{i}: unknown mission '{dep}' "
                    f"(known: {', '.join(missions)})"
                )
            elif enabled and (missions[dep] or {}).get("enabled") is not True:
                problems.append(
                    f"{path}:missions.{name}.depends_on.{i}: '{name}' is enabled but the mission "
                    f"it depends on, '{dep}', is not"
                )
        if enabled and name not in IMPLEMENTED:
            problems.append(
                f"{path}:missions.{name}.enabled: '{name}' has no implementation yet "
                f"(implemented: {', '.join(IMPLEMENTED) or 'none'}); set enabled: false"
            )
    if cycle := _find_cycle(graph):
        problems.append(f"{path}:missions: dependency cycle {' -> '.join(cycle)}")


def _import_model(ref: str) -> type[BaseModel]:
    module, _, name = ref.partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), name)
    return model


@dataclass
class FleetConfig:
    """The configuration for one profile, merged and validated."""

    path: Path
    root: Path
    profile: str
    arch: Architecture
    experiments: dict[str, Experiment]
    params: dict[str, BaseModel] = field(default_factory=dict)
    siblings: dict[str, FleetConfig] = field(default_factory=dict, repr=False, compare=False)

    def deployment(self) -> FleetConfig:
        """The profile whose resource layout (pools, queues, GPUs) the DAGs are built with.

        Resources are fixed when a DAG file is parsed, so they come from the deployment profile
        (env BEM_FLEET_DEPLOYMENT_PROFILE, else fleet.deployment_profile); a run's own profile
        only picks sizes (docs/decisions.md, D1).
        """
        env = os.environ.get("BEM_FLEET_DEPLOYMENT_PROFILE")
        return self.for_profile(env or self.arch.fleet.deployment_profile)

    def for_profile(self, profile: str) -> FleetConfig:
        """The same configuration under another profile (already validated, no reload)."""
        if profile == self.profile:
            return self
        if profile not in self.siblings:
            raise ConfigError([f"{self.path}:profiles: unknown profile '{profile}'"])
        return self.siblings[profile]

    @property
    def artifact_root(self) -> Path:
        env = os.environ.get("BEM_FLEET_ARTIFACT_ROOT")
        if env:
            try:
                check_local_path(env)
            except ValueError as exc:
                raise ConfigError(
                    [f"environment variable BEM_FLEET_ARTIFACT_ROOT: {exc}"]
                ) from None
        return self.resolve(env or self.arch.fleet.artifact_root)

    @property
    def orchestration_class(self) -> str:
        """The CPU device class that runs orchestration tasks (plan, publishing, statistics)."""
        return next(n for n, d in self.arch.device_classes.items() if d.kind == "cpu")

    @property
    def enabled_missions(self) -> list[str]:
        return [m for m, ref in self.arch.missions.items() if ref.enabled]

    def resolve(self, relative: str | os.PathLike[str]) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else (self.root / p)

    def mission_hash(self, mission: str) -> str:
        """Hash of what determines a mission's results: its merged experiment and statistics."""
        doc = {
            "experiment": self.experiments[mission].model_dump(mode="json"),
            "statistics": self.arch.statistics.model_dump(mode="json"),
        }
        blob = json.dumps(doc, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def topological_missions(self, missions: Iterable[str] | None = None) -> list[str]:
        wanted = set(self.enabled_missions if missions is None else missions)
        order: list[str] = []

        def visit(m: str) -> None:
            if m in order:
                return
            for dep in self.arch.missions[m].depends_on:
                visit(dep)
            order.append(m)

        for m in sorted(wanted):
            visit(m)
        return order


def project_root_of(config_path: Path) -> Path:
    return config_path.resolve().parent.parent


def validate(config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Every problem in the architecture file and the files it names; [] when all is well."""
    problems: list[str] = []
    try:
        _load(Path(config_path) if config_path else default_config_path(), None, problems)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return list(dict.fromkeys(problems))


def load_fleet(
    config_path: str | os.PathLike[str] | None = None, profile: str | None = None
) -> FleetConfig:
    """Load the fleet for ``profile`` (default: the config's default profile) or raise ConfigError."""
    problems: list[str] = []
    cfg = _load(Path(config_path) if config_path else default_config_path(), profile, problems)
    if problems or cfg is None:
        raise ConfigError(list(dict.fromkeys(problems)) or ["configuration could not be loaded"])
    return cfg


def _load(path: Path, profile: str | None, problems: list[str]) -> FleetConfig | None:
    raw = load_yaml(path)
    root = project_root_of(path)
    archs = _validate_with_profiles(path, raw, Architecture, problems)
    # Cross-file rules run on the raw document too, so one bad type does not hide them.
    _check_missions(path, raw.get("missions"), problems)
    if "" not in archs:
        return None
    base = archs[""]
    assert isinstance(base, Architecture)
    for name in PROFILES_REQUIRED:
        if name not in base.profiles:
            problems.append(
                f"{path}:profiles: profile '{name}' is missing (need {PROFILES_REQUIRED})"
            )
    if not any(d.kind == "cpu" for d in base.device_classes.values()):
        problems.append(
            f"{path}:device_classes: need at least one class of kind 'cpu' "
            "(orchestration tasks run there)"
        )
    for key in ("default_profile", "deployment_profile"):
        wanted = getattr(base.fleet, key)
        if wanted not in base.profiles:
            problems.append(f"{path}:fleet.{key}: unknown profile '{wanted}'")
    if profile is not None and profile not in base.profiles:
        known = ", ".join(base.profiles)
        problems.append(f"{path}:profiles: unknown profile '{profile}' (known: {known})")
        return None
    missions = base.missions

    stats_gates = root / base.statistics.gates
    if not stats_gates.exists():
        problems.append(f"{path}:statistics.gates: file not found: {stats_gates}")

    experiments_by_profile: dict[str, dict[str, Experiment]] = {p: {} for p in base.profiles}
    params_by_profile: dict[str, dict[str, BaseModel]] = {p: {} for p in base.profiles}
    for name, ref in missions.items():
        exp_path = root / ref.experiment
        try:
            exp_raw = load_yaml(exp_path)
        except ConfigError as exc:
            problems.extend(
                f"{p} (named by {path}:missions.{name}.experiment)" for p in exc.problems
            )
            continue
        exps = _validate_with_profiles(exp_path, exp_raw, Experiment, problems)
        for prof in base.profiles:
            if prof not in exp_raw.get("profiles", {}):
                problems.append(f"{exp_path}:profiles: profile '{prof}' is missing")
        impl = IMPLEMENTED.get(name)
        params_model = _import_model(impl.params_model) if impl else GenericParams
        for prof_name, exp in exps.items():
            assert isinstance(exp, Experiment)
            overlay = (exp_raw.get("profiles") or {}).get(prof_name) or {} if prof_name else {}

            def at(
                *loc: str, _overlay: dict = overlay, _prof: str = prof_name, _file: Path = exp_path
            ) -> str:
                """Where a key's value comes from: the overlay if it sets it, else the base."""
                key = ".".join(loc)
                if _prof and _has_path(_overlay, list(loc)):
                    return f"{_file}:profiles.{_prof}.{key}"
                return f"{_file}:{key}"

            if exp.mission != name:
                problems.append(
                    f"{at('mission')}: says '{exp.mission}' but is the experiment of '{name}'"
                )
            arch = archs.get(prof_name) or base
            assert isinstance(arch, Architecture)
            for phase, spec in exp.phases.items():
                cls = arch.device_classes.get(spec.device_class)
                if cls is None:
                    known = ", ".join(arch.device_classes)
                    problems.append(
                        f"{at('phases', phase, 'device_class')}: unknown device class "
                        f"'{spec.device_class}' (known: {known})"
                    )
                elif cls.kind == "gpu" and spec.gpus < 1:
                    problems.append(
                        f"{at('phases', phase, 'gpus')}: device class '{spec.device_class}' is a "
                        f"GPU class; a phase on it needs gpus >= 1"
                    )
                elif cls.kind == "cpu" and spec.gpus:
                    problems.append(
                        f"{at('phases', phase, 'gpus')}: device class '{spec.device_class}' has "
                        f"no GPUs; got gpus={spec.gpus}"
                    )
                elif spec.gpus > cls.devices:
                    problems.append(
                        f"{at('phases', phase, 'gpus')}: asks for {spec.gpus} GPUs but class "
                        f"'{spec.device_class}' has {cls.devices}"
                    )
            if impl and tuple(exp.phases) != impl.phases:
                problems.append(
                    f"{at('phases')}: expected the phases {list(impl.phases)} of the "
                    f"implementation, got {list(exp.phases)}"
                )
            try:
                params = params_model.model_validate(exp.params)
            except ValidationError as exc:
                for err in exc.errors():
                    problems.append(f"{at('params', *map(str, err['loc']))}: {error_message(err)}")
                continue
            # A params model may check itself against the phases (e.g. a mapped phase's variants,
            # whose one source is the phase spec, against per-variant settings).
            check_phases = getattr(params, "check_phases", None)
            if check_phases is not None:
                problems.extend(f"{at('params')}: {msg}" for msg in check_phases(exp.phases))
            if prof_name:
                experiments_by_profile[prof_name][name] = exp
                params_by_profile[prof_name][name] = params

    # The gates file is checked by its own schema when the statistics layer is present.
    if stats_gates.exists():
        confidences = {
            f"profiles.{name}.statistics" if name else "statistics": a.statistics.confidence  # type: ignore[attr-defined]
            for name, a in archs.items()
        }
        problems.extend(_gate_problems(stats_gates, list(missions), path, confidences))

    if problems:
        return None
    chosen = profile or base.fleet.default_profile
    return _fleet_config(path, root, chosen, archs, experiments_by_profile, params_by_profile)


def _fleet_config(
    path: Path,
    root: Path,
    profile: str,
    archs: dict[str, BaseModel],
    experiments: dict[str, dict[str, Experiment]],
    params: dict[str, dict[str, BaseModel]],
) -> FleetConfig:
    # Every profile was validated anyway; keep them all, sharing one map, so any of them can
    # switch to another (deployment -> run profile and back) without reloading.
    siblings = {
        p: FleetConfig(path, root, p, a, experiments[p], params[p])  # type: ignore[arg-type]
        for p, a in archs.items()
        if p
    }
    for sibling in siblings.values():
        sibling.siblings = siblings
    return siblings[profile]


def _gate_problems(
    gates_path: Path, missions: list[str], arch_path: Path, confidences: dict[str, float]
) -> list[str]:
    """The gates file's own schema, its missions, and one significance level: every profile's
    ``statistics.confidence`` must be ``1 - alpha`` of the gates file (two-sided intervals)."""
    from bem_tasks.gates import load_gates  # it imports this module for ConfigError

    try:
        gates = load_gates(gates_path)
    except ConfigError as exc:
        return exc.problems
    unknown = [m for m in gates.missions if m not in missions]
    problems = [f"{gates_path}:missions.{m}: unknown mission '{m}'" for m in unknown]
    for where, confidence in confidences.items():
        if abs(confidence - (1.0 - gates.alpha)) > 1e-9:
            problems.append(
                f"{arch_path}:{where}.confidence: {confidence} but {gates_path}:alpha is "
                f"{gates.alpha}; gates are judged on two-sided intervals, so confidence must be "
                f"{1.0 - gates.alpha:g}"
            )
    return problems
