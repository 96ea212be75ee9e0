"""One Airflow pool per device class (slots = devices), kept in step with the config.

Pools this tool creates carry a marker in their description, so a sync updates and removes only
its own pools and never touches one a person made by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from bem_tasks.config.loader import FleetConfig

MARKER = "[bem-fleet]"


@dataclass(frozen=True)
class PoolSpec:
    name: str
    slots: int
    description: str


def desired_pools(cfg: FleetConfig) -> list[PoolSpec]:
    return [
        PoolSpec(name, dc.devices, f"{MARKER} {dc.kind}: {dc.hardware}")
        for name, dc in cfg.arch.device_classes.items()
    ]


def sync_pools(cfg: FleetConfig, *, dry_run: bool = False) -> list[str]:
    """Create/update the config's pools and delete stale pools this tool made; returns actions."""
    from airflow.models.pool import Pool

    existing = {p.pool: p for p in Pool.get_pools()}
    wanted = {p.name: p for p in desired_pools(cfg)}
    actions = []
    for spec in wanted.values():
        current = existing.get(spec.name)
        if current is None:
            actions.append(f"create pool {spec.name} slots={spec.slots}")
        elif current.slots != spec.slots or (current.description or "") != spec.description:
            if current.description and not current.description.startswith(MARKER):
                actions.append(f"take over pool {spec.name} (made by hand) slots={spec.slots}")
            else:
                actions.append(f"update pool {spec.name} slots={current.slots}->{spec.slots}")
        else:
            continue
        if not dry_run:
            Pool.create_or_update_pool(
                spec.name, spec.slots, spec.description, include_deferred=False
            )
    for name, pool in existing.items():
        if name is not None and name not in wanted and (pool.description or "").startswith(MARKER):
            actions.append(f"delete pool {name} (no longer in config)")
            if not dry_run:
                Pool.delete_pool(name)
    return actions
