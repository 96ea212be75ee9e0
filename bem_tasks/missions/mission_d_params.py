"""Typed parameters of Mission D (SEP): the `params` block of its experiment file.

Light on purpose (pydantic only, no torch): `bem-fleet validate` and the DAG files import it.
The variant list has one source, the `pretrain` phase's `variants`; `check_phases` (called by
the config loader) requires `invariance.variants` to name exactly those variants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from bem_tasks.config.schema import ModelSpec, Strict, TrainingSpec
from bem_tasks.missions.mission_a_params import RuntimeSpec

Scrambler = Literal["relabel", "shuffle", "synonym", "entity"]
OodSplit = Literal["ood_synonym", "ood_entity", "ood_template"]
OOD_SPLITS: tuple[OodSplit, ...] = ("ood_synonym", "ood_entity", "ood_template")
SCRAMBLERS: tuple[Scrambler, ...] = ("relabel", "shuffle", "synonym", "entity")
MAPPED_PHASE = "pretrain"


class DataSpec(Strict):
    """Suite D sizes; one seeded draw in prepare (not per seed)."""

    seed: int = 0
    n_train: PositiveInt = 2000
    n_dev: PositiveInt = 100
    n_test: PositiveInt = 200
    n_ood: PositiveInt = 200
    min_facts: PositiveInt = 2
    max_facts: PositiveInt = 3

    @model_validator(mode="after")
    def _facts(self) -> DataSpec:
        if not self.min_facts <= self.max_facts <= 10:
            raise ValueError(
                f"need data.min_facts <= data.max_facts <= 10 (verbs in the lexicon), got "
                f"{self.min_facts}, {self.max_facts}"
            )
        return self


class InvarianceSpec(Strict):
    """Per variant: scrambler -> weight of its consistency (KL) term. The weight ramps linearly
    from 0 at `thaw_start` to full at `thaw_end` (steps); before `thaw_start` no extra forward
    runs. A step runs at most two extra forwards: one for the bijective scramblers (relabel,
    synonym, entity; one of them per step, in turn) and one for shuffle."""

    thaw_start: int = Field(0, ge=0)
    thaw_end: int = Field(0, ge=0)
    # rows of each step's batch that get scrambled views (None: all); fewer rows make the
    # consistency terms cheaper (each view costs a forward and backward of its rows)
    view_batch_size: PositiveInt | None = None
    variants: dict[str, dict[Scrambler, NonNegativeFloat]] = Field(min_length=1)

    @model_validator(mode="after")
    def _thaw(self) -> InvarianceSpec:
        if self.thaw_end < self.thaw_start:
            raise ValueError(
                f"invariance.thaw_end={self.thaw_end} must be >= invariance.thaw_start="
                f"{self.thaw_start}"
            )
        return self


class EvaluateSpec(Strict):
    scramblers: list[Scrambler] = Field(default=list(SCRAMBLERS), min_length=1)
    scramble_seed: int = 10_000  # example i is scrambled with seed scramble_seed + i
    ood_splits: list[OodSplit] = Field(default=list(OOD_SPLITS), min_length=1)
    max_new_tokens: PositiveInt = 8
    batch_size: PositiveInt = 128
    candidate: str = "pt4"
    baseline: str = "pt1"


class MissionDParams(Strict):
    runtime: RuntimeSpec = RuntimeSpec()
    model: ModelSpec
    data: DataSpec = DataSpec()
    pretraining: TrainingSpec
    invariance: InvarianceSpec
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="after")
    def _systems(self) -> MissionDParams:
        e = self.evaluate
        for key, name in (("candidate", e.candidate), ("baseline", e.baseline)):
            if name not in self.invariance.variants:
                raise ValueError(
                    f"evaluate.{key}={name!r} is not a variant of invariance.variants "
                    f"({list(self.invariance.variants)})"
                )
        k = self.invariance.view_batch_size
        if k is not None and k > self.pretraining.batch_size:
            raise ValueError(
                f"invariance.view_batch_size={k} must be <= pretraining.batch_size="
                f"{self.pretraining.batch_size}"
            )
        if len(set(e.scramblers)) != len(e.scramblers):
            raise ValueError(f"evaluate.scramblers has duplicates: {e.scramblers}")
        return self

    def check_phases(self, phases: Mapping[str, Any]) -> list[str]:
        """Problems between these params and the experiment's phases (the loader reports them)."""
        spec = phases.get(MAPPED_PHASE)
        declared = getattr(spec, "variants", None)
        if declared is None:
            return [f"phases.{MAPPED_PHASE} must declare `variants` (mission_d maps it over them)"]
        if sorted(declared) != sorted(self.invariance.variants):
            return [
                f"invariance.variants names {sorted(self.invariance.variants)} but "
                f"phases.{MAPPED_PHASE}.variants is {declared}: they must name the same variants"
            ]
        return []
