"""What every mission's phases share: seeded batches, input fingerprints, checkpointed training
loops that resume, progress lines in the task log, and PNG plots.

A mission module reads as its recipe and calls these; nothing here knows about a mission.
Checkpoints live under ``<phase dir>/ckpt/<loop>`` with a fingerprint of everything that shapes
them (config blocks, seed, input digests), so a retried task resumes only its own run and a
changed config starts afresh. Batches are a function of (seed, step, salt), so a resumed run sees
the same data as an unbroken one.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from bem_tasks.config.schema import ModelSpec, TrainingSpec
from bem_tasks.core import CheckpointManager, build_model
from bem_tasks.io import (
    atomic_write_bytes,
    atomic_write_json,
    clear_trash,
    remove_tree,
    sha256_file,
)
from bem_tasks.missions.planner import make_batch

P = TypeVar("P")


def progress(ctx: Any, loop: str, step: int, total: int, **values: float) -> None:
    """Progress in the task log (about 10 lines per loop). Runs after a step's checkpoint."""
    if step == total or step % max(total // 10, 1) == 0:
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        ctx.log.info("%s.%s %s step %d/%d %s", ctx.mission, ctx.phase, loop, step, total, shown)


def step_rng(seed: int, step: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, salt])


def mission_params(ctx: Any, cls: type[P], mission: str) -> P:
    """``ctx.params`` checked to be ``cls``; applies its ``runtime.threads``."""
    p = ctx.params
    if not isinstance(p, cls):
        raise TypeError(f"{mission} expects {cls.__name__}, got {type(p).__name__}")
    threads = p.runtime.threads  # type: ignore[attr-defined]
    if threads:
        torch.set_num_threads(threads)
    return p


def torch_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def fingerprint_of(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def input_digest(ctx: Any, phase: str, seed: int | None, *names: str) -> list[str]:
    """sha256 of an earlier phase's files (from its manifest when it lists them), so that a
    checkpoint folder is never resumed on top of different inputs."""
    d = ctx.input_dir(phase, seed)
    listed: dict[str, Any] = {}
    if (d / "manifest.json").is_file():
        listed = json.loads((d / "manifest.json").read_text()).get("files", {})
    return [
        str(listed.get(n, {}).get("sha256") or sha256_file(d / n))
        for n in names
        if (d / n).is_file()
    ]


def fingerprinted_checkpoints(
    directory: Path, keep: int, fingerprint: str, *, trainable_only: bool
) -> CheckpointManager:
    """A CheckpointManager whose folder only ever holds checkpoints of this exact setup."""
    stamp = directory / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        # Left by a different config or seed: not ours to resume. Removed by a rename first, so
        # a crash cannot leave its steps without this stamp (they would then look like ours).
        remove_tree(directory)
    clear_trash(directory)  # what a crash inside an earlier removal left
    atomic_write_json(stamp, {"fingerprint": fingerprint})
    return CheckpointManager(directory, keep=keep, trainable_only=trainable_only)


def scheduled_lr(spec: TrainingSpec, step: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(spec.steps - spec.warmup_steps, 1)
    return spec.lr * (1.0 - 0.9 * (step - spec.warmup_steps) / span)


def train_loop(
    ctx: Any,
    name: str,
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    spec: TrainingSpec,
    *,
    fingerprint: str,
    trainable_only: bool,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """AdamW on the model's trainable parameters with checkpoint/resume under ckpt/<name>.

    ``state``: the caller's own JSON-able training state that ``loss_fn`` updates as it goes
    (e.g. a Lagrange multiplier); saved with each checkpoint and restored in place on resume."""
    manager = fingerprinted_checkpoints(
        ctx.out_dir / "ckpt" / name,
        spec.keep_checkpoints,
        fingerprint,
        trainable_only=trainable_only,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    loaded = manager.resume(model, opt)
    start = loaded.step if loaded else 0
    history: list[list[float]] = list(loaded.extra.get("history", [])) if loaded else []
    if loaded and state is not None:
        state.update(loaded.extra.get("state", {}))
    if loaded:
        ctx.log.info("%s: resumed %s from step %d (%s)", ctx.phase, name, start, loaded.path)
    model.train()
    for step in range(start, spec.steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(spec, step)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        opt.step()
        history.append([step + 1, float(loss.detach())])
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps:
            extra: dict[str, Any] = {"history": history}
            if state is not None:
                extra["state"] = state
            manager.save(step + 1, model, opt, extra=extra)
        progress(ctx, name, step + 1, spec.steps, loss=history[-1][1])
    model.eval()
    return {"history": history, "resumed_from": start, "final_loss": history[-1][1]}


def pretrain_lm(
    ctx: Any,
    name: str,
    train: Sequence[Any],
    pad_id: int,
    model_spec: ModelSpec,
    spec: TrainingSpec,
    *,
    seed: int,
    fingerprint: str,
    max_new_tokens: int,
    also_fits: Sequence[Any] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """The fleet's base-LM recipe: a tiny ``model_spec`` model built from ``seed`` and trained
    from scratch on prompts + targets of ``train`` (planner ``Example`` rows; batches drawn
    from (seed, step)) under ckpt/<name>. Mission A's pretrain_base and Mission B's own anchor
    both come from here, so the two are the same kind of model. Refuses a ``max_positions``
    shorter than the longest prompt + target of ``train`` and ``also_fits`` + generation."""
    longest = max(len(e.prompt) + len(e.target) for e in [*train, *also_fits]) + max_new_tokens
    if longest > model_spec.max_positions:
        raise ValueError(
            f"params.model.max_positions={model_spec.max_positions} is shorter than the longest "
            f"prompt + generation ({longest} tokens)"
        )
    model = build_model(
        model_spec.family,
        seed=seed,
        d_model=model_spec.n_embd,
        n_layers=model_spec.n_layer,
        n_heads=model_spec.n_head,
        max_positions=model_spec.max_positions,
    ).to(ctx.device)

    def loss_fn(step: int) -> torch.Tensor:
        idx = step_rng(seed, step, 0).choice(len(train), spec.batch_size, replace=False)
        b = make_batch([train[i] for i in idx], pad_id, loss_on_prompt=True).to(ctx.device)
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        return out.loss  # type: ignore[no-any-return]

    run = train_loop(ctx, name, model, loss_fn, spec, fingerprint=fingerprint, trainable_only=False)
    return model, run


def plot_series(
    path: Path, series: Mapping[str, Sequence[Sequence[float]]], title: str, xlabel: str
) -> None:
    """One panel per series (x, y pairs) as a PNG (matplotlib Agg, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.4 * len(series)), squeeze=False)
    for ax, (label, points) in zip(axes[:, 0], series.items(), strict=True):
        if points:
            xs, ys = zip(*[(p[0], p[1]) for p in points], strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
