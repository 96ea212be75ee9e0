"""Mission A's micro run, shared by every Mission A test module: all phases for seed 0 with
explicit inputs (as `bem-fleet train` does), built once per test session."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.phases import PhaseContext, execute
from bem_tasks.missions import common, mission_a
from bem_tasks.missions.registry import IMPLEMENTED

ROOT = Path(__file__).resolve().parents[2]
PHASES = IMPLEMENTED["mission_a"].phases
PER_SEED = PHASES[2:]

MICRO = {
    "runtime": {"threads": 1},
    "model": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_positions": 96},
    "bem": {"rank": 2, "chunk_size": 2},
    "data": {
        "n_train": 96,
        "n_dev": 8,
        "n_test": 8,
        "n_keys": 4,
        "min_facts": 2,
        "max_facts": 2,
        "value_max": 5,
    },
    "training": {
        # 100 steps: enough for the base to emit the answer format, so rollouts carry reward
        "pretrain_base": {"lr": 0.003, "steps": 100, "batch_size": 16, "checkpoint_every": 10},
        "train_experts": {"steps": 10, "batch_size": 8, "checkpoint_every": 4},
        "behavioral_cloning": {"lr": 0.01, "steps": 150, "batch_size": 64, "checkpoint_every": 50},
        "policy_gradient": {"lr": 0.001, "steps": 3, "batch_size": 4, "checkpoint_every": 1},
    },
    "tuning": {"grid": {"lr": [0.003, 0.01], "alpha": [4.0, 16.0]}, "steps": 3},
    "router": {"hidden": 16, "bc_examples": None},
    "evaluate": {
        "max_new_tokens": 32,
        "batch_size": 4,
        "latency_warmup": 1,
        "latency_examples": 8,
        "kv_contexts": 8,
        "kv_questions": 4,
    },
}


def write_micro_project(root: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of configs/ and experiments/ whose mission_a smoke profile is the micro config."""
    for name in ("configs", "experiments"):
        shutil.copytree(ROOT / name, root / name, dirs_exist_ok=True)
    path = root / "experiments" / "mission_a_agentic_planner.yml"
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["smoke"] = {"params": copy.deepcopy(MICRO)}
    if edit:
        edit(doc["profiles"]["smoke"]["params"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "configs" / "bem_fleet_architecture.yml"


@dataclass
class MicroRun:
    cfg: FleetConfig
    dirs: dict[str, Path]
    metrics: dict[str, dict]
    tmp: Path

    def ctx(self, phase: str, out: Path, seed: int | None = 0, cfg: FleetConfig | None = None):
        inputs = {q: self.dirs[q] for q in PHASES[: PHASES.index(phase)]}
        return PhaseContext(
            "mission_a",
            phase,
            seed if phase in PER_SEED else None,
            cfg or self.cfg,
            out,
            inputs=inputs,
        )


@pytest.fixture(scope="session")
def micro(tmp_path_factory: pytest.TempPathFactory) -> MicroRun:
    tmp = tmp_path_factory.mktemp("mission_a")
    cfg = load_fleet(write_micro_project(tmp / "project"), "smoke")
    run = MicroRun(cfg, {}, {}, tmp)
    for phase in PHASES:
        out = tmp / "run" / phase
        execute(run.ctx(phase, out), config_hash="micro")
        run.dirs[phase] = out
        run.metrics[phase] = json.loads((out / "metrics.json").read_text())
    return run


def load_router_system(run: MicroRun):
    ctx = run.ctx("evaluate", run.tmp / "unused")
    p = mission_a._params(ctx)
    model, codec = mission_a._experts_system(ctx, p)
    return ctx, p, model, codec


def kl_overrun(params: dict) -> None:
    """PPO whose every step leaves a tiny KL region: lr 50 with an entropy bonus (a non-zero
    gradient even when every reward is equal); the step shrinks 50 -> 25 -> 15 (the floor)."""
    params["training"]["policy_gradient"]["lr"] = 50.0
    params["policy_gradient"] = {
        "kl_bound": 1e-4,
        "kl_coef": 0.0,
        "entropy_coef": 1.0,
        "lr_shrink": 0.5,
        "min_lr_fraction": 0.3,
    }


def run_interrupted(ctx: PhaseContext, loop: str, step: int) -> None:
    """Run a phase that a simulated worker crash stops right after training loop ``loop``
    reports ``step`` (its checkpoint of that step, if any, is written), then run it again to
    the end, as a retried task does."""
    real = common.progress

    def crash(ctx: PhaseContext, name: str, at: int, total: int, **values: float) -> None:
        real(ctx, name, at, total, **values)
        if name == loop and at == step:
            raise RuntimeError("simulated worker crash")

    with pytest.MonkeyPatch.context() as patch:
        for module in (common, mission_a):  # the shared training loop and PPO's own loop
            patch.setattr(module, "progress", crash)
        with pytest.raises(RuntimeError, match="simulated worker crash"):
            execute(ctx, config_hash="micro")
    assert not (ctx.out_dir / "manifest.json").exists()
    execute(ctx, config_hash="micro")


from tests.missions.conftest_b import micro_b  # noqa: E402,F401  (Mission B's micro run)
