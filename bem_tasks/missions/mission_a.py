"""Mission A, Agentic Planner: a macro-policy router over skill experts vs one fused BEM.

Phases (each ``fn(ctx) -> metrics``; inputs only through ``ctx.input_dir``):

    prepare            Suite A train/dev/test JSONL, read back and validated
    pretrain_base      tiny byte-level GPT-2 trained from scratch (smoke), or a local model (full)
    train_experts      per seed: one BEM expert per skill under oracle routing + the fused baseline
                       (K=1) at parameter parity with experts + macro-policy router, each at the
                       best (lr, alpha) of the same tuning grid and budget (dev loss)
    behavioral_cloning per seed: macro-policy cloned from the oracle plans (AR0)
    policy_gradient    per seed: PPO on real decoded-answer reward in a KL trust region (AR1);
                       dev reward of the BC vs the PPO router, paired, with a bootstrap CI
    evaluate           per seed: router vs baseline on test (slice_b) and dev (slice_a)

Evaluation definitions (greedy decoding with a K/V cache; every dev/test example is decoded in
batches of prompts of one length, which gives the batch-1 tokens and decisions, tested):

    em, f1          exact typed answer EM / order-aware element F1 in points (0..100) of the
                    answer ``extract_answer`` finds in the decoded text, against the gold JSON
                    answer (``bem_tasks.eval.metrics.answer_em_f1``; 0 when none parses; F1 = EM
                    for a scalar answer; a list answer such as ``sort``'s is matched as a longest
                    common subsequence, so unsorted right values get partial credit only)
    plan_length     router only: segments of the decoded (horizon-locked) decision sequence;
                    <= plan horizon by construction, so reported, not gated
    plan_length_unconstrained  router only: segments of a second decode with the horizon lock
                    off (the router is trained at locked states too; gated <= 3)
    flip_rate, flip_rate_unconstrained  router only: expert switches / routing decisions of
                    those two decodes (the fused baseline makes no routing decisions: no record)
    latency_ms, ttft_ms  on the first evaluate.latency_examples test items only: a batch-1
                    decode's wall time, whole and to the first token (prompt prefill included),
                    timed by the decoder; both systems interleaved on the same device,
                    alternating which goes first
    latency_per_token_ms  (latency_ms - ttft_ms) / (generated tokens - 1): one decoding step
                    (gated: the systems stop at different lengths, and the prefill is per request)
    kv_hit_ratio    per context group of a serving workload (per test context up to
                    evaluate.kv_questions requests that share its facts and differ in the
                    question; record id kv:<item id>): prompt tokens a per-system prefix cache
                    serves / prompt tokens. The first request of a group misses and stores the
                    prefix K/V; a later request reuses the leading positions whose K/V are
                    bit-identical to a fresh computation of the prefix under its own routing. A
                    system that routes the prefix from the question loses them.
    kv_reuse_agreement  metrics only: share of the requests that reused a prefix whose decode
                    from the served cache equals their decode from a full-prompt prefill
    base_kv_share   per context group: mean share of the prompt's K/V head vectors bit-identical
                    to the frozen base model's (router 1.0: prompt tokens get zero gates;
                    reported, not gated)

Training loops, resumable checkpoints, progress and plots come from ``bem_tasks.missions.common``.
See ``bem_tasks.missions.planner`` for the router, routed decoding and the KV-hit measurement.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bem_tasks.config.schema import TrainingSpec
from bem_tasks.core import (
    attach_bem,
    bem_disabled,
    bem_layers,
    bem_routing,
    count_bem_parameters,
    detach_bem,
    load_model,
    load_weights,
    save_model,
    save_weights,
)
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data import check_disjoint, extract_answer, generate_compositional, write_jsonl
from bem_tasks.data.suites.compositional import (
    ARITY,
    SKILLS,
    CompositionalItem,
    make_item,
    read_compositional,
)
from bem_tasks.eval import ExampleRecord, answer_em_f1, write_records
from bem_tasks.eval.latency import summarize_latencies
from bem_tasks.io import atomic_write_json
from bem_tasks.missions.common import (
    fingerprint_of,
    fingerprinted_checkpoints,
    input_digest,
    mission_params,
    plot_series,
    pretrain_lm,
    progress,
    step_rng,
    torch_dtype,
    train_loop,
)
from bem_tasks.missions.mission_a_params import MissionAParams
from bem_tasks.missions.planner import (
    Batch,
    Decoded,
    Example,
    MacroRouter,
    PrefixCache,
    RolloutBatch,
    RoutedDecoder,
    TextCodec,
    bc_loss,
    closed_loop_accuracy,
    decode_all,
    encode_items,
    expected_reward,
    greedy_chooser,
    kv_share,
    load_codec,
    make_batch,
    ppo_update,
    sampling_chooser,
    shared_prefix,
    skill_gates,
    teacher_forced_chunks,
    timed_decodes,
)
from bem_tasks.stats import paired_bootstrap

SPLITS = ("train", "dev", "test")
SLICES = {"test": "slice_b", "dev": "slice_a"}  # slice_b gates, slice_a is reported
SYSTEMS = ("router", "baseline")
TRAINED_SYSTEMS = ("experts", "baseline")  # what train_experts trains (and tunes alike)
PARITY_TOLERANCE = 0.05


# ============================================================================ helpers
def _params(ctx: Any) -> MissionAParams:
    return mission_params(ctx, MissionAParams, "mission_a")


def _read_split(ctx: Any, split: str) -> list[Any]:
    return read_compositional(ctx.input_dir("prepare") / f"{split}.jsonl")


def _dtype(p: MissionAParams) -> torch.dtype:
    return torch_dtype(p.runtime.dtype)


def _base_dir(ctx: Any) -> Path:
    """Where the base model lives: saved by pretrain_base, or the local path it validated."""
    out = ctx.input_dir("pretrain_base")
    if (out / "model" / "config.json").is_file():
        return Path(out / "model")
    info = out / "base.json"
    if not info.is_file():
        raise FileNotFoundError(f"{out}: neither model/ nor base.json (run pretrain_base first)")
    return Path(json.loads(info.read_text())["path"])


def _base_digest(ctx: Any) -> list[str]:
    return input_digest(ctx, "prepare", None, "train.jsonl") + input_digest(
        ctx, "pretrain_base", None, "model/model.safetensors", "base.json"
    )


def _load_base(ctx: Any, p: MissionAParams) -> tuple[nn.Module, TextCodec]:
    base_dir = _base_dir(ctx)
    model = load_model(base_dir, dtype=_dtype(p), device=ctx.device)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model, load_codec(base_dir)


def _sites(p: MissionAParams) -> list[str]:
    return list(p.bem.sites)


def _bem_used(p: MissionAParams) -> dict[str, Any]:
    """The bem block as Mission A uses it, for fingerprints: alpha is tuning's choice."""
    return p.bem.model_dump(exclude={"alpha"})


def _attach_experts(model: nn.Module, p: MissionAParams, seed: int, *, alpha: float) -> None:
    """`alpha`: the tuned value (systems.json `experts_alpha`)."""
    attach_bem(
        model,
        _sites(p),
        num_experts=len(SKILLS),
        rank=p.bem.rank,
        alpha=alpha,
        chunk_size=p.bem.chunk_size,
        tau=p.bem.tau,
        trust_budget=p.bem.trust_budget,
        seed=seed,
    )
    # Routing is external (oracle plan or macro-policy): each layer's own controller would be
    # dead weight, so it is dropped and not counted in the parameter budget.
    for _, layer in bem_layers(model):
        layer.router = None


def _attach_fused(
    model: nn.Module, p: MissionAParams, rank: int, seed: int, *, alpha: float
) -> None:
    """`alpha`: the tuned value (systems.json `baseline_alpha`)."""
    attach_bem(
        model,
        _sites(p),
        num_experts=1,
        rank=rank,
        alpha=alpha,
        chunk_size=p.bem.chunk_size,
        trust_budget=p.bem.trust_budget,
        seed=seed,
    )


def _new_router(model: nn.Module, p: MissionAParams, seed: int) -> MacroRouter:
    d_model = int(model.get_input_embeddings().embedding_dim)  # type: ignore[operator]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = MacroRouter(d_model, horizon=p.router.plan_horizon, hidden=p.router.hidden)
    return router.to(torch.float32)


def fused_rank_at_parity(experts: nn.Module, router: nn.Module) -> tuple[int, int, int]:
    """The parameter-parity rule: the fused baseline's rank whose parameters match the router
    system's (expert adapters + macro-policy router). ``experts``: a model carrying the expert
    adapters (alpha does not change the counts). Returns (rank, system parameters, parameters
    per fused rank column)."""
    per_rank = sum(layer.in_features + layer.out_features + 1 for _, layer in bem_layers(experts))
    system = count_bem_parameters(experts) + sum(q.numel() for q in router.parameters())
    return max(1, round(system / per_rank)), system, per_rank


def _systems_info(ctx: Any) -> dict[str, Any]:
    """train_experts' systems.json (parameter counts, chosen lr/alpha, baseline rank)."""
    path = ctx.input_dir("train_experts", ctx.seed) / "systems.json"
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def _experts_system(
    ctx: Any, p: MissionAParams, systems_info: dict[str, Any] | None = None
) -> tuple[nn.Module, TextCodec]:
    """The frozen base with the trained expert adapters; ``systems_info``: ``_systems_info(ctx)``
    when the caller has it already (read here otherwise)."""
    model, codec = _load_base(ctx, p)
    experts_dir = ctx.input_dir("train_experts", ctx.seed)
    if systems_info is None:
        systems_info = _systems_info(ctx)
    _attach_experts(model, p, ctx.seed or 0, alpha=systems_info["experts_alpha"])
    load_weights(experts_dir / "experts.safetensors", model, trainable_only=True)
    model.eval()
    return model, codec


def _load_router(model: nn.Module, p: MissionAParams, path: Path) -> MacroRouter:
    router = _new_router(model, p, 0)  # on the CPU: see RoutedDecoder
    load_weights(path, router)
    router.eval()
    return router


def _batch(examples: Sequence[Example], codec: TextCodec, seed: int, step: int, size: int) -> Batch:
    idx = step_rng(seed, step, 1).choice(
        len(examples), size=min(size, len(examples)), replace=False
    )
    return make_batch([examples[i] for i in idx], codec.pad_id, loss_on_prompt=False)


def _answer_scores(text: str, answer: str) -> tuple[float, float, bool]:
    """(EM, F1) in points of the answer in decoded ``text`` against the gold JSON ``answer``,
    compared as typed values (``-3`` is not ``3``), and whether an answer parsed at all."""
    pred = extract_answer(text)
    em, f1 = answer_em_f1(pred, answer)
    return em, f1, pred is not None


# ============================================================================ phases
def prepare(ctx: Any) -> dict[str, Any]:
    """Write Suite A train/dev/test (JSONL), read every row back through its validator and
    check that no two rows share a content key (same problem in another order), naming
    file:line of both if they do."""
    p = _params(ctx)
    d = p.data
    paths = generate_compositional(
        ctx.out_dir,
        seed=d.seed,
        n_train=d.n_train,
        n_dev=d.n_dev,
        n_test=d.n_test,
        n_keys=d.n_keys,
        min_facts=d.min_facts,
        max_facts=d.max_facts,
        value_min=d.value_min,
        value_max=d.value_max,
        ops=d.ops,
    )
    splits = {name: read_compositional(path) for name, path in paths.items()}
    check_disjoint({str(paths[name]): rows for name, rows in splits.items()})
    metrics: dict[str, Any] = {}
    for name in SPLITS:
        rows = splits[name]
        want = getattr(d, f"n_{name}")
        if len(rows) != want:
            raise ValueError(f"{paths[name]}: {len(rows)} rows, expected {want}")
        metrics[f"n_{name}"] = len(rows)
        metrics[f"{name}_mean_target_chars"] = sum(len(r.target) for r in rows) / len(rows)
        metrics[f"{name}_max_plan_length"] = max(len(r.plan) for r in rows)
        # shares of the answers that expose sign handling and give F1 partial credit
        n = len(rows)
        metrics[f"{name}_negative_answers"] = sum(r.answer.startswith("-") for r in rows) / n
        metrics[f"{name}_list_answers"] = sum(r.answer.startswith("[") for r in rows) / n
    metrics["ops"] = {op: sum(r.op == op for r in splits["train"]) for op in d.ops}
    return metrics


def pretrain_base(ctx: Any) -> dict[str, Any]:
    """Smoke: train the byte-level base LM on train prompts + targets. Full: validate the local
    model directory named by model.path and record it (nothing heavy is copied)."""
    p = _params(ctx)
    if p.model.path:
        return _record_local_base(ctx, p)
    codec = TextCodec(ByteTokenizer())
    train = encode_items(_read_split(ctx, "train"), codec)
    dev = encode_items(_read_split(ctx, "dev"), codec)
    spec = p.training.pretrain_base
    fp = fingerprint_of(p.model, p.data, spec, input_digest(ctx, "prepare", None, "train.jsonl"))
    model, run = pretrain_lm(
        ctx, "base", train, codec.pad_id, p.model, spec, seed=p.data.seed, fingerprint=fp,
        max_new_tokens=p.evaluate.max_new_tokens, also_fits=dev,
    )  # fmt: skip
    save_model(model, ctx.out_dir / "model", codec.tok)
    plot_series(ctx.out_dir / "loss.png", {"LM loss": run["history"]}, "pretrain_base", "step")
    decoder = RoutedDecoder(
        model, eos_id=codec.eos_id, max_new_tokens=p.evaluate.max_new_tokens, device=ctx.device
    )
    metrics: dict[str, Any] = {
        "final_loss": run["final_loss"],
        "resumed_from": run["resumed_from"],
        "parameters": sum(q.numel() for q in model.parameters()),
    }
    # The base alone on the held-out splits: the floor both adapter systems start from (batched
    # decoding gives the batch-1 tokens, as in evaluate, at a fraction of the time).
    for split, examples in (("dev", dev), ("test", encode_items(_read_split(ctx, "test"), codec))):
        decoded = decode_all(decoder, examples, p.evaluate.batch_size)
        em = [
            _answer_scores(codec.decode(d.tokens), e.answer)[0]
            for e, d in zip(examples, decoded, strict=True)
        ]
        metrics[f"base_{split}_em"] = sum(em) / len(em)
    return metrics


def _record_local_base(ctx: Any, p: MissionAParams) -> dict[str, Any]:
    from transformers import AutoConfig

    path = Path(str(p.model.path))
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"params.model.path={path}: expected a local model directory with config.json and "
            "*.safetensors (nothing is downloaded)"
        )
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != p.model.family:
        raise ValueError(
            f"params.model.family={p.model.family!r} but {path / 'config.json'} says "
            f"model_type={config.model_type!r}"
        )
    codec = load_codec(path)
    probe = codec.encode("k1=2|add k1 k1\n")
    info = {
        "path": str(path.resolve()),
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tokenizer": "byte" if codec.is_bytes else type(codec.tok).__name__,
    }
    atomic_write_json(ctx.out_dir / "base.json", info)
    return {"local_model": True, "model_type": config.model_type, "probe_tokens": len(probe)}


def train_experts(ctx: Any) -> dict[str, Any]:
    """One expert per skill under oracle routing, and the fused baseline at parameter parity.

    Parity covers tuning too: both systems train every (lr, alpha) point of `params.tuning` for
    the same short budget from the same initialisation, each is scored by its teacher-forced dev
    loss, and each system's best point is used for its full training. One frozen base serves
    every point and both systems: a point's adapters are attached, trained, scored, saved and
    detached (a copy of the base per point would not fit a 7B model on one GPU)."""
    p = _params(ctx)
    seed = int(ctx.seed or 0)
    base, codec = _load_base(ctx, p)

    # Parameter counts (alpha does not change them), from adapters attached for the count only.
    _attach_experts(base, p, seed, alpha=1.0)
    router = _new_router(base, p, seed)
    router_params = sum(q.numel() for q in router.parameters())
    baseline_rank, system_params, per_rank = fused_rank_at_parity(base, router)
    experts_params = system_params - router_params  # the expert adapters' count
    detach_bem(base)
    _attach_fused(base, p, baseline_rank, seed, alpha=1.0)
    baseline_params = count_bem_parameters(base)
    detach_bem(base)
    parity = system_params / baseline_params
    if abs(parity - 1.0) > PARITY_TOLERANCE:
        raise ValueError(
            f"parameter parity {parity:.3f} is outside 1 +/- {PARITY_TOLERANCE}: router system "
            f"{system_params}, baseline rank {baseline_rank} gives {baseline_params}; one rank "
            f"column costs {per_rank} (raise bem.rank or lower router.hidden)"
        )

    @contextmanager
    def adapters(system: str, alpha: float) -> Iterator[None]:
        """Fresh (seeded) adapters of ``system`` on the shared base, removed afterwards."""
        if system == "experts":
            _attach_experts(base, p, seed, alpha=alpha)
        else:
            _attach_fused(base, p, baseline_rank, seed, alpha=alpha)
        try:
            yield
        finally:
            detach_bem(base)

    train = encode_items(_read_split(ctx, "train"), codec)
    dev = encode_items(_read_split(ctx, "dev"), codec)
    spec = p.training.train_experts
    # Dev batches and their target-token counts (the model shifts labels by one), built once.
    dev_batches = []
    for i in range(0, len(dev), spec.batch_size):
        b = make_batch(dev[i : i + spec.batch_size], codec.pad_id, loss_on_prompt=False)
        dev_batches.append((b, int((b.labels[:, 1:] != -100).sum())))
    inputs_fp = fingerprint_of(
        p.model, _bem_used(p), p.data, p.router, p.runtime.dtype, seed, _base_digest(ctx)
    )

    def lm_loss(system: str, b: Batch) -> torch.Tensor:
        b = b.to(ctx.device)
        if system == "experts":  # oracle routing; prompt/padding rows: base K/V
            with bem_routing(base, skill_gates(b.skills)):
                out = base(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        else:
            out = base(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        return out.loss  # type: ignore[no-any-return]

    def fit(system: str, alpha: float, run: TrainingSpec, name: str) -> dict[str, Any]:
        """Train the attached adapters (resumable from ckpt/<name>)."""

        def loss_fn(step: int) -> torch.Tensor:
            return lm_loss(system, _batch(train, codec, seed, step, spec.batch_size))

        fp = fingerprint_of(inputs_fp, system, run, alpha)
        return train_loop(ctx, name, base, loss_fn, run, fingerprint=fp, trainable_only=True)

    @torch.no_grad()
    def dev_loss(system: str) -> float:
        """Teacher-forced loss per target token over the whole dev split."""
        total, tokens = 0.0, 0
        for b, n in dev_batches:
            total += float(lm_loss(system, b)) * n
            tokens += n
        return total / tokens

    tuning = p.tuning
    short = spec.model_copy(
        update={
            "steps": tuning.steps,
            "warmup_steps": spec.warmup_steps * tuning.steps // spec.steps,
            "checkpoint_every": tuning.steps,
        }
    )
    grid = [(lr, alpha) for lr in tuning.grid.lr for alpha in tuning.grid.alpha]
    points: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    resumed_points = 0
    for system in TRAINED_SYSTEMS:
        points[system] = []
        for i, (lr, alpha) in enumerate(grid):  # a finished point resumes from its checkpoint
            with adapters(system, alpha):
                run = fit(system, alpha, short.at_lr(lr), f"tune_{system}_{i}")
                loss = dev_loss(system)
            points[system].append(
                {"lr": lr, "alpha": alpha, "dev_loss": loss if math.isfinite(loss) else None}
            )
            resumed_points += run["resumed_from"] == short.steps
        chosen[system] = _best_point(points[system], system)

    dev_base = dev_loss("base")  # no adapters attached: the frozen base model
    final: dict[str, dict[str, Any]] = {}
    for system in TRAINED_SYSTEMS:
        lr, alpha = chosen[system]["lr"], chosen[system]["alpha"]
        with adapters(system, alpha):
            final[system] = fit(system, alpha, spec.at_lr(lr), system)
            save_weights(ctx.out_dir / f"{system}.safetensors", base, trainable_only=True)
            final[system]["dev_loss"] = dev_loss(system)

    info = {
        "experts_params": experts_params,
        "router_params": router_params,
        "router_system_params": system_params,
        "baseline_params": baseline_params,
        "baseline_rank": baseline_rank,
        "expert_rank": p.bem.rank,
        "param_parity": parity,
        **{f"{s}_{k}": v for s in TRAINED_SYSTEMS for k, v in chosen[s].items()},
        **{
            f"{s}_{k}": v
            for s in TRAINED_SYSTEMS
            for k, v in _at_grid_edge(chosen[s], tuning.grid.model_dump()).items()
        },
        "tuning": {
            "grid": tuning.grid.model_dump(),
            "steps": tuning.steps,
            "batch_size": spec.batch_size,
            "score": "teacher-forced dev loss (experts under oracle routing)",
            **points,
        },
    }
    atomic_write_json(ctx.out_dir / "systems.json", info)
    plot_series(
        ctx.out_dir / "loss.png",
        {"experts (oracle routing)": final["experts"]["history"],
         "fused baseline": final["baseline"]["history"]},
        f"train_experts seed {seed}",
        "step",
    )  # fmt: skip
    return {
        **info,
        "experts_final_loss": final["experts"]["final_loss"],
        "baseline_final_loss": final["baseline"]["final_loss"],
        "dev_loss_experts_oracle": final["experts"]["dev_loss"],
        "dev_loss_baseline": final["baseline"]["dev_loss"],
        "dev_loss_base": dev_base,
        "resumed_from_experts": final["experts"]["resumed_from"],
        "resumed_from_baseline": final["baseline"]["resumed_from"],
        "tuning_points_resumed": resumed_points,
    }


def _at_grid_edge(chosen: dict[str, float], grid: dict[str, list[float]]) -> dict[str, bool]:
    """Per tuned setting, whether the chosen value is the grid's smallest or largest: the
    best value may lie beyond it (the grid may be too narrow)."""
    return {f"{k}_at_grid_edge": chosen[k] in (min(v), max(v)) for k, v in grid.items()}


def _best_point(points: list[dict[str, Any]], system: str) -> dict[str, float]:
    """The (lr, alpha) with the lowest dev loss; a diverged point (non-finite loss) never wins."""
    finite = [q for q in points if q["dev_loss"] is not None]
    if not finite:
        raise ValueError(
            f"params.tuning: every grid point diverged for the {system} (non-finite dev loss); "
            "use smaller lr or alpha values"
        )
    best = min(finite, key=lambda q: q["dev_loss"])
    return {"lr": best["lr"], "alpha": best["alpha"]}


def behavioral_cloning(ctx: Any) -> dict[str, Any]:
    """AR0: clone the oracle plans (chunk-majority skill) into the macro-policy router."""
    p = _params(ctx)
    seed = int(ctx.seed or 0)
    model, codec = _experts_system(ctx, p)
    train_items = _read_split(ctx, "train")[: p.router.bc_examples]
    chunk = p.bem.chunk_size
    kw = {"chunk": chunk, "pad_id": codec.pad_id, "device": ctx.device}
    train = teacher_forced_chunks(model, encode_items(train_items, codec), **kw)
    dev = teacher_forced_chunks(model, encode_items(_read_split(ctx, "dev"), codec), **kw)
    router = _new_router(model, p, seed)
    spec = p.training.behavioral_cloning
    tau, penalty = p.bem.tau, p.router.step_penalty

    def loss_fn(step: int) -> torch.Tensor:
        idx = step_rng(seed, step, 2).choice(
            len(train), min(spec.batch_size, len(train)), replace=False
        )
        loss, _ = bc_loss(router, train, torch.as_tensor(idx), tau=tau, step_penalty=penalty)
        return loss

    experts_digest = input_digest(
        ctx, "train_experts", ctx.seed, "experts.safetensors", "systems.json"
    )
    fp = fingerprint_of(
        _bem_used(p), p.data, p.router, p.runtime.dtype, spec, seed, _base_digest(ctx),
        experts_digest,
    )  # fmt: skip
    run = train_loop(ctx, "router", router, loss_fn, spec, fingerprint=fp, trainable_only=False)
    save_weights(ctx.out_dir / "router.safetensors", router)
    atomic_write_json(ctx.out_dir / "router.json", router.config())
    acc_dev = closed_loop_accuracy(router, dev, chunk, tau=tau)
    acc_train = closed_loop_accuracy(router, train, chunk, tau=tau)
    plot_series(
        ctx.out_dir / "loss.png",
        {"BC loss": run["history"]},
        f"behavioral_cloning seed {seed}",
        "step",
    )
    return {
        "bc_dev_token_accuracy": acc_dev["token_accuracy"],
        "bc_dev_chunk_accuracy": acc_dev["chunk_accuracy"],
        "bc_dev_chunk_ceiling": acc_dev["chunk_ceiling"],
        "bc_dev_plan_length": acc_dev["plan_length"],
        "bc_train_token_accuracy": acc_train["token_accuracy"],
        "final_loss": run["final_loss"],
        "chunks_train": len(train),
        "resumed_from": run["resumed_from"],
    }


def rollout_reward(
    decoded: Decoded, text: str, answer: str, p: MissionAParams
) -> tuple[float, dict]:
    """Task reward of one decoded answer minus the plan's switch and step penalties."""
    em, f1, valid = _answer_scores(text, answer)
    reward = (
        (em + f1) / 200.0
        + p.policy_gradient.format_bonus * valid
        - p.router.switch_penalty * decoded.switches
        - p.router.step_penalty * decoded.plan_length
    )
    return reward, {"em": em, "f1": f1, "valid": float(valid)}


def collect_rollouts(
    decoder: RoutedDecoder,
    examples: Sequence[Example],
    codec: TextCodec,
    p: MissionAParams,
    generator: torch.Generator,
) -> tuple[RolloutBatch, list[dict]]:
    """Decode each example greedily with sampled routing; score the real decoded answers."""
    choose = sampling_chooser(p.bem.tau, p.router.plan_horizon, generator)
    rollouts, rewards, info = [], [], []
    for e in examples:
        dec = decoder(e.prompt, choose)
        r, scores = rollout_reward(dec, codec.decode(dec.tokens), e.answer, p)
        rollouts.append(dec)
        rewards.append(r)
        info.append({**scores, "reward": r, "plan_length": dec.plan_length})
    return RolloutBatch.from_rollouts(rollouts, rewards), info


def policy_gradient(ctx: Any) -> dict[str, Any]:
    """AR1: PPO from the BC policy on decoded-answer reward, inside KL(BC || policy) <= bound.

    An update with an epoch that leaves the KL region is rejected: ppo_update puts router and
    optimizer back to where the update started, and the following updates run at a smaller lr
    (pg.lr_shrink, floored); every update runs. Then both routers greedy-decode the dev split:
    dev reward PPO vs BC, paired, with a bootstrap CI at the fleet's statistics settings, and
    a verdict with the measured reason (flat rewards, entropy, KL, rejections)."""
    p = _params(ctx)
    seed = int(ctx.seed or 0)
    model, codec = _experts_system(ctx, p)
    bc_path = ctx.input_dir("behavioral_cloning", ctx.seed) / "router.safetensors"
    router = _load_router(model, p, bc_path)
    reference = _load_router(model, p, bc_path)
    for q in reference.parameters():
        q.requires_grad_(False)
    train = encode_items(_read_split(ctx, "train"), codec)
    spec = p.training.policy_gradient
    pg = p.policy_gradient
    decoding = {
        "eos_id": codec.eos_id,
        "max_new_tokens": p.evaluate.max_new_tokens,
        "device": ctx.device,
        "chunk": p.bem.chunk_size,
    }
    decoder = RoutedDecoder(model, router=router, **decoding)
    opt = torch.optim.Adam(router.parameters(), lr=spec.lr)
    fp = fingerprint_of(
        _bem_used(p),
        p.data,
        p.router,
        pg,
        spec,
        p.evaluate.max_new_tokens,  # the rollout decoder's length
        p.runtime.dtype,
        seed,
        _base_digest(ctx),
        input_digest(ctx, "train_experts", ctx.seed, "experts.safetensors", "systems.json"),
        input_digest(ctx, "behavioral_cloning", ctx.seed, "router.safetensors"),
    )
    manager = fingerprinted_checkpoints(
        ctx.out_dir / "ckpt" / "router", spec.keep_checkpoints, fp, trainable_only=False
    )
    loaded = manager.resume(router, opt)
    start = loaded.step if loaded else 0
    log: list[dict[str, Any]] = list(loaded.extra.get("log", [])) if loaded else []
    lr = float(loaded.extra["lr"]) if loaded else spec.lr
    min_lr = spec.lr * pg.min_lr_fraction
    if loaded:
        ctx.log.info("policy_gradient: resumed from update %d (lr %.3g)", start, lr)
    for update in range(start, spec.steps):
        idx = step_rng(seed, update, 3).choice(
            len(train), min(spec.batch_size, len(train)), replace=False
        )
        gen = torch.Generator().manual_seed(int(step_rng(seed, update, 4).integers(2**62)))
        router.eval()
        batch, info = collect_rollouts(decoder, [train[i] for i in idx], codec, p, gen)
        before = expected_reward(router, batch, p.bem.tau)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = ppo_update(
            router,
            reference,
            opt,
            batch,
            tau=p.bem.tau,
            clip=pg.ppo_clip,
            epochs=pg.ppo_epochs,
            kl_bound=pg.kl_bound,
            kl_coef=pg.kl_coef,
            entropy_coef=pg.entropy_coef,
            grad_clip=spec.grad_clip,
        )
        log.append(
            {
                "update": update + 1,
                "lr": lr,
                "reward": float(batch.rewards.mean()),
                "em": sum(i["em"] for i in info) / len(info),
                "valid": sum(i["valid"] for i in info) / len(info),
                "plan_length": sum(i["plan_length"] for i in info) / len(info),
                "expected_reward_before": before,
                "expected_reward_after": expected_reward(router, batch, p.bem.tau),
                "kl": stats.kl,
                "entropy": stats.entropy,
                "clip_fraction": stats.clip_fraction,
                "epochs": stats.epochs,
                "rejected": stats.rejected,
                # equal rewards -> all-zero advantages -> no policy gradient from the batch
                "reward_std": float(batch.rewards.std(unbiased=False)),
                "zero_advantage": not bool(batch.advantages().any()),
            }
        )
        if stats.rejected:  # a smaller step for what follows, never below the floor
            lr = max(lr * pg.lr_shrink, min_lr)
        if (update + 1) % spec.checkpoint_every == 0 or update + 1 == spec.steps:
            manager.save(update + 1, router, opt, extra={"log": log, "lr": lr})
        progress(ctx, "ppo", update + 1, spec.steps, reward=log[-1]["reward"], kl=stats.kl)
    save_weights(ctx.out_dir / "router.safetensors", router)
    atomic_write_json(ctx.out_dir / "router.json", router.config())
    write_jsonl(ctx.out_dir / "updates.jsonl", log)
    plot_series(
        ctx.out_dir / "updates.png",
        {
            k: [(row["update"], row[k]) for row in log]
            for k in ("reward", "kl", "entropy", "expected_reward_after", "lr")
        },
        f"policy_gradient seed {seed} (kl_bound {pg.kl_bound})",
        "PPO update",
    )

    dev = encode_items(_read_split(ctx, "dev"), codec)
    bc_dev = _dev_rewards(RoutedDecoder(model, router=reference, **decoding), dev, codec, p)
    ppo_dev = _dev_rewards(decoder, dev, codec, p)
    statistics = ctx.cfg.arch.statistics  # one significance level for the whole fleet
    gain = paired_bootstrap(
        ppo_dev["reward"],
        bc_dev["reward"],
        confidence=statistics.confidence,
        n_resamples=statistics.n_resamples,
        seed=seed,
    )
    if gain.low > 0:
        verdict = "improved"
    elif gain.high < 0:
        verdict = "worse"
    else:
        verdict = "no detectable change"
    changed = sum(a != b for a, b in zip(ppo_dev["decisions"], bc_dev["decisions"], strict=True))
    flat = sum(row["zero_advantage"] for row in log)
    rejected = sum(row["rejected"] for row in log)
    mean_entropy = sum(row["entropy"] for row in log) / len(log)
    max_kl = max(row["kl"] for row in log)
    reason = (
        f"all rollouts of {flat}/{len(log)} updates had equal rewards; entropy "
        f"{mean_entropy:.3g}; max KL {max_kl:.3g} of {pg.kl_bound:g}; {rejected} rejected; "
        f"greedy dev plans changed on {changed}/{len(dev)}"
    )
    return {
        "updates": len(log),
        "rejected_updates": rejected,
        "zero_advantage_updates": flat,
        "mean_reward_std": sum(row["reward_std"] for row in log) / len(log),
        "final_lr": lr,
        "final_kl": log[-1]["kl"],
        "max_kl": max_kl,
        "kl_bound": pg.kl_bound,
        "mean_entropy": mean_entropy,
        "final_entropy": log[-1]["entropy"],
        "first_reward": log[0]["reward"],
        "last_reward": log[-1]["reward"],
        "dev_reward_bc": sum(bc_dev["reward"]) / len(dev),
        "dev_reward_ppo": sum(ppo_dev["reward"]) / len(dev),
        "dev_reward_gain": gain.estimate,
        "dev_reward_gain_ci_low": gain.low,
        "dev_reward_gain_ci_high": gain.high,
        "dev_reward_gain_p_value": gain.p_value,
        "dev_reward_n": gain.n,
        "dev_reward_verdict": verdict,
        "dev_reward_reason": reason,
        "dev_reward_confidence": statistics.confidence,
        "dev_em_bc": sum(bc_dev["em"]) / len(dev),
        "dev_em_ppo": sum(ppo_dev["em"]) / len(dev),
        "dev_plans_changed": changed / len(dev),
        "resumed_from": start,
    }


def _dev_rewards(
    decoder: RoutedDecoder, examples: Sequence[Example], codec: TextCodec, p: MissionAParams
) -> dict[str, list[Any]]:
    """Training reward (rollout_reward) of each example greedy-decoded with greedy routing in
    evaluate's batches (``decode_all``: the batch-1 tokens and decisions): per-example reward,
    EM and routing decisions."""
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    out: dict[str, list[Any]] = {"reward": [], "em": [], "decisions": []}
    decoded = decode_all(decoder, examples, p.evaluate.batch_size, choose)
    for e, dec in zip(examples, decoded, strict=True):
        reward, scores = rollout_reward(dec, codec.decode(dec.tokens), e.answer, p)
        out["reward"].append(reward)
        out["em"].append(scores["em"])
        out["decisions"].append(dec.decisions)
    return out


def evaluate(ctx: Any) -> dict[str, Any]:
    """Router system vs fused baseline: decoded EM/F1, plans, latency, KV reuse when serving."""
    p = _params(ctx)
    seed = int(ctx.seed or 0)
    systems_info = _systems_info(ctx)
    router_model, codec = _experts_system(ctx, p, systems_info)
    router = _load_router(
        router_model, p, ctx.input_dir("policy_gradient", ctx.seed) / "router.safetensors"
    )
    experts_dir = ctx.input_dir("train_experts", ctx.seed)
    baseline_model, _ = _load_base(ctx, p)
    _attach_fused(
        baseline_model, p, systems_info["baseline_rank"], seed, alpha=systems_info["baseline_alpha"]
    )
    load_weights(experts_dir / "baseline.safetensors", baseline_model, trainable_only=True)
    baseline_model.eval()

    ev = p.evaluate
    common = {"eos_id": codec.eos_id, "max_new_tokens": ev.max_new_tokens, "device": ctx.device}
    decoders = {
        "router": RoutedDecoder(router_model, router=router, chunk=p.bem.chunk_size, **common),
        "baseline": RoutedDecoder(baseline_model, **common),
    }
    choose = greedy_chooser(p.bem.tau, p.router.plan_horizon)
    # The same greedy rule never locked (a horizon no decode reaches): the router's own plan.
    unlocked = greedy_chooser(p.bem.tau, ev.max_new_tokens)
    items = {s: _read_split(ctx, s) for s in SLICES}
    splits = {s: encode_items(rows, codec) for s, rows in items.items()}

    # Answers and plans: every example, decoded in batches of one prompt length (no padding);
    # the router twice, with and without the horizon lock.
    decoded = {
        split: {name: decode_all(decoders[name], examples, ev.batch_size, choose)
                for name in SYSTEMS}
        for split, examples in splits.items()
    }  # fmt: skip
    free = {
        split: decode_all(decoders["router"], examples, ev.batch_size, unlocked)
        for split, examples in splits.items()
    }
    metrics_of: dict[tuple[str, str], dict[str, float]] = {}  # (example id, system) -> metrics
    outputs: list[dict[str, Any]] = []
    for split, examples in splits.items():
        for name in SYSTEMS:
            for i, (e, dec) in enumerate(zip(examples, decoded[split][name], strict=True)):
                text = codec.decode(dec.tokens)
                m = _answer_metrics(text, e.answer, dec)
                if name == "router":  # the baseline makes no routing decisions
                    m |= _plan_metrics(dec, free[split][i])
                metrics_of[(e.id, name)] = m
                outputs.append({"id": e.id, "split": split, "system": name, "output": text,
                                "answer": e.answer, "decisions": dec.decisions})  # fmt: skip
        ctx.log.info("evaluate: %s decoded (%d examples)", split, len(examples))

    # Latency is a serving metric: batch-1 decodes of the first latency_examples test items,
    # both systems interleaved, alternating which goes first, each timed by the decoder.
    timed = splits["test"][: ev.latency_examples]
    warmup = splits["dev"][: ev.latency_warmup]
    singles = timed_decodes({s: decoders[s] for s in SYSTEMS}, timed, warmup, choose)
    agree = {s: 0 for s in SYSTEMS}
    for i, e in enumerate(timed):
        single = {s: singles[s][i] for s in SYSTEMS}
        for name in SYSTEMS:
            batched = decoded["test"][name][i]
            agree[name] += (single[name].tokens, single[name].decisions) == (
                batched.tokens, batched.decisions)  # fmt: skip
        per_token = {s: d.latency_per_token_ms for s, d in single.items()}
        for name, d in single.items():
            m = metrics_of[(e.id, name)]
            m |= {"latency_ms": d.total_ms, "ttft_ms": d.ttft_ms}
            step = per_token[name]
            if step is not None and None not in per_token.values():  # a pair, or neither
                m["latency_per_token_ms"] = step
    ctx.log.info("evaluate: latency timed on %d test examples", len(timed))

    # KV reuse on a serving workload: groups of requests sharing a test item's fact context.
    evaluated = {e.id for examples in splits.values() for e in examples}  # never a second record
    workload = _serving_workload(items["test"][: ev.kv_contexts], evaluated, p, codec)

    def base_kv(prompt: Sequence[int]) -> Any:  # the frozen base model's prompt K/V
        with bem_disabled(router_model):
            return decoders["router"].prefill(prompt).cache

    kv = _kv_reuse(decoders, workload, choose, ev.batch_size, base_kv)
    ctx.log.info("evaluate: KV reuse on %d serving requests", sum(len(g) for g in workload))

    slice_of = {e.id: SLICES[split] for split, examples in splits.items() for e in examples}
    records = [
        ExampleRecord(eid, name, seed, m, (slice_of[eid],)) for (eid, name), m in metrics_of.items()
    ] + [  # one record per context group: its requests share a prefix, so they are not
        # independent; the group is what the gate's bootstrap resamples
        ExampleRecord(gid, name, seed, m, (SLICES["test"],))
        for (gid, name), m in kv["records"].items()
    ]
    write_records(ctx.out_dir / "records.jsonl", records)
    write_jsonl(ctx.out_dir / "outputs.jsonl", outputs)

    rows = {
        split: {name: [metrics_of[(e.id, name)] for e in examples] for name in SYSTEMS}
        for split, examples in splits.items()
    }
    for (_, name), m in kv["records"].items():
        rows["test"][name].append(m)
    summary = {split: {s: _summarise(r[s]) for s in SYSTEMS} for split, r in rows.items()}
    test = summary["test"]
    metrics: dict[str, Any] = {
        "router": test["router"],
        "baseline": test["baseline"],
        "dev": summary["dev"],
        "param_parity": systems_info["param_parity"],
        "n_test": len(splits["test"]),
        "n_dev": len(splits["dev"]),
        "n_latency": len(timed),
        "n_kv_requests": sum(len(g) for g in workload),
        "n_kv_contexts": len(workload),
    }
    for s in SYSTEMS:
        for k, v in test[s].items():
            metrics[f"{s}_{k}"] = v
        # batched decoding (accuracy) vs batch-1 decoding (latency) on the timed examples
        metrics[f"{s}_batch_agreement"] = agree[s] / max(len(timed), 1)
        metrics[f"{s}_kv_reuse_agreement"] = kv["agreement"][s]
        metrics[f"{s}_kv_reused_requests"] = kv["reused_requests"][s]
    r, b = test["router"], test["baseline"]
    metrics["em_gain"] = r["em"] - b["em"]
    metrics["f1_gain"] = r["f1"] - b["f1"]
    for q in ("p50", "p95"):  # gated: per generated token (docs/mission_a.md says why)
        metrics[f"latency_overhead_{q}"] = (
            r[f"latency_per_token_{q}_ms"] / b[f"latency_per_token_{q}_ms"] - 1.0
        )
        metrics[f"latency_overhead_total_{q}"] = r[f"latency_{q}_ms"] / b[f"latency_{q}_ms"] - 1.0
        metrics[f"ttft_overhead_{q}"] = r[f"ttft_{q}_ms"] / b[f"ttft_{q}_ms"] - 1.0
    metrics["kv_hit_gain"] = r["kv_hit_ratio"] - b["kv_hit_ratio"]
    # what summary tables show first (metrics.json is written with sorted keys)
    metrics["headline"] = [
        "router_em", "baseline_em", "em_gain", "router_latency_per_token_p50_ms",
        "baseline_latency_per_token_p50_ms", "router_plan_length_unconstrained_max",
        "router_kv_hit_ratio", "baseline_kv_hit_ratio", "param_parity",
    ]  # fmt: skip
    _plot_eval(ctx.out_dir / "evaluation.png", rows["test"], seed)
    return metrics


def _kv_reuse(
    decoders: dict[str, RoutedDecoder],
    workload: Sequence[Sequence[Example]],
    choose: Any,
    batch_size: int,
    base_kv: Any,
) -> dict[str, Any]:
    """Each system serves the workload through its own PrefixCache, group after group.

    Per (context group, system) record: ``kv_hit_ratio`` = reused prompt tokens / prompt
    tokens over the group's requests (its first request misses: it computes and stores the
    prefix) and ``base_kv_share`` = the requests' mean share of prompt K/V bit-identical to the
    frozen base model's (``base_kv(prompt)``: its cache). Every request that reused a prefix is also decoded from its served
    cache (batch 1, as served) and compared with its decode from a full-prompt prefill (batched
    by length, which gives the batch-1 decode: tested, and checked by ``batch_agreement``):
    ``agreement`` = share of those requests whose tokens and routing decisions are identical."""
    requests = [e for g in workload for e in g]
    caches = {s: PrefixCache(decoders[s]) for s in SYSTEMS}
    fresh = {s: iter(decode_all(decoders[s], requests, batch_size, choose)) for s in SYSTEMS}
    same = dict.fromkeys(SYSTEMS, 0)
    reused_requests = dict.fromkeys(SYSTEMS, 0)
    per_group: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    for group in workload:
        shared = shared_prefix([e.prompt for e in group])
        reused = dict.fromkeys(SYSTEMS, 0)
        tokens = dict.fromkeys(SYSTEMS, 0)
        shares: dict[str, list[float]] = {s: [] for s in SYSTEMS}
        for e in group:
            base = base_kv(e.prompt)  # once per request, for both systems
            for name in SYSTEMS:
                own = decoders[name].prefill(e.prompt).cache
                shares[name].append(kv_share(own, base, len(e.prompt)))
                n, cache = caches[name].serve(e.prompt, shared)
                full = next(fresh[name])
                if n:
                    served = decoders[name](e.prompt, choose, prefix=cache)
                    same[name] += (served.tokens, served.decisions) == (full.tokens, full.decisions)
                    reused_requests[name] += 1
                reused[name] += n
                tokens[name] += len(e.prompt)
        for name in SYSTEMS:
            per_group[name].append(
                {
                    "kv_hit_ratio": reused[name] / tokens[name],
                    "base_kv_share": sum(shares[name]) / len(shares[name]),
                }
            )
    records = {  # per system, then per group
        (f"kv:{group[0].id}", name): per_group[name][j]
        for name in SYSTEMS
        for j, group in enumerate(workload)
    }
    return {
        "records": records,
        "agreement": {s: same[s] / max(reused_requests[s], 1) for s in SYSTEMS},
        "reused_requests": reused_requests,
    }


def _answer_metrics(text: str, answer: str, dec: Decoded) -> dict[str, float]:
    em, f1, valid = _answer_scores(text, answer)
    return {"em": em, "f1": f1, "valid": float(valid), "generated_tokens": float(len(dec.tokens))}


def _plan_metrics(locked: Decoded, free: Decoded) -> dict[str, float]:
    """The plan of the decode with the horizon lock, and of the decode without it."""
    return {
        "plan_length": float(locked.plan_length),
        "flip_rate": locked.flip_rate,
        "plan_length_unconstrained": float(free.plan_length),
        "flip_rate_unconstrained": free.flip_rate,
    }


def _serving_workload(
    contexts: Sequence[CompositionalItem], taken: set[str], p: MissionAParams, codec: TextCodec
) -> list[list[Example]]:
    """Per test item, a group of requests over its facts: the item itself and up to
    kv_questions - 1 other questions built by the suite's own item builder (valid items with
    gold answers), drawn deterministically from the item id; ids already ``taken`` are skipped.
    Groups of one request (no other question found) share no prefix and are left out."""
    groups = []
    taken = set(taken)
    for it in contexts:
        rng = random.Random(f"{p.data.seed}:{it.id}")
        keys = list(it.facts)
        ops = [op for op in p.data.ops if ARITY[op][0] <= len(keys)]
        group = [it]
        for _ in range(20 * p.evaluate.kv_questions):
            if len(group) >= p.evaluate.kv_questions:
                break
            op = rng.choice(ops)
            lo, hi = ARITY[op]
            args = rng.sample(keys, rng.randint(lo, min(hi, len(keys))))
            q = make_item(it.facts, op, args, split="test")
            if q.id not in taken:
                taken.add(q.id)
                group.append(q)
        if len(group) > 1:
            groups.append(encode_items(group, codec))
    return groups


def _summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of every metric over the rows that carry it, latency percentiles, extremes."""

    def values(key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    keys = sorted({k for r in rows for k in r})
    out = {k: sum(values(k)) / len(values(k)) for k in keys}
    for key, name in (
        ("latency_ms", "latency"),
        ("latency_per_token_ms", "latency_per_token"),
        ("ttft_ms", "ttft"),
    ):
        if values(key):
            lat = summarize_latencies(values(key))
            out |= {f"{name}_p50_ms": lat.p50_ms, f"{name}_p95_ms": lat.p95_ms,
                    f"{name}_p99_ms": lat.p99_ms}  # fmt: skip
    for key in ("plan_length", "plan_length_unconstrained"):
        if values(key):
            out[f"{key}_max"] = max(values(key))
    if values("kv_hit_ratio"):
        out["kv_hit_ratio_min"] = min(values("kv_hit_ratio"))
    return out


def _plot_eval(path: Path, rows: dict[str, list[dict[str, float]]], seed: int) -> None:
    """Per-token latency of the timed examples, and the running EM, for both systems."""
    series: dict[str, list[list[float]]] = {}
    for s in SYSTEMS:
        timed = [r["latency_per_token_ms"] for r in rows[s] if "latency_per_token_ms" in r]
        series[f"{s} latency ms/token"] = [[i, v] for i, v in enumerate(timed)]
    for s in SYSTEMS:
        run, pts = 0.0, []
        for i, r in enumerate(x for x in rows[s] if "em" in x):
            run += r["em"]
            pts.append([i + 1, run / (i + 1)])
        series[f"{s} running EM"] = pts
    plot_series(path, series, f"evaluate (test) seed {seed}", "example")
