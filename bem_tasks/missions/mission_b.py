"""Mission B, Living Model: a controller-only learner on a feedback stream with a failure mode
injected at t0, promoted through a canary gate, kept near its anchor while it learns online, and
rolled back when a canary or drift monitor fails.

Phases (each ``fn(ctx) -> metrics``; inputs only through ``ctx.input_dir``):

    prepare      the anchor (Mission A's trained base in the same run, a local model, or an own
                 tiny anchor trained with the fleet's base-LM recipe) and the data: stream with
                 the variant injected at t0, probes, variant test, held-out, canary, drift sets;
                 content-disjoint, checked, and checked that the anchor fails the variant
    shadow       per seed: the learner (a BEM module on the frozen anchor) learns on prompts
                 [0, shadow_until) while the anchor serves them
    canary_gate  per seed: activate the learner when its canary pass rate >= the threshold
    online       per seed: the activated learner serves and learns on [shadow_until, n_stream)
                 with EWC + proximal term + prioritized replay, drift monitors and rollbacks
    evaluate     per seed: served system vs anchor on held-out regular and variant items,
                 time_to_fix, rollbacks, drift rate, memory, latency; paired records

Definitions:

    greedy_exact     an example passes iff the argmax at every target position (EOS included)
                     of one teacher-forced forward equals the gold token, which is exactly
                     "greedy decoding reproduces the gold target" (tested against decoding)
    probe            a held-out item of the injected variant whose regular form the anchor
                     answers exactly: it fails only through the new convention; never trained on
    canary           a held-out regular item the anchor answers exactly (anchor pass rate 1.0 by
                     construction); a learner's pass rate measures regressions
    time_to_fix      living.time_to_fix over the *served* system's probe evaluations after t0
                     (the anchor's until activation); censored at the prompts observed after t0
                     (``time_to_fix_censored`` = 1) when never fixed
    rollback_count   online rollbacks (canary failure or drift trip)
    aggregate_score  per held-out example: weight_g * EM with weights such that the mean over
                     examples is sum_g share_g * EM_g, shares = the post-t0 stream mixture

The one stream engine (``Engine``) serves shadow, online and soak.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bem_tasks.core import (
    CheckpointManager,
    attach_bem,
    bem_disabled,
    load_model,
    load_weights,
    save_model,
    save_weights,
)
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data import check_disjoint, extract_answer, write_jsonl
from bem_tasks.data.suites.compositional import (
    CompositionalConfig,
    make_compositional,
    make_item,
    read_compositional,
)
from bem_tasks.data.suites.feedback_stream import (
    BASE,
    StreamItem,
    make_feedback_stream,
    read_feedback_stream,
)
from bem_tasks.eval import ExampleRecord, answer_em_f1, write_records
from bem_tasks.eval.latency import summarize_latencies
from bem_tasks.fleet.runs import require_intact
from bem_tasks.io import atomic_write_json, sha256_file
from bem_tasks.missions.common import (
    fingerprint_of,
    fingerprinted_checkpoints,
    input_digest,
    mission_params,
    plot_series,
    pretrain_lm,
    progress,
    torch_dtype,
)
from bem_tasks.missions.living import (
    DriftReading,
    LastGood,
    PrioritizedReplay,
    ProbeEval,
    Trip,
    check_drift,
    controller_spectral_norm,
    diagonal_fisher,
    ewc_penalty,
    gradient_norm,
    parameter_distance,
    probe_kl,
    proximal_penalty,
    snapshot,
    time_to_fix,
    trainable,
)
from bem_tasks.missions.mission_a_params import ITEM_SPACE
from bem_tasks.missions.mission_b_params import MissionBParams
from bem_tasks.missions.planner import (
    Example,
    RoutedDecoder,
    TextCodec,
    decode_all,
    encode_items,
    load_codec,
    make_batch,
    timed_decodes,
)
from bem_tasks.missions.soak import current_rss_mib

SLICE = "slice_b"
DATA_FILES = ("stream", "probe", "variant_test", "heldout", "canary", "drift")


# ============================================================================ helpers
def _params(ctx: Any) -> MissionBParams:
    return mission_params(ctx, MissionBParams, "mission_b")


def _dtype(p: MissionBParams) -> torch.dtype:
    return torch_dtype(p.runtime.dtype)


def _item_space(p: MissionBParams) -> CompositionalConfig:
    space = {k: getattr(p.data, k) for k in ITEM_SPACE}
    return CompositionalConfig(**(space | {"ops": tuple(p.data.ops)}))


def _read(ctx: Any, name: str) -> list[StreamItem]:
    return read_feedback_stream(ctx.input_dir("prepare") / f"{name}.jsonl")


def _anchor_dir(ctx: Any) -> Path:
    prep = ctx.input_dir("prepare")
    info = json.loads((prep / "anchor.json").read_text())
    path = Path(info["path"])
    return path if path.is_absolute() else prep / path


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def load_anchor(ctx: Any, p: MissionBParams) -> tuple[nn.Module, TextCodec]:
    d = _anchor_dir(ctx)
    model = load_model(d, dtype=_dtype(p), device=ctx.device)
    return _freeze(model), load_codec(d)


def attach_controller(model: nn.Module, p: MissionBParams, seed: int) -> nn.Module:
    """The learner: the frozen anchor plus a BEM module, whose parameters are the only
    trainable ones (U starts at zero: the learner starts as the anchor)."""
    c = p.controller
    attach_bem(
        model,
        list(c.sites),
        num_experts=c.num_experts,
        rank=c.rank,
        alpha=c.alpha,
        chunk_size=c.chunk_size,
        tau=c.tau,
        trust_budget=c.trust_budget,
        routing=c.routing,
        seed=seed,
    )
    model.eval()
    return model


def _learner(ctx: Any, p: MissionBParams) -> tuple[nn.Module, TextCodec]:
    model, codec = load_anchor(ctx, p)
    return attach_controller(model, p, ctx.seed or 0), codec


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_exact(
    model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> list[bool]:
    """Per example: does greedy decoding reproduce the gold target (EOS included)? One
    teacher-forced forward per batch: by induction over the target, every argmax equal to the
    gold token is the same statement (the model is causal, so right padding changes nothing)."""
    was = model.training
    model.eval()
    out: list[bool] = []
    try:
        for i in range(0, len(examples), batch_size):
            b = make_batch(examples[i : i + batch_size], pad_id, loss_on_prompt=False)
            b = b.to(_device(model))
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            gold = b.labels[:, 1:]
            good = (logits[:, :-1].argmax(-1) == gold) | (gold == -100)
            out += [bool(v) for v in good.all(-1).tolist()]
    finally:
        model.train(was)
    return out


def _pass_rate(model: nn.Module, examples: Sequence[Example], pad_id: int, bs: int) -> float:
    ok = greedy_exact(model, examples, pad_id, bs)
    return sum(ok) / len(ok)


def _per_example_ce(model: nn.Module, examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Mean target-token cross-entropy of each example, [B] (differentiable)."""
    b = make_batch(examples, pad_id, loss_on_prompt=False).to(_device(model))
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    gold = b.labels[:, 1:]
    tok = F.cross_entropy(logits.float().transpose(1, 2), gold, ignore_index=-100, reduction="none")
    counted = (gold != -100).sum(-1).clamp(min=1)
    return tok.sum(-1) / counted


# ============================================================================ stream engine
@dataclass
class Guard:
    """What keeps the online learner near its promoted weights and says when to roll back."""

    reference: dict[str, torch.Tensor]  # promoted weights: EWC/proximal anchor and drift origin
    fisher: dict[str, torch.Tensor]
    drift_batches: list[Any]  # planner Batches of drift.jsonl
    last_good: LastGood


class Engine:
    """Processes stream prompts in order, ``update_every`` at a time: the served system answers
    them, then (when learning) one AdamW step on the controller over them plus prioritized
    replay draws, then the new prompts enter the replay with their loss as priority. Learner
    probes every ``probe_every`` prompts; with a ``guard`` also penalties, a drift check after
    every update and a canary check every ``canary_every`` prompts, with rollbacks.

    ``state`` is plain JSON, saved with the weights, optimizer and RNG in each checkpoint, so
    a retried task continues exactly where the checkpoint left off."""

    def __init__(
        self,
        ctx: Any,
        p: MissionBParams,
        model: nn.Module,
        data: StreamData,
        *,
        learn: bool,
        serve_learner: bool,
        guard: Guard | None = None,
        canary_every: int | None = None,
    ) -> None:
        self.ctx, self.p, self.model, self.data = ctx, p, model, data
        self.learn, self.serve_learner, self.guard = learn, serve_learner, guard
        self.canary_every = canary_every or p.canary.canary_every
        s = p.stream
        self.params = list(trainable(model).values())
        self.opt = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.replay: PrioritizedReplay[int] = PrioritizedReplay(s.replay_capacity, ctx.seed or 0)
        self.state: dict[str, Any] = {
            "updates": 0,
            "probe_evals": [],  # [after_prompt, failed, probes]
            "canary": [],  # [after_prompt, pass_rate]
            "drift": [],  # [update, kl, param_distance, grad_norm, spectral_norm]
            "losses": [],  # [update, ce]
            "served": [],  # [prompt t, 1 if the served system answered it exactly]
            "drift_checks": 0,
            "trips": 0,
            "canary_failures": 0,
            "rollbacks": 0,
        }

    # --- resumable state
    def snapshot_state(self) -> dict[str, Any]:
        return self.state | {"replay": [self.replay.items, self.replay.priorities]}

    def restore_state(self, extra: dict[str, Any]) -> None:
        items, priorities = extra.pop("replay")
        self.replay.items, self.replay.priorities = list(items), list(priorities)
        self.state = extra

    # --- one chunk of update_every prompts
    def chunk(self, ts: Sequence[int]) -> dict[str, Any]:
        """Prompts ``ts`` (stream positions; soak passes them modulo the stream length) and
        what happened: {"rolled_back": bool, "canary_checked": bool, "canary_failed": bool}."""
        p, data = self.p, self.data
        examples = [data.stream[t % len(data.stream)] for t in ts]
        served = self._serve(examples)
        self.state["served"] += [[t, int(ok)] for t, ok in zip(ts, served, strict=True)]
        events = {"rolled_back": False, "canary_checked": False, "canary_failed": False}
        trips: list[Trip] = []
        if self.learn:
            trips += self._update(list(ts), examples)
        done = ts[-1] + 1
        if self.guard is not None and self.learn and done % self.canary_every == 0:
            rate = _pass_rate(self.model, data.canary, data.pad_id, p.stream.batch_size)
            self.state["canary"].append([done, rate])
            events["canary_checked"] = True
            if rate < p.canary.rollback_below:
                self.state["canary_failures"] += 1
                events["canary_failed"] = True
                trips.append(Trip("canary_pass_rate", rate, p.canary.rollback_below, "min"))
        if self.guard is not None and self.learn:
            step = self.state["updates"]
            if trips:
                self.guard.last_good.rollback(step, trips, self.model, self.opt)
                self.state["rollbacks"] += 1
                events["rolled_back"] = True
            elif events["canary_checked"]:
                self.guard.last_good.mark(step, self.model, self.opt)
        # after any rollback: the probes judge the weights that serve the next prompts
        if done % p.stream.probe_every == 0:
            ok = greedy_exact(self.model, data.probe, data.pad_id, p.stream.batch_size)
            self.state["probe_evals"].append([done, len(ok) - sum(ok), len(ok)])
        return events

    def _serve(self, examples: list[Example]) -> list[bool]:
        bs = self.p.stream.batch_size
        if self.serve_learner:
            return greedy_exact(self.model, examples, self.data.pad_id, bs)
        with bem_disabled(self.model):  # exactly the anchor: every delta off
            return greedy_exact(self.model, examples, self.data.pad_id, bs)

    def _update(self, ts: list[int], examples: list[Example]) -> list[Trip]:
        s, step = self.p.stream, self.state["updates"]
        drawn = []
        if len(self.replay) and s.replay_batch:
            drawn = [self.replay.items[i] for i in self.replay.sample(s.replay_batch, step)]
        batch = examples + [self.data.stream[t % len(self.data.stream)] for t in drawn]
        self.model.train()
        per_example = _per_example_ce(self.model, batch, self.data.pad_id)
        ce = per_example.mean()
        loss = ce
        if self.guard is not None:
            o = self.p.online
            loss = loss + o.ewc_lambda * ewc_penalty(
                self.model, self.guard.reference, self.guard.fisher
            )
            loss = loss + o.prox_lambda * proximal_penalty(self.model, self.guard.reference)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = gradient_norm(self.model)
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.opt.step()
        self.model.eval()
        for t, value in zip(ts, per_example[: len(ts)].tolist(), strict=True):
            self.replay.add(t, max(float(value), 1e-6))
        self.state["updates"] = step + 1
        self.state["losses"].append([step + 1, float(ce.detach())])
        if self.guard is None:
            return []
        reading = self._drift(grad_norm)
        self.state["drift"].append([step + 1, *astuple(reading)])
        self.state["drift_checks"] += 1
        report = check_drift(reading, self.p.drift)
        self.state["trips"] += bool(report.tripped)
        return list(report.tripped)

    @torch.no_grad()
    def _drift(self, grad_norm: float) -> DriftReading:
        g = self.guard
        assert g is not None
        return DriftReading(
            kl=drift_kl(self.model, g.drift_batches),
            param_distance=parameter_distance(self.model, g.reference),
            grad_norm=grad_norm,
            spectral_norm=controller_spectral_norm(self.model, g.reference),
        )


@torch.no_grad()
def drift_kl(model: nn.Module, batches: Sequence[Any]) -> float:
    """KL(anchor || learner) of the next-token distributions, mean over the drift set's tokens.
    Batch by batch, with the anchor's logits recomputed (deltas off) rather than kept: [N, T, V]
    logits of a full-size vocabulary would not fit for the whole phase."""
    total, count = 0.0, 0.0
    for b in batches:
        with bem_disabled(model):
            anchor = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        learner = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        n = float(b.attention_mask.sum())
        total += probe_kl(anchor.float(), learner.float(), b.attention_mask) * n
        count += n
    return total / max(count, 1.0)


@dataclass
class StreamData:
    pad_id: int
    stream: list[Example]
    regular: list[bool]  # stream prompt t is of the regular mixture
    probe: list[Example]
    canary: list[Example]
    drift: list[Example]


def _stream_data(ctx: Any, codec: TextCodec) -> StreamData:
    stream = _read(ctx, "stream")
    return StreamData(
        pad_id=codec.pad_id,
        stream=encode_items(stream, codec),
        regular=[it.variant == BASE for it in stream],
        probe=encode_items(_read(ctx, "probe"), codec),
        canary=encode_items(_read(ctx, "canary"), codec),
        drift=encode_items(_read(ctx, "drift"), codec),
    )


def _make_guard(
    model: nn.Module, p: MissionBParams, data: StreamData, last_good_dir: Path
) -> Guard:
    """At the promoted weights: their snapshot, the diagonal Fisher of the anchor task (regular
    pre-t0 stream items), and the anchor's logits on the drift set."""
    regular = [e for e, r in zip(data.stream[: p.data.inject_at], data.regular, strict=False) if r]
    o = p.online
    size = o.fisher_batch_size
    batches = [regular[i : i + size] for i in range(0, size * o.fisher_batches, size)]
    batches = [b for b in batches if b]

    def log_likelihood(m: nn.Module, batch: list[Example]) -> torch.Tensor:
        return -_per_example_ce(m, batch, data.pad_id).mean()

    model.train()
    fisher = diagonal_fisher(model, batches, log_likelihood)
    model.eval()
    bs = p.stream.batch_size
    drift_batches = [
        make_batch(data.drift[i : i + bs], data.pad_id, loss_on_prompt=False).to(_device(model))
        for i in range(0, len(data.drift), bs)
    ]
    return Guard(
        reference=snapshot(model),
        fisher=fisher,
        drift_batches=drift_batches,
        last_good=LastGood(last_good_dir, trainable_only=True),
    )


def _checkpoints(ctx: Any, p: MissionBParams, name: str, fingerprint: str) -> CheckpointManager:
    return fingerprinted_checkpoints(
        ctx.out_dir / "ckpt" / name, p.stream.keep_checkpoints, fingerprint, trainable_only=True
    )


def run_stream(
    ctx: Any, engine: Engine, start: int, stop: int, name: str, manager: CheckpointManager
) -> dict[str, Any]:
    """Prompts [start, stop) through ``engine``, resumable from ``manager``'s checkpoints."""
    s = engine.p.stream
    loaded = manager.resume(engine.model, engine.opt) if engine.learn else None
    position = start
    if loaded is not None:
        position = int(loaded.extra.pop("position"))
        engine.restore_state(dict(loaded.extra))
        ctx.log.info("%s: resumed %s at prompt %d (%s)", ctx.phase, name, position, loaded.path)
    total = (stop - start) // s.update_every
    cuda = _device(engine.model).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(_device(engine.model))
    rss = [current_rss_mib()]
    while position < stop:
        events = engine.chunk(range(position, position + s.update_every))
        position += s.update_every
        rss.append(current_rss_mib())
        k = (position - start) // s.update_every
        special = events["rolled_back"] or events["canary_checked"]
        if engine.learn and (k % s.checkpoint_every == 0 or position == stop or special):
            manager.save(
                k, engine.model, engine.opt, extra=engine.snapshot_state() | {"position": position}
            )
        losses = engine.state["losses"]
        progress(ctx, name, k, total, loss=losses[-1][1] if losses else math.nan)
    # this phase's process only (a resumed run measures its own part): the living model's
    # footprint while it serves and learns, and its growth over the stream
    engine.state["memory"] = {
        "rss_peak_mib": max(rss),
        "rss_growth_mib": rss[-1] - rss[0],
        "cuda_peak_mib": torch.cuda.max_memory_allocated(_device(engine.model)) / 2**20
        if cuda
        else None,
    }
    return engine.state


def _probe_evals(rows: Sequence[Sequence[int]]) -> list[ProbeEval]:
    return [ProbeEval(int(a), int(f), int(n)) for a, f, n in rows]


# ============================================================================ phases
def prepare(ctx: Any) -> dict[str, Any]:
    """The anchor, then the data: one feedback-stream draw split into the six files, checked
    content-disjoint (file:line), and checked that the anchor gets the variant wrong."""
    p = _params(ctx)
    anchor_info, anchor_metrics = _prepare_anchor(ctx, p)
    anchor_model = load_model(_anchor_dir_of(ctx, anchor_info), dtype=_dtype(p), device=ctx.device)
    _freeze(anchor_model)
    codec = load_codec(_anchor_dir_of(ctx, anchor_info))
    d = p.data
    parts = make_feedback_stream(
        seed=d.seed,
        n_stream=d.n_stream,
        inject_at=d.inject_at,
        variant=d.variant,
        variant_rate=d.variant_rate,
        n_probe=d.n_probe_pool + d.n_variant_test,
        n_heldout=d.n_heldout + d.n_canary_pool + d.n_drift,
        config=_item_space(p),
    )
    probe_pool, variant_test = parts["probe"][: d.n_probe_pool], parts["probe"][d.n_probe_pool :]
    heldout = parts["heldout"][: d.n_heldout]
    canary_pool = parts["heldout"][d.n_heldout : d.n_heldout + d.n_canary_pool]
    drift = parts["heldout"][d.n_heldout + d.n_canary_pool :]

    def exact(items: Sequence[Any]) -> list[bool]:
        return greedy_exact(anchor_model, encode_items(items, codec), codec.pad_id)

    # A probe's regular form (same facts and question, old convention): the anchor knows it.
    regular_forms = [make_item(it.facts, it.op, it.args, split="probe") for it in probe_pool]
    probe = [it for it, ok in zip(probe_pool, exact(regular_forms), strict=True) if ok][: d.n_probe]
    canary = [it for it, ok in zip(canary_pool, exact(canary_pool), strict=True) if ok]
    canary = canary[: d.n_canary]
    files = {
        "stream": parts["stream"],
        "probe": probe,
        "variant_test": variant_test,
        "heldout": heldout,
        "canary": canary,
        "drift": drift,
    }
    for name, minimum in (("probe", d.min_probes), ("canary", d.min_canaries)):
        if len(files[name]) < minimum:
            raise ValueError(
                f"{name}.jsonl: only {len(files[name])} items (< data.min_{name}s={minimum}); the "
                f"anchor answers too few of data.n_{name}_pool items exactly: raise the pool or "
                "train a stronger anchor"
            )
    paths = {name: ctx.out_dir / f"{name}.jsonl" for name in DATA_FILES}
    for name, rows in files.items():
        write_jsonl(paths[name], rows)
    check_data(paths, ctx.out_dir / "anchor_train.jsonl")
    anchor_probe_failure = 1 - sum(exact(probe)) / len(probe)
    if anchor_probe_failure < d.min_anchor_probe_failure:
        raise ValueError(
            f"{paths['probe']}: the anchor fails only {anchor_probe_failure:.1%} of the "
            f"{d.variant!r} probes (< data.min_anchor_probe_failure="
            f"{d.min_anchor_probe_failure:.0%}): the failure mode was not injected"
        )
    return (
        anchor_metrics
        | {f"n_{name}": len(rows) for name, rows in files.items()}
        | {
            "anchor_probe_failure": anchor_probe_failure,
            "anchor_regular_exact": sum(exact(heldout)) / len(heldout),
            "anchor_variant_exact": sum(exact(variant_test)) / len(variant_test),
            "anchor_probe_regular_form_exact": len(probe) / len(probe_pool),
            "stream_variant_share_after_t0": _variant_share(parts["stream"], d.inject_at),
        }
    )


def check_data(paths: dict[str, Path], anchor_train: Path | None = None) -> None:
    """Read every file back through its validator; no two files (nor rows of one) share
    content (file:line of both); the own anchor's training set shares nothing with the
    held-out files (it may share with the stream: both are training data)."""
    rows: dict[str, list[Any]] = {str(path): read_feedback_stream(path) for path in paths.values()}
    check_disjoint(rows)
    if anchor_train is not None and anchor_train.is_file():
        held = {k: v for k, v in rows.items() if not k.endswith("stream.jsonl")}
        check_disjoint({str(anchor_train): read_compositional(anchor_train)} | held)


def _variant_share(stream: Sequence[StreamItem], t0: int) -> float:
    after = stream[t0:]
    return sum(it.injected for it in after) / len(after)


def _anchor_dir_of(ctx: Any, info: dict[str, Any]) -> Path:
    path = Path(info["path"])
    return path if path.is_absolute() else ctx.out_dir / path


def _prepare_anchor(ctx: Any, p: MissionBParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """anchor.json (source, path, sha256) for Mission A's base in this run, a local model
    (model.path), or an own anchor trained here with the fleet's base-LM recipe."""
    a_base = _mission_a_base(ctx)
    if p.model.path:
        path = Path(p.model.path)
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"params.model.path={path}: expected a local model directory with config.json "
                "and *.safetensors (nothing is downloaded)"
            )
        info: dict[str, Any] = {"source": "local", "path": str(path.resolve())}
    elif a_base is not None:
        _check_same_items(ctx, p)
        info = {"source": "mission_a", "path": str(a_base.resolve())}
    else:
        info = {"source": "own", "path": "anchor/model"}
        _train_own_anchor(ctx, p)
    weights = sorted(_anchor_dir_of(ctx, info).glob("*.safetensors"))
    info["sha256"] = {w.name: sha256_file(w) for w in weights}
    atomic_write_json(ctx.out_dir / "anchor.json", info)
    ctx.log.info("mission_b anchor: %s (%s)", info["source"], info["path"])
    return info, {"anchor_source": info["source"]}


def _mission_a_base(ctx: Any) -> Path | None:
    """Mission A's trained base model in this run, when it is complete."""
    if ctx.layout is None or "mission_a" not in ctx.cfg.params:
        return None
    phase = ctx.layout.phase_dir("mission_a", "pretrain_base")
    if not (phase / "manifest.json").is_file() or not (phase / "model").is_dir():
        return None
    require_intact(phase, "mission_b.prepare: Mission A's base model")
    return Path(phase / "model")


def _check_same_items(ctx: Any, p: MissionBParams) -> None:
    a = ctx.cfg.params["mission_a"].data
    differ = [k for k in ITEM_SPACE if getattr(a, k) != getattr(p.data, k)]
    if differ:
        shown = ", ".join(f"{k}: {getattr(a, k)!r} vs {getattr(p.data, k)!r}" for k in differ)
        raise ValueError(
            "mission_b anchors on Mission A's base model, so its item space must equal Mission "
            "A's: params.data in experiments/mission_b_living_model.yml differs from "
            f"experiments/mission_a_agentic_planner.yml ({shown})"
        )


def _train_own_anchor(ctx: Any, p: MissionBParams) -> None:
    """A tiny LM with Mission A's recipe (common.pretrain_lm) on Suite A train-region items."""
    codec = TextCodec(ByteTokenizer())
    items = make_compositional(
        seed=p.data.seed, sizes={"train": p.data.anchor_train}, config=_item_space(p)
    )["train"]
    write_jsonl(ctx.out_dir / "anchor_train.jsonl", items)
    train = encode_items(items, codec)
    spec = p.anchor_training
    fp = anchor_fingerprint(p)
    model, run = pretrain_lm(
        ctx, "anchor", train, codec.pad_id, p.model, spec, seed=p.data.seed, fingerprint=fp,
        max_new_tokens=p.evaluate.max_new_tokens,
    )  # fmt: skip
    save_model(model, ctx.out_dir / "anchor" / "model", codec.tok)
    plot_series(ctx.out_dir / "anchor_loss.png", {"LM loss": run["history"]}, "anchor", "step")


def anchor_fingerprint(p: MissionBParams) -> str:
    """Only what the own anchor is trained from: stream or pool sizes do not retrain it."""
    d = p.data
    return fingerprint_of(p.model, _item_space(p), d.anchor_train, d.seed, p.anchor_training)


def _stream_fingerprint(ctx: Any, p: MissionBParams, *extra: Any) -> str:
    return fingerprint_of(
        p.controller,
        p.stream,
        p.data,
        ctx.seed,
        input_digest(ctx, "prepare", None, "anchor.json", *(f"{n}.jsonl" for n in DATA_FILES)),
        *extra,
    )


def shadow(ctx: Any) -> dict[str, Any]:
    """The learner learns on [0, shadow_until) while the anchor serves those prompts."""
    p = _params(ctx)
    model, codec = _learner(ctx, p)
    data = _stream_data(ctx, codec)
    engine = Engine(ctx, p, model, data, learn=True, serve_learner=False)
    manager = _checkpoints(ctx, p, "shadow", _stream_fingerprint(ctx, p))
    state = run_stream(ctx, engine, 0, p.stream.shadow_until, "shadow", manager)
    save_weights(ctx.out_dir / "learner.safetensors", model, trainable_only=True)
    atomic_write_json(ctx.out_dir / "state.json", state)
    t0 = p.data.inject_at
    evals = _probe_evals(state["probe_evals"])
    after = [e for e in evals if e.after_prompt > t0]
    return {
        "prompts": p.stream.shadow_until,
        "updates": state["updates"],
        "final_loss": state["losses"][-1][1],
        "trainable_parameters": sum(q.numel() for q in trainable(model).values()),
        "anchor_served_exact": _served_rate(state["served"]),
        "learner_probe_failure_last": after[-1].failed / after[-1].probes if after else None,
    }


def _served_rate(served: Sequence[Sequence[int]]) -> float:
    return sum(ok for _, ok in served) / max(len(served), 1)


def canary_gate(ctx: Any) -> dict[str, Any]:
    """Activate the shadow learner iff its canary pass rate >= activation_threshold."""
    p = _params(ctx)
    model, codec = _learner(ctx, p)
    load_weights(
        ctx.input_dir("shadow", ctx.seed) / "learner.safetensors", model, trainable_only=True
    )
    canary = encode_items(_read(ctx, "canary"), codec)
    learner_rate = _pass_rate(model, canary, codec.pad_id, p.stream.batch_size)
    with bem_disabled(model):
        anchor_rate = _pass_rate(model, canary, codec.pad_id, p.stream.batch_size)
    decision = {
        "activated": learner_rate >= p.canary.activation_threshold,
        "canary_pass_rate": learner_rate,
        "anchor_canary_pass_rate": anchor_rate,
        "activation_threshold": p.canary.activation_threshold,
        "n_canary": len(canary),
    }
    atomic_write_json(ctx.out_dir / "gate.json", decision)
    ctx.log.info(
        "canary gate: learner %.3f vs threshold %.3f -> %s",
        learner_rate,
        p.canary.activation_threshold,
        "activate" if decision["activated"] else "keep the anchor",
    )
    return decision | {"activated": int(decision["activated"])}


def _activated(ctx: Any) -> bool:
    gate = json.loads((ctx.input_dir("canary_gate", ctx.seed) / "gate.json").read_text())
    return bool(gate["activated"])


def _promoted(ctx: Any, p: MissionBParams) -> tuple[nn.Module, TextCodec]:
    model, codec = _learner(ctx, p)
    load_weights(
        ctx.input_dir("shadow", ctx.seed) / "learner.safetensors", model, trainable_only=True
    )
    return model, codec


def online(ctx: Any) -> dict[str, Any]:
    """The activated learner serves and learns on [shadow_until, n_stream) with EWC, the
    proximal term and replay; drift and canary checks roll back to the last good weights. Not
    activated: the anchor keeps serving and nothing learns."""
    p = _params(ctx)
    activated = _activated(ctx)
    model, codec = _promoted(ctx, p)
    data = _stream_data(ctx, codec)
    shadow_digest = input_digest(ctx, "shadow", ctx.seed, "learner.safetensors")
    fp = _stream_fingerprint(ctx, p, p.online, p.canary, p.drift, shadow_digest, activated)
    # last_good lives inside the fingerprinted folder: a changed config starts it afresh too
    manager = _checkpoints(ctx, p, "online", fp)
    last_good = manager.directory / "last_good"
    guard = _make_guard(model, p, data, last_good) if activated else None
    engine = Engine(ctx, p, model, data, learn=activated, serve_learner=activated, guard=guard)
    if guard is not None and guard.last_good.step is None:
        guard.last_good.mark(0, model, engine.opt)  # the promoted weights are good by the gate
    state = run_stream(ctx, engine, p.stream.shadow_until, p.data.n_stream, "online", manager)
    save_weights(ctx.out_dir / "learner.safetensors", model, trainable_only=True)
    rollbacks = guard.last_good.rollbacks if guard is not None else []
    state["rollback_log"] = [
        {"at_update": r.at_step, "restored_update": r.restored_step,
         "tripped": [vars(t) for t in r.tripped]}
        for r in rollbacks
    ]  # fmt: skip
    state["serving"] = "learner" if activated else "anchor"
    atomic_write_json(ctx.out_dir / "state.json", state)
    _plot_online(ctx.out_dir / "online.png", state, p.stream.shadow_until, p.stream.update_every)
    return {
        "activated": int(activated),
        "serving": state["serving"],
        "updates": state["updates"],
        "rollbacks": state["rollbacks"],
        "drift_checks": state["drift_checks"],
        "drift_trips": state["trips"],
        "canary_checks": len(state["canary"]),
        "canary_failures": state["canary_failures"],
        "served_exact": _served_rate(state["served"]),
        "final_loss": state["losses"][-1][1] if state["losses"] else None,
        "max_kl": max((r[1] for r in state["drift"]), default=None),
        "max_param_distance": max((r[2] for r in state["drift"]), default=None),
        "max_grad_norm": max((r[3] for r in state["drift"]), default=None),
        "max_spectral_norm": max((r[4] for r in state["drift"]), default=None),
    }


def _plot_online(path: Path, state: dict[str, Any], start: int, every: int) -> None:
    """Every series against prompts: update u ends after prompt start + u * every."""

    def prompt(update: int) -> int:
        return start + update * every

    plot_series(
        path,
        {
            "probe failure rate": [[a, f / n] for a, f, n in state["probe_evals"]],
            "canary pass rate": state["canary"],
            "drift KL": [[prompt(r[0]), r[1]] for r in state["drift"]],
            "rollbacks": [
                [prompt(r["at_update"]), i + 1] for i, r in enumerate(state.get("rollback_log", []))
            ],
        },
        "online",
        "prompt",
    )


def evaluate(ctx: Any) -> dict[str, Any]:
    """The served system (candidate ``online``) vs the anchor (baseline) on held-out regular and
    variant items, decoded; time_to_fix from the probe evaluations; paired records."""
    p = _params(ctx)
    seed = ctx.seed or 0
    t0 = p.data.inject_at
    shadow_state = json.loads((ctx.input_dir("shadow", ctx.seed) / "state.json").read_text())
    online_state = json.loads((ctx.input_dir("online", ctx.seed) / "state.json").read_text())
    activated = online_state["serving"] == "learner"

    anchor, codec = load_anchor(ctx, p)
    served, _ = _learner(ctx, p)
    load_weights(
        ctx.input_dir("online", ctx.seed) / "learner.safetensors", served, trainable_only=True
    )
    probe = encode_items(_read(ctx, "probe"), codec)
    anchor_failed = len(probe) - sum(greedy_exact(anchor, probe, codec.pad_id))

    served_evals, learner_evals = probe_records(
        _probe_evals(shadow_state["probe_evals"]),
        _probe_evals(online_state["probe_evals"]),
        ProbeEval(0, anchor_failed, len(probe)),
        activated=activated,
    )
    horizon = p.data.n_stream - t0
    fix = time_to_fix(served_evals, t0, p.fix.window, p.fix.threshold)
    learner_fix = time_to_fix(learner_evals, t0, p.fix.window, p.fix.threshold)

    systems = {"online": served if activated else anchor, "anchor": anchor}
    heldout = _read(ctx, "heldout")
    variant = _read(ctx, "variant_test")
    items = heldout + variant
    examples = encode_items(items, codec)
    share = {BASE: 1 - p.data.variant_rate, p.data.variant: p.data.variant_rate}
    count = {BASE: len(heldout), p.data.variant: len(variant)}
    weight = {g: share[g] * len(items) / count[g] for g in share}
    rows: dict[str, list[dict[str, float]]] = {}
    for name in ("online", "anchor"):
        decoder = _decoder(systems[name], codec, p)
        decoded = decode_all(decoder, examples, p.evaluate.batch_size)
        rows[name] = []
        for it, e, dec in zip(items, examples, decoded, strict=True):
            em, f1 = answer_em_f1(extract_answer(codec.decode(dec.tokens)), e.answer)
            rows[name].append({"em": em, "f1": f1, "aggregate_score": weight[it.variant] * em})
    # Timed: regular and variant items alternately (both slices of the stream); warm-up on
    # drift items, which are never timed nor scored.
    timed = _interleave(range(len(heldout)), range(len(heldout), len(items)))
    timed = timed[: p.evaluate.latency_examples]
    warmup = encode_items(_read(ctx, "drift"), codec)[: p.evaluate.latency_warmup]
    latency = timed_decodes(
        {n: _decoder(systems[n], codec, p) for n in ("online", "anchor")},
        [examples[i] for i in timed],
        warmup,
    )
    for k, i in enumerate(timed):
        per_token = {n: latency[n][k].latency_per_token_ms for n in latency}
        for name, dec in ((n, latency[n][k]) for n in latency):
            rows[name][i] |= {"latency_ms": dec.total_ms, "ttft_ms": dec.ttft_ms}
            step = per_token[name]
            if step is not None and None not in per_token.values():  # a pair, or neither
                rows[name][i]["latency_per_token_ms"] = step

    rollback_count = int(online_state["rollbacks"])
    drift_rate = (
        online_state["trips"] / online_state["drift_checks"]
        if online_state["drift_checks"]
        else 0.0
    )
    run_metrics = {
        "time_to_fix": float(fix if fix is not None else horizon),
        "rollback_count": float(rollback_count),
        "drift_rate": float(drift_rate),
        "canary_failures": float(online_state["canary_failures"]),
    }
    records = [
        ExampleRecord(it.id, name, seed, rows[name][i], (SLICE,))
        for name in ("online", "anchor")
        for i, it in enumerate(items)
    ]
    records.append(ExampleRecord("run", "online", seed, run_metrics, (SLICE,)))
    write_records(ctx.out_dir / "records.jsonl", records)

    def mean(name: str, key: str, group: str | None = None) -> float:
        vals = [
            r[key] for r, it in zip(rows[name], items, strict=True) if group in (None, it.variant)
        ]
        return sum(vals) / len(vals)

    agg = {n: mean(n, "aggregate_score") for n in ("online", "anchor")}
    per_tok = {n: [r["latency_per_token_ms"] for r in rows[n] if "latency_per_token_ms" in r]
               for n in ("online", "anchor")}  # fmt: skip
    lat = {n: summarize_latencies(per_tok[n]) for n in ("online", "anchor")}
    total = {n: summarize_latencies([d.total_ms for d in latency[n]]) for n in latency}
    metrics: dict[str, Any] = {
        "anchor_used": json.loads((ctx.input_dir("prepare") / "anchor.json").read_text())["source"],
        "serving": online_state["serving"],
        "time_to_fix": run_metrics["time_to_fix"],
        "time_to_fix_censored": int(fix is None),
        "learner_time_to_fix": float(learner_fix if learner_fix is not None else horizon),
        "learner_time_to_fix_censored": int(learner_fix is None),
        "rollback_count": rollback_count,
        "drift_rate": drift_rate,
        "canary_failures": online_state["canary_failures"],
        "online_aggregate": agg["online"],
        "anchor_aggregate": agg["anchor"],
        "aggregate_improvement": (
            100 * (agg["online"] / agg["anchor"] - 1) if agg["anchor"] else None
        ),
        "memory_usage_mib": online_state["memory"]["rss_peak_mib"],
        "memory_growth_mib": online_state["memory"]["rss_growth_mib"],
        "n_heldout": len(heldout),
        "n_variant_test": len(variant),
        "n_latency": len(timed),
    }
    if online_state["memory"]["cuda_peak_mib"] is not None:
        metrics["cuda_memory_mib"] = online_state["memory"]["cuda_peak_mib"]
    for name in ("online", "anchor"):
        for group, label in ((BASE, "regular"), (p.data.variant, "variant")):
            metrics[f"{name}_{label}_em"] = mean(name, "em", group)
    for q in ("p50", "p95"):
        a, o = getattr(lat["anchor"], f"{q}_ms"), getattr(lat["online"], f"{q}_ms")
        metrics[f"latency_overhead_{q}"] = o / a - 1.0  # per generated token, as Mission A
        a, o = getattr(total["anchor"], f"{q}_ms"), getattr(total["online"], f"{q}_ms")
        metrics[f"latency_overhead_total_{q}"] = o / a - 1.0
    metrics["headline"] = [  # numbers only (the dashboard checks): `serving` is a label
        "time_to_fix", "time_to_fix_censored", "aggregate_improvement",
        "rollback_count", "online_variant_em", "anchor_variant_em", "online_regular_em",
        "anchor_regular_em",
    ]  # fmt: skip
    plot_series(
        ctx.out_dir / "probes.png",
        {
            "served probe failure": [[e.after_prompt, e.failed / e.probes] for e in served_evals],
            "learner probe failure": [[e.after_prompt, e.failed / e.probes] for e in learner_evals],
        },
        f"probes (t0={t0}) seed {seed}",
        "prompt",
    )
    return metrics


def probe_records(
    shadow: Sequence[ProbeEval],
    online: Sequence[ProbeEval],
    anchor: ProbeEval,
    *,
    activated: bool,
) -> tuple[list[ProbeEval], list[ProbeEval]]:
    """(served, learner) probe records. Served: the anchor's result (``anchor``, computed once;
    its after_prompt is ignored) at every shadow point, then the online learner's if the gate
    activated it, else the anchor's still. Learner: shadow then online (when it learned)."""

    def of_anchor(evals: Sequence[ProbeEval]) -> list[ProbeEval]:
        return [ProbeEval(e.after_prompt, anchor.failed, anchor.probes) for e in evals]

    served = of_anchor(shadow) + (list(online) if activated else of_anchor(online))
    learner = list(shadow) + (list(online) if activated else [])
    return served, learner


def _decoder(model: nn.Module, codec: TextCodec, p: MissionBParams) -> RoutedDecoder:
    return RoutedDecoder(
        model, eos_id=codec.eos_id, max_new_tokens=p.evaluate.max_new_tokens, device=_device(model)
    )


def _interleave(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = [x for pair in zip(a, b, strict=False) for x in pair]
    n = min(len(a), len(b))
    return out + list(a[n:]) + list(b[n:])


# ============================================================================ soak
def soak(ctx: Any, *, duration_s: float, canary_every: int | None = None) -> dict[str, Any]:
    """Continue the served learner from ``online`` on the stream replayed cyclically, with the
    online rules (penalties to the promoted weights, drift and canary checks, rollbacks), for
    ``duration_s`` of wall time; ``soak.run_soak`` measures rollbacks and memory growth."""
    from bem_tasks.missions.soak import SoakChunk, run_soak

    p = _params(ctx)
    activated = _activated(ctx)
    model, codec = _promoted(ctx, p)
    data = _stream_data(ctx, codec)
    shutil.rmtree(ctx.out_dir / "last_good", ignore_errors=True)  # a soak does not resume
    guard = _make_guard(model, p, data, ctx.out_dir / "last_good") if activated else None
    load_weights(
        ctx.input_dir("online", ctx.seed) / "learner.safetensors", model, trainable_only=True
    )
    every = canary_every or p.canary.canary_every
    if every % p.stream.update_every:
        raise ValueError(
            f"soak canary_every={every} must be a multiple of stream.update_every="
            f"{p.stream.update_every}"
        )
    engine = Engine(
        ctx, p, model, data, learn=activated, serve_learner=activated, guard=guard,
        canary_every=every,
    )  # fmt: skip
    if guard is not None:
        guard.last_good.mark(0, model, engine.opt)
    position = [0]

    def advance() -> SoakChunk:
        rollbacks = checks = failures = 0
        for _ in range(every // p.stream.update_every):
            start = position[0]
            events = engine.chunk(range(start, start + p.stream.update_every))
            position[0] = start + p.stream.update_every
            rollbacks += events["rolled_back"]
            checks += events["canary_checked"]
            failures += events["canary_failed"]
        # histories stay bounded over a long soak: the report reads the chunk counts
        for key in ("served", "losses", "drift", "probe_evals", "canary"):
            engine.state[key] = engine.state[key][-1000:]
        return SoakChunk(every, rollbacks, checks, failures)

    report = run_soak(advance, duration_s=duration_s, out_dir=ctx.out_dir)
    # not activated: the anchor serves and nothing learns, so its 0 rollbacks say nothing
    return report | {"serving": "learner" if activated else "anchor", "learning": activated}
