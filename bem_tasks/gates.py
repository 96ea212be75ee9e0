"""Promotion gates: structured data -> one outcome per gate -> a decision, a report, the registry.

Gates come from ``configs/gates_bem2.yaml`` (see the comments there): per mission a list of
comparative gates (``superiority`` / ``non_inferiority``, judged on the paired statistics from
:func:`bem_tasks.stats.analyze`) and ``absolute`` gates (a property of the candidate alone).

A comparative gate ``observed op threshold`` is judged on the bootstrap BCa CI (of the mean for
``mean`` gates, of the Harrell-Davis quantile of the pooled example x seed values for ``median``
and ``pNN`` gates) and the BH-adjusted p-value of the test *at the threshold* (build the analysis
with :func:`analysis_specs` so the p-values test the gate thresholds). Sidedness: the question is one-sided (is the candidate beyond the
threshold on the passing side?), answered with the two-sided ``1 - alpha`` interval and its
two-sided p-value, so one gate passes by chance at most ``alpha / 2`` of the time when the truth
sits on the threshold. ``alpha`` and ``power`` come from the gates file only, and the statistics
must have been computed at ``confidence = 1 - alpha``.

* too_few_examples: fewer examples than :meth:`Gate.required_examples`, whatever the CI: the
  gate's ``min_examples`` (default 30), and for a quantile q also enough that the pooled example x
  seed values hold ``MIN_TAIL_VALUES`` (10) beyond the quantile (``examples x seeds x min(q, 1 -
  q) >= 10``);
* passed: the CI bound on the passing side satisfies ``op`` and ``p_adjusted < alpha``;
* failed: the CI bound on the failing side violates ``op`` (the whole CI is on the wrong side);
  when the bootstrap is degenerate (zero-width CI) also the exact sign test's ``p < alpha``;
  CI bounds within ``TIE_RTOL`` (1e-9) of the data's magnitude from the threshold count
  as on it (rounding is not evidence);
* underpowered: anything else (the CI straddles the threshold, or clears it only before the
  FDR adjustment); the outcome says how many examples would give ``power`` at the observed effect.

The decision is PROMOTED when every gate passed, REJECTED when any failed, and
INSUFFICIENT_EVIDENCE otherwise (underpowered, too few examples, or missing measurements). ERROR
is a mission whose statistics or gates could not be computed (:func:`error_decision`); it is
never promoted and never stops another mission.
"""

from __future__ import annotations

import fcntl
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bem_tasks.config.loader import ConfigError, error_message, load_yaml
from bem_tasks.config.schema import Strict
from bem_tasks.io import atomic_write_json
from bem_tasks.stats.statistic import TIE_RTOL, parse_statistic

Op = Literal[">=", "<=", ">", "<"]
Kind = Literal["superiority", "non_inferiority", "absolute"]
Status = Literal["passed", "failed", "underpowered", "too_few_examples", "missing"]
STATUSES: tuple[Status, ...] = get_args(Status)
DecisionValue = Literal["PROMOTED", "REJECTED", "INSUFFICIENT_EVIDENCE", "ERROR"]
DEFAULT_MIN_EXAMPLES = 30
# A quantile gate also needs this many pooled (example x seed) values beyond its quantile: a p95
# interval from 1.5 values in the tail (30 examples, 1 seed) promoted falsely 7% of the time on
# the threshold (docs/statistics.md, tests/stats/test_stats_simulation.py).
MIN_TAIL_VALUES = 10

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
ABSOLUTE_STATISTICS = ("value", "mean", "min", "max", "median", "pNN")

__all__ = [
    "Decision",
    "Gate",
    "GateOutcome",
    "GatesConfig",
    "MissionGates",
    "analysis_specs",
    "error_decision",
    "evaluate_gates",
    "load_gates",
    "promote",
    "render_report_md",
]


class Gate(Strict):
    """One gate. Field order matters: later validators read the earlier fields."""

    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    kind: Kind
    op: Op
    threshold: float
    family: str = Field(min_length=1)
    slice: str = Field(default="slice_b", min_length=1)
    relative: bool = False
    statistic: str = "mean"
    # Comparative gates only: below this many examples the gate cannot pass or fail (None: 30).
    min_examples: int | None = Field(default=None, ge=2)
    description: str = ""

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float, info: ValidationInfo) -> float:
        if not math.isfinite(v):
            raise ValueError(f"threshold must be a finite number, got {v}")
        kind, op = info.data.get("kind"), info.data.get("op")
        if kind is None or op is None or kind == "absolute":
            return v
        above = op in (">=", ">")  # the candidate passes above the threshold
        # Superiority margins lie on the better side of "no change", non-inferiority margins on
        # the worse side; the other sign is almost always a typo that would invert the gate.
        if kind == "superiority" and (v < 0 if above else v > 0):
            raise ValueError(
                f"a superiority gate with op '{op}' needs a threshold {'>=' if above else '<='} 0 "
                f"(an improvement margin), got {v}"
            )
        if kind == "non_inferiority" and (v > 0 if above else v < 0):
            raise ValueError(
                f"a non_inferiority gate with op '{op}' needs a threshold {'<=' if above else '>='} "
                f"0 (the largest allowed loss), got {v}"
            )
        return v

    @field_validator("relative")
    @classmethod
    def _relative(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("kind") == "absolute":
            raise ValueError("an absolute gate has no baseline, so it cannot be relative")
        t = info.data.get("threshold")
        if v and t is not None and not t > -1.0:
            raise ValueError(f"a relative threshold must be above -1 (-100%), got {t}")
        return v

    @field_validator("statistic")
    @classmethod
    def _statistic(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "absolute" and v in ("value", "min", "max"):
            return v
        try:
            parse_statistic(v)
        except ValueError:
            allowed = (
                ABSOLUTE_STATISTICS
                if info.data.get("kind") == "absolute"
                else ("mean", "median", "pNN")
            )
            raise ValueError(
                f"statistic must be one of {allowed} (pNN e.g. p95), got {v!r}"
            ) from None
        return v

    @field_validator("min_examples")
    @classmethod
    def _min_examples(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("kind") == "absolute":
            raise ValueError(
                "min_examples applies to comparative gates (superiority, non_inferiority); an "
                "absolute gate judges the value it is given"
            )
        return v

    @property
    def comparative(self) -> bool:
        return self.kind != "absolute"

    @property
    def floor_examples(self) -> int:
        """The configured ``min_examples`` (default 30)."""
        return DEFAULT_MIN_EXAMPLES if self.min_examples is None else self.min_examples

    def required_examples(self, n_seeds: int = 1) -> int:
        """Examples the gate needs with ``n_seeds`` seeds per example.

        ``min_examples`` for a mean; for a quantile q also enough examples that the pooled
        example x seed values hold at least ``MIN_TAIL_VALUES`` beyond the quantile:
        ``examples x seeds x min(q, 1 - q) >= MIN_TAIL_VALUES`` (p95, 2 seeds: 100 examples;
        p99, 2 seeds: 500; the median never needs more than the floor).
        """
        q = parse_statistic(self.statistic) if self.comparative else None
        if q is None:
            return self.floor_examples
        tail = math.ceil(MIN_TAIL_VALUES / (max(1, n_seeds) * min(q, 1.0 - q)) - 1e-9)
        return max(self.floor_examples, tail)

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">=", ">")


class MissionGates(Strict):
    title: str = ""
    candidate: str = Field(min_length=1)
    baseline: str = Field(min_length=1)
    families: list[str] = Field(min_length=1)
    gates: list[Gate] = Field(min_length=1)
    # Metrics reported without a gate take their direction from a gate on the same metric, else
    # they count as higher-is-better unless listed here (e.g. routing flip rate).
    lower_is_better: list[str] = Field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-gate problems as (path relative to this mission, message)."""
        out: list[tuple[str, str]] = []
        if len(set(self.families)) != len(self.families):
            out.append(("families", f"families must be unique, got {self.families}"))
        seen: dict[str, int] = {}
        for i, g in enumerate(self.gates):
            if g.name in seen:
                out.append(
                    (f"gates.{i}.name", f"gate name '{g.name}' is already gates.{seen[g.name]}")
                )
            seen.setdefault(g.name, i)
            if g.family not in self.families:
                out.append(
                    (f"gates.{i}.family", f"family '{g.family}' is not declared in {self.families}")
                )
            if g.metric in self.lower_is_better and g.higher_is_better:
                out.append(
                    (
                        f"gates.{i}.op",
                        f"'{g.metric}' is listed in lower_is_better but this gate's op '{g.op}' "
                        "says higher is better",
                    )
                )
        return out

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> MissionGates:
        if info.context and info.context.get("defer_cross_checks"):
            return self  # load_gates reports them with their exact paths
        if problems := self.problems():
            raise ValueError("; ".join(f"{path}: {msg}" for path, msg in problems))
        return self


class GatesConfig(Strict):
    version: Literal[1] = 1
    # The one significance level (BH FDR level and the gates' two-sided 1 - alpha intervals) and
    # the power target of the report's sample sizes.
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)
    missions: dict[str, MissionGates] = Field(min_length=1)


def load_gates(path: str | os.PathLike[str]) -> GatesConfig:
    """Load and validate a gates file; raise ConfigError with ``file:key.path: message`` lines."""
    path = Path(path)
    raw = load_yaml(path)
    try:
        cfg = GatesConfig.model_validate(raw, context={"defer_cross_checks": True})
    except ValidationError as exc:
        problems = [
            f"{path}:{'.'.join(str(p) for p in err['loc']) or '<root>'}: {error_message(err)}"
            for err in exc.errors()
        ]
        raise ConfigError(problems) from None
    problems = [
        f"{path}:missions.{name}.{where}: {msg}"
        for name, mission in cfg.missions.items()
        for where, msg in mission.problems()
    ]
    if problems:
        raise ConfigError(problems)
    return cfg


def analysis_specs(config: GatesConfig, mission: str) -> list[dict[str, Any]]:
    """What ``bem_tasks.stats.analyze`` must compute for a mission's comparative gates.

    One dict per distinct comparison (keys: mission, metric, slice, family, relative, statistic,
    higher_is_better, null_value); add ``candidate`` and ``baseline`` arrays and pass the list to
    ``analyze``. ``null_value`` is the gate threshold, so the p-values test the gates.
    """
    mg = _mission(config, mission)
    specs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for g in mg.gates:
        if not g.comparative:
            continue
        key = (g.metric, g.slice, g.relative, g.statistic, g.threshold)
        specs.setdefault(
            key,
            {
                "mission": mission,
                "metric": g.metric,
                "slice": g.slice,
                "family": g.family,
                "relative": g.relative,
                "statistic": g.statistic,
                "higher_is_better": g.higher_is_better,
                "null_value": g.threshold,
            },
        )
    return list(specs.values())


class GateOutcome(Strict):
    gate: str
    kind: Kind
    metric: str
    slice: str
    family: str
    op: Op
    threshold: float
    relative: bool
    statistic: str
    status: Status
    reason: str
    observed: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    n: int | None = None
    n_needed: int | None = None
    achieved_power: float | None = None


class Decision(Strict):
    mission: str
    decision: DecisionValue
    summary: str
    candidate: str = ""
    baseline: str = ""
    alpha: float
    power: float
    gates: list[GateOutcome]
    error: str | None = None  # the message, when decision is ERROR

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _mission(config: GatesConfig, mission: str) -> MissionGates:
    if mission not in config.missions:
        raise ValueError(f"no gates for mission '{mission}'; configured: {sorted(config.missions)}")
    return config.missions[mission]


def _fmt(v: float | None, relative: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v * 100:+.2f}%" if relative else f"{v:.4g}"


def _find_result(
    mission: str, g: Gate, results: Sequence[Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    same = [
        r
        for r in results
        if r.get("mission") == mission
        and r.get("metric") == g.metric
        and r.get("slice") == g.slice
        and bool(r.get("relative")) == g.relative
        and r.get("statistic", "mean") == g.statistic
    ]
    if not same:
        return None
    hit = [r for r in same if math.isclose(float(r["null_value"]), g.threshold, abs_tol=1e-12)]
    if len(hit) != 1:
        found = sorted({float(r["null_value"]) for r in same})
        raise ValueError(
            f"{mission}/{g.name}: expected one statistical result for {g.metric} [{g.slice}] tested "
            f"at the gate threshold {g.threshold}, found {len(hit)} (null values {found}); build the "
            "analysis with bem_tasks.gates.analysis_specs() so p-values test the gate thresholds"
        )
    return hit[0]


def _comparative(g: Gate, r: Mapping[str, Any], alpha: float, power: float) -> GateOutcome:
    from bem_tasks.stats.power import achieved_power, n_for_margin  # scipy: not at config load

    est, lo, hi = float(r["estimate"]), float(r["ci_low"]), float(r["ci_high"])
    p_adj, n, se = float(r["p_adjusted"]), int(r["n"]), float(r["se"])
    n_seeds = int(r.get("n_seeds") or 1)
    degenerate = bool(r.get("degenerate", False))
    conf = float(r["confidence"])
    if not math.isclose(conf, 1.0 - alpha, abs_tol=1e-9):
        raise ValueError(
            f"{g.name}: the statistics were computed at confidence {conf:g}, but the gates file's "
            f"alpha = {alpha:g} judges gates on two-sided {1 - alpha:g} intervals; recompute the "
            f"statistics with confidence {1 - alpha:g}"
        )
    m = max(1, int(r.get("family_size", 1)))
    t, op, rel = g.threshold, OPS[g.op], g.relative
    above = g.higher_is_better
    # A bound within rounding of the threshold is on it: 0.1 + 1e-15 is not evidence of > 0.1.
    scale = [abs(t), abs(est), abs(lo), abs(hi), 1.0 if rel else 0.0]
    scale += [abs(float(r.get(k) or 0.0)) for k in (
        "candidate_value", "baseline_value", "candidate_mean", "baseline_mean")]  # fmt: skip
    tol = TIE_RTOL * max(scale)

    def snap(v: float) -> float:
        return t if abs(v - t) <= tol else v

    est_s = snap(est)
    pass_bound, fail_bound = (snap(lo), snap(hi)) if above else (snap(hi), snap(lo))
    ci = f"{int(round(float(r['confidence']) * 100))}% CI [{_fmt(lo, rel)}, {_fmt(hi, rel)}]"
    side = "above" if above else "below"
    other = "below" if above else "above"

    # Examples for `power` at the observed distance from the threshold (two-sided test at
    # alpha / family size: Bonferroni, conservative for BH). se * sqrt(n) is the per-example sd.
    sd_unit = se * math.sqrt(n)
    delta = abs(est_s - t)
    n_needed = power_now = None
    if sd_unit > 0 and delta > 0:
        a_m = alpha / m
        n_needed = n_for_margin(sd_unit, delta, power=power, alpha=a_m)
        power_now = achieved_power(delta / sd_unit, n, a_m)

    base: dict[str, Any] = dict(
        gate=g.name, kind=g.kind, metric=g.metric, slice=g.slice, family=g.family, op=g.op,
        threshold=t, relative=rel, statistic=g.statistic, observed=est, ci_low=lo, ci_high=hi,
        confidence=float(r["confidence"]), p_value=float(r["p_value"]), p_adjusted=p_adj, n=n,
    )  # fmt: skip
    need = g.required_examples(n_seeds)
    if n < need:
        if need > g.floor_examples:
            q = parse_statistic(g.statistic)
            assert q is not None
            rule = (
                f"a {g.statistic} gate needs examples x seeds x {min(q, 1 - q):g} >= "
                f"{MIN_TAIL_VALUES} values beyond the quantile: {need} examples with {n_seeds} "
                f"seed(s) (min_examples = {g.floor_examples})"
            )
        else:
            rule = f"min_examples = {need}"
        reason = (
            f"only {n} examples, fewer than {rule}: too little evidence to pass or fail ({ci}, "
            f"estimate {_fmt(est, rel)})"
        )
        return GateOutcome(status="too_few_examples", reason=reason, **base)
    if op(pass_bound, t) and p_adj < alpha:
        reason = (
            f"{ci} lies {side} the threshold {_fmt(t, rel)} and the BH-adjusted p = {p_adj:.3g} "
            f"< {alpha} (family of {m})"
        )
        return GateOutcome(status="passed", reason=reason, **base)
    # A zero-width (degenerate) CI says nothing about sampling error: failing needs the exact
    # sign test too (at the unadjusted alpha, as a non-degenerate CI's side implies).
    if not op(fail_bound, t) and (not degenerate or float(r["p_value"]) < alpha):
        reason = f"{ci} lies entirely {other} the threshold {_fmt(t, rel)}"
        if degenerate:
            reason += f" and the exact sign test gives p = {float(r['p_value']):.3g} < {alpha}"
        return GateOutcome(status="failed", reason=reason, **base)
    if not op(fail_bound, t):
        reason = (
            f"{ci} has zero width on the failing side of the threshold {_fmt(t, rel)}, but the "
            f"exact sign test gives p = {float(r['p_value']):.3g} >= {alpha}"
        )
    elif op(pass_bound, t) and pass_bound != t:
        reason = (
            f"{ci} clears the threshold {_fmt(t, rel)} but the BH-adjusted p = {p_adj:.3g} >= "
            f"{alpha} (family of {m})"
        )
    else:
        how = "touches" if t in (pass_bound, fail_bound) else "straddles"
        reason = f"{ci} {how} the threshold {_fmt(t, rel)} (estimate {_fmt(est, rel)})"
    if n_needed is not None:
        reason += (
            f"; about {n_needed} examples would give {power:.0%} power at the observed effect "
            f"(have {n})"
        )
        if not op(est_s, t):
            reason += (
                ", and the estimate is on the failing side: more data would likely confirm a fail"
            )
    elif delta > 0:
        reason += (
            "; every resample gave the same value, so p is the exact sign test of the "
            "per-example differences: more examples are needed"
        )
    else:
        reason += "; the estimate sits on the threshold, so no sample size would resolve it"
    return GateOutcome(
        status="underpowered", reason=reason, n_needed=n_needed, achieved_power=power_now, **base
    )


def _reduce_property(g: Gate, value: Any) -> float:
    import numpy as np  # lazily: DAG files load the gates config at parse time

    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"property '{g.metric}' has NaN or infinite values")
    if arr.ndim == 0:
        return float(arr)  # an already-reduced value, taken as given
    flat = arr.ravel()
    if g.statistic == "value":
        if flat.size != 1:
            raise ValueError(
                f"gate '{g.name}' expects a single value for '{g.metric}', got {flat.size} values; "
                "set statistic (mean, min, max, median, pNN) to reduce them"
            )
        return float(flat[0])
    if g.statistic == "min":
        return float(flat.min())
    if g.statistic == "max":
        return float(flat.max())
    q = parse_statistic(g.statistic)
    if q is None:
        return float(flat.mean())
    from bem_tasks.stats.bootstrap import harrell_davis  # the comparative gates' estimator

    return harrell_davis(flat, q)


def _absolute(g: Gate, value: Any) -> GateOutcome:
    import numpy as np

    observed = _reduce_property(g, value)
    ok = OPS[g.op](observed, g.threshold)
    what = g.metric if g.statistic == "value" else f"{g.statistic}({g.metric})"
    reason = f"{what} = {observed:.6g} {'satisfies' if ok else 'violates'} {g.op} {g.threshold:g}"
    n = None if np.ndim(value) == 0 else int(np.size(value))
    return GateOutcome(
        gate=g.name, kind=g.kind, metric=g.metric, slice=g.slice, family=g.family, op=g.op,
        threshold=g.threshold, relative=False, statistic=g.statistic,
        status="passed" if ok else "failed", reason=reason, observed=observed, n=n,
    )  # fmt: skip


def evaluate_gates(
    mission: str,
    gates: GatesConfig,
    stats_results: Sequence[Mapping[str, Any]],
    properties: Mapping[str, Any] | None = None,
) -> Decision:
    """Judge every gate of ``mission``.

    ``stats_results``: the dicts from ``bem_tasks.stats.analyze`` (other missions' are ignored).
    ``properties``: candidate-only values for absolute gates, metric name -> a number (taken as
    already reduced) or per-example values (reduced with the gate's ``statistic``).
    ``alpha``/``power`` are the gates file's (the only source). A gate whose measurement is absent
    or empty is ``missing``. Raises ValueError on results that cannot be judged (computed at
    another confidence, testing another null, NaN properties): :func:`error_decision` turns that
    into the mission's ERROR.
    """
    mg = _mission(gates, mission)
    a, pw = gates.alpha, gates.power
    props = properties or {}
    outcomes: list[GateOutcome] = []
    for g in mg.gates:
        if g.comparative:
            r = _find_result(mission, g, stats_results)
            if r is not None and not r.get("error"):
                outcomes.append(_comparative(g, r, a, pw))
                continue
            if r is not None:
                what = f"no statistic: {r['error']}"
            else:
                what = f"no statistical result for {g.metric} [{g.slice}, {g.statistic}"
                what += ", relative]" if g.relative else "]"
        else:
            if g.metric in props and _size(props[g.metric]) > 0:
                outcomes.append(_absolute(g, props[g.metric]))
                continue
            what = (
                f"property '{g.metric}' has no values"
                if g.metric in props
                else f"no property '{g.metric}' was measured"
            )
        outcomes.append(
            GateOutcome(
                gate=g.name,
                kind=g.kind,
                metric=g.metric,
                slice=g.slice,
                family=g.family,
                op=g.op,
                threshold=g.threshold,
                relative=g.relative,
                statistic=g.statistic,
                status="missing",
                reason=what,
            )  # fmt: skip
        )
    failed = [o.gate for o in outcomes if o.status == "failed"]
    open_ = [o.gate for o in outcomes if o.status not in ("passed", "failed")]
    decision: DecisionValue
    if failed:
        decision, summary = "REJECTED", f"failed: {', '.join(failed)}"
        if open_:
            summary += f"; not resolved: {', '.join(open_)}"
    elif open_:
        decision, summary = "INSUFFICIENT_EVIDENCE", f"not resolved: {', '.join(open_)}"
    else:
        decision, summary = "PROMOTED", f"all {len(outcomes)} gates passed"
    return Decision(
        mission=mission, decision=decision, summary=summary, candidate=mg.candidate,
        baseline=mg.baseline, alpha=a, power=pw, gates=outcomes,
    )  # fmt: skip


def _size(value: Any) -> int:
    import numpy as np

    return int(np.size(value))


def error_decision(mission: str, gates: GatesConfig, message: str) -> Decision:
    """The ERROR decision of a mission whose statistics or gates could not be computed."""
    mg = gates.missions.get(mission)
    return Decision(
        mission=mission,
        decision="ERROR",
        summary=f"error: {message}",
        candidate="" if mg is None else mg.candidate,
        baseline="" if mg is None else mg.baseline,
        alpha=gates.alpha,
        power=gates.power,
        gates=[],
        error=message,
    )


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_report_md(
    decisions: Sequence[Decision], *, results: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Markdown promotion report: a summary table, then every gate of every mission with why.

    With ``results`` (the ``analyze`` dicts) the comparisons no gate uses (e.g. slice_a) are
    listed as reported only.
    """
    lines = ["# Promotion report", ""]
    lines += [
        "| Mission | Decision | Passed | Failed | Underpowered | Too few examples | Missing |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in decisions:
        counts = [str(sum(o.status == s for o in d.gates)) for s in STATUSES]
        lines.append(f"| {d.mission} | **{d.decision}** | {' | '.join(counts)} |")
    used: set[tuple[Any, ...]] = set()
    for d in decisions:
        lines += ["", f"## {d.mission}: {d.decision}", ""]
        if d.decision == "ERROR":
            lines.append(f"The statistics or gates of this mission failed: {_md(d.error or '')}")
            continue
        lines.append(
            f"Candidate `{d.candidate}` vs baseline `{d.baseline}`. {_md(d.summary)}. Comparative "
            f"gates are one-sided questions judged on two-sided {1 - d.alpha:.0%} bootstrap BCa "
            f"intervals (of the mean for mean gates, of the Harrell-Davis quantile of the pooled "
            f"example x seed values for median/pNN gates) and two-sided p-values at the "
            f"threshold (the exact sign test when every resample gives the same value), "
            f"Benjamini-Hochberg within family at alpha = {d.alpha} (a gate passes by chance at "
            f"most alpha/2 of the time); sample sizes for {d.power:.0%} power."
        )
        lines += [
            "",
            "| Gate | Kind | Metric [slice] | Observed | CI | Threshold | p (BH) | n | Status | n needed | Why |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for o in d.gates:
            rel = o.relative
            ci = "" if o.ci_low is None else f"[{_fmt(o.ci_low, rel)}, {_fmt(o.ci_high, rel)}]"
            stat = "" if o.statistic in ("mean", "value") else f" ({o.statistic})"
            p = "" if o.p_adjusted is None else f"{o.p_adjusted:.3g}"
            lines.append(
                f"| {o.gate} | {o.kind} | {o.metric}{stat} [{o.slice}] | {_fmt(o.observed, rel)} | "
                f"{ci} | {o.op} {_fmt(o.threshold, rel)} | {p} | {o.n if o.n is not None else ''} | "
                f"{o.status} | {o.n_needed if o.n_needed is not None else ''} | {_md(o.reason)} |"
            )
            used.add((d.mission, o.metric, o.slice, o.relative, o.statistic))
    extra = [
        r
        for r in results or []
        if (r["mission"], r["metric"], r["slice"], bool(r["relative"]), r.get("statistic", "mean"))
        not in used
    ]
    if extra:
        lines += [
            "",
            "## Reported only (no gate)",
            "",
            "| Mission | Metric [slice] | Estimate | CI | p (BH) | Family | Favours |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in extra:
            rel = bool(r["relative"])
            if r.get("error"):
                lines.append(
                    f"| {r['mission']} | {r['metric']} ({r.get('statistic', 'mean')}"
                    f"{', relative' if rel else ''}) [{r['slice']}] | n/a | {_md(r['error'])} | "
                    f"| {r['family']} | |"
                )
                continue
            lines.append(
                f"| {r['mission']} | {r['metric']} ({r.get('statistic', 'mean')}"
                f"{', relative' if rel else ''}) [{r['slice']}] | {_fmt(r['estimate'], rel)} | "
                f"[{_fmt(r['ci_low'], rel)}, {_fmt(r['ci_high'], rel)}] | {r['p_adjusted']:.3g} | "
                f"{r['family']} | {r.get('favours', '')} |"
            )
    return "\n".join(lines) + "\n"


def promote(
    registry_path: str | os.PathLike[str],
    mission: str,
    run_id: str,
    model_path: str | os.PathLike[str],
    decision: Decision,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a PROMOTED candidate in the JSON model registry and return its entry.

    Read-modify-write under an exclusive ``fcntl`` lock on ``<registry>.lock`` (released by the
    kernel if the process dies), written with an atomic replace. Registry layout:
    ``{"version": 1, "missions": {mission: {"current": entry, "history": [entry, ...]}}}``.
    Re-promoting the same ``run_id`` replaces its entry (idempotent task reruns).
    """
    if decision.mission != mission:
        raise ValueError(f"decision is for mission '{decision.mission}', not '{mission}'")
    if decision.decision != "PROMOTED":
        raise ValueError(
            f"{mission} run {run_id} was not promoted: {decision.decision} ({decision.summary})"
        )
    path = Path(registry_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry: dict[str, Any] = {
        "run_id": run_id,
        "model_path": str(model_path),
        "candidate": decision.candidate,
        "baseline": decision.baseline,
        "decision": decision.decision,
        "summary": decision.summary,
        "gates": {o.gate: o.status for o in decision.gates},
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            registry = _read_registry(path)
            slot = registry["missions"].setdefault(mission, {"current": None, "history": []})
            slot["history"] = [e for e in slot["history"] if e.get("run_id") != run_id] + [entry]
            slot["current"] = entry
            atomic_write_json(path, registry)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return entry


def _read_registry(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": 1, "missions": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}:{exc.lineno}: the registry is not valid JSON: {exc.msg}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("missions"), dict):
        raise ValueError(f"{path}:missions: expected a mapping of mission -> entries")
    return data
