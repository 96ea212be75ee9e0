"""Mission D, SEP (scramble-equivariant pretraining): the same tiny LM pretrained four ways, then
compared on held-out surface forms.

Phases (each ``fn(ctx) -> metrics``; inputs only through ``ctx.input_dir``):

    prepare         Suite D: train/dev/test (in-distribution surface forms) and the OOD splits
                    (unseen synonyms, renamed entities, new templates); content-disjoint, checked;
                    the word vocabulary
    pretrain        mapped over variant x seed: a tiny GPT-2 from scratch on the train split, same
                    batches, steps and init for every variant; pt1 cross-entropy only, pt2 +
                    relabelling invariance, pt3 + word-shuffle invariance, pt4 all (config)
    ood_evaluation  per seed: every variant on ID test (clean and scrambled), the OOD splits and
                    greedy generation of the answer sentence; paired records (pt4 vs pt1)

Tokens are words (the suite separates every word and punctuation mark by one space), so every
scrambler keeps the sequence length and position t of a scrambled sequence lines up with
position t of the original. The invariance term of a scrambler is a KL between output
distributions on original and scrambled inputs, under teacher forcing, at the answer-sentence
positions (the next-token distributions that predict the target sentence and EOS):

    KL( p(. | x_<t)  ||  P^-1 p(. | s(x)_<t) )

with the clean distribution detached (it is the teacher; the clean forward is the one that
computes the cross-entropy, so it costs no extra pass). For the bijective scramblers (relabel,
synonym, entity) ``s`` acts on token ids as a permutation ``P`` of the vocabulary and the
scrambled distribution is mapped back through it (equivariance: "the answer to the relabelled
question is the relabelled answer"); shuffle leaves the answer sentence as it is (P = identity).
The identity scrambler gives KL = 0 exactly.

Definitions (ood_evaluation; "answer correct" = the argmax at the last prompt position, i.e. the
first greedy token, is the answer entity):

    accuracy            answer correct on clean ID test items
    acc_<s>             answer correct on the item scrambled by s (its answer scrambled too)
    surface_dependence  acc - acc_<s>, per scrambler
    RRS (metrics)       mean_s acc_<s> / acc (DESIGN.md)
    rrs (records)       per example: mean_s min(1, p_s(answer) / p(answer)), the share of the
                        clean answer probability that survives each scrambler (1 = fully robust;
                        higher is better; its mean is the average surviving share)
    ldc                 per example: mean_s (CE_s - CE) over the answer-sentence tokens
    bleu / chrf         sacrebleu sentence scores (0-100) of the greedy answer sentence on ID test
    ood_transfer        mean over the OOD splits of accuracy / ID accuracy

OOD words (unseen synonyms, OOD entities, the new templates' words) are in the vocabulary but
never occur in pretraining, clean or scrambled: their embeddings keep their random
initialisation (weight decay aside). That is the point of the OOD splits, and it means an OOD
entity can only be answered by a model that copies an untrained token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem_tasks.core import build_model, load_model, save_model
from bem_tasks.data import check_disjoint, write_jsonl
from bem_tasks.data.splits import split_sizes
from bem_tasks.data.suites.scramble import (
    ENTITIES_OOD,
    ID_VOCAB,
    OOD_TEMPLATES,
    PUNCT,
    SYNONYMS,
    TEMPLATES,
    ScrambleItem,
    entity_mapping,
    make_scramble,
    read_scramble,
    relabel_mapping,
    scramble_item,
    shuffle_words,
    synonym_of,
    synonym_pool,
)
from bem_tasks.eval import ExampleRecord, write_records
from bem_tasks.eval.metrics import corpus_bleu, corpus_chrf, sentence_bleu, sentence_chrf
from bem_tasks.io import atomic_write_json
from bem_tasks.missions.common import (
    fingerprint_of,
    input_digest,
    mission_params,
    plot_series,
    step_rng,
    train_loop,
)
from bem_tasks.missions.mission_d_params import OOD_SPLITS, MissionDParams

SLICE = "slice_b"
ID_SPLITS = ("train", "dev", "test")
BIJECTIVE = ("relabel", "synonym", "entity")
PAD, EOS, NL = "<pad>", "<eos>", "\n"
VOCAB_FILE = "vocab.json"


def _params(ctx: Any) -> MissionDParams:
    return mission_params(ctx, MissionDParams, "mission_d")


# ============================================================================ vocabulary
class WordVocab:
    """Words of Suite D's whole lexicon (ID and OOD forms) plus PAD, EOS and the newline that
    ends a prompt. An unknown word is an error, not an UNK: the lexicon is closed."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be unique")
        self.pad_id, self.eos_id, self.nl_id = (self.index[t] for t in (PAD, EOS, NL))

    @classmethod
    def of_suite(cls) -> WordVocab:
        lexicon = set(ID_VOCAB) | set(ENTITIES_OOD) | set(PUNCT)
        lexicon |= {s for base in SYNONYMS for s in synonym_pool(base, "ood")}
        for t in OOD_TEMPLATES:
            lexicon |= {w for w in TEMPLATES[t].split(" ") if not w.startswith("{")}
        return cls([PAD, EOS, NL, *sorted(lexicon)])

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        return cls(json.loads(path.read_text())["words"])

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"words": self.words})

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, words: Sequence[str]) -> list[int]:
        missing = [w for w in words if w not in self.index]
        if missing:
            raise ValueError(f"words {sorted(set(missing))} are not in the Suite D vocabulary")
        return [self.index[w] for w in words]

    def prompt_ids(self, prompt: str) -> list[int]:
        return [*self.ids(prompt.rstrip("\n").split(" ")), self.nl_id]

    def target_ids(self, target: str) -> list[int]:
        return [*self.ids(target.split(" ")), self.eos_id]

    def permutation(self, mapping: dict[str, str]) -> Tensor:
        """The id permutation of a word bijection (words it does not name map to themselves)."""
        perm = torch.arange(len(self.words))
        for a, b in mapping.items():
            perm[self.index[a]] = self.index[b]
        if sorted(perm.tolist()) != list(range(len(self.words))):
            raise ValueError("the mapping is not a bijection of the vocabulary")
        return perm


def scramble_permutation(vocab: WordVocab, scrambler: str, seed: int) -> Tensor:
    """The permutation P with ids(s(text)) == P[ids(text)] for an ID text and a bijective
    scrambler s (tested on the whole corpus against the suite's text scramblers). Synonym
    substitution is the swap base <-> chosen synonym: on ID texts, which hold base words only,
    that is exactly the substitution."""
    if scrambler == "relabel":
        return vocab.permutation(relabel_mapping(seed))
    if scrambler == "entity":
        return vocab.permutation(entity_mapping(seed, "train"))
    if scrambler == "synonym":
        swap = {}
        for base in SYNONYMS:
            syn = synonym_of(base, seed, "train")
            swap[base], swap[syn] = syn, base
        return vocab.permutation(swap)
    raise ValueError(f"{scrambler!r} is not a bijective scrambler ({BIJECTIVE})")


# ============================================================================ batches
@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    target: list[int]  # answer sentence + EOS
    answer: int  # id of the answer entity (the target's first token)


def encode(items: Sequence[ScrambleItem], vocab: WordVocab) -> list[Encoded]:
    out = []
    for it in items:
        target = vocab.target_ids(it.target)
        if target[0] != vocab.index[it.answer]:
            raise ValueError(f"{it.id}: the target {it.target!r} does not start with the answer")
        out.append(Encoded(vocab.prompt_ids(it.prompt), target, target[0]))
    return out


@dataclass(frozen=True)
class Batch:
    ids: Tensor  # [B, T] prompt + target, right-padded
    mask: Tensor  # [B, T] 1 on real tokens
    loss_mask: Tensor  # [B, T-1] next-token positions predicting a real token
    target_mask: Tensor  # [B, T-1] positions predicting an answer-sentence token (or EOS)
    answer_pos: Tensor  # [B] the position whose next-token distribution is the answer's

    def with_ids(self, ids: Tensor) -> Batch:
        return Batch(ids, self.mask, self.loss_mask, self.target_mask, self.answer_pos)

    def head(self, k: int) -> Batch:
        return Batch(*(x[:k] for x in astuple_batch(self)))


BATCH_FIELDS = ("ids", "mask", "loss_mask", "target_mask", "answer_pos")


def astuple_batch(b: Batch) -> tuple[Tensor, ...]:
    return tuple(getattr(b, f) for f in BATCH_FIELDS)


def make_batch(examples: Sequence[Encoded], pad_id: int, device: str = "cpu") -> Batch:
    n = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    target = torch.zeros((len(examples), n - 1), dtype=torch.bool)
    for i, e in enumerate(examples):
        seq = e.prompt + e.target
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        target[i, len(e.prompt) - 1 : len(seq) - 1] = True
    answer_pos = torch.tensor([len(e.prompt) - 1 for e in examples])
    return Batch(
        ids.to(device), mask.to(device), mask[:, 1:].bool().to(device), target.to(device),
        answer_pos.to(device),
    )  # fmt: skip


def logits_of(model: nn.Module, b: Batch) -> Tensor:
    return model(input_ids=b.ids, attention_mask=b.mask).logits[:, :-1]  # type: ignore[no-any-return]


def token_ce(logits: Tensor, b: Batch) -> Tensor:
    """[B, T-1] cross-entropy of each next token (0 on padding)."""
    ce = F.cross_entropy(logits.transpose(1, 2), b.ids[:, 1:], reduction="none")
    return ce * b.loss_mask


def consistency_kl(
    clean_logits: Tensor, scr_logits: Tensor, perm: Tensor | None, b: Batch
) -> Tensor:
    """Mean over answer-sentence positions of KL(p_clean || P^-1 p_scrambled), the clean side
    detached. ``perm`` (the scrambler's id permutation, or None for identity) maps the scrambled
    distribution back: the probability of original word w is that of P[w]."""
    logq = F.log_softmax(scr_logits, dim=-1)
    if perm is not None:
        logq = logq[..., perm]
    logp = F.log_softmax(clean_logits.detach(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    m = b.target_mask
    return (kl * m).sum() / m.sum()


def thaw_factor(step: int, start: int, end: int) -> float:
    """0 before ``start``, a linear ramp to 1 at ``end``, 1 after (``end == start``: a step)."""
    if step < start:
        return 0.0
    if end <= start:
        return 1.0
    return min(1.0, (step - start) / (end - start))


class SepLoss:
    """One variant's pretraining loss at a step: CE on prompt + answer sentence, plus each active
    scrambler view's weighted consistency KL. A view whose weight is 0 at this step runs no
    forward and draws nothing, so weight 0 trains exactly like cross-entropy only."""

    def __init__(
        self,
        model: nn.Module,
        train: Sequence[Encoded],
        train_items: Sequence[ScrambleItem],
        vocab: WordVocab,
        weights: dict[str, float],
        p: MissionDParams,
        seed: int,
        device: str = "cpu",
    ) -> None:
        self.model, self.train, self.items, self.vocab = model, train, train_items, vocab
        self.weights, self.p, self.seed, self.device = weights, p, seed, device
        self.bijective = [s for s in BIJECTIVE if weights.get(s, 0.0) > 0]
        self.last: dict[str, float] = {}

    def batch_indices(self, step: int) -> np.ndarray:
        return step_rng(self.seed, step, 0).choice(
            len(self.train), self.p.pretraining.batch_size, replace=False
        )

    def scramble_seed(self, step: int) -> int:
        return int(step_rng(self.seed, step, 1).integers(2**31))

    def views(self, step: int, idx: np.ndarray, b: Batch) -> list[tuple[str, Batch, Tensor | None]]:
        """The scrambled views of this step's batch with a positive weight."""
        inv = self.p.invariance
        if thaw_factor(step, inv.thaw_start, inv.thaw_end) == 0.0:
            return []
        seed = self.scramble_seed(step)
        out: list[tuple[str, Batch, Tensor | None]] = []
        if self.bijective:
            name = self.bijective[step % len(self.bijective)]
            perm = scramble_permutation(self.vocab, name, seed).to(b.ids.device)
            out.append((name, b.with_ids(perm[b.ids]), perm))
        if self.weights.get("shuffle", 0.0) > 0:
            rows = []
            for k, i in enumerate(idx):
                prompt = self.vocab.prompt_ids(
                    shuffle_words(self.items[i].prompt.rstrip("\n"), seed + k)
                )
                rows.append(prompt + self.train[i].target)
            ids = b.ids.clone()
            for k, seq in enumerate(rows):
                ids[k, : len(seq)] = torch.tensor(seq)
            out.append(("shuffle", b.with_ids(ids), None))
        return out

    def __call__(self, step: int) -> Tensor:
        idx = self.batch_indices(step)
        b = make_batch([self.train[i] for i in idx], self.vocab.pad_id, self.device)
        k = self.p.invariance.view_batch_size or len(idx)
        sub = b.head(k)
        views = self.views(step, idx[:k], sub)
        # Views share their rows' shape and padding, so clean and scrambled sequences go through
        # one forward (the same numbers as separate calls, far less per-call overhead).
        if views:
            both = Batch(*(torch.cat([x, *[getattr(v, f) for _, v, _ in views]])
                           for x, f in zip(astuple_batch(b), BATCH_FIELDS, strict=True)))  # fmt: skip
            logits = logits_of(self.model, both)
            parts = logits.split([len(idx)] + [k] * len(views))
        else:
            parts = (logits_of(self.model, b),)
        ce = token_ce(parts[0], b).sum() / b.loss_mask.sum()
        loss = ce
        inv = self.p.invariance
        factor = thaw_factor(step, inv.thaw_start, inv.thaw_end)
        self.last = {"ce": float(ce.detach()), "kl": 0.0, "weight": factor}
        for (name, view, perm), scr in zip(views, parts[1:], strict=True):
            kl = consistency_kl(parts[0][:k], scr, perm, view)
            loss = loss + factor * self.weights[name] * kl
            self.last["kl"] += float(kl.detach())
        return loss


# ============================================================================ helpers
def _read(ctx: Any, split: str) -> list[ScrambleItem]:
    return read_scramble(ctx.input_dir("prepare") / f"{split}.jsonl")


def _vocab(ctx: Any) -> WordVocab:
    return WordVocab.load(ctx.input_dir("prepare") / VOCAB_FILE)


def content_key(it: ScrambleItem) -> str:
    """What an item asks, whatever its surface: its facts (OOD synonyms and entities mapped back
    to base words; templates ignored) and the asked fact."""
    base_of = {s: b for b in SYNONYMS for s in SYNONYMS[b]}

    def fact(f: Any) -> str:
        return f"{f.entity}|{base_of.get(f.verb, f.verb)}|{base_of.get(f.object, f.object)}"

    facts = sorted(fact(f) for f in it.facts)
    return f"{';'.join(facts)}?{fact(it.facts[it.asked])}"


def ood_words() -> set[str]:
    """Words only an OOD split may contain."""
    return set(WordVocab.of_suite().words) - set(ID_VOCAB) - set(PUNCT) - {PAD, EOS, NL}


def _model(p: MissionDParams, vocab: WordVocab, seed: int) -> nn.Module:
    m = p.model
    return build_model(  # type: ignore[no-any-return]
        m.family, seed=seed, vocab_size=len(vocab), d_model=m.n_embd, n_layers=m.n_layer,
        n_heads=m.n_head, max_positions=m.max_positions, pad_token_id=vocab.pad_id,
        bos_token_id=vocab.eos_id, eos_token_id=vocab.eos_id,
    )  # fmt: skip


# ============================================================================ phases
def prepare(ctx: Any) -> dict[str, Any]:
    """One seeded Suite D draw; rows of a later split that ask what an earlier split asks (same
    facts and question in another surface form) are dropped, then every split is checked
    content-disjoint and the ID splits free of OOD words."""
    p = _params(ctx)
    d = p.data
    splits = make_scramble(
        seed=d.seed, sizes=split_sizes(d.n_train, d.n_dev, d.n_test), n_ood=d.n_ood,
        min_facts=d.min_facts, max_facts=d.max_facts,
    )  # fmt: skip
    seen: set[str] = set()
    dropped: dict[str, int] = {}
    kept: dict[str, list[ScrambleItem]] = {}
    for name in (*ID_SPLITS, *OOD_SPLITS):
        kept[name] = []
        for it in splits[name]:
            key = content_key(it)
            if key not in seen:
                kept[name].append(it)
            seen.add(key)
        dropped[name] = len(splits[name]) - len(kept[name])
    paths = {name: ctx.out_dir / f"{name}.jsonl" for name in kept}
    for name, rows in kept.items():
        write_jsonl(paths[name], rows)
    check_data(paths)
    vocab = WordVocab.of_suite()
    vocab.save(ctx.out_dir / VOCAB_FILE)
    longest = max(
        len(e.prompt) + len(e.target) for rows in kept.values() for e in encode(rows, vocab)
    )
    if longest + p.evaluate.max_new_tokens > p.model.max_positions:
        raise ValueError(
            f"params.model.max_positions={p.model.max_positions} is shorter than the longest "
            f"item + generation ({longest} + {p.evaluate.max_new_tokens} tokens)"
        )
    return (
        {f"n_{name}": len(rows) for name, rows in kept.items()}
        | {f"dropped_{name}": n for name, n in dropped.items()}
        | {"vocab_size": len(vocab), "longest_tokens": longest}
    )


def check_data(paths: dict[str, Path]) -> None:
    """Every file read back through its validator; no two rows share an item's content (by
    prompt and by content_key, naming file:line of both); ID splits hold no OOD word."""
    rows = {str(path): read_scramble(path) for path in paths.values()}
    check_disjoint(rows)
    check_disjoint(rows, key=content_key)
    bad = ood_words()
    for name in ID_SPLITS:
        for line, it in enumerate(rows[str(paths[name])], start=1):
            words = set(it.prompt.split()) & bad
            if words:
                raise ValueError(f"{paths[name]}:{line}: OOD words {sorted(words)} in an ID split")


def pretrain(ctx: Any) -> dict[str, Any]:
    """One variant, one seed: a tiny LM from scratch on train (same init, batches and steps for
    every variant), its invariance terms thawed by the config's schedule; checkpointed resume."""
    p = _params(ctx)
    seed = ctx.seed or 0
    variant = ctx.variant
    if variant not in p.invariance.variants:
        raise ValueError(
            f"mission_d.pretrain: variant {variant!r} not in invariance.variants "
            f"({list(p.invariance.variants)})"
        )
    weights: dict[str, float] = {str(k): w for k, w in p.invariance.variants[variant].items()}
    vocab = _vocab(ctx)
    items = _read(ctx, "train")
    model = _model(p, vocab, seed).to(ctx.device)
    loss = SepLoss(model, encode(items, vocab), items, vocab, weights, p, seed, ctx.device)
    curves: dict[str, list[list[float]]] = {"ce": [], "kl": []}
    times: list[float] = []

    def step_fn(step: int) -> Tensor:
        t = time.perf_counter()
        out = loss(step)
        times.append(time.perf_counter() - t)  # forward passes only; backward is the same graph
        curves["ce"].append([step + 1, loss.last["ce"]])
        curves["kl"].append([step + 1, loss.last["kl"]])
        return out

    fingerprint = fingerprint_of(
        p.model.model_dump(), p.pretraining.model_dump(), p.invariance.thaw_start,
        p.invariance.thaw_end, p.invariance.view_batch_size, weights, seed, input_digest(ctx, "prepare", None, "train.jsonl", VOCAB_FILE),
    )  # fmt: skip
    run = train_loop(
        ctx,
        "pretrain",
        model,
        step_fn,
        p.pretraining,
        fingerprint=fingerprint,
        trainable_only=False,
    )
    save_model(model, ctx.out_dir / "model")
    vocab.save(ctx.out_dir / "model" / VOCAB_FILE)
    plot_series(
        ctx.out_dir / "pretrain.png",
        {"loss": run["history"], "ce": curves["ce"], "consistency KL": curves["kl"]},
        f"mission_d pretrain {variant} seed {seed}",
        "step",
    )
    return {
        "variant": variant,
        "final_loss": run["final_loss"],
        "final_ce": curves["ce"][-1][1] if curves["ce"] else None,
        "final_kl": curves["kl"][-1][1] if curves["kl"] else None,
        "resumed_from": run["resumed_from"],
        "loss_ms_per_step": 1000 * float(np.mean(times)) if times else None,
        "weights": weights,
        "headline": ["final_loss", "final_ce", "final_kl", "loss_ms_per_step"],
    }


@dataclass(frozen=True)
class Scores:
    correct: np.ndarray  # [N] answer correct
    answer_prob: np.ndarray  # [N] p(answer) at the answer position
    target_ce: np.ndarray  # [N] mean CE over the answer-sentence tokens (EOS included)


@torch.no_grad()
def score(model: nn.Module, examples: Sequence[Encoded], vocab: WordVocab, bs: int) -> Scores:
    """Teacher-forced answer accuracy, answer probability and answer-sentence CE per example."""
    device = next(model.parameters()).device
    correct, prob, ce = [], [], []
    for i in range(0, len(examples), bs):
        chunk = examples[i : i + bs]
        b = make_batch(chunk, vocab.pad_id, str(device))
        logits = logits_of(model, b)
        rows = torch.arange(len(chunk), device=device)
        at = logits[rows, b.answer_pos]
        answers = torch.tensor([e.answer for e in chunk], device=device)
        correct.append((at.argmax(-1) == answers).cpu().numpy())
        prob.append(F.softmax(at, -1)[rows, answers].cpu().numpy())
        tok = F.cross_entropy(logits.transpose(1, 2), b.ids[:, 1:], reduction="none")
        m = b.target_mask
        ce.append(((tok * m).sum(1) / m.sum(1)).cpu().numpy())
    return Scores(np.concatenate(correct).astype(float), np.concatenate(prob), np.concatenate(ce))


@torch.no_grad()
def greedy(
    model: nn.Module, examples: Sequence[Encoded], vocab: WordVocab, max_new: int
) -> list[list[int]]:
    """Greedy continuation of each prompt until EOS or ``max_new`` tokens (EOS dropped); prompts
    of one length are decoded together, so no padding enters a forward."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in examples]
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_len.setdefault(len(e.prompt), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([examples[i].prompt for i in idx], device=device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            for k, i in enumerate(idx):
                if not done[k] and int(nxt[k]) != vocab.eos_id:
                    out[i].append(int(nxt[k]))
            done |= nxt == vocab.eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def ood_evaluation(ctx: Any) -> dict[str, Any]:
    """Every variant of this seed on ID test (clean and under each scrambler), on the chosen OOD
    splits, and by greedy generation of the answer sentence; paired per-example records."""
    p = _params(ctx)
    e = p.evaluate
    seed = ctx.seed or 0
    ood_splits = list(ctx.options.get("ood_splits") or e.ood_splits)
    unknown = sorted(set(ood_splits) - set(OOD_SPLITS))
    if unknown:
        raise ValueError(f"ood splits {unknown} unknown; expected some of {list(OOD_SPLITS)}")
    vocab = _vocab(ctx)
    test = _read(ctx, "test")
    clean = encode(test, vocab)
    scrambled = {
        s: encode([scramble_item(it, s, e.scramble_seed + i) for i, it in enumerate(test)], vocab)
        for s in e.scramblers
    }
    ood = {name: _read(ctx, name) for name in ood_splits}
    variants = list(p.invariance.variants)
    per: dict[str, dict[str, Any]] = {}
    records: list[ExampleRecord] = []
    bleu_sig = chrf_sig = ""
    for v in variants:
        model = load_model(
            ctx.input_dir("pretrain", ctx.seed, variant=v) / "model", device=ctx.device
        )
        model.eval()
        base = score(model, clean, vocab, e.batch_size)
        scr = {s: score(model, ex, vocab, e.batch_size) for s, ex in scrambled.items()}
        ldc = np.mean([scr[s].target_ce - base.target_ce for s in scr], axis=0)
        ratio = [
            np.minimum(1.0, scr[s].answer_prob / np.maximum(base.answer_prob, 1e-12)) for s in scr
        ]
        rrs = np.mean(ratio, axis=0)
        hyps = [
            " ".join(vocab.words[t] for t in g)
            for g in greedy(model, clean, vocab, e.max_new_tokens)
        ]
        bleu = [sentence_bleu(h, it.target) for h, it in zip(hyps, test, strict=True)]
        chrf = [sentence_chrf(h, it.target) for h, it in zip(hyps, test, strict=True)]
        bleu_sig, chrf_sig = bleu[0].signature, chrf[0].signature
        ood_scores = {
            name: score(model, encode(rows, vocab), vocab, e.batch_size)
            for name, rows in ood.items()
        }
        for i, it in enumerate(test):
            row = {
                "accuracy": float(base.correct[i]), "ldc": float(ldc[i]), "rrs": float(rrs[i]),
                "bleu": bleu[i].score, "chrf": chrf[i].score,
                **{f"acc_{s}": float(scr[s].correct[i]) for s in scr},
            }  # fmt: skip
            records.append(ExampleRecord(it.id, v, seed, row, (SLICE,)))
        for name, sc in ood_scores.items():
            for it, c in zip(ood[name], sc.correct, strict=True):
                records.append(ExampleRecord(it.id, v, seed, {"accuracy": float(c)}, (name,)))
        acc = float(base.correct.mean())
        acc_s = {s: float(scr[s].correct.mean()) for s in scr}
        ood_acc = {name: float(sc.correct.mean()) for name, sc in ood_scores.items()}
        per[v] = {
            "accuracy": acc,
            **{f"acc_{s}": a for s, a in acc_s.items()},
            **{f"surface_dependence_{s}": acc - a for s, a in acc_s.items()},
            "RRS": float(np.mean([a / acc for a in acc_s.values()])) if acc else None,
            "rrs": float(rrs.mean()),
            "ldc": float(ldc.mean()),
            "bleu": float(np.mean([b.score for b in bleu])),
            "chrf": float(np.mean([c.score for c in chrf])),
            "corpus_bleu": corpus_bleu(hyps, [it.target for it in test]).score,
            "corpus_chrf": corpus_chrf(hyps, [it.target for it in test]).score,
            **{f"{name}_accuracy": a for name, a in ood_acc.items()},
            **{f"ood_transfer_{name}": (a / acc if acc else None) for name, a in ood_acc.items()},
            "ood_transfer": float(np.mean(list(ood_acc.values())) / acc) if acc else None,
        }
    write_records(ctx.out_dir / "records.jsonl", records)
    ref = per[e.baseline]
    for v in variants:
        per[v]["bleu_change_vs_" + e.baseline] = per[v]["bleu"] - ref["bleu"]
        per[v]["chrf_change_vs_" + e.baseline] = per[v]["chrf"] - ref["chrf"]
    cand, basel = per[e.candidate], per[e.baseline]
    metrics: dict[str, Any] = {
        "candidate": e.candidate,
        "baseline": e.baseline,
        "ood_splits": ood_splits,
        "scramblers": list(e.scramblers),
        "n_test": len(test),
        **{f"n_{name}": len(rows) for name, rows in ood.items()},
        "bleu_signature": bleu_sig,
        "chrf_signature": chrf_sig,
        "variants": per,
        "rrs_change": cand["rrs"] - basel["rrs"],
        "RRS_change": (cand["RRS"] - basel["RRS"])
        if None not in (cand["RRS"], basel["RRS"])
        else None,
        "ldc_change": cand["ldc"] - basel["ldc"],
        "bleu_change": cand["bleu"] - basel["bleu"],
        "chrf_change": cand["chrf"] - basel["chrf"],
        **{
            f"{v}_{k}": per[v][k]
            for v in variants
            for k in ("accuracy", "RRS", "ldc", "ood_transfer")
        },
    }
    metrics["headline"] = [
        "rrs_change", "ldc_change", "bleu_change", "chrf_change",
        f"{e.candidate}_ood_transfer", f"{e.baseline}_ood_transfer",
    ]  # fmt: skip
    _plot(ctx.out_dir / "ood.png", per, variants, ood_splits, list(e.scramblers), seed)
    return metrics


def _plot(
    path: Path, per: dict[str, dict[str, Any]], variants: list[str], ood_splits: list[str],
    scramblers: list[str], seed: int,
) -> None:  # fmt: skip
    """Accuracy per surface (ID clean, each scrambler, each OOD split), one line per variant."""
    labels = ["id", *scramblers, *ood_splits]
    keys = ["accuracy", *(f"acc_{s}" for s in scramblers), *(f"{n}_accuracy" for n in ood_splits)]
    series = {v: [[i, float(per[v][k])] for i, k in enumerate(keys)] for v in variants}
    plot_series(
        path,
        series,
        f"mission_d accuracy by surface ({', '.join(labels)}) seed {seed}",
        "surface index",
    )
