"""`bem-fleet stream` and `bem-fleet soak`: which phases run where, with which inputs, and the
errors. Mission B's phases are replaced by recording fakes (this module): no model is trained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from bem_tasks.cli import main
from bem_tasks.fleet.runs import write_manifest
from bem_tasks.io import atomic_write_json
from bem_tasks.missions.soak import SoakChunk, run_soak

PHASES = ("prepare", "shadow", "canary_gate", "online", "evaluate")
NEEDS = {"shadow": ["prepare"], "canary_gate": ["prepare", "shadow"],
         "online": ["prepare", "shadow", "canary_gate"], "evaluate": ["prepare", "online"]}  # fmt: skip


class AnyParams(BaseModel):
    """Takes whatever params the shipped experiment file has."""

    model_config = ConfigDict(extra="allow")


def _phase(name: str):  # type: ignore[no-untyped-def]
    def run(ctx) -> dict:  # type: ignore[no-untyped-def]
        used = {q: str(ctx.input_dir(q, ctx.seed)) for q in NEEDS.get(name, [])}
        atomic_write_json(ctx.out_dir / "ran.json", {"seed": ctx.seed, "inputs": used})
        return {"phase": name}

    return run


prepare, shadow, canary_gate, online, evaluate = (_phase(p) for p in PHASES)


def soak(ctx, *, duration_s: float, canary_every: int | None = None, **leak_min) -> dict:  # type: ignore[no-untyped-def]
    ticks = iter(range(10**6))
    report = run_soak(
        lambda: SoakChunk(prompts=10, canary_checks=1),
        duration_s=duration_s, out_dir=ctx.out_dir, clock=lambda: float(next(ticks)),
        rss_mib=lambda: 100.0, **leak_min,
    )  # fmt: skip
    used = {q: str(ctx.input_dir(q, ctx.seed)) for q in ("prepare", "online")}
    atomic_write_json(ctx.out_dir / "soak_call.json", {
        "duration_s": duration_s, "canary_every": canary_every, "inputs": used,
        "profile": ctx.profile, "phase": ctx.phase, "seed": ctx.seed, "leak_min": leak_min,
    })  # fmt: skip
    return report


@pytest.fixture
def arch(project: Path, monkeypatch: pytest.MonkeyPatch, edit_yaml, tmp_path: Path) -> str:
    """The shipped configs with mission_b enabled and implemented by this module's fakes."""
    from bem_tasks.missions import registry

    impl = registry.MissionImpl(
        module=__name__, phases=PHASES, params_model=f"{__name__}:AnyParams"
    )
    monkeypatch.setitem(registry.IMPLEMENTED, "mission_b", impl)
    monkeypatch.setenv("BEM_FLEET_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BEM_FLEET_LOCK_DIR", str(tmp_path / "locks"))
    path = project / "configs" / "bem_fleet_architecture.yml"
    edit_yaml(path, lambda d: d["missions"]["mission_b"].update(enabled=True))
    return str(path)


def ran(folder: Path) -> dict:
    return json.loads((folder / "ran.json").read_text())


def test_stream_shadow_then_online(arch: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "b"
    base = ["stream", "--mission", "mission_b", "--config", arch, "--seed", "1"]
    assert main([*base, "--mode", "shadow", "--output", str(run / "shadow")]) == 0
    assert ran(run / "prepare")["seed"] is None  # prepare is not per seed
    assert ran(run / "shadow") == {"seed": 1, "inputs": {"prepare": str(run / "prepare")}}
    # a second shadow run finds prepare beside its output instead of preparing again
    capsys.readouterr()
    assert main([*base, "--mode", "shadow", "--output", str(run / "shadow2")]) == 0
    assert f"prepare: using {run / 'prepare'}" in capsys.readouterr().out

    online_dir = tmp_path / "elsewhere" / "online"
    argv = [*base, "--mode", "online", "--checkpoint", str(run / "shadow")]
    assert main([*argv, "--output", str(online_dir)]) == 0
    gate = tmp_path / "elsewhere" / "online_canary_gate"  # its own, named after --output
    assert ran(gate)["inputs"] == {"prepare": str(run / "prepare"), "shadow": str(run / "shadow")}
    assert ran(online_dir)["inputs"] == {
        "prepare": str(run / "prepare"), "shadow": str(run / "shadow"), "canary_gate": str(gate),
    }  # fmt: skip
    assert (online_dir / "manifest.json").exists()
    assert main([*argv, "--output", str(online_dir)]) == 0  # the same call again reuses both

    # the other shadow, online into its own folder: its gate decides on shadow2, not on shadow
    online2 = tmp_path / "elsewhere" / "online2"
    argv2 = [*base, "--mode", "online", "--checkpoint", str(run / "shadow2")]
    assert main([*argv2, "--output", str(online2)]) == 0
    gate2 = tmp_path / "elsewhere" / "online2_canary_gate"
    assert ran(gate2)["inputs"]["shadow"] == str(run / "shadow2")
    assert ran(online2)["inputs"]["canary_gate"] == str(gate2)
    # ... and into the first one's folder: refused, not handed the first shadow's decision
    capsys.readouterr()
    assert main([*argv2, "--output", str(online_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{gate}: a complete mission_b canary_gate made from inputs" in err
    assert str(run / "shadow2") in err and "choose another --output" in err
    assert ran(gate)["inputs"]["shadow"] == str(run / "shadow")


def test_stream_errors(arch: str, tmp_path: Path, capsys) -> None:
    out = ["--output", str(tmp_path / "o")]
    argv = ["stream", "--config", arch, "--mode", "online", "--mission"]
    assert main([*argv, "mission_b", *out]) == 2
    assert "--mode online needs --checkpoint" in capsys.readouterr().err
    assert main([*argv, "mission_a", "--checkpoint", str(tmp_path), *out]) == 2
    err = capsys.readouterr().err
    assert "--mission mission_a: only mission_b (Living Model) has an online learner" in err
    # online without a prepare anywhere near the shadow checkpoint
    assert main([*argv, "mission_b", "--checkpoint", str(tmp_path / "x" / "shadow"), *out]) == 2
    assert "needs the output of phase 'prepare'" in capsys.readouterr().err


def _dag_run(root: Path, run_id: str, seed: int, profile: str = "smoke") -> Path:
    mission_dir = root / "bem_fleet" / run_id / "mission_b"
    for phase in PHASES[:4]:
        folder = mission_dir / phase / (f"seed_{seed}" if phase != "prepare" else "")
        folder.mkdir(parents=True)
        write_manifest(folder, config_hash="x", seed=seed, extra={"profile": profile})
    return mission_dir


def test_soak_uses_the_newest_run_with_an_online_output(arch: str, tmp_path: Path, capsys) -> None:
    root = tmp_path / "artifacts"
    older = _dag_run(root, "older", 0) / "online" / "seed_0" / "manifest.json"
    newest = _dag_run(root, "newer", 0, profile="full")
    os.utime(older, (older.stat().st_mtime - 60,) * 2)
    _dag_run(root, "other_seed", 2)
    out = tmp_path / "soak"
    argv = ["soak", "--mission", "mission_b", "--duration", "30s", "--canary-every", "50"]
    assert main([*argv, "--config", arch, "--output", str(out)]) == 0
    call = json.loads((out / "soak_call.json").read_text())
    assert call["duration_s"] == 30 and call["canary_every"] == 50 and call["seed"] == 0
    assert call["leak_min"] == {}  # not given: mission_b.soak's default applies
    assert call["phase"] == "soak" and call["profile"] == "full"  # the soaked run's profile
    assert call["inputs"] == {
        "prepare": str(newest / "prepare"), "online": str(newest / "online" / "seed_0"),
    }  # fmt: skip
    printed = capsys.readouterr().out
    assert '"steady_state"' in printed and '"samples"' not in printed
    assert json.loads((out / "soak.json").read_text())["prompts"] == 300
    argv += ["--leak-min-mib-per-1k-prompts", "0.5"]
    assert main([*argv, "--config", arch, "--output", str(out)]) == 0
    assert json.loads((out / "soak_call.json").read_text())["leak_min"] == {
        "leak_min_mib_per_1k_prompts": 0.5
    }
    assert json.loads((out / "soak.json").read_text())["leak_min_mib_per_1k_prompts"] == 0.5


def test_soak_without_a_run_trains_the_phases_standalone_first(
    arch: str, tmp_path: Path, capsys
) -> None:
    argv = ["soak", "--mission", "mission_b", "--duration", "5s", "--seed", "3", "--config", arch]
    assert main(argv) == 0
    out = tmp_path / "artifacts" / "soak" / "mission_b" / "seed_3"
    printed = capsys.readouterr().out
    assert "running prepare, shadow, canary_gate, online standalone into" in printed
    phases = out / "phases"
    assert ran(phases / "online" / "seed_3")["inputs"]["canary_gate"] == str(
        phases / "canary_gate" / "seed_3"
    )
    assert not (phases / "evaluate").exists()
    call = json.loads((out / "soak_call.json").read_text())
    assert call["inputs"]["online"] == str(phases / "online" / "seed_3")
    # again: the standalone phases are complete, so they are reused, not retrained
    assert main(argv) == 0
    assert "online: reused" in capsys.readouterr().out


def test_soak_errors(arch: str, tmp_path: Path, capsys) -> None:
    argv = ["soak", "--config", arch, "--output", str(tmp_path / "s"), "--mission"]
    assert main([*argv, "mission_a", "--duration", "5m"]) == 2
    assert "only mission_b (Living Model) has an online learner to soak" in capsys.readouterr().err
    assert main([*argv, "mission_b", "--duration", "5 minutes"]) == 2
    assert "duration '5 minutes': expected a number with a unit" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main([*argv, "mission_b", "--duration", "5m", "--inputs-from", str(empty)]) == 2
    assert f"{empty}: no complete online/seed_0" in capsys.readouterr().err


def test_soak_refuses_a_disabled_mission_b(project: Path, edit_yaml, capsys) -> None:
    path = project / "configs" / "bem_fleet_architecture.yml"
    edit_yaml(path, lambda d: d["missions"]["mission_b"].update(enabled=False))
    argv = ["soak", "--mission", "mission_b", "--duration", "5m", "--config", str(path)]
    assert main(argv) == 2
    assert "mission_b is not enabled" in capsys.readouterr().err
