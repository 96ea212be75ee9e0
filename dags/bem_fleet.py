"""BEM Fleet Airflow DAGs: `bem_fleet` (nightly) and one `bem_mission_<x>` per implemented mission.

The DAGs are built from configs/bem_fleet_architecture.yml and experiments/*.yml by
bem_tasks.fleet.dags; this file is only the entry point the dag-processor parses.
"""

from __future__ import annotations

from bem_tasks.config.loader import ConfigError
from bem_tasks.fleet.dags import build_all

try:
    globals().update(build_all())
except ConfigError as exc:
    # Re-raised here so the UI's import error is the list of `file:key: message` lines,
    # not a stack trace from inside the loader.
    raise ConfigError(exc.problems) from None
