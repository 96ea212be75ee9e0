"""Mission B's micro run, shared by the Mission B test modules: every phase for seed 0 with
explicit inputs (as `bem-fleet train` does), built once per test session. Imported by
conftest.py. The micro anchor is a tiny LM on a tiny item space (so it answers enough items
exactly to fill the probe and canary sets), and the canary gate activates at any pass rate so
that `online` learns."""

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

B_PHASES = IMPLEMENTED["mission_b"].phases
B_PER_SEED = B_PHASES[1:]

MICRO_B: dict[str, Any] = {
    "runtime": {"threads": 1},
    "model": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "max_positions": 96},
    "anchor_training": {"lr": 0.01, "steps": 250, "batch_size": 16, "checkpoint_every": 250},
    "data": {
        "n_keys": 4,
        "min_facts": 2,
        "max_facts": 2,
        "value_min": 0,
        "value_max": 9,
        "ops": ["copy", "max"],
        "anchor_train": 200,
        "n_stream": 160,
        "inject_at": 32,
        "n_probe_pool": 30,
        "n_probe": 10,
        "n_variant_test": 10,
        "n_heldout": 12,
        "n_canary_pool": 30,
        "n_canary": 10,
        "n_drift": 8,
        "min_probes": 3,
        "min_canaries": 3,
    },
    "controller": {"sites": ["attn.c_proj", "mlp.c_proj"], "rank": 2},
    "stream": {
        "shadow_until": 64,
        "update_every": 8,
        "replay_batch": 4,
        "probe_every": 16,
        "checkpoint_every": 2,
    },
    "online": {"fisher_batches": 2, "fisher_batch_size": 4},
    "canary": {"activation_threshold": 0.0, "rollback_below": 0.0, "canary_every": 32},
    "drift": {
        "kl_max": 1e6,
        "param_distance_max": 1e6,
        "grad_norm_max": 1e6,
        "spectral_norm_max": 1e6,
    },
    "fix": {"window": 2, "threshold": 0.5},
    "evaluate": {
        "max_new_tokens": 24,
        "batch_size": 16,
        "latency_warmup": 1,
        "latency_examples": 4,
    },
    "targets": {"time_to_fix": 100},
}


def write_micro_b_project(root: Path, params: dict[str, Any] | None = None) -> Path:
    """A copy of configs/ and experiments/ with mission_b enabled and its smoke profile set to
    ``params`` (default: the micro config)."""
    from tests.missions.conftest import write_micro_project

    arch = write_micro_project(root)
    text = arch.read_text()
    text = re.sub(r"(  mission_b:\n(?:    .*\n)*?    enabled: )false[^\n]*", r"\1true", text)
    arch.write_text(text)
    path = root / "experiments" / "mission_b_living_model.yml"
    doc = yaml.safe_load(path.read_text())
    doc["profiles"]["smoke"] = {"params": copy.deepcopy(params or MICRO_B)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return arch


@dataclass
class MicroB:
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
        given = {q: self.dirs[q] for q in B_PHASES[: B_PHASES.index(phase)] if q in self.dirs}
        return PhaseContext(
            "mission_b",
            phase,
            seed if phase in B_PER_SEED else None,
            cfg or self.cfg,
            out,
            inputs=given | (inputs or {}),
        )


def load_b_config(root: Path, params: dict[str, Any] | None = None) -> FleetConfig:
    return load_fleet(write_micro_b_project(root, params), "smoke")


@pytest.fixture(scope="session")
def micro_b(tmp_path_factory: pytest.TempPathFactory) -> MicroB:
    tmp = tmp_path_factory.mktemp("mission_b")
    run = MicroB(load_b_config(tmp / "project"), {}, {}, tmp)
    for phase in B_PHASES:
        out = tmp / "run" / phase
        execute(run.ctx(phase, out), config_hash="micro")
        run.dirs[phase] = out
        run.metrics[phase] = json.loads((out / "metrics.json").read_text())
    return run
