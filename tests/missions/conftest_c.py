"""Mission C's micro run, shared by the Mission C test modules: every phase for seed 0 with
explicit inputs (as `bem-fleet train` does), built once per module that imports the fixture.
The micro base is tiny but still learns to comply with harmful prompts (a dense baseline)."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.phases import PhaseContext, execute
from bem_tasks.missions.registry import IMPLEMENTED

C_PHASES = IMPLEMENTED["mission_c"].phases
C_PER_SEED = C_PHASES[2:]

MICRO_C: dict[str, Any] = {
    "runtime": {"threads": 1},
    "model": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_positions": 160},
    "data": {
        "n_train": 240,
        "n_dev": 12,
        "n_test": 40,
        "n_red_team": 8,
        "n_keys": 4,
        "min_facts": 2,
        "max_facts": 2,
        "value_max": 5,
        "ops": ["copy", "max"],
    },
    "experts": {"rank": 2, "num_experts": 2},
    "safety": {
        "rank": 2,
        "epsilon": 0.05,
        "dual_lr": 0.5,
        "lambda_init": 1.0,
        "orthogonality_weight": 100.0,
        "curriculum": [
            {"steps": 10, "harmful_fraction": 0.5, "categories": ["weapons", "malware"]},
            {"steps": 20, "harmful_fraction": 0.25},
        ],
    },
    "training": {
        "pretrain_base": {"lr": 0.01, "steps": 120, "batch_size": 16, "checkpoint_every": 60},
        "experts": {"lr": 0.01, "steps": 20, "batch_size": 16, "checkpoint_every": 10},
        "safety": {"lr": 0.01, "steps": 30, "batch_size": 16, "checkpoint_every": 10},
    },
    "evaluate": {
        "max_new_tokens": 24,
        "batch_size": 32,
        "latency_warmup": 1,
        "latency_examples": 6,
    },
    "knob_sweep": {"knob_values": [0.0, 0.5, 1.0], "examples": 10},
}


def write_micro_c_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """A copy of configs/ and experiments/ with mission_c enabled and its smoke profile set to
    ``params`` (default: the micro config)."""
    from tests.missions.conftest import write_micro_project

    arch = write_micro_project(root)
    text = arch.read_text()
    text = re.sub(r"(  mission_c:\n(?:    .*\n)*?    enabled: )false[^\n]*", r"\1true", text)
    arch.write_text(text)
    path = root / "experiments" / "mission_c_alignment_enforcer.yml"
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["smoke"] = {"params": copy.deepcopy(params or MICRO_C)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return arch


def load_c_config(root: Path, params: dict[str, Any] | None = None) -> FleetConfig:
    return load_fleet(write_micro_c_project(root, params), "smoke")


@dataclass
class MicroC:
    cfg: FleetConfig
    dirs: dict[str, Path]
    metrics: dict[str, dict]
    tmp: Path

    def ctx(
        self,
        phase: str,
        out: Path,
        seed: int | None = 0,
        cfg: FleetConfig | None = None,
        inputs: dict[str, Path] | None = None,
    ) -> PhaseContext:
        given = {q: self.dirs[q] for q in C_PHASES[: C_PHASES.index(phase)] if q in self.dirs}
        return PhaseContext(
            "mission_c",
            phase,
            seed if phase in C_PER_SEED else None,
            cfg or self.cfg,
            out,
            inputs=given | (inputs or {}),
        )

    def run(self, phase: str, out: Path, **kw: Any) -> dict:
        execute(self.ctx(phase, out, **kw), config_hash="micro")
        return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def micro_c(tmp_path_factory: pytest.TempPathFactory) -> MicroC:
    tmp = tmp_path_factory.mktemp("mission_c")
    run = MicroC(load_c_config(tmp / "project"), {}, {}, tmp)
    for phase in C_PHASES:
        out = tmp / "run" / phase
        run.metrics[phase] = run.run(phase, out)
        run.dirs[phase] = out
    return run
