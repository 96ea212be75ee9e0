"""Mission E's micro run: prepare, train_memory_coupling and long_context_evaluation (seed 0)
with explicit inputs (as `bem-fleet train` does), built once per test module that asks for it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.phases import PhaseContext, execute
from bem_tasks.missions.registry import IMPLEMENTED

E_PHASES = IMPLEMENTED["mission_e"].phases

MICRO_E: dict[str, Any] = {
    "runtime": {"threads": 1},
    "backbone": {"d_model": 32, "n_layer": 2, "n_head": 2, "window": 64, "chunk": 32},
    "recall": {"d_mem": 16, "kernel": 8, "slots": 8, "lm_positions": 8},
    "bem": {"num_experts": 2, "rank": 2},
    "data": {
        "train_lengths": [192, 224],
        "eval_lengths": [256, 512],
        "depths": [0.1, 0.95],
        "n_train_per_cell": 6,
        "n_test_per_cell": 4,
        "n_keys": 30,
        "n_distractors": 1,
    },  # fmt: skip
    "training": {
        "pretrain": {"lr": 0.003, "steps": 10, "batch_size": 4, "crop": 96, "checkpoint_every": 5},
        "memory_coupling": {"lr": 0.01, "steps": 30, "batch_size": 8, "checkpoint_every": 10},
    },
    "evaluate": {"latency_warmup": 1},
}


def write_micro_e_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """A copy of configs/ and experiments/ with mission_e's smoke params replaced."""
    from tests.missions.conftest import write_micro_project

    arch = write_micro_project(root)
    path = root / "experiments" / "mission_e_long_memory.yml"
    doc = yaml.safe_load(path.read_text())
    doc["params"] = copy.deepcopy(params or MICRO_E)
    doc["profiles"]["smoke"] = {}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return arch


@dataclass
class MicroE:
    cfg: FleetConfig
    run: Path  # holds prepare/, train_memory_coupling/, long_context_evaluation/
    metrics: dict[str, dict]

    def ctx(self, phase: str, out: Path, options: dict[str, Any] | None = None) -> PhaseContext:
        inputs = {q: self.run / q for q in E_PHASES[: E_PHASES.index(phase)]}
        seed = None if phase == "prepare" else 0
        return PhaseContext(
            "mission_e", phase, seed, self.cfg, out, inputs=inputs, options=options or {}
        )


@pytest.fixture(scope="module")
def micro_e(tmp_path_factory: pytest.TempPathFactory) -> MicroE:
    tmp = tmp_path_factory.mktemp("mission_e")
    run = MicroE(load_fleet(write_micro_e_project(tmp / "project"), "smoke"), tmp / "run", {})
    for phase in E_PHASES:
        out = run.run / phase
        execute(run.ctx(phase, out), config_hash="micro")
        run.metrics[phase] = json.loads((out / "metrics.json").read_text())
    return run
