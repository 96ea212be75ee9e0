"""Evaluation: exact typed answer EM/F1, SQuAD EM/F1, sacrebleu BLEU/chrF, latency percentiles, per-example records."""

from __future__ import annotations

from bem_tasks.eval.latency import LatencyProfiler, LatencyStats, measure_latency
from bem_tasks.eval.metrics import (
    MetricScore,
    SquadScores,
    answer_em_f1,
    corpus_bleu,
    corpus_chrf,
    em_f1_points,
    exact_match,
    f1_score,
    normalize_answer,
    sentence_bleu,
    sentence_chrf,
    squad_scores,
)
from bem_tasks.eval.records import (
    ExampleRecord,
    PairedArray,
    paired_differences,
    read_records,
    write_records,
)

__all__ = [
    "ExampleRecord",
    "LatencyProfiler",
    "LatencyStats",
    "MetricScore",
    "PairedArray",
    "SquadScores",
    "answer_em_f1",
    "corpus_bleu",
    "corpus_chrf",
    "em_f1_points",
    "exact_match",
    "f1_score",
    "measure_latency",
    "normalize_answer",
    "paired_differences",
    "read_records",
    "sentence_bleu",
    "sentence_chrf",
    "squad_scores",
    "write_records",
]
