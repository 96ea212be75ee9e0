"""`bem-fleet validate`: every documented bad case gives its `file:key.path: message` line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bem_tasks.cli import main
from bem_tasks.config.loader import ConfigError, deep_merge, load_fleet, validate

ARCH = "configs/bem_fleet_architecture.yml"
EXP_A = "experiments/mission_a_agentic_planner.yml"


def problems_after(project: Path, edit_yaml, path: str, fn) -> list[str]:
    edit_yaml(project / path, fn)
    return validate(project / ARCH)


def test_shipped_config_is_valid(project: Path) -> None:
    assert validate(project / ARCH) == []


def test_cli_prints_ok_and_exits_0(project: Path, capsys) -> None:
    assert main(["validate", "--config", str(project / ARCH)]) == 0
    assert capsys.readouterr().out.strip() == "OK"


def test_unknown_key(project: Path, edit_yaml) -> None:
    problems = problems_after(project, edit_yaml, ARCH, lambda d: d["fleet"].update(colour="blue"))
    assert problems == [f"{project / ARCH}:fleet.colour: unknown key"]


def test_wrong_type(project: Path, edit_yaml) -> None:
    problems = problems_after(project, edit_yaml, ARCH, lambda d: d["fleet"].update(retries="many"))
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{project / ARCH}:fleet.retries: Input should be a valid integer"
    )


def test_negative_learning_rate(project: Path, edit_yaml) -> None:
    def bad(d: dict) -> None:
        d["params"]["training"]["policy_gradient"]["lr"] = -0.001

    problems = problems_after(project, edit_yaml, EXP_A, bad)
    assert problems == [
        f"{project / EXP_A}:params.training.policy_gradient.lr: "
        "Input should be greater than 0 (got -0.001)"
    ]


def test_negative_learning_rate_in_a_profile_overlay_points_at_the_overlay(
    project: Path, edit_yaml
) -> None:
    def bad(d: dict) -> None:
        d["profiles"]["full"]["params"]["training"] = {
            "pretrain_base": {"lr": -1.0, "steps": 1, "batch_size": 1}
        }

    problems = problems_after(project, edit_yaml, EXP_A, bad)
    assert any(
        p.startswith(f"{project / EXP_A}:profiles.full.params.training.pretrain_base.lr:")
        for p in problems
    ), problems


def test_dependency_on_unknown_mission(project: Path, edit_yaml) -> None:
    def bad(d: dict) -> None:
        d["missions"]["mission_b"]["depends_on"] = ["mission_x"]

    problems = problems_after(project, edit_yaml, ARCH, bad)
    assert problems == [
        f"{project / ARCH}:missions.mission_b.depends_on.0: unknown mission 'mission_x' "
        "(known: mission_a, mission_b, mission_c, mission_d, mission_e)"
    ]


def test_dependency_cycle(project: Path, edit_yaml) -> None:
    def bad(d: dict) -> None:
        # two missions left disabled, so that the cycle is the only problem
        d["missions"]["mission_d"].update(enabled=False, depends_on=["mission_e"])
        d["missions"]["mission_e"].update(enabled=False, depends_on=["mission_d"])

    problems = problems_after(project, edit_yaml, ARCH, bad)
    assert problems == [
        f"{project / ARCH}:missions: dependency cycle mission_d -> mission_e -> mission_d"
    ]


def test_unknown_device_class(project: Path, edit_yaml) -> None:
    def bad(d: dict) -> None:
        d["profiles"]["full"]["phases"]["evaluate"]["device_class"] = "tpu_v5"

    problems = problems_after(project, edit_yaml, EXP_A, bad)
    assert problems == [
        f"{project / EXP_A}:profiles.full.phases.evaluate.device_class: unknown device class "
        "'tpu_v5' (known: cpu, rtx4090_24gb, h100_80gb)"
    ]


def test_artifact_root_must_be_a_path_not_a_url(
    project: Path, edit_yaml, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_yaml(project / ARCH, lambda d: d["fleet"].update(artifact_root="s3://bucket/bem"))
    assert any(
        p.startswith(f"{project / ARCH}:fleet.artifact_root: must be a local or mounted")
        for p in validate(project / ARCH)
    )
    edit_yaml(project / ARCH, lambda d: d["fleet"].update(artifact_root="./artifacts"))
    cfg = load_fleet(project / ARCH)
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", "gs://bucket")
    with pytest.raises(ConfigError, match="BEM_FLEET_ARTIFACT_ROOT: must be a local or mounted"):
        _ = cfg.artifact_root
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", "/mnt/shared/artifacts")
    assert cfg.artifact_root == Path("/mnt/shared/artifacts")


def test_pool_with_zero_slots(project: Path, edit_yaml) -> None:
    problems = problems_after(
        project, edit_yaml, ARCH, lambda d: d["device_classes"]["h100_80gb"].update(devices=0)
    )
    assert problems == [
        f"{project / ARCH}:device_classes.h100_80gb.devices: a device class is an Airflow pool "
        "and needs at least 1 slot, got 0"
    ]


def test_more_gpus_than_the_class_has(project: Path, edit_yaml) -> None:
    def bad(d: dict) -> None:
        d["profiles"]["full"]["phases"]["evaluate"]["gpus"] = 4

    problems = problems_after(project, edit_yaml, EXP_A, bad)
    assert problems == [
        f"{project / EXP_A}:profiles.full.phases.evaluate.gpus: asks for 4 GPUs but class "
        "'rtx4090_24gb' has 3"
    ]


def test_enabling_a_mission_without_implementation(
    project: Path, edit_yaml, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bem_tasks.missions import registry

    # every mission of the design is implemented now: take one out of the registry (its params
    # are then checked against the generic schema too, which reports its own keys as unknown)
    monkeypatch.delitem(registry.IMPLEMENTED, "mission_e")
    problems = problems_after(project, edit_yaml, ARCH, lambda d: None)
    want = f"{project / ARCH}:missions.mission_e.enabled: 'mission_e' has no implementation yet"
    assert any(p.startswith(want) for p in problems), problems


def test_missing_experiment_file(project: Path) -> None:
    (project / "experiments" / "mission_d_sep.yml").unlink()
    problems = validate(project / ARCH)
    assert problems == [
        f"{project / 'experiments/mission_d_sep.yml'}: file not found "
        f"(named by {project / ARCH}:missions.mission_d.experiment)"
    ]


def test_invalid_yaml_names_the_line(project: Path) -> None:
    path = project / ARCH
    path.write_text("fleet:\n  name: [unclosed\n")
    (problem,) = validate(path)
    assert problem.startswith(f"{path}:3: invalid YAML")


def test_cli_lists_problems_and_exits_2(project: Path, edit_yaml, capsys) -> None:
    edit_yaml(project / ARCH, lambda d: d["fleet"].update(colour="blue"))
    assert main(["validate", "--config", str(project / ARCH)]) == 2
    assert f"{project / ARCH}:fleet.colour: unknown key" in capsys.readouterr().out


def test_profile_overlay_merges_onto_base(project: Path) -> None:
    smoke = load_fleet(project / ARCH, "smoke")
    full = load_fleet(project / ARCH, "full")
    assert smoke.arch.statistics.n_resamples == 2000
    assert full.arch.statistics.n_resamples == 10000
    assert full.arch.fleet.seeds == [0, 1, 2, 3, 4]
    assert full.experiments["mission_a"].phases["evaluate"].device_class == "rtx4090_24gb"
    assert smoke.experiments["mission_a"].phases["evaluate"].device_class == "cpu"
    # untouched keys survive the overlay
    assert full.experiments["mission_a"].phases["prepare"].device_class == "cpu"


def test_any_profile_switches_to_any_other_without_reloading(project: Path) -> None:
    # The cluster path: the DAG is built from the deployment profile ('full'), a run then asks
    # for 'smoke', and the run's tasks go back to the deployment layout.
    full = load_fleet(project / ARCH, "full")
    smoke = full.for_profile("smoke")
    assert smoke.profile == "smoke" and smoke.arch.statistics.n_resamples == 2000
    assert smoke.for_profile("full") is full
    assert smoke.for_profile("smoke") is smoke
    with pytest.raises(ConfigError, match="unknown profile 'nightly'"):
        smoke.for_profile("nightly")


def test_load_fleet_raises_with_all_problems(project: Path, edit_yaml) -> None:
    edit_yaml(project / ARCH, lambda d: d["fleet"].update(colour="blue", retries=-1))
    with pytest.raises(ConfigError) as info:
        load_fleet(project / ARCH)
    assert len(info.value.problems) == 2


def test_deep_merge_replaces_lists_and_merges_mappings() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}}) == {"a": {"x": 1, "y": [3]}, "b": 1}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}


def test_confidence_must_match_the_gates_alpha(project: Path, edit_yaml) -> None:
    """One significance level: the gates file's alpha; a profile's confidence that disagrees
    with it is named at validation, and the old second source is an unknown key."""
    gates = project / "configs" / "gates_bem2.yaml"

    def bad(d: dict) -> None:
        d["profiles"]["smoke"]["statistics"]["confidence"] = 0.9

    problems = problems_after(project, edit_yaml, ARCH, bad)
    assert problems == [
        f"{project / ARCH}:profiles.smoke.statistics.confidence: 0.9 but {gates}:alpha is 0.05; "
        "gates are judged on two-sided intervals, so confidence must be 0.95"
    ]
    edit_yaml(project / ARCH, lambda d: d["profiles"]["smoke"]["statistics"].pop("confidence"))
    edit_yaml(project / ARCH, lambda d: d["statistics"].update(fdr_alpha=0.05))
    assert validate(project / ARCH) == [f"{project / ARCH}:statistics.fdr_alpha: unknown key"]
