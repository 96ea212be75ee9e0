"""Answer and generation metrics: exact typed answers, SQuAD EM / F1 for free text, and BLEU /
chrF through sacrebleu.

Structured answers (Suite A's compositional answers, and every suite that reuses them) are
scored by ``answer_em_f1``, on values parsed from canonical JSON, never on normalised text:

* EM: the parsed prediction equals the gold value exactly, with types kept: numbers compare as
  numbers with their sign (``-3`` vs ``3`` is 0, ``3`` vs ``3.0`` is 1), a string never equals
  a number (``"3"`` vs ``3`` is 0), ``true`` is not ``1``, lists compare element by element in
  order and objects key by key.
* F1: F1 over the answer's elements, elements compared as EM compares values. A list is a
  sequence, so its F1 respects order: the matched elements are a longest common subsequence of
  prediction and gold (ROUGE-L's F-measure, beta 1), precision = matched / predicted elements,
  recall = matched / gold elements. A sort that copies the right values unsorted does not get
  full credit: ``[17,4,8]`` against ``[4,8,17]`` matches ``4,8`` (F1 2/3), ``[8,4]`` against
  ``[4,8]`` gets 1/2; one wrong element of three gets 2/3, a dropped element 0.8 (an insertion
  or deletion does not shift every later match away, as a per-position comparison would). An
  object's ``key: value`` pairs are a multiset (objects have no order). A scalar answer is a
  one-element list, so its F1 equals its EM.

A prediction that is missing or does not parse as JSON scores 0 on both.

SQuAD ``normalize_answer`` / ``exact_match`` / ``f1_score`` stay for free-text answers; they drop
punctuation (a minus sign included), so they must not score numbers.

Scale: per-example ``exact_match`` and ``f1`` are in [0, 1] as in the official SQuAD script;
``answer_em_f1``, ``squad_scores`` and ``em_f1_points`` report points (0..100), like the official
totals and like sacrebleu, so per-example records in points average straight to the corpus
figure and a gate threshold such as "+1.5 EM" means the same thing everywhere.

Every sacrebleu score comes with sacrebleu's signature string (tokenizer, smoothing, number of
references, version) so a reported BLEU/chrF can be reproduced exactly.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalisation: lower case, drop punctuation, drop the articles
    a/an/the, collapse whitespace (applied in that order, as the official script does)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-multiset F1 between the normalised strings (``collections.Counter`` overlap).

    Empty answers follow the SQuAD v2.0 convention: if either side normalises to no tokens, F1
    is 1.0 when both are empty and 0.0 otherwise (the v1.1 script would give 0.0 for two empty
    strings, which would punish a correct empty answer).
    """
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _canonical(value: Any) -> Hashable:
    """A hashable form in which two JSON values are equal iff they are the same typed value:
    numbers by exact value (bool is not a number), strings as they are, lists in order,
    objects by key."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int | float):
        try:
            return ("num", Fraction(value))
        except (OverflowError, ValueError):  # inf, nan: never equal to a finite number
            return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _canonical(v)) for k, v in value.items())))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _matched(pred: Any, gold: Any) -> tuple[int, int, int]:
    """(matched, predicted, gold) element counts for F1 of two ``_canonical`` forms: a list's
    longest common subsequence (order counts), an object's key: value overlap (keys are unique),
    a scalar as a one-element list."""
    if pred[0] == gold[0] == "dict":
        return len(set(pred[1]) & set(gold[1])), len(pred[1]), len(gold[1])
    xs = pred[1] if pred[0] == "list" else (pred,)
    ys = gold[1] if gold[0] == "list" else (gold,)
    lcs = [[0] * (len(ys) + 1) for _ in range(len(xs) + 1)]  # answers are short lists
    for i, x in enumerate(xs, start=1):
        for j, y in enumerate(ys, start=1):
            lcs[i][j] = lcs[i - 1][j - 1] + 1 if x == y else max(lcs[i - 1][j], lcs[i][j - 1])
    return lcs[-1][-1], len(xs), len(ys)


_MISSING = object()


def _parse(text: str | None) -> Any:
    """The JSON value of an answer text, or ``_MISSING`` when there is none or it does not
    parse (a sentinel of its own: JSON ``null`` is a real answer)."""
    if text is None:
        return _MISSING
    try:
        return json.loads(text)
    except ValueError:  # JSONDecodeError, or an integer literal past Python's digit limit
        return _MISSING


def answer_em_f1(prediction: str | None, gold: str) -> tuple[float, float]:
    """Per-example (EM, F1) in points (0..100) of a JSON answer against the gold JSON answer,
    compared as typed values (see the module docstring). ``prediction`` None or unparsable
    scores (0, 0); an unparsable ``gold`` is a ValueError."""
    want = _parse(gold)
    if want is _MISSING:
        raise ValueError(f"gold answer {gold!r} is not JSON")
    got = _parse(prediction)
    if got is _MISSING:
        return 0.0, 0.0
    pred, ref = _canonical(got), _canonical(want)
    em = float(pred == ref)
    same, n_pred, n_gold = _matched(pred, ref)
    if not n_pred or not n_gold:  # an empty list or object: right only if both are empty
        return 100.0 * em, 100.0 * float(n_pred == n_gold)
    return 100.0 * em, 100.0 * 2 * same / (n_pred + n_gold)


def _as_list(refs: str | Sequence[str]) -> list[str]:
    out = [refs] if isinstance(refs, str) else list(refs)
    if not out:
        raise ValueError("each example needs at least one reference")
    return out


def em_f1_points(prediction: str, references: str | Sequence[str]) -> tuple[float, float]:
    """Per-example (EM, F1) in points (0..100), the max over the references as in SQuAD."""
    refs = _as_list(references)
    em = max(exact_match(prediction, r) for r in refs)
    f1 = max(f1_score(prediction, r) for r in refs)
    return 100.0 * em, 100.0 * f1


@dataclass(frozen=True)
class SquadScores:
    exact_match: float  # points, 0..100
    f1: float  # points, 0..100
    n: int


def squad_scores(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> SquadScores:
    """Corpus EM and F1 in points: the mean of ``em_f1_points`` over examples."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no examples to score")
    pairs = [em_f1_points(p, r) for p, r in zip(predictions, references, strict=True)]
    n = len(pairs)
    return SquadScores(
        exact_match=sum(e for e, _ in pairs) / n, f1=sum(f for _, f in pairs) / n, n=n
    )


@dataclass(frozen=True)
class MetricScore:
    score: float  # points, 0..100, as sacrebleu reports it
    signature: str  # sacrebleu's signature, e.g. "nrefs:1|case:mixed|eff:no|tok:13a|..."


def _ref_streams(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-hypothesis references -> sacrebleu's reference streams (one list per ref index)."""
    if isinstance(hyps, str) or isinstance(refs, str):
        raise TypeError("pass lists of strings, not a single string")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    if not hyps:
        raise ValueError("no hypotheses to score")
    per = [_as_list(r) for r in refs]
    n_refs = len(per[0])
    if any(len(r) != n_refs for r in per):
        raise ValueError("every hypothesis needs the same number of references")
    return [[r[i] for r in per] for i in range(n_refs)]


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> MetricScore:
    """sacrebleu corpus BLEU (defaults: 13a tokenizer, exp smoothing). ``refs[i]`` is the
    reference (or list of references) for ``hyps[i]``."""
    metric = BLEU()
    score = metric.corpus_score(list(hyps), _ref_streams(hyps, refs)).score
    return MetricScore(float(score), str(metric.get_signature()))


def corpus_chrf(
    hyps: Sequence[str], refs: Sequence[str | Sequence[str]], *, word_order: int = 0
) -> MetricScore:
    """sacrebleu corpus chrF (``word_order=2`` gives chrF++)."""
    metric = CHRF(word_order=word_order)
    score = metric.corpus_score(list(hyps), _ref_streams(hyps, refs)).score
    return MetricScore(float(score), str(metric.get_signature()))


def sentence_bleu(hyp: str, refs: str | Sequence[str]) -> MetricScore:
    """sacrebleu sentence BLEU with effective order (what sacrebleu recommends per sentence)."""
    metric = BLEU(effective_order=True)
    score = metric.sentence_score(hyp, _as_list(refs)).score
    return MetricScore(float(score), str(metric.get_signature()))


def sentence_chrf(hyp: str, refs: str | Sequence[str], *, word_order: int = 0) -> MetricScore:
    metric = CHRF(word_order=word_order)
    score = metric.sentence_score(hyp, _as_list(refs)).score
    return MetricScore(float(score), str(metric.get_signature()))
