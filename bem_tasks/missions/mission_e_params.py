"""Typed parameters of Mission E (Long-Memory): the `params` block of its experiment file.

Light on purpose (pydantic only, no torch): `bem-fleet validate` and the DAG files import it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from bem_tasks.config.schema import Strict, TrainingSpec
from bem_tasks.missions.mission_a_params import RuntimeSpec

Kind = Literal["single", "multihop"]


class BackboneSpec(Strict):
    """The windowed LM (bem_tasks.core.long_memory), built from this config in every profile:
    streaming a local transformers checkpoint through the window is not implemented (D26)."""

    d_model: PositiveInt = 64
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    window: PositiveInt = 256  # tokens a chunk sees before it, without memory
    chunk: PositiveInt = 128  # tokens processed together; window must be a multiple of it

    @model_validator(mode="after")
    def _shape(self) -> BackboneSpec:
        if self.d_model % self.n_head:
            raise ValueError(
                f"backbone.d_model={self.d_model} must be a multiple of n_head={self.n_head}"
            )
        if self.window % self.chunk:
            raise ValueError(
                f"backbone.window={self.window} must be a multiple of backbone.chunk={self.chunk}"
            )
        return self


class RecallSpec(Strict):
    """The recall module both systems train (the memory system also reads evicted pairs)."""

    d_mem: PositiveInt = 32  # width of its embeddings, keys and values
    kernel: PositiveInt = 12  # short causal convolution that builds keys and queries
    slots: PositiveInt = 64  # evicted pairs the memory keeps (largest write gate)
    # loss = CE(answer) + lm_weight * CE(lm_positions random positions per row)
    #        + write_sparsity * mean write gate (keep the memory for what is worth keeping)
    lm_weight: NonNegativeFloat = 0.1
    lm_positions: PositiveInt = 32
    write_sparsity: NonNegativeFloat = 0.05


class BemSpec(Strict):
    """The BEM layer the recall read goes through (router on the read, experts into the model)."""

    num_experts: PositiveInt = 4
    rank: PositiveInt = 4
    alpha: PositiveFloat = 16.0
    trust_budget: PositiveFloat | None = None


class DataSpec(Strict):
    """Suite E (bem_tasks.data.suites.long_context); one seeded draw in prepare."""

    seed: int = 0
    train_lengths: list[PositiveInt] = Field(default=[512, 768], min_length=1)
    eval_lengths: list[PositiveInt] = Field(default=[1024, 2048, 4096], min_length=1)
    depths: list[float] = Field(default=[0.1, 0.5, 0.9], min_length=1)
    kinds: list[Kind] = Field(default=["single", "multihop"], min_length=1)
    n_train_per_cell: PositiveInt = 40
    n_dev_per_cell: PositiveInt = 1
    n_test_per_cell: PositiveInt = 6
    n_keys: PositiveInt = 100
    n_distractors: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _depths(self) -> DataSpec:
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"data.depths must lie in [0, 1], got {bad}")
        return self


class PretrainSpec(TrainingSpec):
    crop: PositiveInt = 384  # tokens per training row (a random span of a train item)


class TrainingBlock(Strict):
    pretrain: PretrainSpec  # the shared backbone, LM loss, per seed
    memory_coupling: TrainingSpec  # each system's recall module + BEM layer, same batches


class EvaluateSpec(Strict):
    parity_tolerance: PositiveFloat = 0.05  # trainable parameters, memory vs kv_only
    latency_warmup: int = Field(2, ge=0)  # items streamed before timing starts


class MissionEParams(Strict):
    runtime: RuntimeSpec = RuntimeSpec()
    backbone: BackboneSpec = BackboneSpec()
    recall: RecallSpec = RecallSpec()
    bem: BemSpec = BemSpec()
    data: DataSpec = DataSpec()
    training: TrainingBlock
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="after")
    def _lengths(self) -> MissionEParams:
        w = self.backbone.window
        short = [n for n in self.data.train_lengths if n <= w + self.backbone.chunk]
        if short:
            raise ValueError(
                f"data.train_lengths {short} must exceed backbone.window + chunk "
                f"({w + self.backbone.chunk}): no training item would put a needle beyond the window"
            )
        if self.training.pretrain.crop > min(self.data.train_lengths):
            raise ValueError(
                f"training.pretrain.crop={self.training.pretrain.crop} is longer than the shortest "
                f"data.train_lengths ({min(self.data.train_lengths)})"
            )
        return self
