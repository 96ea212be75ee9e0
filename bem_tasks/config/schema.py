"""Typed schema of the fleet configuration (pydantic v2).

Every model forbids unknown keys so a typo is an error, not a silently ignored setting.
Cross-object rules (dependencies, cycles, device classes, implementations) live in
``bem_tasks.config.loader`` because they need several files at once.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- architecture


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local_path(v: str) -> str:
    """Artifacts need a file system (atomic renames; docs/decisions.md D17), not a URL."""
    if URL_SCHEME.match(v):
        raise ValueError(
            f"must be a local or mounted file-system path, got the URL {v!r} "
            "(object stores are not supported: mount shared storage at one path on every worker)"
        )
    return v


class Tracking(Strict):
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "bem_fleet_research"
    mode: Literal["offline", "online", "disabled"] = "offline"


class FleetSettings(Strict):
    name: str = "bem_fleet"
    artifact_root: str = "./artifacts"
    schedule: str | None = "0 2 * * *"
    default_profile: str = "smoke"
    deployment_profile: str = "smoke"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    retries: int = Field(2, ge=0)
    retry_delay_s: PositiveFloat = 30
    max_retry_delay_s: PositiveFloat = 600
    tracking: Tracking = Tracking()

    @field_validator("artifact_root")
    @classmethod
    def _local_path(cls, v: str) -> str:
        return check_local_path(v)


class DeviceClass(Strict):
    kind: Literal["cpu", "gpu"]
    devices: int = Field(
        description="Concurrent devices of this class; the Airflow pool gets this many slots."
    )
    hardware: str
    memory_gb: PositiveFloat | None = None

    @field_validator("devices")
    @classmethod
    def _at_least_one_slot(cls, v: int) -> int:
        if v < 1:
            raise ValueError(
                f"a device class is an Airflow pool and needs at least 1 slot, got {v}"
            )
        return v


class MissionRef(Strict):
    title: str
    enabled: bool = False
    experiment: str
    depends_on: list[str] = Field(default_factory=list)


class Statistics(Strict):
    # The significance level and target power live in the gates file only; `bem-fleet validate`
    # checks that confidence == 1 - its alpha (gates are judged on two-sided intervals).
    confidence: float = Field(0.95, gt=0, lt=1)
    n_resamples: PositiveInt = 10_000
    gates: str = "configs/gates_bem2.yaml"


class Retention(Strict):
    """What `bem-fleet cleanup` and the maintenance DAG keep (bem_tasks.fleet.retention)."""

    keep_last_runs: PositiveInt = 5  # per mission (and per statistics/gates DAG), newest first
    max_age_days: PositiveFloat | None = 30  # None: no age limit
    prune_checkpoints: bool = True  # complete phases keep the newest checkpoint of each loop
    stale_after_hours: PositiveFloat = 24  # an unfinished run untouched this long is not running


AlertEvent = Literal["task_failure", "rejected", "error", "health"]


class Alerts(Strict):
    """Where failures and non-promotions are posted; the URL is a secret, so it is named here
    and read from the environment or an Airflow connection, never written in this file."""

    webhook_url_env: str | None = None  # an environment variable holding the webhook URL
    webhook_conn_id: str | None = None  # or an Airflow connection (its host / URI)
    timeout_s: PositiveFloat = 10
    events: tuple[AlertEvent, ...] = ("task_failure", "rejected", "error", "health")


class Maintenance(Strict):
    schedule: str | None = "30 1 * * *"  # daily, before the nightly fleet run
    min_free_gb: PositiveFloat = 5  # the health check fails below this on the artifact root
    db_clean_days: PositiveInt = 30  # `airflow db clean` of metadata older than this
    weekly_report_weekday: int = Field(0, ge=0, le=6)  # Monday = 0


class Operations(Strict):
    retention: Retention = Retention()
    alerts: Alerts = Alerts()
    maintenance: Maintenance = Maintenance()


class Architecture(Strict):
    fleet: FleetSettings
    device_classes: dict[str, DeviceClass] = Field(min_length=1)
    missions: dict[str, MissionRef] = Field(min_length=1)
    statistics: Statistics = Statistics()
    operations: Operations = Operations()
    # Overlays are validated after merging; here they are only required to be mappings.
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)


# --------------------------------------------------------------------------- experiments


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class PhaseSpec(Strict):
    device_class: str
    gpus: int = Field(0, ge=0)
    per_seed: bool = False
    # A mapped phase: one task per (seed, variant), Airflow's cross product of the two lists. The
    # list is fixed when the experiment file is parsed, so the DAG's shape is too.
    variants: list[str] | None = None
    timeout_minutes: PositiveFloat = 120
    retries: int | None = Field(None, ge=0)
    doc: str = ""

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("a mapped phase needs at least one variant (or no `variants` key)")
        bad = [n for n in v if not VARIANT_NAME.match(n)]
        if bad:
            raise ValueError(
                f"variant names {bad} must be letters, digits, '_' or '-' (they name folders)"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate variant names in {v}")
        return v

    @model_validator(mode="after")
    def _variants_per_seed(self) -> PhaseSpec:
        if self.variants is not None and not self.per_seed:
            raise ValueError("`variants` needs `per_seed: true` (tasks map over seed x variant)")
        return self


class StepsSpec(Strict):
    """Optimiser settings shared by every trainable phase, except the learning rate (a phase
    whose lr is tuned takes this block alone)."""

    steps: PositiveInt
    batch_size: PositiveInt
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: PositiveFloat | None = 1.0
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2


class TrainingSpec(StepsSpec):
    lr: PositiveFloat


class ModelSpec(Strict):
    """Tiny model from a transformers config (smoke) or a local directory (full)."""

    family: Literal["gpt2", "llama", "mamba"] = "gpt2"
    path: str | None = None  # a local from_pretrained directory; None builds from config
    n_layer: PositiveInt = 2
    n_embd: PositiveInt = 64
    n_head: PositiveInt = 2
    max_positions: PositiveInt = 256


class BemSpec(Strict):
    sites: list[str] = Field(default_factory=lambda: ["attn.c_proj", "mlp.c_proj"])
    rank: PositiveInt = 4
    alpha: PositiveFloat = 8.0
    chunk_size: PositiveInt = 8
    tau: float = Field(0.0, ge=0)
    trust_budget: PositiveFloat = 1.0


class GenericParams(Strict):
    """Parameters of a mission that has no implementation yet: the common blocks only."""

    model: ModelSpec = ModelSpec()
    bem: BemSpec | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, TrainingSpec] = Field(default_factory=dict)
    targets: dict[str, float] = Field(default_factory=dict)
    # Mission-specific settings, typed by the mission's own schema once it is implemented.
    mission: dict[str, Any] = Field(default_factory=dict)


class Experiment(Strict):
    mission: str
    description: str = ""
    phases: dict[str, PhaseSpec] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
