"""Experiment tracking with Weights & Biases: offline unless a key is set.

A phase gets one wandb run (grouped by the DAG run, job type = phase) holding its curves
(``ctx.track``) and final metrics. Offline runs land in the phase folder (``wandb/``) and can be
uploaded later with ``wandb sync``; with ``WANDB_API_KEY`` set they go online. Backend ``none``
turns tracking off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from bem_tasks.config.schema import Tracking


class Tracker:
    """No tracking; the base of the real one."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Nothing to record without a backend."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Nothing to close without a backend."""


class WandbTracker(Tracker):
    def __init__(
        self, settings: Tracking, *, name: str, group: str, job_type: str, out_dir: Path,
        config: dict[str, Any],
    ) -> None:  # fmt: skip
        import wandb

        # offline unless a key is set; "disabled" never gets here (see open_tracker)
        mode: Literal["online", "offline"] = (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            name=name,
            group=group,
            job_type=job_type,
            dir=str(out_dir),
            mode=mode,
            config=config,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, int | float | str | bool):
                self.run.summary[key] = value
        self.run.finish()


def open_tracker(
    settings: Tracking, *, name: str, group: str, job_type: str, out_dir: Path,
    config: dict[str, Any],
) -> Tracker:  # fmt: skip
    if settings.backend == "none" or settings.mode == "disabled":
        return Tracker()
    return WandbTracker(
        settings, name=name, group=group, job_type=job_type, out_dir=out_dir, config=config
    )
