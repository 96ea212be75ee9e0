"""Mission D's micro run, shared by the Mission D test modules: prepare, the four pretrain
variants (seed 0) and ood_evaluation with explicit inputs (as `bem-fleet train` does), built once
per test module that requests ``micro_d``."""

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

D_PHASES = IMPLEMENTED["mission_d"].phases
VARIANTS = ["pt1", "pt2", "pt3", "pt4"]

MICRO_D: dict[str, Any] = {
    "runtime": {"threads": 1},
    "model": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_positions": 48},
    "data": {"n_train": 240, "n_dev": 10, "n_test": 40, "n_ood": 16},
    "pretraining": {"lr": 0.01, "steps": 40, "batch_size": 16, "checkpoint_every": 20},
    "invariance": {
        "thaw_start": 10,
        "thaw_end": 20,
        "view_batch_size": 8,
        "variants": {
            "pt1": {},
            "pt2": {"relabel": 1.0},
            "pt3": {"shuffle": 1.0},
            "pt4": {"relabel": 1.0, "shuffle": 1.0, "synonym": 1.0, "entity": 1.0},
        },
    },
    "evaluate": {"max_new_tokens": 7, "batch_size": 64},
}


def write_micro_d_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """A copy of configs/ and experiments/ with mission_d enabled and its smoke params."""
    from tests.missions.conftest import write_micro_project

    arch = write_micro_project(root)
    text = arch.read_text()
    text = re.sub(r"(  mission_d:\n(?:    .*\n)*?    enabled: )false[^\n]*", r"\1true", text)
    arch.write_text(text)
    path = root / "experiments" / "mission_d_sep.yml"
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["smoke"] = {"params": copy.deepcopy(params or MICRO_D)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return arch


def load_d_config(root: Path, params: dict[str, Any] | None = None) -> FleetConfig:
    return load_fleet(write_micro_d_project(root, params), "smoke")


@dataclass
class MicroD:
    cfg: FleetConfig
    run: Path  # holds prepare/, pretrain/<variant>/seed_0/, ood_evaluation/
    metrics: dict[str, dict]

    def ctx(
        self, phase: str, out: Path, variant: str | None = None, cfg: FleetConfig | None = None
    ) -> PhaseContext:
        inputs = {q: self.run / q for q in D_PHASES[: D_PHASES.index(phase)]}
        seed = None if phase == "prepare" else 0
        return PhaseContext(
            "mission_d", phase, seed, cfg or self.cfg, out, inputs=inputs, variant=variant
        )


@pytest.fixture(scope="module")
def micro_d(tmp_path_factory: pytest.TempPathFactory) -> MicroD:
    tmp = tmp_path_factory.mktemp("mission_d")
    run = MicroD(load_d_config(tmp / "project"), tmp / "run", {})
    execute(run.ctx("prepare", run.run / "prepare"), config_hash="micro")
    for v in VARIANTS:
        out = run.run / "pretrain" / v / "seed_0"
        execute(run.ctx("pretrain", out, variant=v), config_hash="micro")
        run.metrics[f"pretrain/{v}"] = json.loads((out / "metrics.json").read_text())
    for phase in ("prepare", "ood_evaluation"):
        out = run.run / phase
        if phase != "prepare":
            execute(run.ctx(phase, out), config_hash="micro")
        run.metrics[phase] = json.loads((out / "metrics.json").read_text())
    return run
