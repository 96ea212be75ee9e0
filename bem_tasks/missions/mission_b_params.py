"""Typed parameters of Mission B (Living Model): the `params` block of its experiment file.

Light on purpose (pydantic only, no torch): `bem-fleet validate` and the DAG files import it.
Every block forbids unknown keys, so a typo in the experiment file is an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from bem_tasks.config.schema import ModelSpec, Strict, TrainingSpec
from bem_tasks.missions.mission_a_params import ALL_OPS, Op, RuntimeSpec, check_item_ranges


class DriftThresholds(Strict):
    """Upper bounds on the drift monitors; exceeding any one trips a rollback."""

    kl_max: PositiveFloat
    param_distance_max: PositiveFloat
    grad_norm_max: PositiveFloat
    spectral_norm_max: PositiveFloat


class DataSpec(Strict):
    """The item space (must equal Mission A's data block when B anchors on A's base model), the
    own anchor's training set, and the feedback stream's sizes. Everything is drawn once in
    prepare (not per seed) from one seeded call, so all files are content-disjoint."""

    seed: int = 0
    n_keys: PositiveInt = 6
    min_facts: PositiveInt = 2
    max_facts: PositiveInt = 3
    value_min: int = 0
    value_max: int = 9
    ops: list[Op] = Field(default_factory=lambda: list(ALL_OPS))
    anchor_train: PositiveInt = 2000  # Suite A train items for the own anchor (unused with A's)
    n_stream: PositiveInt
    inject_at: int = Field(ge=1)  # t0: the first prompt that may be the variant
    variant: Literal["result_key", "reversed_op"] = "result_key"
    variant_rate: float = Field(0.5, gt=0, le=1)
    # held-out variant items drawn; those whose regular form the anchor answers exactly become
    # the probes (at most n_probe), so a probe fails only through the injected convention
    n_probe_pool: PositiveInt
    n_probe: PositiveInt
    n_variant_test: PositiveInt  # the final evaluation's variant items (unfiltered)
    n_heldout: PositiveInt  # the final evaluation's regular items
    n_canary_pool: PositiveInt  # regular items; those the anchor answers exactly are canaries
    n_canary: PositiveInt
    n_drift: PositiveInt  # regular items for the KL drift monitor
    min_anchor_probe_failure: float = Field(0.9, ge=0, le=1)  # else: the variant was not injected
    min_probes: PositiveInt = 20
    min_canaries: PositiveInt = 20

    @model_validator(mode="after")
    def _ranges(self) -> DataSpec:
        check_item_ranges(self)
        if not self.inject_at < self.n_stream:
            raise ValueError(
                f"data.inject_at={self.inject_at} must be < data.n_stream={self.n_stream}"
            )
        for pool, n in (("n_probe_pool", "n_probe"), ("n_canary_pool", "n_canary")):
            if getattr(self, n) > getattr(self, pool):
                raise ValueError(f"data.{n} must be <= data.{pool}")
        return self


class ControllerSpec(Strict):
    """The learner's only trainable part: a BEM module bolted onto the frozen anchor (router,
    codes, low-rank U/V; U starts at zero, so the learner starts equal to the anchor).
    `chunk_size: 1` and `tau: 0` make teacher-forced routing equal to cached greedy decoding's,
    which is what lets greedy_exact stand in for a decode."""

    sites: list[str] = Field(default_factory=lambda: ["attn.c_proj", "mlp.c_proj"])
    num_experts: PositiveInt = 2
    rank: PositiveInt = 4
    alpha: PositiveFloat = 8.0
    chunk_size: Literal[1] = 1
    tau: float = Field(0.0, ge=0, le=0)
    trust_budget: PositiveFloat | None = 1.0
    routing: Literal["soft", "straight_through"] = "straight_through"


class StreamSpec(Strict):
    """The stream engine shared by shadow, online and soak. Shadow covers prompts
    [0, shadow_until), online [shadow_until, n_stream). Every `update_every` prompts: one AdamW
    step on the controller over those prompts plus `replay_batch` prioritized-replay draws."""

    shadow_until: PositiveInt
    update_every: PositiveInt = 8
    replay_batch: int = Field(8, ge=0)
    replay_capacity: PositiveInt = 512
    lr: PositiveFloat = 0.003
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: PositiveFloat | None = 1.0
    probe_every: PositiveInt = 50  # prompts between ProbeEvals of the learner
    checkpoint_every: PositiveInt = 20  # updates between resumable checkpoints
    keep_checkpoints: PositiveInt = 2
    batch_size: PositiveInt = 64  # examples per greedy_exact forward


class OnlineSpec(Strict):
    """Online loss = CE + ewc_lambda * EWC (diagonal Fisher of the anchor task: regular pre-t0
    stream items at the promoted weights) + prox_lambda * ||theta - theta_promoted||^2 / 2."""

    ewc_lambda: float = Field(100.0, ge=0)
    prox_lambda: float = Field(0.01, ge=0)
    fisher_batches: PositiveInt = 16
    fisher_batch_size: PositiveInt = 8


class CanarySpec(Strict):
    """`activation_threshold`: canary pass rate the shadow learner needs to be activated;
    `rollback_below`: an online canary check below it rolls back to the last good weights."""

    activation_threshold: float = Field(0.9, ge=0, le=1)
    rollback_below: float = Field(0.8, ge=0, le=1)
    canary_every: PositiveInt = 100


class FixSpec(Strict):
    """time_to_fix: prompts after t0 until the pooled probe failure rate of the last `window`
    probe evaluations falls below `threshold` (living.time_to_fix)."""

    window: PositiveInt = 3
    threshold: float = Field(0.2, gt=0, le=1)


class EvaluateSpec(Strict):
    max_new_tokens: PositiveInt = 40
    batch_size: PositiveInt = 64
    latency_warmup: int = Field(2, ge=0)
    latency_examples: PositiveInt = 50


class Targets(Strict):
    time_to_fix: PositiveInt = 1000  # the gate's threshold, used here to check the horizon


class MissionBParams(Strict):
    runtime: RuntimeSpec = RuntimeSpec()
    model: ModelSpec  # the own anchor's architecture, or model.path: a local model directory
    anchor_training: TrainingSpec  # the own anchor's pretraining (the fleet's base-LM recipe)
    data: DataSpec
    controller: ControllerSpec = ControllerSpec()
    stream: StreamSpec
    online: OnlineSpec = OnlineSpec()
    canary: CanarySpec = CanarySpec()
    drift: DriftThresholds
    fix: FixSpec = FixSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    targets: Targets = Targets()

    @model_validator(mode="after")
    def _stream(self) -> MissionBParams:
        d, s = self.data, self.stream
        if not d.inject_at < s.shadow_until < d.n_stream:
            raise ValueError(
                f"need data.inject_at < stream.shadow_until < data.n_stream, got {d.inject_at}, "
                f"{s.shadow_until}, {d.n_stream}"
            )
        every = s.update_every
        for key, value in (
            ("stream.shadow_until", s.shadow_until),
            ("data.n_stream", d.n_stream),
            ("stream.probe_every", s.probe_every),
            ("canary.canary_every", self.canary.canary_every),
        ):
            if value % every:
                raise ValueError(
                    f"{key}={value} must be a multiple of stream.update_every={every}: the stream "
                    "engine works in whole updates"
                )
        if self.fix.threshold > d.min_anchor_probe_failure:
            raise ValueError(
                f"fix.threshold={self.fix.threshold} must be <= data.min_anchor_probe_failure="
                f"{d.min_anchor_probe_failure}: else an anchor that fails fewer probes than the "
                "threshold passes prepare and counts as fixed from the first window"
            )
        horizon = d.n_stream - d.inject_at
        if horizon <= self.targets.time_to_fix:
            raise ValueError(
                f"data.n_stream - data.inject_at = {horizon} prompts observed after t0 must exceed "
                f"targets.time_to_fix={self.targets.time_to_fix}: otherwise a never-fixed run's "
                "censored time_to_fix could pass the gate"
            )
        return self
