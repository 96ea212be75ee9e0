"""Gates YAML errors name the file and the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bem_tasks.config.loader import ConfigError
from bem_tasks.gates import Gate, MissionGates, load_gates

GOOD = {
    "version": 1,
    "missions": {
        "mission_a": {
            "candidate": "router",
            "baseline": "baseline",
            "families": ["performance", "system"],
            "gates": [
                {"name": "em_gain", "metric": "em", "kind": "superiority", "op": ">=",
                 "threshold": 0.015, "family": "performance"},
                {"name": "latency", "metric": "latency_ms", "kind": "non_inferiority", "op": "<=",
                 "threshold": 0.15, "relative": True, "family": "system"},
            ],
        }
    },
}  # fmt: skip


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "gates.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _problems(tmp_path: Path, doc: object) -> list[str]:
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_gates(path)
    return info.value.problems


def _edit_gate(index: int, **changes: object) -> dict:
    import copy

    doc = copy.deepcopy(GOOD)
    gate = doc["missions"]["mission_a"]["gates"][index]  # type: ignore[index]
    for k, v in changes.items():
        if v is None:
            gate.pop(k)
        else:
            gate[k] = v
    return doc


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = load_gates(_write(tmp_path, GOOD))
    assert [g.name for g in cfg.missions["mission_a"].gates] == ["em_gain", "latency"]
    assert cfg.alpha == 0.05 and cfg.power == 0.8


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (_edit_gate(0, colour="red"), "missions.mission_a.gates.0.colour: unknown key"),
        (_edit_gate(0, op="=="), "missions.mission_a.gates.0.op: Input should be '>=', '<=', '>' or '<'"),
        (_edit_gate(1, metric=None), "missions.mission_a.gates.1.metric: required key is missing"),
        (_edit_gate(0, threshold=-0.015),
         "missions.mission_a.gates.0.threshold: a superiority gate with op '>=' needs a threshold >= 0"),
        (_edit_gate(1, threshold=-0.15),
         "missions.mission_a.gates.1.threshold: a non_inferiority gate with op '<=' needs a threshold >= 0"),
        (_edit_gate(0, kind="absolute", relative=True),
         "missions.mission_a.gates.0.relative: an absolute gate has no baseline"),
        (_edit_gate(0, statistic="max"), "missions.mission_a.gates.0.statistic: statistic must be one of"),
        (_edit_gate(0, family="quality"),
         "missions.mission_a.gates.0.family: family 'quality' is not declared in ['performance', 'system']"),
        (_edit_gate(1, name="em_gain"), "missions.mission_a.gates.1.name: gate name 'em_gain' is already gates.0"),
        ({**GOOD, "missions": {"mission_a": {**GOOD["missions"]["mission_a"],  # type: ignore[index]
                                             "lower_is_better": ["em"]}}},
         "missions.mission_a.gates.0.op: 'em' is listed in lower_is_better but this gate's op '>='"),
        ({**GOOD, "alpha": 1.5}, "alpha: Input should be less than 1"),
        ({**GOOD, "extra": 1}, "extra: unknown key"),
        ({"version": 1, "missions": {}}, "missions: Dictionary should have at least 1 item"),
    ],
)  # fmt: skip
def test_errors_name_file_and_key_path(tmp_path: Path, doc: dict, expected: str) -> None:
    problems = _problems(tmp_path, doc)
    path = tmp_path / "gates.yaml"
    assert any(p.startswith(f"{path}:{expected}") for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = _edit_gate(0, colour="red", op="!")
    problems = _problems(tmp_path, doc)
    assert len(problems) == 2


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "gates.yaml"
    p.write_text("version: 1\nmissions:\n  mission_a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"gates.yaml:\d+: invalid YAML"):
        load_gates(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_gates(tmp_path / "absent.yaml")


def test_cross_checks_also_apply_when_built_in_code() -> None:
    g = Gate(name="x", metric="em", kind="superiority", op=">=", threshold=0.0, family="nope")
    with pytest.raises(ValueError, match="gates.0.family: family 'nope' is not declared"):
        MissionGates(candidate="c", baseline="b", families=["performance"], gates=[g])
