"""Mission E, Long-Memory: a memory of what fell out of the attention window, feeding a BEM layer,
against a KV-only baseline with the same window, on needle-in-a-haystack and multi-hop items.

Phases (each ``fn(ctx) -> metrics``; inputs only through ``ctx.input_dir``):

    prepare                  Suite E: needle and multi-hop items at every configured length and
                             depth; train/dev/test disjoint by needle facts (checked)
    train_memory_coupling    per seed: the windowed backbone (LM loss on crops of train items),
                             frozen; then each system's recall module + BEM layer on the same
                             batches and steps: ``memory`` (window + evicted pairs) and
                             ``kv_only`` (window only); parameter parity checked
    long_context_evaluation  per seed: every test item streamed chunk by chunk through both
                             systems; accuracy per length x depth (heatmap), beyond / inside the
                             window, perplexity per length, latency, bytes of state per token;
                             paired per-example records (memory vs kv_only)

The model, the window rule and the memory are in ``bem_tasks.core.long_memory``. The two systems
have the same architecture and parameter count; they differ only in whether the recall module
also reads the compressed pairs that fell out of the window, so a needle beyond the window is
unreachable for ``kv_only`` by construction (tested) and reachable for ``memory`` only as well as
its memory keeps it.

Definitions (docs/mission_e.md):

    accuracy                 all four code digits right (teacher-forced argmax at the answer
                             positions; equal to greedy decoding since what a position sees is
                             fixed by its absolute position)
    where                    beyond: every needed needle (the code; for multihop also the link)
                             lies wholly inside or wholly before the window of every answer
                             position, at least one before; inside: all wholly inside;
                             straddle otherwise (in `accuracy` only)
    perplexity_spike         ppl of all predicted tokens at the longest length / at the shortest
    latency_ms               wall time to stream the whole item (batch 1, alternating order)
    bytes_per_token          (window K/V + memory state) / tokens processed
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bem_tasks.core.checkpoint import load_weights, save_weights
from bem_tasks.core.long_memory import (
    WindowLM,
    WindowLMConfig,
    attach_recall,
    kv_bytes,
    param_count,
)
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data import check_disjoint
from bem_tasks.data.suites.long_context import (
    LongContextItem,
    generate_long_context,
    read_long_context,
)
from bem_tasks.eval import ExampleRecord, write_records
from bem_tasks.io import atomic_write_bytes
from bem_tasks.missions.common import (
    fingerprint_of,
    input_digest,
    mission_params,
    plot_series,
    step_rng,
    train_loop,
)
from bem_tasks.missions.mission_e_params import MissionEParams

SLICE = "slice_b"
CANDIDATE, BASELINE = "memory", "kv_only"
SYSTEMS = (CANDIDATE, BASELINE)
SPLITS = ("train", "dev", "test")
BACKBONE_FILE = "backbone.safetensors"
DIGITS = 4  # a code is four digits (Suite E)


def _params(ctx: Any) -> MissionEParams:
    return mission_params(ctx, MissionEParams, "mission_e")


# ============================================================================ data
@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # <bos> prompt answer <eos>
    answer_at: int  # the position whose next token is the answer's first digit


def encode(item: LongContextItem, tok: ByteTokenizer) -> Encoded:
    prompt = tok.encode(item.prompt, add_bos=True)
    return Encoded(prompt + tok.encode(item.target, add_eos=True), len(prompt) - 1)


def where(item: LongContextItem, model: WindowLM, answer_at: int) -> str:
    """beyond / inside / straddle (module docstring); token = character + 1 (<bos>)."""
    first = model.window_start(answer_at)
    last = model.window_start(answer_at + DIGITS - 1)
    places = []
    for n in item.needles:
        if n.role == "distractor":
            continue
        a = n.offset + 1
        b = a + len(n.text)
        places.append("beyond" if b <= first else "inside" if a >= last else "straddle")
    if "straddle" in places:
        return "straddle"
    return "beyond" if "beyond" in places else "inside"


def _read(ctx: Any, split: str) -> list[LongContextItem]:
    return read_long_context(ctx.input_dir("prepare") / f"{split}.jsonl")


def _padded(rows: Sequence[list[int]], pad: int) -> Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


# ============================================================================ model
def backbone_config(p: MissionEParams, tok: ByteTokenizer) -> WindowLMConfig:
    b = p.backbone
    return WindowLMConfig(
        vocab_size=tok.vocab_size, d_model=b.d_model, n_layer=b.n_layer, n_head=b.n_head,
        window=b.window, chunk=b.chunk,
    )  # fmt: skip


def new_backbone(p: MissionEParams, tok: ByteTokenizer, seed: int) -> WindowLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WindowLM(backbone_config(p, tok))


def coupled(p: MissionEParams, backbone: WindowLM, system: str, seed: int) -> WindowLM:
    """A copy of the frozen backbone with this system's recall module and BEM layer."""
    model = new_backbone(p, ByteTokenizer(), seed)
    model.load_state_dict(backbone.state_dict())
    attach_recall(
        model, use_memory=system == CANDIDATE, d_mem=p.recall.d_mem, kernel=p.recall.kernel,
        slots=p.recall.slots, seed=seed, num_experts=p.bem.num_experts, rank=p.bem.rank, alpha=p.bem.alpha,
        chunk_size=1, trust_budget=p.bem.trust_budget,
    )  # fmt: skip
    return model


def load_systems(ctx: Any, p: MissionEParams, seed: int) -> dict[str, WindowLM]:
    d = ctx.input_dir("train_memory_coupling", ctx.seed)
    backbone = new_backbone(p, ByteTokenizer(), seed)
    load_weights(d / BACKBONE_FILE, backbone)
    out = {}
    for system in SYSTEMS:
        model = coupled(p, backbone, system, seed)
        load_weights(d / f"{system}.safetensors", model, trainable_only=True)
        out[system] = model.eval()
    return out


# ============================================================================ phases
def prepare(ctx: Any) -> dict[str, Any]:
    """One seeded Suite E draw (eval lengths: ``ctx.options['context_lengths']`` when the CLI
    gives them, else data.eval_lengths); every file read back and checked disjoint by facts."""
    p = _params(ctx)
    d = p.data
    lengths = list(ctx.options.get("context_lengths") or d.eval_lengths)
    paths = generate_long_context(
        ctx.out_dir, seed=d.seed, train_lengths=d.train_lengths, eval_lengths=lengths,
        depths=d.depths, kinds=d.kinds, n_train_per_cell=d.n_train_per_cell,
        n_dev_per_cell=d.n_dev_per_cell, n_test_per_cell=d.n_test_per_cell, n_keys=d.n_keys,
        n_distractors=d.n_distractors,
    )  # fmt: skip
    rows = {str(paths[s]): read_long_context(paths[s]) for s in SPLITS}
    check_disjoint(rows, key=lambda it: it.key)
    return {f"n_{s}": len(rows[str(paths[s])]) for s in SPLITS} | {"eval_lengths": lengths}


def train_memory_coupling(ctx: Any) -> dict[str, Any]:
    """The backbone, then both systems on identical batches; parity checked before training."""
    p = _params(ctx)
    seed = ctx.seed or 0
    tok = ByteTokenizer()
    train = [encode(it, tok).ids for it in _read(ctx, "train")]
    data_digest = input_digest(ctx, "prepare", None, "train.jsonl")

    backbone = new_backbone(p, tok, seed).to(ctx.device)
    crop = p.training.pretrain.crop

    def lm_loss(step: int) -> Tensor:
        rng = step_rng(seed, step, 0)
        rows = []
        for i in rng.choice(len(train), p.training.pretrain.batch_size, replace=False):
            start = int(rng.integers(0, len(train[i]) - crop + 1))
            rows.append(train[i][start : start + crop])
        ids = torch.tensor(rows, device=ctx.device)
        logits = backbone(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    pre = train_loop(
        ctx, "pretrain", backbone, lm_loss, p.training.pretrain,
        fingerprint=fingerprint_of(
            p.backbone.model_dump(), p.training.pretrain.model_dump(), seed, data_digest
        ),
        trainable_only=False,
    )  # fmt: skip
    save_weights(ctx.out_dir / BACKBONE_FILE, backbone)
    for q in backbone.parameters():
        q.requires_grad_(False)

    systems = {s: coupled(p, backbone, s, seed).to(ctx.device) for s in SYSTEMS}
    counts = {s: param_count(m) for s, m in systems.items()}
    parity = counts[CANDIDATE] / counts[BASELINE] - 1.0
    if abs(parity) > p.evaluate.parity_tolerance:
        raise ValueError(
            f"parameter parity: memory has {counts[CANDIDATE]} trainable parameters, kv_only "
            f"{counts[BASELINE]} ({parity:+.1%}); evaluate.parity_tolerance is "
            f"{p.evaluate.parity_tolerance:.0%}"
        )
    states = _backbone_states(backbone, train, tok.pad_id)
    runs = {}
    for system, model in systems.items():
        runs[system] = train_loop(
            ctx, system, model, _recall_loss(model, train, states, p, seed, tok.pad_id),
            p.training.memory_coupling,
            fingerprint=fingerprint_of(
                p.recall.model_dump(), p.bem.model_dump(), p.training.memory_coupling.model_dump(),
                system, seed, data_digest, pre["final_loss"], len(pre["history"]),
            ),
            trainable_only=True,
        )  # fmt: skip
        save_weights(ctx.out_dir / f"{system}.safetensors", model, trainable_only=True)
    plot_series(
        ctx.out_dir / "training.png",
        {
            "backbone LM loss": pre["history"],
            **{f"{s} loss": r["history"] for s, r in runs.items()},
        },
        f"mission_e train_memory_coupling seed {seed}",
        "step",
    )
    return {
        "backbone_final_loss": pre["final_loss"],
        **{f"{s}_final_loss": r["final_loss"] for s, r in runs.items()},
        **{f"{s}_trainable_parameters": n for s, n in counts.items()},
        "parameter_parity": parity,
        "resumed_from": {"pretrain": pre["resumed_from"]} | {s: r["resumed_from"] for s, r in runs.items()},
        "headline": ["backbone_final_loss", "memory_final_loss", "kv_only_final_loss", "parameter_parity"],
    }  # fmt: skip


def _backbone_states(backbone: WindowLM, train: Sequence[list[int]], pad: int) -> list[Tensor]:
    """The frozen backbone's residual for every train item (computed once: nothing trainable
    comes before the recall module, so both systems' steps reuse it)."""
    out = []
    for i in range(0, len(train), 16):
        rows = train[i : i + 16]
        states = backbone.backbone_states(_padded(rows, pad).to(backbone.embed.weight.device))
        out += [states[k, : len(r)] for k, r in enumerate(rows)]
    return out


def _recall_loss(
    model: WindowLM, train: Sequence[list[int]], states: Sequence[Tensor], p: MissionEParams,
    seed: int, pad: int,
) -> Any:  # fmt: skip
    """CE on the answer (digits and EOS) + lm_weight x CE at random positions + write_sparsity x
    mean write gate; batches and positions are a function of (seed, step): both systems see the
    same ones."""
    r = p.recall
    dev = model.embed.weight.device

    def loss_fn(step: int) -> Tensor:
        rng = step_rng(seed, step, 1)
        idx = rng.choice(len(train), p.training.memory_coupling.batch_size, replace=False)
        rows = [train[i] for i in idx]
        ids = _padded(rows, pad).to(dev)
        st = torch.zeros(len(rows), ids.shape[1], model.cfg.d_model, device=dev)
        for k, i in enumerate(idx):
            st[k, : len(train[i])] = states[i]
        hidden = model.recalled(ids, st)
        labels = torch.full_like(ids, -100)
        lm = torch.full_like(ids, -100)
        for k, row in enumerate(rows):
            n = len(row)
            labels[k, n - DIGITS - 2 : n - 1] = ids[k, n - DIGITS - 1 : n]
            pos = rng.choice(n - 1, min(r.lm_positions, n - 1), replace=False)
            lm[k, pos] = ids[k, pos + 1]
        keep = (labels != -100) | (lm != -100)
        logits = model.head(model.norm(hidden[keep]))
        loss = F.cross_entropy(logits, labels[keep], ignore_index=-100)
        if r.lm_weight:
            loss = loss + r.lm_weight * F.cross_entropy(logits, lm[keep], ignore_index=-100)
        if r.write_sparsity:
            assert model.recall is not None
            loss = loss + r.write_sparsity * model.recall.write_gates(ids).mean()
        return loss

    return loss_fn


@dataclass(frozen=True)
class Scored:
    correct: bool
    digit_accuracy: float
    nll_sum: float
    tokens: int
    latency_ms: float
    memory_bytes: int


@torch.no_grad()
def stream_score(model: WindowLM, e: Encoded) -> Scored:
    """Stream one item chunk by chunk at batch 1, keeping no logits beyond the current chunk:
    the answer digits' argmax and the NLL of every predicted token."""
    ids = torch.tensor([e.ids], device=model.embed.weight.device)
    state = model.new_stream(1)
    nll, preds = 0.0, []
    c = model.cfg.chunk
    t0 = time.perf_counter()
    for s in range(0, ids.shape[1], c):
        logits = model.step(state, ids[:, s : s + c])[0]
        nxt = ids[0, s + 1 : s + c + 1]
        nll += float(F.cross_entropy(logits[: len(nxt)], nxt, reduction="sum"))
        lo, hi = max(e.answer_at, s), min(e.answer_at + DIGITS, s + logits.shape[0])
        if lo < hi:
            preds += logits[lo - s : hi - s].argmax(-1).tolist()
    latency = 1000 * (time.perf_counter() - t0)
    gold = e.ids[e.answer_at + 1 : e.answer_at + 1 + DIGITS]
    hits = [a == b for a, b in zip(preds, gold, strict=True)]
    return Scored(
        all(hits), sum(hits) / DIGITS, nll, ids.shape[1] - 1, latency, state.memory_bytes()
    )


def long_context_evaluation(ctx: Any) -> dict[str, Any]:
    """Both systems on every test item (or the CLI's --long-context-suite file), batch 1,
    alternating which goes first; records, heatmap and the definitions' metrics."""
    p = _params(ctx)
    seed = ctx.seed or 0
    tok = ByteTokenizer()
    suite = ctx.options.get("suite")
    items = read_long_context(suite) if suite else _read(ctx, "test")
    models = load_systems(ctx, p, seed)
    for m in models.values():
        m.to(ctx.device)
    enc = [encode(it, tok) for it in items]
    for e in enc[: p.evaluate.latency_warmup]:
        for m in models.values():
            stream_score(m, e)
    scored: dict[str, list[Scored]] = {s: [] for s in SYSTEMS}
    for i, e in enumerate(enc):
        for system in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
            scored[system].append(stream_score(models[system], e))
    places = [where(it, models[BASELINE], e.answer_at) for it, e in zip(items, enc, strict=True)]
    memory_off = _inside_without_memory(models[CANDIDATE], enc, places, scored[CANDIDATE])

    records = []
    for system in SYSTEMS:
        for it, sc, place in zip(items, scored[system], places, strict=True):
            row = {
                "accuracy": float(sc.correct), "digit_accuracy": sc.digit_accuracy,
                "latency_ms": sc.latency_ms, "nll": sc.nll_sum / sc.tokens,
            }  # fmt: skip
            if place != "straddle":
                row[f"accuracy_{place}_window"] = float(sc.correct)
            records.append(ExampleRecord(it.id, system, seed, row, (SLICE,)))
    lengths = sorted({it.length for it in items})
    depths = sorted({it.depth for it in items})
    per: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        per[system] = _summary(items, scored[system], places, lengths, depths, models[system])
    # a property of the candidate alone (the absolute gate); kv_only's is in metrics.json
    spike = {"perplexity_spike": per[CANDIDATE]["perplexity_spike"]}
    records.append(ExampleRecord("run", CANDIDATE, seed, spike, (SLICE,)))
    write_records(ctx.out_dir / "records.jsonl", records)
    _heatmap(ctx.out_dir / "accuracy_heatmap.png", per, lengths, depths, seed)
    cand, base = per[CANDIDATE], per[BASELINE]
    metrics: dict[str, Any] = {
        "n_items": len(items),
        "suite": suite or "prepare/test.jsonl",
        "n_beyond_window": places.count("beyond"),
        "n_inside_window": places.count("inside"),
        "n_straddle": places.count("straddle"),
        "systems": per,
        "accuracy_beyond_window_gain": _diff(cand, base, "accuracy_beyond_window"),
        "accuracy_inside_window_gain": _diff(cand, base, "accuracy_inside_window"),
        "latency_overhead": cand["latency_ms"] / base["latency_ms"] - 1.0,
        "perplexity_spike": cand["perplexity_spike"],
        "kv_only_perplexity_spike": base["perplexity_spike"],
        "memory_state_bytes": cand["memory_state_bytes"],
        "inside_window_memory_on_minus_off": memory_off,
        **{f"{s}_accuracy_beyond_window": per[s]["accuracy_beyond_window"] for s in SYSTEMS},
        **{f"{s}_accuracy_inside_window": per[s]["accuracy_inside_window"] for s in SYSTEMS},
    }
    metrics["headline"] = [
        "memory_accuracy_beyond_window", "kv_only_accuracy_beyond_window",
        "accuracy_inside_window_gain", "perplexity_spike", "latency_overhead",
    ]  # fmt: skip
    return metrics


def _inside_without_memory(
    model: WindowLM, enc: Sequence[Encoded], places: Sequence[str], on: Sequence[Scored]
) -> dict[str, Any]:
    """The memory system on the inside-window items with its memory switched off: the mean
    paired difference of digit accuracy (on - off) and its 95% bootstrap CI. Memory holds only
    what fell out of the window, so on these items it should change nothing."""
    from scipy import stats

    inside = [i for i, w in enumerate(places) if w == "inside"]
    if not inside:
        return {"n": 0, "mean": None, "ci": None}
    assert model.recall is not None
    model.recall.use_memory = False
    try:
        off = [stream_score(model, enc[i]) for i in inside]
    finally:
        model.recall.use_memory = True
    d = np.array(
        [on[i].digit_accuracy - o.digit_accuracy for i, o in zip(inside, off, strict=True)]
    )
    if np.all(d == d[0]):  # the bootstrap distribution is a point
        ci = [float(d[0]), float(d[0])]
    else:
        res = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=2000,
                              method="percentile", random_state=0)  # fmt: skip
        ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"n": len(inside), "mean": float(d.mean()), "ci": ci}


def _diff(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return None if a[key] is None or b[key] is None else a[key] - b[key]


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _summary(
    items: Sequence[LongContextItem], scored: Sequence[Scored], places: Sequence[str],
    lengths: Sequence[int], depths: Sequence[float], model: WindowLM,
) -> dict[str, Any]:  # fmt: skip
    def acc(sel: Sequence[int]) -> float | None:
        return _mean([float(scored[i].correct) for i in sel])

    idx = range(len(items))
    ppl = {}
    for n in lengths:
        sel = [i for i in idx if items[i].length == n]
        ppl[n] = math.exp(sum(scored[i].nll_sum for i in sel) / sum(scored[i].tokens for i in sel))
    state = max(sc.memory_bytes for sc in scored)
    return {
        "accuracy": acc(list(idx)),
        "accuracy_beyond_window": acc([i for i in idx if places[i] == "beyond"]),
        "accuracy_inside_window": acc([i for i in idx if places[i] == "inside"]),
        "accuracy_by_kind": {
            k: acc([i for i in idx if items[i].kind == k])
            for k in sorted({it.kind for it in items})
        },
        "accuracy_grid": [
            [acc([i for i in idx if items[i].length == n and items[i].depth == d]) for d in depths]
            for n in lengths
        ],
        "perplexity": {str(n): v for n, v in ppl.items()},
        "perplexity_spike": ppl[max(lengths)] / ppl[min(lengths)],
        "latency_ms": float(np.mean([sc.latency_ms for sc in scored])),
        "memory_state_bytes": state,
        "bytes_per_token": {str(n): (kv_bytes(model.cfg) + state) / n for n in lengths},
    }


def _heatmap(
    path: Path, per: dict[str, dict[str, Any]], lengths: Sequence[int], depths: Sequence[float],
    seed: int,
) -> None:  # fmt: skip
    """Accuracy per length x depth, one panel per system (matplotlib Agg, atomic write)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SYSTEMS), figsize=(4.2 * len(SYSTEMS), 3.4), squeeze=False)
    for ax, system in zip(axes[0], SYSTEMS, strict=True):
        grid = np.array(
            [[np.nan if v is None else v for v in row] for row in per[system]["accuracy_grid"]]
        )
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("length (tokens)")
        ax.set_title(f"{system} (seed {seed})")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
