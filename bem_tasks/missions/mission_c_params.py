"""Typed parameters of Mission C (Alignment Enforcer): the `params` block of its experiment file.

Light on purpose (pydantic only, no torch): `bem-fleet validate` and the DAG files import it.
Every block forbids unknown keys, so a typo in the experiment file is an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from bem_tasks.config.schema import ModelSpec, Strict, TrainingSpec
from bem_tasks.missions.mission_a_params import ALL_OPS, Op, RuntimeSpec, check_item_ranges
from bem_tasks.missions.mission_b_params import ControllerSpec

# Kept in step with bem_tasks.data.suites.safety.CATEGORIES (a test checks); not imported from
# there so that this module stays light.
Category = Literal["weapons", "malware", "self_harm", "fraud"]
ALL_CATEGORIES: tuple[Category, ...] = ("weapons", "malware", "self_harm", "fraud")
Suite = Literal["test", "red_team"]  # test is gated (slice_b), red_team reported on its own
SUITES: tuple[Suite, ...] = ("test", "red_team")


class DataSpec(Strict):
    """Suite C sizes (each split mixed harmful/benign by `harmful_fraction`), the red-team split
    (harmful, held out by template) and the benign rows' compositional item space."""

    seed: int = 0
    n_train: PositiveInt
    n_dev: PositiveInt
    n_test: PositiveInt
    n_red_team: PositiveInt
    harmful_fraction: float = Field(0.5, gt=0, lt=1)
    categories: list[Category] = Field(default_factory=lambda: list(ALL_CATEGORIES), min_length=1)
    n_keys: PositiveInt = 6
    min_facts: PositiveInt = 2
    max_facts: PositiveInt = 3
    value_min: int = 0
    value_max: int = 9
    ops: list[Op] = Field(default_factory=lambda: list(ALL_OPS))

    @model_validator(mode="after")
    def _ranges(self) -> DataSpec:
        check_item_ranges(self)
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"data.categories has duplicates: {self.categories}")
        return self


# The task experts: a BEM module (K experts, own controller) on the frozen base, trained on the
# benign utility tasks in pretrain_base; the same settings (and token-level routing, so that
# teacher-forced routing equals cached greedy decoding's) as Mission B's controller.
ExpertsSpec = ControllerSpec


class Stage(Strict):
    """One curriculum stage: `steps` optimiser steps whose harmful batch is
    round(batch_size * harmful_fraction) rows drawn from `categories` (None: all of them)."""

    steps: PositiveInt
    harmful_fraction: float = Field(gt=0, lt=1)
    categories: list[Category] | None = None


class SafetySpec(Strict):
    """The safety basis and its Lagrangian (see mission_c's docstring).

    loss = utility CE + lambda * (v - epsilon) + orthogonality_weight * overlap; after each step
    lambda <- max(0, lambda + dual_lr * (v - epsilon)). `init: task_subspace` starts the basis
    inside the task experts' subspace (a test's failing candidate; with `orthogonality_weight:
    0` nothing pulls it out)."""

    rank: PositiveInt = 4
    alpha: PositiveFloat = 8.0
    epsilon: float = Field(0.05, ge=0, lt=1)
    dual_lr: PositiveFloat = 0.5
    lambda_init: float = Field(1.0, ge=0)
    orthogonality_weight: float = Field(10.0, ge=0)
    init: Literal["random", "task_subspace"] = "random"
    serve_knob: float = Field(1.0, gt=0, le=1)  # the candidate `safety` serves at this knob
    curriculum: list[Stage] = Field(min_length=1)


class EvaluateSpec(Strict):
    """Greedy decodes of every example of `suites` (test: gated slice_b; red_team: its own
    reported slice); latency on the first `latency_examples` test items (batch 1,
    interleaved)."""

    suites: list[Suite] = Field(default_factory=lambda: list(SUITES), min_length=1)
    max_new_tokens: PositiveInt = 40
    batch_size: PositiveInt = 64
    latency_warmup: int = Field(2, ge=0)
    latency_examples: PositiveInt = 60


class KnobSweepSpec(Strict):
    """Violation and EM per knob value on the first `examples` harmful and benign test items."""

    knob_values: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    examples: PositiveInt = 100

    @model_validator(mode="after")
    def _values(self) -> KnobSweepSpec:
        v = self.knob_values
        if len(v) < 2 or any(not 0.0 <= x <= 1.0 for x in v) or v != sorted(set(v)):
            raise ValueError(
                f"knob_sweep.knob_values must be at least two distinct increasing values in "
                f"[0, 1], got {v}"
            )
        return self


class TrainingBlocks(Strict):
    pretrain_base: TrainingSpec  # the unsafe base LM (benign answers + harmful compliance)
    experts: TrainingSpec  # the task experts on benign items, base frozen
    safety: TrainingSpec  # the safety basis; its steps must equal the curriculum's


class MissionCParams(Strict):
    runtime: RuntimeSpec = RuntimeSpec()
    model: ModelSpec
    data: DataSpec
    experts: ExpertsSpec = ExpertsSpec()
    safety: SafetySpec
    training: TrainingBlocks
    evaluate: EvaluateSpec = EvaluateSpec()
    knob_sweep: KnobSweepSpec = KnobSweepSpec()

    @model_validator(mode="after")
    def _curriculum(self) -> MissionCParams:
        total = sum(s.steps for s in self.safety.curriculum)
        if total != self.training.safety.steps:
            raise ValueError(
                f"safety.curriculum stages sum to {total} steps but training.safety.steps="
                f"{self.training.safety.steps}: the curriculum must cover the whole run"
            )
        bs = self.training.safety.batch_size
        for i, s in enumerate(self.safety.curriculum):
            n_h = round(bs * s.harmful_fraction)
            if not 1 <= n_h < bs:
                raise ValueError(
                    f"safety.curriculum[{i}].harmful_fraction={s.harmful_fraction} gives {n_h} "
                    f"harmful rows of training.safety.batch_size={bs}: need 1..{bs - 1}"
                )
            bad = [c for c in s.categories or [] if c not in self.data.categories]
            if bad:
                raise ValueError(
                    f"safety.curriculum[{i}].categories {bad} are not in data.categories "
                    f"{self.data.categories}"
                )
        if self.model.path is not None:
            raise ValueError(
                "model.path: Mission C trains its own unsafe base (pretrain_base); a local model "
                "directory is not supported yet"
            )
        return self
