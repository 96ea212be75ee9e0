"""Mission A building blocks: the macro-policy router, routed decoding, KV-hit measurement, PPO.

The router system is a frozen base LM with one BEM expert per skill (retrieve, reason,
formalize) on cache-safe sites, routed *externally*: prompt tokens get zero gates (so their K/V
are the base model's), and every generated token is routed to the expert the macro-policy picked
for its chunk. The macro-policy decides once per chunk of ``chunk_size`` generated tokens from

    [rms(h_prev), rms(e_tok), onehot(previous expert), onehot(segments used)]

where ``h_prev`` is the last-layer hidden state of the position before the chunk (the one that
emitted the chunk's first token, already computed by the decoder) and ``e_tok`` is the frozen
input embedding of that first token. A token is routed by its own skill: under teacher forcing
the input position of target character j gets the oracle skill of character j.

Decisions are chunk-sticky, obey hysteresis (switch only if the new expert's logit beats the
current one by more than tau) and a plan horizon (at most ``horizon`` segments; after that the
current expert is locked). As a stochastic policy the same rules read: logits + tau on the current
expert, the other experts masked once the horizon is used up, then a softmax.

The lock applies when acting (choosers, PPO's sampling policy); the router itself is trained on
the unmasked hysteresis logits at every state, locked ones included (where the oracle stays), so
what it would choose without the lock is a trained output that evaluate can measure.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem_tasks.core import ByteTokenizer, bem_layers, bem_routing
from bem_tasks.core.tokenizer import TOKENIZER_FILE
from bem_tasks.data.suites.compositional import SKILLS, CompositionalItem, skill_per_char
from bem_tasks.eval.latency import cuda_sync_fn

NUM_EXPERTS = len(SKILLS)
MASKED = -1e9  # finite, so masked actions get probability 0 without inf - inf = nan in KL


# ---------------------------------------------------------------------------- text codec
class TextCodec:
    """The byte tokenizer (smoke) or a local Hugging Face tokenizer (full) behind one interface.

    ``spans(text)`` returns token ids and the first character of each token, so per-character
    oracle skills become per-token labels whatever the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.is_bytes = isinstance(tokenizer, ByteTokenizer)

    @property
    def eos_id(self) -> int:
        return int(self.tok.eos_id if self.is_bytes else self.tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        if self.is_bytes:
            return int(self.tok.pad_id)
        pad = self.tok.pad_token_id
        return int(self.eos_id if pad is None else pad)

    def encode(self, text: str) -> list[int]:
        return self.spans(text)[0]

    def spans(self, text: str) -> tuple[list[int], list[int]]:
        if self.is_bytes:
            if not text.isascii():
                raise ValueError(f"byte-level labels need ASCII text, got {text!r}")
            return self.tok.encode(text), list(range(len(text)))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        if self.is_bytes:
            return str(self.tok.decode(list(ids)))
        return str(self.tok.decode(list(ids), skip_special_tokens=True))


def load_codec(model_dir: str | os.PathLike[str]) -> TextCodec:
    """The tokenizer saved beside a model: ``bem_tokenizer.json`` or a Hugging Face one."""
    d = Path(model_dir)
    if (d / TOKENIZER_FILE).is_file():
        return TextCodec(ByteTokenizer.load(d))
    from transformers import AutoTokenizer

    try:
        return TextCodec(AutoTokenizer.from_pretrained(str(d), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{d}: no tokenizer (expected bem_tokenizer.json or a Hugging Face tokenizer saved "
            f"with the model): {exc}"
        ) from exc


# ---------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[int]
    target: list[int]  # target tokens followed by EOS
    skills: list[int]  # oracle skill of each target token (EOS excluded: it is never fed)
    answer: str


def encode_items(items: Sequence[CompositionalItem], codec: TextCodec) -> list[Example]:
    out = []
    for it in items:
        per_char = skill_per_char(it.target, it.plan)
        ids, starts = codec.spans(it.target)
        out.append(
            Example(
                id=it.id,
                prompt=codec.encode(it.prompt),
                target=ids + [codec.eos_id],
                skills=[per_char[min(s, len(per_char) - 1)] for s in starts],
                answer=it.answer,
            )
        )
    return out


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T], -100 where no loss
    skills: Tensor  # [B, T] oracle skill of each input token, -1 for prompt and padding

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.skills.to(device),
        )


def make_batch(examples: Sequence[Example], pad_id: int, *, loss_on_prompt: bool) -> Batch:
    """Right-padded prompt + target + EOS. Labels cover the target (and the prompt if asked)."""
    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    skills = torch.full_like(ids, -1)
    for row, e in enumerate(examples):
        seq = e.prompt + e.target
        p, n = len(e.prompt), len(seq)
        ids[row, :n] = torch.tensor(seq)
        mask[row, :n] = 1
        labels[row, :n] = ids[row, :n]
        if not loss_on_prompt:
            labels[row, :p] = -100
        skills[row, p : p + len(e.skills)] = torch.tensor(e.skills)
    return Batch(ids, mask, labels, skills)


def skill_gates(skills: Tensor, num_experts: int = NUM_EXPERTS) -> Tensor:
    """[B, T] skill ids (-1: no expert) -> float gates [B, T, K] (zero rows for -1)."""
    return F.one_hot(skills.clamp_min(0), num_experts).float() * (skills >= 0)[..., None]


# ---------------------------------------------------------------------------- macro-policy
class MacroRouter(nn.Module):
    """A small MLP from the decision features to one logit per expert."""

    state_rows: Tensor

    def __init__(
        self, d_model: int, *, num_experts: int = NUM_EXPERTS, horizon: int = 3, hidden: int = 32
    ) -> None:
        super().__init__()
        self.d_model, self.num_experts, self.horizon = d_model, num_experts, horizon
        self.hidden = hidden
        self.in_features = 2 * d_model + num_experts + horizon + 1
        self.net = nn.Sequential(
            nn.Linear(self.in_features, hidden), nn.GELU(), nn.Linear(hidden, num_experts)
        )
        # [onehot(previous expert), onehot(segments)] for every (previous + 1, segments) pair, in
        # row (previous + 1) * (horizon + 1) + segments: a lookup table, not weights
        prev_1h = torch.cat([torch.zeros(1, num_experts), torch.eye(num_experts)])
        segs_1h = torch.eye(horizon + 1)
        state = torch.cat(
            [
                prev_1h.repeat_interleave(horizon + 1, dim=0),
                segs_1h.repeat(num_experts + 1, 1),
            ],
            dim=1,
        )
        self.register_buffer("state_rows", state, persistent=False)

    def config(self) -> dict[str, int]:
        return {
            "d_model": self.d_model,
            "num_experts": self.num_experts,
            "horizon": self.horizon,
            "hidden": self.hidden,
        }

    def features(
        self, h: Tensor, emb: Tensor, prev: Tensor | list[int], segs: Tensor | list[int]
    ) -> Tensor:
        """h, emb [N, d]; prev [N] (-1 before the first decision); segs [N] in 0..horizon
        (tensors, or lists of ints as a decoder holds them)."""
        # The one-hot part is one table lookup: decoding calls this once per chunk, and at this
        # size every op saved is a noticeable share of a decision's cost.
        width = self.horizon + 1
        if isinstance(prev, Tensor) and isinstance(segs, Tensor):
            row: Tensor | list[int] = (prev + 1) * width + segs.clamp(0, self.horizon)
        else:
            row = [
                (p + 1) * width + min(max(s, 0), self.horizon)
                for p, s in zip(prev, segs, strict=True)
            ]
        normed = F.rms_norm(torch.stack([h, emb], 1).float(), (self.d_model,), eps=1e-6)
        return torch.cat([normed.flatten(1), self.state_rows[row].to(h.device)], dim=-1)

    def forward(self, feats: Tensor) -> Tensor:
        return self.logits(feats)

    def logits(self, feats: Tensor) -> Tensor:
        """``forward`` without nn.Module's call machinery: at this size module-call overhead is
        most of a decision's cost, and decoding makes one decision per chunk."""
        fc_in, fc_out = cast(nn.Linear, self.net[0]), cast(nn.Linear, self.net[2])
        return F.linear(
            F.gelu(F.linear(feats, fc_in.weight, fc_in.bias)), fc_out.weight, fc_out.bias
        )


def hysteresis_logits(logits: Tensor, prev: Tensor, tau: float) -> Tensor:
    """The router's own policy: +tau on the current expert (hysteresis), no horizon lock."""
    has = (prev >= 0)[:, None]
    cur = F.one_hot(prev.clamp_min(0), logits.shape[-1]).bool() & has
    return logits + tau * cur.to(logits.dtype)


def policy_logits(logits: Tensor, prev: Tensor, segs: Tensor, tau: float, horizon: int) -> Tensor:
    """The acting policy's logits: ``hysteresis_logits`` with the other experts masked once
    ``horizon`` segments are used (the plan cannot grow any more)."""
    locked = ((prev >= 0) & (segs >= horizon))[:, None]
    other = ~F.one_hot(prev.clamp_min(0), logits.shape[-1]).bool()
    return hysteresis_logits(logits, prev, tau).masked_fill(locked & other, MASKED)


def greedy_decision(
    logits: Tensor | Sequence[float], prev: int, segs: int, tau: float, horizon: int
) -> int:
    """Deterministic rule: first chunk argmax; later switch only if the best expert beats the
    current one by more than tau and the horizon still allows a new segment."""
    row = logits.tolist() if isinstance(logits, Tensor) else logits
    cand = max(range(len(row)), key=row.__getitem__)  # the first maximum, as argmax
    if prev < 0:
        return cand
    if segs >= horizon:
        return prev
    return cand if row[cand] - row[prev] > tau else prev


def kl_divergence(ref_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(ref || new) per row of (already masked) policy logits."""
    ref = F.log_softmax(ref_logits, -1)
    new = F.log_softmax(new_logits, -1)
    return (ref.exp() * (ref - new)).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class ChunkData:
    """Teacher-forced decision points: one row per chunk of one example."""

    h: Tensor  # [N, d] hidden state before the chunk
    emb: Tensor  # [N, d] input embedding of the chunk's first token
    label: Tensor  # [N] oracle majority skill of the chunk
    prev: Tensor  # [N] oracle label of the previous chunk (-1 for the first)
    segs: Tensor  # [N] segments of the oracle chunk plan so far
    example: Tensor  # [N] example index
    token_skills: list[list[int]]  # per example: oracle skill per fed target token

    def __len__(self) -> int:
        return int(self.label.shape[0])


def chunk_labels(skills: Sequence[int], chunk: int) -> list[int]:
    """Majority skill per chunk (ties go to the earlier skill)."""
    out = []
    for c in range(0, len(skills), chunk):
        part = skills[c : c + chunk]
        out.append(max(range(NUM_EXPERTS), key=lambda k: (part.count(k), -k)))
    return out


def segments(decisions: Sequence[int]) -> int:
    return sum(1 for i, d in enumerate(decisions) if i == 0 or d != decisions[i - 1])


@torch.no_grad()
def teacher_forced_chunks(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    chunk: int,
    pad_id: int,
    device: str | torch.device,
    batch_size: int = 64,
) -> ChunkData:
    """Features at every chunk start of the oracle-routed expert model, plus oracle labels."""
    emb_layer = model.get_input_embeddings()  # type: ignore[operator]
    rows: dict[str, list[Any]] = {k: [] for k in ("h", "emb", "label", "prev", "segs", "example")}
    for lo in range(0, len(examples), batch_size):
        part = examples[lo : lo + batch_size]
        batch = make_batch(part, pad_id, loss_on_prompt=False).to(device)
        with bem_routing(model, skill_gates(batch.skills)):
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1]
        emb = emb_layer(batch.input_ids)
        for row, e in enumerate(part):
            labels = chunk_labels(e.skills, chunk)
            p = len(e.prompt)
            for c, lab in enumerate(labels):
                j = p + c * chunk  # input position of the chunk's first target token
                rows["h"].append(hidden[row, j - 1])
                rows["emb"].append(emb[row, j])
                rows["label"].append(lab)
                rows["prev"].append(labels[c - 1] if c else -1)
                rows["segs"].append(segments(labels[:c]))
                rows["example"].append(lo + row)
    return ChunkData(
        h=torch.stack(rows["h"]).float().cpu(),
        emb=torch.stack(rows["emb"]).float().cpu(),
        label=torch.tensor(rows["label"]),
        prev=torch.tensor(rows["prev"]),
        segs=torch.tensor(rows["segs"]),
        example=torch.tensor(rows["example"]),
        token_skills=[list(e.skills) for e in examples],
    )


def bc_loss(
    router: MacroRouter, data: ChunkData, idx: Tensor, *, tau: float, step_penalty: float
) -> tuple[Tensor, Tensor]:
    """Cross-entropy to the oracle chunk labels on the hysteresis logits, plus step_penalty x
    the expected number of new segments. Returns (loss, accuracy).

    No horizon mask: at a state whose segments are used up the oracle stays (its label is the
    current expert), and the router learns that too. Masked, those states would carry no
    gradient, and what the router wants there (evaluate's unconstrained plan) would be its
    random initialisation."""
    feats = router.features(data.h[idx], data.emb[idx], data.prev[idx], data.segs[idx])
    logits = hysteresis_logits(router(feats), data.prev[idx], tau)
    ce = F.cross_entropy(logits, data.label[idx])
    probs = logits.softmax(-1)
    prev = data.prev[idx]
    stay = probs.gather(1, prev.clamp_min(0)[:, None])[:, 0]
    new_segment = torch.where(prev >= 0, 1.0 - stay, torch.ones_like(stay))
    acc = (logits.argmax(-1) == data.label[idx]).float().mean()
    return ce + step_penalty * new_segment.mean(), acc


@torch.no_grad()
def closed_loop_accuracy(
    router: MacroRouter, data: ChunkData, chunk: int, *, tau: float, horizon: int | None = None
) -> dict:
    """Run the greedy policy over each example's chunks (its own previous decisions, teacher-
    forced features) and compare with the oracle per token and per chunk. ``horizon``: the lock
    (default the router's; a horizon beyond the chunk count runs it unconstrained)."""
    horizon = router.horizon if horizon is None else horizon
    by_example: dict[int, list[int]] = {}
    for i, ex in enumerate(data.example.tolist()):
        by_example.setdefault(ex, []).append(i)
    tok_hit = tok_n = chunk_hit = 0
    ceiling_hit = 0
    plan_lengths = []
    for ex, rows in by_example.items():
        prev, segs, decisions = -1, 0, []
        for i in rows:
            feats = router.features(
                data.h[i : i + 1], data.emb[i : i + 1], torch.tensor([prev]), torch.tensor([segs])
            )
            a = greedy_decision(router(feats)[0], prev, segs, tau, horizon)
            if a != prev:
                segs += 1
            prev = a
            decisions.append(a)
        skills = data.token_skills[ex]
        oracle_chunks = chunk_labels(skills, chunk)
        for t, s in enumerate(skills):
            tok_hit += int(decisions[t // chunk] == s)
            ceiling_hit += int(oracle_chunks[t // chunk] == s)
        tok_n += len(skills)
        chunk_hit += sum(int(a == b) for a, b in zip(decisions, oracle_chunks, strict=True))
        plan_lengths.append(segments(decisions))
    return {
        "token_accuracy": tok_hit / max(tok_n, 1),
        "chunk_accuracy": chunk_hit / max(len(data), 1),
        "chunk_ceiling": ceiling_hit / max(tok_n, 1),
        "plan_length": sum(plan_lengths) / max(len(plan_lengths), 1),
        "plan_length_max": max(plan_lengths, default=0),
    }


# ---------------------------------------------------------------------------- decoding
@dataclass
class Decoded:
    tokens: list[int]  # generated ids, EOS included when produced
    fed: list[int]  # generated tokens that were fed back (their K/V went into the cache)
    decisions: list[int] = field(default_factory=list)
    feats: list[Tensor] = field(default_factory=list)
    prev: list[int] = field(default_factory=list)
    segs: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    # Wall time of the decode call that produced this row (the whole batch's, on a batch of
    # several): to the first generated token (prompt prefill included), and to the end.
    ttft_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def latency_per_token_ms(self) -> float | None:
        """Decode time per generated token after the first: one decoding step, without the
        prompt prefill (None when only one token was generated)."""
        n = len(self.tokens)
        return (self.total_ms - self.ttft_ms) / (n - 1) if n > 1 else None

    @property
    def plan_length(self) -> int:
        return segments(self.decisions)

    @property
    def switches(self) -> int:
        return max(self.plan_length - 1, 0)

    @property
    def flip_rate(self) -> float:
        return self.switches / len(self.decisions) if self.decisions else 0.0


# A chooser maps the decision points of a batch (router logits [B, K], each row's current expert
# (-1 before the first decision) and segments used) to (action, log-probability) per row.
Chooser = Callable[[Tensor, list[int], list[int]], tuple[list[int], list[float]]]


def greedy_chooser(tau: float, horizon: int) -> Chooser:
    """The greedy rule, locked at ``horizon`` segments. A horizon of at least the number of
    decisions (e.g. max_new_tokens) never locks: the router's unconstrained plan, with the
    segment feature capped at the router's "horizon used" column, as it was trained."""

    def choose(logits: Tensor, prev: list[int], segs: list[int]) -> tuple[list[int], list[float]]:
        rows = logits.tolist()  # one host copy; the rule itself is a few float compares per row
        actions = [
            greedy_decision(row, p, s, tau, horizon)
            for row, p, s in zip(rows, prev, segs, strict=True)
        ]
        return actions, [0.0] * len(actions)

    return choose


def sampling_chooser(tau: float, horizon: int, generator: torch.Generator) -> Chooser:
    def choose(logits: Tensor, prev: list[int], segs: list[int]) -> tuple[list[int], list[float]]:
        pl = policy_logits(logits.float(), torch.tensor(prev), torch.tensor(segs), tau, horizon)
        logp = F.log_softmax(pl, -1)
        a = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        return a.tolist(), logp.gather(1, a[:, None])[:, 0].tolist()

    return choose


PromptRouter = Callable[[Tensor], Tensor]  # prompt ids [B, P] -> gates [B, P, K]


class RoutedDecoder:
    """Greedy decoding with a K/V cache for the router system (external gates per token) or a
    plain model (``router=None``: whatever its BEM layers do by themselves).

    ``decoder(prompt)`` decodes one request (batch 1: what latency is timed on);
    ``decoder.batch(prompts)`` decodes prompts of one length together, without padding (rows
    that finished keep being fed, and are ignored). Prompt tokens get the gates
    ``prompt_router`` gives them, zero gates (the base model's K/V) by default. Each call times
    itself (``Decoded.ttft_ms``, ``total_ms``), synchronising CUDA around the clock readings.

    The macro-policy router is tiny and lives on the CPU; only its decision features (one
    hidden vector and one embedding per row and chunk) leave the model's device."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_id: int,
        max_new_tokens: int,
        device: str | torch.device,
        router: MacroRouter | None = None,
        chunk: int = 1,
        prompt_router: PromptRouter | None = None,
    ) -> None:
        self.model, self.router, self.chunk = model, router, chunk
        self.eos_id, self.max_new, self.device = eos_id, max_new_tokens, device
        self.prompt_router = prompt_router
        self.layers = [layer for _, layer in bem_layers(model)] if router is not None else []
        k = router.num_experts if router is not None else 1
        self.expert_gates = torch.eye(k, device=device)  # [K, K]: row k routes to expert k
        self.emb = model.get_input_embeddings()  # type: ignore[operator]
        # The transformer body and the LM head apart: the body's last hidden state is the
        # router's feature (no output_hidden_states), and logits are needed at one position.
        self.body: nn.Module = model.base_model  # type: ignore[assignment]
        self.head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
        self._sync = cuda_sync_fn(device)

    def _clock(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def _route(self, gates: Tensor | None, *, convex: bool | None = None) -> None:
        for layer in self.layers:
            layer.set_routing(gates, convex=convex)

    def _route_prompt(self, ids: Tensor, start: int, stop: int) -> bool:
        """Route prompt positions start..stop-1 as the request ``ids`` [B, P] has them routed:
        the ``prompt_router``'s gates, or zero gates (one row, broadcast). False for a plain
        model (nothing to route)."""
        if self.router is None:
            return False
        if self.prompt_router is None:
            zeros = torch.zeros(ids.shape[0], 1, self.router.num_experts, device=self.device)
            self._route(zeros, convex=True)
        else:
            self._route(self.prompt_router(ids).to(self.device)[:, start:stop])
        return True

    @torch.no_grad()
    def prefill(self, prompt: Sequence[int], *, routed_as: Sequence[int] | None = None) -> Any:
        """One forward of the transformer body over ``prompt`` under the gates the request
        ``routed_as`` (default: the prompt itself) gives those positions; the output's
        ``cache`` holds their K/V."""
        full = list(routed_as if routed_as is not None else prompt)
        ids = torch.tensor([full], device=self.device)
        routed = self._route_prompt(ids, 0, len(prompt))
        try:
            return self.body(input_ids=ids[:, : len(prompt)], use_cache=True)
        finally:
            if routed:
                self._route(None)

    def __call__(
        self, prompt: Sequence[int], choose: Chooser | None = None, *, prefix: Any = None
    ) -> Decoded:
        """Decode one request; ``prefix``: a one-row cache holding the K/V of its first
        positions (``PrefixCache.serve``); the rest of the prompt is computed on top of it."""
        return self.batch([prompt], choose, prefix=prefix)[0]

    @torch.no_grad()
    def batch(
        self, prompts: Sequence[Sequence[int]], choose: Chooser | None = None, *, prefix: Any = None
    ) -> list[Decoded]:
        rows = len(prompts)
        if len({len(q) for q in prompts}) != 1:
            raise ValueError("RoutedDecoder.batch decodes prompts of one length (bucket them)")
        routed = self.router is not None
        if routed and choose is None:
            raise ValueError("the router system needs a chooser (greedy_chooser, sampling_chooser)")
        start = 0
        if prefix is not None:
            start = prefix.get_seq_length()
            held = cache_tensors(prefix)[0][0].shape[0]
            if rows != 1 or held != 1:
                raise ValueError(
                    f"RoutedDecoder: a prefix cache serves one request (one prompt, a one-row "
                    f"cache), got {rows} prompt(s) and a cache of {held} row(s)"
                )
            if start >= len(prompts[0]):
                raise ValueError(
                    f"RoutedDecoder: the prefix cache holds {start} positions, the prompt has "
                    f"{len(prompts[0])}: at least its last token must be computed"
                )
        t0 = self._clock()
        ids = torch.tensor([list(q) for q in prompts], device=self.device)
        self._route_prompt(ids, start, ids.shape[1])
        try:
            out = self.body(input_ids=ids[:, start:], cache=prefix, use_cache=True)
            cache, hidden = out.cache, out.last_hidden_state[:, -1]
            res = [Decoded(tokens=[], fed=[]) for _ in range(rows)]
            live = list(range(rows))
            cur, segs = [-1] * rows, [0] * rows
            ttft = 0.0
            for t in range(self.max_new):
                step = self.head(hidden).argmax(-1)
                toks = step.tolist()
                if t == 0:
                    ttft = self._clock()
                for r in live:
                    res[r].tokens.append(toks[r])
                live = [r for r in live if toks[r] != self.eos_id]
                if not live or t + 1 == self.max_new:
                    break
                if routed and t % self.chunk == 0:
                    assert self.router is not None and choose is not None
                    # the hidden state that emitted the chunk's first token, and its embedding
                    emb = self.emb.weight[step]
                    feats = self.router.features(hidden.cpu(), emb.cpu(), cur, segs)
                    logits = self.router.logits(feats)
                    action, logp = choose(logits, cur, segs)
                    for r in live:
                        d = res[r]
                        d.feats.append(feats[r])
                        d.prev.append(cur[r])
                        d.segs.append(segs[r])
                        d.logp.append(logp[r])
                        d.decisions.append(action[r])
                    if action != cur:
                        segs = [s + (a != c) for s, a, c in zip(segs, action, cur, strict=True)]
                        cur = action
                        # [B, 1, K] gates broadcast over positions: set once per segment change.
                        self._route(self.expert_gates[cur][:, None], convex=True)
                out = self.body(input_ids=step[:, None], cache=cache, use_cache=True)
                hidden = out.last_hidden_state[:, -1]
                for r in live:
                    res[r].fed.append(toks[r])
            end = self._clock()
        finally:
            if routed:
                self._route(None)
        for d in res:
            d.ttft_ms, d.total_ms = 1e3 * (ttft - t0), 1e3 * (end - t0)
        return res


def length_buckets(prompts: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices grouped by prompt length (so a batch needs no padding), at most ``size`` each."""
    by_len: dict[int, list[int]] = {}
    for i, q in enumerate(prompts):
        by_len.setdefault(len(q), []).append(i)
    return [
        idx[lo : lo + size] for _, idx in sorted(by_len.items()) for lo in range(0, len(idx), size)
    ]


def decode_all(
    decoder: RoutedDecoder,
    examples: Sequence[Example],
    batch_size: int,
    choose: Chooser | None = None,
) -> list[Decoded]:
    """Greedy decodes of every example, batched by prompt length, in the examples' order."""
    out: dict[int, Decoded] = {}
    for idx in length_buckets([e.prompt for e in examples], batch_size):
        out.update(zip(idx, decoder.batch([examples[i].prompt for i in idx], choose), strict=True))
    return [out[i] for i in range(len(examples))]


def timed_decodes(
    decoders: Mapping[str, RoutedDecoder],
    examples: Sequence[Example],
    warmup: Sequence[Example],
    choose: Chooser | None = None,
) -> dict[str, list[Decoded]]:
    """Latency as a serving metric: batch-1 decodes of ``examples`` after untimed ``warmup``
    decodes, the systems interleaved and alternating which goes first (so drift of the machine
    hits both alike), each timed by its decoder."""
    names = list(decoders)
    for e in warmup:
        for n in names:
            decoders[n](e.prompt, choose)
    out: dict[str, list[Decoded]] = {n: [] for n in names}
    for i, e in enumerate(examples):
        for n in names if i % 2 == 0 else names[::-1]:
            out[n].append(decoders[n](e.prompt, choose))
    return out


# ---------------------------------------------------------------------------- KV-hit
def cache_tensors(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer, each [B, heads, T, head_dim], from a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


def _head_vectors_equal(a: Any, b: Any, n: int) -> Iterator[Tensor]:
    """Per layer, K then V: which of the first ``n`` positions' head vectors are bit-identical
    in the two caches ([B, heads, n] booleans)."""
    for (ka, va), (kb, vb) in zip(cache_tensors(a), cache_tensors(b), strict=True):
        for x, y in ((ka, kb), (va, vb)):
            yield (x[:, :, :n] == y[:, :, :n]).all(-1)


def identical_positions(a: Any, b: Any, n: int) -> int:
    """Leading positions (of the first ``n``) whose keys and values are bit-identical in every
    layer and head of both caches: the prefix of ``a`` that can stand in for ``b``."""
    same = torch.ones(n, dtype=torch.bool)
    for eq in _head_vectors_equal(a, b, n):
        same &= eq.flatten(0, 1).all(0).cpu()
    return int(same.int().cumprod(0).sum())


def kv_share(a: Any, b: Any, n: int) -> float:
    """Share of the first ``n`` positions' K/V head vectors (per layer, K and V) that are
    bit-identical in the two caches."""
    hits = total = 0
    for eq in _head_vectors_equal(a, b, n):
        hits += int(eq.sum())
        total += eq.numel()
    return hits / total


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every prompt of a group shares."""
    if not prompts:  # as before: a group of no prompts has no defined prefix
        raise ValueError("shared_prefix: no prompts")
    return len(os.path.commonprefix([list(q) for q in prompts]))


class PrefixCache:
    """One system's prefix cache on a serving workload.

    The first request with a given prefix misses: it computes its prompt from scratch, and the
    server keeps the K/V of the prefix positions as that request computed them. A later
    request reuses the leading positions whose K/V are bit-identical to a fresh computation of
    the prefix under its own routing; the rest of its prompt is computed on top.

    What the bit-identity shows: that the request's routing gives the prefix the K/V the cache
    holds. For a causal system both sides are prefix-only forwards under the same gates, so
    they match by construction and the whole prefix is reused; a system that routes prefix
    tokens by later (question) tokens loses the positions whose K/V change. What it does not
    show: that decoding from the served cache gives what a full-prompt prefill gives (cache
    offsets, cropping, the suffix's routing): evaluate decodes both ways and reports the share
    of requests that agree (``kv_reuse_agreement``)."""

    def __init__(self, decoder: RoutedDecoder) -> None:
        self.decoder = decoder
        self.store: dict[tuple[int, ...], Any] = {}

    def serve(self, prompt: Sequence[int], prefix_len: int) -> tuple[int, Any]:
        """(reused prompt tokens, a cache of exactly those positions to decode from; None when
        nothing is reused)."""
        key = tuple(prompt[:prefix_len])
        fresh = self.decoder.prefill(prompt[:prefix_len], routed_as=prompt).cache
        if key not in self.store:  # a miss: this request computes and stores the prefix
            self.store[key] = fresh
            return 0, None
        reused = identical_positions(self.store[key], fresh, prefix_len)
        if reused == 0:
            return 0, None
        cache = copy.deepcopy(self.store[key])
        cache.crop(reused - cache.get_seq_length())  # a negative count: tokens to drop
        return reused, cache


# ---------------------------------------------------------------------------- PPO
@dataclass
class RolloutBatch:
    """Decision points of several trajectories, with the trajectory's reward on each."""

    feats: Tensor  # [N, F]
    prev: Tensor  # [N]
    segs: Tensor  # [N]
    actions: Tensor  # [N]
    logp_old: Tensor  # [N]
    traj: Tensor  # [N] trajectory index
    rewards: Tensor  # [M] per trajectory

    @classmethod
    def from_rollouts(cls, rollouts: Sequence[Decoded], rewards: Sequence[float]) -> RolloutBatch:
        feats, prev, segs, actions, logp, traj = [], [], [], [], [], []
        for i, r in enumerate(rollouts):
            feats += r.feats
            prev += r.prev
            segs += r.segs
            actions += r.decisions
            logp += r.logp
            traj += [i] * len(r.decisions)
        width = rollouts[0].feats[0].shape[0] if feats else 0
        return cls(
            feats=torch.stack(feats) if feats else torch.zeros(0, width),
            prev=torch.tensor(prev, dtype=torch.long),
            segs=torch.tensor(segs, dtype=torch.long),
            actions=torch.tensor(actions, dtype=torch.long),
            logp_old=torch.tensor(logp, dtype=torch.float32),
            traj=torch.tensor(traj, dtype=torch.long),
            rewards=torch.tensor(list(rewards), dtype=torch.float32),
        )

    def advantages(self) -> Tensor:
        """Rewards minus their mean over the batch's trajectories, divided by their std; all
        zero (no policy gradient) when every trajectory got the same reward."""
        r = self.rewards
        adv = r - r.mean()
        std = float(adv.std()) if r.numel() > 1 else 0.0
        return adv / std if std > 1e-8 else torch.zeros_like(r)


def masked_logits(router: MacroRouter, batch: RolloutBatch, tau: float) -> Tensor:
    return policy_logits(router(batch.feats), batch.prev, batch.segs, tau, router.horizon)


@torch.no_grad()
def expected_reward(router: MacroRouter, batch: RolloutBatch, tau: float) -> float:
    """Self-normalised importance-sampling estimate of E_router[reward] from the batch.

    Decoding is deterministic given the routing decisions, so a trajectory's likelihood ratio
    is exactly the product of its per-decision ratios."""
    logp = F.log_softmax(masked_logits(router, batch, tau), -1)
    logp = logp.gather(1, batch.actions[:, None])[:, 0]
    log_ratio = torch.zeros_like(batch.rewards).index_add_(0, batch.traj, logp - batch.logp_old)
    w = torch.softmax(log_ratio, 0)
    return float((w * batch.rewards).sum())


@dataclass
class UpdateStats:
    kl: float
    entropy: float
    clip_fraction: float
    epochs: int  # epochs applied: all of them, or 0 when the update was rejected
    rejected: bool  # an epoch left the KL region: the whole update was undone


def ppo_update(
    router: MacroRouter,
    reference: MacroRouter,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    *,
    tau: float,
    clip: float,
    epochs: int,
    kl_bound: float,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    grad_clip: float | None = 1.0,
) -> UpdateStats:
    """PPO epochs on one batch inside a KL trust region to ``reference`` (the BC policy).

    After every epoch the mean KL(reference || router) on the batch's states is measured. If an
    epoch leaves the region the update is rejected as a whole: router and optimizer state go
    back to what they were before its first epoch, its remaining epochs are skipped and
    ``rejected`` is set, so that the caller can take smaller steps from then on."""
    adv = batch.advantages()[batch.traj]
    with torch.no_grad():
        ref_logits = masked_logits(reference, batch, tau)
    params = [p for p in router.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    saved_opt = copy.deepcopy(optimizer.state_dict())
    rejected = False
    clip_frac = 0.0
    for _ in range(epochs):
        logits = masked_logits(router, batch, tau)
        logp = F.log_softmax(logits, -1).gather(1, batch.actions[:, None])[:, 0]
        ratio = torch.exp(logp - batch.logp_old)
        surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        kl = kl_divergence(ref_logits, logits).mean()
        loss = -surrogate.mean() + kl_coef * kl - entropy_coef * entropy(logits).mean()
        optimizer.zero_grad()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        with torch.no_grad():
            kl_after = float(kl_divergence(ref_logits, masked_logits(router, batch, tau)).mean())
        if not math.isfinite(kl_after) or kl_after > kl_bound:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            optimizer.load_state_dict(saved_opt)
            rejected = True
            clip_frac = 0.0
            break
        clip_frac = float(((ratio - 1).abs() > clip).float().mean())
    with torch.no_grad():
        logits = masked_logits(router, batch, tau)
        kl_now = float(kl_divergence(ref_logits, logits).mean())
        ent = float(entropy(logits).mean())
    return UpdateStats(
        kl=kl_now,
        entropy=ent,
        clip_fraction=clip_frac,
        epochs=0 if rejected else epochs,
        rejected=rejected,
    )
