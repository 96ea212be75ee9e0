"""Typed parameters of Mission A (Agentic Planner): the `params` block of its experiment file.

Light on purpose (pydantic only, no torch): `bem-fleet validate` and the DAG files import it.
Every block forbids unknown keys, so a typo in the experiment file is an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from bem_tasks.config.schema import BemSpec, ModelSpec, StepsSpec, Strict, TrainingSpec

# Kept in step with bem_tasks.data.suites.compositional.OPS (a test checks); not imported from
# there so that this module stays light.
Op = Literal["add", "sub", "max", "min", "copy", "sort"]
ALL_OPS: tuple[Op, ...] = ("add", "sub", "max", "min", "copy", "sort")


class RuntimeSpec(Strict):
    # One intra-op thread per phase: the smoke pool runs two phases at once on two cores, and
    # tiny models lose far more to thread contention than they gain from a second thread.
    threads: PositiveInt | None = 1
    dtype: Literal["float32", "bfloat16"] = "float32"


# The compositional item space; Mission B anchoring on A's base must use the same values.
ITEM_SPACE = ("n_keys", "min_facts", "max_facts", "value_min", "value_max", "ops")


def check_item_ranges(d: Any) -> None:
    """The item space's own constraints (shared by Mission A's and Mission B's data blocks)."""
    if not 2 <= d.min_facts <= d.max_facts <= d.n_keys:
        raise ValueError(
            f"need 2 <= min_facts <= max_facts <= n_keys, got {d.min_facts}, "
            f"{d.max_facts}, {d.n_keys}"
        )
    if d.value_max <= d.value_min:
        raise ValueError(f"need value_min < value_max, got {d.value_min}, {d.value_max}")
    if not d.ops:
        raise ValueError("ops must name at least one operation")


class DataSpec(Strict):
    """Suite A (bem_tasks.data compositional) sizes and item space. `sort` (a list answer) is
    on by default: it is what makes answer F1 differ from EM. prepare refuses sizes the item
    space cannot hold content-distinct."""

    seed: int = 0  # data and base-model seed (prepare / pretrain_base are not per seed)
    n_train: PositiveInt
    n_dev: PositiveInt
    n_test: PositiveInt
    n_keys: PositiveInt = 10
    min_facts: PositiveInt = 3
    max_facts: PositiveInt = 6
    value_min: int = 0
    value_max: int = 20
    ops: list[Op] = Field(default_factory=lambda: list(ALL_OPS))

    @model_validator(mode="after")
    def _ranges(self) -> DataSpec:
        check_item_ranges(self)
        return self


class TunedTrainingSpec(StepsSpec):
    """`training.train_experts`: TrainingSpec's settings without `lr`. Each system trains at
    the lr its tuning chose from `tuning.grid.lr` (systems.json `experts_lr`, `baseline_lr`)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lr(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lr" in data:
            raise ValueError(
                "lr is not used: train_experts trains each system at the lr its tuning chose "
                "from tuning.grid.lr; remove it"
            )
        return data

    def at_lr(self, lr: float) -> TrainingSpec:
        return TrainingSpec(lr=lr, **self.model_dump())


class TrainingBlocks(Strict):
    """Optimiser settings per trainable phase. `policy_gradient.steps` counts PPO updates and
    its `batch_size` the rollouts per update (constant lr, Adam: warm-up and weight decay do not
    apply there); `pretrain_base` is unused when model.path is set."""

    pretrain_base: TrainingSpec
    train_experts: TunedTrainingSpec
    behavioral_cloning: TrainingSpec
    policy_gradient: TrainingSpec


class TuningGrid(Strict):
    lr: list[PositiveFloat] = Field(min_length=1)
    alpha: list[PositiveFloat] = Field(min_length=1)


class TuningSpec(Strict):
    """One tuning budget for both train_experts systems (the experts and the fused baseline):
    every (lr, alpha) point of the grid is trained `steps` steps from the same initialisation
    (batch size and warm-up share of training.train_experts) and scored by teacher-forced dev
    loss; each system's best point is used for its full training."""

    grid: TuningGrid
    steps: PositiveInt


class RouterSpec(Strict):
    """The macro-policy router (chunk size and hysteresis tau come from the `bem` block)."""

    hidden: PositiveInt = 32
    plan_horizon: int = Field(3, ge=1, le=3)
    step_penalty: float = Field(0.01, ge=0)  # per plan segment (BC: expected, PG: realised)
    switch_penalty: float = Field(0.01, ge=0)  # per expert switch (PG reward)
    bc_examples: PositiveInt | None = None  # train items used to clone the oracle (None: all)


class PolicyGradientSpec(Strict):
    kl_bound: PositiveFloat = 0.05  # trust region: mean KL(BC || policy) on the update's states
    ppo_clip: float = Field(0.2, gt=0, lt=1)
    ppo_epochs: PositiveInt = 4
    kl_coef: float = Field(0.1, ge=0)  # KL(BC || policy) penalty inside the PPO loss
    entropy_coef: float = Field(0.0, ge=0)
    format_bonus: float = Field(0.1, ge=0)  # reward for a parsable F:{...} answer
    # An update whose step leaves the KL region is rejected and the following updates run at
    # lr * lr_shrink, never below min_lr_fraction * training.policy_gradient.lr.
    lr_shrink: float = Field(0.5, gt=0, lt=1)
    min_lr_fraction: float = Field(0.01, gt=0, le=1)


class EvaluateSpec(Strict):
    """EM/F1 and plans on every dev/test example (batched decoding; the router also with the
    horizon lock off); latency on the first `latency_examples` test items (batch 1,
    interleaved); KV reuse on a serving workload of `kv_contexts` test contexts with up to
    `kv_questions` questions each (one gate record per context: the KV gate needs at least its
    min_examples, 30, of them)."""

    max_new_tokens: PositiveInt = 48
    batch_size: PositiveInt = 64  # prompts of one length decoded together (no padding)
    latency_warmup: int = Field(3, ge=0)  # untimed decodes per system before timing
    latency_examples: PositiveInt = 200
    kv_contexts: PositiveInt = 100
    kv_questions: int = Field(4, ge=2)  # requests per shared context, the test item included


class MissionAParams(Strict):
    runtime: RuntimeSpec = RuntimeSpec()
    model: ModelSpec
    bem: BemSpec  # without alpha: tuning.grid.alpha
    data: DataSpec
    training: TrainingBlocks
    tuning: TuningSpec
    router: RouterSpec = RouterSpec()
    policy_gradient: PolicyGradientSpec = PolicyGradientSpec()
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="after")
    def _tuning(self) -> MissionAParams:
        if "alpha" in self.bem.model_fields_set:
            raise ValueError(
                "bem.alpha is not used by Mission A: each system trains at the alpha its tuning "
                "chose from tuning.grid.alpha; remove it"
            )
        full = self.training.train_experts.steps
        if self.tuning.steps > full:
            raise ValueError(
                f"tuning.steps={self.tuning.steps} exceeds training.train_experts.steps={full}: "
                "a tuning point would train longer than the full run it chooses settings for"
            )
        return self
