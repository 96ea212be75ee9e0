"""Run one mission phase: the bridge between a task (Airflow or CLI) and a phase function.

A phase function is ``bem_tasks.missions.<mission>.<phase>(ctx: PhaseContext) -> dict`` returning
its headline metrics. This module does everything around it: load the config for the run's
profile, find the run-scoped output folder, skip work that is already complete, lease devices,
write ``metrics.json`` and the manifest, and return small JSON for XCom.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bem_tasks.config.loader import FleetConfig, load_fleet
from bem_tasks.fleet.runs import RunLayout, is_complete, require_intact, write_manifest
from bem_tasks.fleet.tracking import Tracker, open_tracker
from bem_tasks.io import atomic_write_json, utc_now
from bem_tasks.missions.registry import IMPLEMENTED

log = logging.getLogger("bem_fleet.phase")


@dataclass
class PhaseContext:
    """Everything a phase function may use. It reads inputs only through ``input_dir``."""

    mission: str
    phase: str
    seed: int | None
    cfg: FleetConfig
    out_dir: Path
    layout: RunLayout | None = None
    inputs: dict[str, Path] = field(default_factory=dict)
    device: str = "cpu"
    log: logging.Logger = log
    tracker: Tracker = field(default_factory=Tracker)
    variant: str | None = None  # set for a mapped phase (PhaseSpec.variants)
    # CLI-only choices that change what a phase computes (e.g. evaluate's --ood-suite); they are
    # part of the config hash the manifest records, so a run with other options is not reused.
    options: dict[str, Any] = field(default_factory=dict)
    # Input folders whose hashes this phase has checked: input_dir is called once per file read,
    # and the inputs of a running phase do not change under it (only their own phase writes them).
    _verified: set[Path] = field(default_factory=set, repr=False)

    @property
    def profile(self) -> str:
        return self.cfg.profile

    @property
    def params(self) -> BaseModel:
        return self.cfg.params[self.mission]

    def track(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record a point of a training curve (wandb; offline unless a key is set)."""
        self.tracker.log(metrics, step=step)

    def input_dir(self, phase: str, seed: int | None = None, variant: str | None = None) -> Path:
        """Output folder of an earlier phase of this mission (explicit inputs win). For a
        mapped phase pass ``variant``; an explicit input then names the phase folder that holds
        ``<variant>/seed_N`` (or ``<variant>``) folders."""
        if phase in self.inputs:
            given = self.inputs[phase]
            if variant is None:
                # A folder given by hand may hold no manifest (nothing to check); one that has
                # one must match it.
                if (given / "manifest.json").exists():
                    self._check_input(phase, given)
                return given
            for cand in (given / variant / f"seed_{seed}", given / variant):
                if (cand / "manifest.json").exists():
                    return self._check_input(phase, cand)
            raise FileNotFoundError(
                f"{self.mission}.{self.phase}: no complete output of phase '{phase}' variant "
                f"'{variant}' (seed {seed}) under {given} (expected {given / variant}/seed_{seed})"
            )
        if self.layout is None:
            raise FileNotFoundError(
                f"{self.mission}.{self.phase}: needs the output of phase '{phase}'. Outside a DAG "
                f"run it is looked up as {phase}[/seed_N] beside --output or under --inputs-from; "
                f"run `bem-fleet train {self.mission} --phase {phase} --output "
                f"{self.out_dir.parent / phase}` first, or point --inputs-from at a run's "
                f"<artifacts>/<dag>/<run>/{self.mission} folder"
            )
        path = self.layout.phase_dir(self.mission, phase, seed, variant)
        if not (path / "manifest.json").exists():
            which = f"seed {seed}" + (f", variant {variant}" if variant is not None else "")
            raise FileNotFoundError(
                f"{self.mission}.{self.phase}: output of phase '{phase}' ({which}) is missing "
                f"or incomplete at {path}; run that phase first"
            )
        return self._check_input(phase, path)

    def _check_input(self, phase: str, path: Path) -> Path:
        """``path`` once its files match the sha256 its manifest lists (checked once a phase)."""
        if path not in self._verified:
            require_intact(path, f"{self.mission}.{self.phase}: input '{phase}'")
            self._verified.add(path)
        return path


def phase_function(mission: str, phase: str) -> Any:
    impl = IMPLEMENTED.get(mission)
    if impl is None or phase not in impl.phases:
        raise KeyError(f"no implementation of {mission}.{phase}")
    return getattr(importlib.import_module(impl.module), phase)


@contextmanager
def phase_lock(out_dir: Path, who: str) -> Iterator[None]:
    """One process at a time in a phase folder (an exclusive ``flock`` on ``.phase.lock``).

    A task process can outlive its attempt: when the supervisor that forked it is killed, Airflow
    retries the task while the orphan goes on training. The retry then waits here instead of
    writing the same checkpoints beside it, and reuses what the orphan finished (or resumes from
    its checkpoints if it died: the kernel drops a dead holder's lock)."""
    path = out_dir / ".phase.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            log.warning("%s: %s is held by %s; waiting for it to finish", who, path, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.warning("%s: %s released; going on", who, path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def execute(ctx: PhaseContext, *, config_hash: str, extra: dict[str, Any] | None = None) -> dict:
    """Run the phase function in ``ctx.out_dir`` unless a matching complete result is there."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    label = f"{ctx.phase}[{ctx.variant}]" if ctx.variant else ctx.phase
    with phase_lock(ctx.out_dir, f"{ctx.mission}.{label}"):
        return _execute(ctx, label, config_hash=config_hash, extra=extra)


def _execute(
    ctx: PhaseContext, label: str, *, config_hash: str, extra: dict[str, Any] | None
) -> dict:
    metrics_path = ctx.out_dir / "metrics.json"
    config_hash = options_hash(config_hash, ctx.options)
    if is_complete(ctx.out_dir, config_hash, ctx.seed):
        ctx.log.info(
            "%s.%s%s seed=%s already complete in %s: reusing it",
            ctx.mission,
            ctx.phase,
            f"[{ctx.variant}]" if ctx.variant else "",
            ctx.seed,
            ctx.out_dir,
        )
        metrics = json.loads(metrics_path.read_text())
        return _xcom(ctx, metrics, reused=True)
    started = time.monotonic()
    ctx.log.info(
        "%s.%s seed=%s profile=%s -> %s", ctx.mission, label, ctx.seed, ctx.profile, ctx.out_dir
    )
    # Tracking files go next to the phase folder, not into it: the manifest covers results only.
    ctx.tracker = open_tracker(
        ctx.cfg.arch.fleet.tracking,
        name=f"{ctx.mission}.{label}" + (f".seed{ctx.seed}" if ctx.seed is not None else ""),
        group=f"{ctx.layout.dag_id}/{ctx.layout.run_id}" if ctx.layout else "standalone",
        job_type=ctx.phase,
        out_dir=ctx.out_dir.parent / f".tracking-{ctx.out_dir.name}",
        config={"profile": ctx.profile, "seed": ctx.seed, "config_hash": config_hash},
    )
    try:
        metrics = phase_function(ctx.mission, ctx.phase)(ctx) or {}
    except BaseException:
        ctx.tracker.finish({"status": "failed"})
        raise
    ctx.tracker.finish(metrics)
    duration = time.monotonic() - started
    atomic_write_json(metrics_path, metrics)
    write_manifest(
        ctx.out_dir,
        config_hash=config_hash,
        seed=ctx.seed,
        extra={
            "mission": ctx.mission,
            "phase": ctx.phase,
            **({"variant": ctx.variant} if ctx.variant is not None else {}),
            **({"options": ctx.options} if ctx.options else {}),
            "profile": ctx.profile,
            "duration_s": round(duration, 3),
            **(extra or {}),
        },
    )
    return _xcom(ctx, metrics, reused=False)


def options_hash(config_hash: str, options: dict[str, Any]) -> str:
    """The config hash, extended by CLI options when there are any (none: unchanged)."""
    if not options:
        return config_hash
    blob = json.dumps([config_hash, options], sort_keys=True).encode()
    return f"{config_hash}+{hashlib.sha256(blob).hexdigest()[:12]}"


def _xcom(ctx: PhaseContext, metrics: dict, *, reused: bool) -> dict:
    headline = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
    return {
        "mission": ctx.mission,
        "phase": ctx.phase,
        "seed": ctx.seed,
        **({"variant": ctx.variant} if ctx.variant is not None else {}),
        "dir": str(ctx.out_dir),
        "metrics": headline,
        "reused": reused,
    }


def run_phase(
    mission: str,
    phase: str,
    *,
    profile: str,
    dag_id: str,
    run_id: str,
    seed: int | None = None,
    variant: str | None = None,
    config_path: str | None = None,
) -> dict:
    """Entry point of a phase task: config, run folder, device lease, execution, manifest."""
    from bem_tasks.fleet.lease import gpu_lease

    cfg = load_fleet(config_path, profile)
    # The task was queued and pooled by the deployment layout; lease devices of that class.
    deployed = cfg.deployment()
    spec = deployed.experiments[mission].phases[phase]
    check_variant(mission, phase, spec.variants, variant)
    layout = RunLayout(cfg.artifact_root, dag_id, run_id)
    layout.claim()  # a folder of another run id is an error, not outputs to reuse
    out_dir = layout.phase_dir(mission, phase, seed if spec.per_seed else None, variant)
    device_class = deployed.arch.device_classes[spec.device_class]
    holder = f"{mission}.{phase}[seed={seed}" + (f",variant={variant}]" if variant else "]")
    with gpu_lease(
        spec.device_class, spec.gpus, devices=device_class.devices, holder=holder
    ) as lease:
        device = "cuda" if spec.gpus and _cuda_available() else "cpu"
        ctx = PhaseContext(
            mission,
            phase,
            seed if spec.per_seed else None,
            cfg,
            out_dir,
            layout=layout,
            device=device,
            variant=variant,
        )
        return execute(
            ctx,
            config_hash=cfg.mission_hash(mission),
            extra={
                "lease": lease.to_manifest(),
                "worker": {
                    "host": socket.gethostname(),
                    "queues": os.environ.get("BEM_FLEET_WORKER_QUEUES", ""),
                },
            },
        )


def check_variant(
    mission: str, phase: str, variants: list[str] | None, variant: str | None
) -> None:
    """A mapped phase runs one of its variants; any other phase runs none."""
    if variants is None and variant is not None:
        raise ValueError(f"{mission}.{phase} is not a mapped phase; got variant {variant!r}")
    if variants is not None and variant not in variants:
        raise ValueError(
            f"{mission}.{phase}: variant {variant!r} is not one of its variants {variants}"
        )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
