"""Mission B's building blocks: what keeps a model that learns online close to its anchor, tells
when it has drifted, takes it back to the last good weights, replays what mattered, and says when
an injected failure is fixed.

Every function works on the model's *trainable* parameters (during Mission B that is the
controller), keyed by ``named_parameters`` name, against an anchor snapshot taken before online
learning starts. Nothing here knows about phases or Airflow; ``mission_b.py`` composes these.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bem_tasks.core import CheckpointManager
from bem_tasks.missions.common import step_rng
from bem_tasks.missions.mission_b_params import DriftThresholds  # light: the DAG files read it

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module) -> Params:
    """A detached copy of the trainable parameters: the anchor theta* of EWC and the drift monitors."""
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def _deltas(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = trainable(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    if params.keys() != anchor.keys():
        raise ValueError(
            "anchor does not match the model's trainable parameters: "
            f"missing {sorted(params.keys() - anchor.keys())[:8]}, "
            f"unexpected {sorted(anchor.keys() - params.keys())[:8]}"
        )
    return {n: p - anchor[n].to(p.device) for n, p in params.items()}


# ---------------------------------------------------------------------- EWC and proximal term
def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    log_likelihood: Callable[[nn.Module, Any], torch.Tensor],
) -> Params:
    """Diagonal empirical Fisher of the trainable parameters: the mean over ``batches`` of the
    squared gradient of ``log_likelihood(model, batch)`` (a scalar).

    One example per batch gives the textbook per-example Fisher; a batch whose log-likelihood is
    a mean over B examples gives the cheaper batch-gradient estimate, which is about B times
    smaller for independent gradients, so the EWC strength must be set for the batch size used.
    ``.grad`` is left untouched.
    """
    params = trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(
            log_likelihood(model, batch), list(params.values()), allow_unused=True
        )
        for name, grad in zip(params, grads, strict=True):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("diagonal_fisher: the batch iterator was empty")
    return {n: f / count for n, f in fisher.items()}


def ewc_penalty(
    model: nn.Module, anchor: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 / 2 over the trainable parameters (differentiable)."""
    deltas = _deltas(model, anchor)
    return torch.stack([(fisher[n].to(d.device) * d**2).sum() for n, d in deltas.items()]).sum() / 2


def proximal_penalty(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """||theta - theta*||^2 / 2 over the trainable parameters (differentiable)."""
    return torch.stack([(d**2).sum() for d in _deltas(model, anchor).values()]).sum() / 2


# ---------------------------------------------------------------------- drift monitors
def probe_kl(
    anchor_logits: torch.Tensor,
    online_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> float:
    """KL(anchor || online) of the next-token distributions, averaged over the probe batch's
    tokens (``mask`` [B, T]: 1 for positions that count). Logits are [B, T, V]."""
    if anchor_logits.shape != online_logits.shape:
        raise ValueError(
            f"probe_kl: logits shapes differ {tuple(anchor_logits.shape)} vs "
            f"{tuple(online_logits.shape)}"
        )
    log_anchor = F.log_softmax(anchor_logits.detach().double(), dim=-1)
    log_online = F.log_softmax(online_logits.detach().double(), dim=-1)
    per_token = F.kl_div(log_online, log_anchor, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return float(per_token.mean())
    weights = mask.to(per_token.dtype)
    return float((per_token * weights).sum() / weights.sum())


def parameter_distance(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of theta - theta* over all trainable parameters together."""
    return math.sqrt(2 * float(proximal_penalty(model, anchor).detach()))


def gradient_norm(model: nn.Module) -> float:
    """L2 norm of the trainable parameters' current gradients (read after backward)."""
    grads = [p.grad for p in trainable(model).values() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def controller_spectral_norm(model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> float:
    """Largest spectral norm (largest singular value) of theta - theta* over the trainable
    weight matrices; vectors such as biases have no spectral norm and are left to the distance."""
    deltas = [d.detach() for d in _deltas(model, anchor).values() if d.ndim >= 2]
    if not deltas:
        raise ValueError("controller_spectral_norm: the model has no trainable weight matrix")
    return max(float(torch.linalg.matrix_norm(d, ord=2).max()) for d in deltas)


@dataclass(frozen=True)
class DriftReading:
    kl: float
    param_distance: float
    grad_norm: float
    spectral_norm: float


@dataclass(frozen=True)
class Trip:
    """One failed check: ``value`` broke ``threshold`` (``bound`` max: must stay <=; min: >=)."""

    monitor: str
    value: float
    threshold: float
    bound: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class DriftReport:
    reading: DriftReading
    tripped: list[Trip]

    @property
    def ok(self) -> bool:
        return not self.tripped


def check_drift(reading: DriftReading, thresholds: DriftThresholds) -> DriftReport:
    """Name every monitor above its threshold. A NaN reading trips too (it is not <= anything)."""
    tripped = [
        Trip(name, value, limit)
        for name, value, limit in (
            ("kl", reading.kl, thresholds.kl_max),
            ("param_distance", reading.param_distance, thresholds.param_distance_max),
            ("grad_norm", reading.grad_norm, thresholds.grad_norm_max),
            ("spectral_norm", reading.spectral_norm, thresholds.spectral_norm_max),
        )
        if not value <= limit
    ]
    return DriftReport(reading, tripped)


# ---------------------------------------------------------------------- rollback
@dataclass(frozen=True)
class Rollback:
    at_step: int
    restored_step: int
    tripped: list[Trip]


ROLLBACK_LOG = "rollbacks.jsonl"


def read_rollback_log(path: str | Path) -> Iterator[tuple[int, Rollback]]:
    """``(line number, Rollback)`` for each line of a rollback log, in order; a line that is not
    a rollback raises a ValueError naming ``file:line``. A final line without its newline is an
    append cut short by a crash and is skipped: the retried task redoes that rollback."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith("\n"):
                log.warning("%s:%d: skipping an unfinished last line %r", path, lineno, line[:80])
                return
            try:
                entry = json.loads(line)
                trips = [Trip(**t) for t in entry.pop("tripped")]
                record = Rollback(tripped=trips, **entry)
                if not isinstance(record.at_step, int) or not isinstance(record.restored_step, int):
                    raise TypeError("at_step and restored_step must be integers")
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(
                    f"{path}:{lineno}: not a rollback record ({type(exc).__name__}: {exc}); "
                    "expected a JSON object with at_step, restored_step and tripped "
                    "[{monitor, value, threshold, bound}]"
                ) from None
            yield lineno, record


class LastGood:
    """The last checkpoint marked good (after a passing canary and drift check) and the log of
    rollbacks to it, both under ``directory``.

    The good checkpoint lives in its own keep=1 CheckpointManager, so the training loop's pruning
    never deletes it. A rollback restores weights (and optimizer state when given) bit for bit but
    not the RNG: the steps after a rollback must not replay the draws that led to the trip.

    The log, ``rollbacks.jsonl``, gets one appended line per rollback, so a soak that rolls back
    thousands of times never rewrites it; in memory are only the newest ``keep_in_memory``
    rollbacks (``rollbacks``) and the number logged (``total``).
    """

    def __init__(
        self, directory: str | Path, *, trainable_only: bool, keep_in_memory: int = 1000
    ) -> None:
        if keep_in_memory < 1:
            raise ValueError(f"keep_in_memory must be >= 1, got {keep_in_memory}")
        self.manager = CheckpointManager(Path(directory), keep=1, trainable_only=trainable_only)
        self.log_path = self.manager.directory / ROLLBACK_LOG
        self._recent: deque[Rollback] = deque(maxlen=keep_in_memory)
        self.total = 0
        self._last_step: int | None = None  # the largest logged at_step
        if self.log_path.is_file():
            self._truncate_unfinished_line()
            for _, record in read_rollback_log(self.log_path):
                self._count(record)

    @property
    def rollbacks(self) -> list[Rollback]:
        """The newest rollbacks (all of them up to ``keep_in_memory``), oldest first."""
        return list(self._recent)

    @property
    def step(self) -> int | None:
        found = self.manager.checkpoints()
        return found[-1][0] if found else None

    def mark(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> Path:
        return self.manager.save(step, model, optimizer)

    def rollback(
        self,
        step: int,
        tripped: Sequence[Trip],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Rollback:
        """Restore the good weights after ``tripped`` fired at ``step``; log it and append it to
        ``rollbacks.jsonl`` (once per step, so a retried task does not count it twice)."""
        if not tripped:
            raise ValueError(f"rollback at step {step} without a tripped check")
        loaded = self.manager.resume(model, optimizer, restore_rng=False)
        if loaded is None:
            raise RuntimeError(
                f"{self.manager.directory}: rollback at step {step} but no checkpoint was marked good"
            )
        record = Rollback(at_step=step, restored_step=loaded.step, tripped=list(tripped))
        if not self._logged(step):
            line = json.dumps(asdict(record), sort_keys=True) + "\n"
            with self.log_path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._count(record)
        log.warning(
            "rollback at step %d to good step %d: %s",
            step,
            loaded.step,
            ", ".join(f"{t.monitor}={t.value:.4g} ({t.bound} {t.threshold:.4g})" for t in tripped),
        )
        return record

    def _count(self, record: Rollback) -> None:
        self._recent.append(record)
        self.total += 1
        if self._last_step is None or record.at_step > self._last_step:
            self._last_step = record.at_step

    def _logged(self, step: int) -> bool:
        """Whether a rollback at ``step`` is in the log already. Steps only grow within a try, so
        only a retried task, redoing steps up to the largest logged one, reads the file."""
        if self._last_step is None or step > self._last_step:
            return False
        if any(r.at_step == step for r in self._recent):
            return True
        return any(r.at_step == step for _, r in read_rollback_log(self.log_path))

    def _truncate_unfinished_line(self) -> None:
        """Drop a last line a crash left without its newline, so the next append starts a line."""
        with self.log_path.open("r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    log.warning("%s: dropping an unfinished last line", self.log_path)
                    fh.seek(0)
                    fh.truncate(fh.read().rfind(b"\n") + 1)


# ---------------------------------------------------------------------- prioritized replay
T = TypeVar("T")


@dataclass
class PrioritizedReplay(Generic[T]):
    """A bounded buffer that draws items with probability proportional to their priority (for
    Mission B: the item's last loss). When full, the oldest item makes room. Draws are a function
    of (seed, step), like every batch in the fleet, so a resumed run draws what an unbroken one
    would have."""

    capacity: int
    seed: int
    items: list[T] = field(default_factory=list)
    priorities: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"PrioritizedReplay capacity must be >= 1, got {self.capacity}")

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T, priority: float) -> None:
        _check_priority(priority)
        if len(self.items) == self.capacity:
            del self.items[0], self.priorities[0]
        self.items.append(item)
        self.priorities.append(float(priority))

    def update(self, index: int, priority: float) -> None:
        _check_priority(priority)
        self.priorities[index] = float(priority)

    def probabilities(self) -> np.ndarray:
        p = np.asarray(self.priorities, dtype=np.float64)
        return p / p.sum()

    def sample(self, k: int, step: int) -> list[int]:
        """Indices of ``k`` draws with replacement, priority-proportional."""
        if not self.items:
            raise ValueError("PrioritizedReplay.sample: the buffer is empty")
        rng = step_rng(self.seed, step, 0xB0FF)
        return [int(i) for i in rng.choice(len(self.items), size=k, p=self.probabilities())]


def _check_priority(priority: float) -> None:
    if not (math.isfinite(priority) and priority > 0):
        raise ValueError(f"replay priority must be a positive finite number, got {priority}")


# ---------------------------------------------------------------------- time to fix
@dataclass(frozen=True)
class ProbeEval:
    """The held-out probes of the injected variant, run after ``after_prompt`` stream prompts:
    ``failed`` of ``probes`` answered wrong. Training prompts never go here."""

    after_prompt: int
    failed: int
    probes: int

    def __post_init__(self) -> None:
        if not 0 <= self.failed <= self.probes:
            raise ValueError(
                f"ProbeEval after prompt {self.after_prompt}: failed {self.failed} "
                f"of {self.probes} probes"
            )


def time_to_fix(evals: Sequence[ProbeEval], t0: int, window: int, threshold: float) -> int | None:
    """Prompts after ``t0`` until the pooled failure rate of the last ``window`` probe
    evaluations (all after t0) falls below ``threshold``; None when it never does."""
    if window < 1:
        raise ValueError(f"time_to_fix window must be >= 1, got {window}")
    after = sorted((e for e in evals if e.after_prompt > t0), key=lambda e: e.after_prompt)
    for end in range(window, len(after) + 1):
        recent = after[end - window : end]
        probes = sum(e.probes for e in recent)
        if probes and sum(e.failed for e in recent) / probes < threshold:
            return recent[-1].after_prompt - t0
    return None
