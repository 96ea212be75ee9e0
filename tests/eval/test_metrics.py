from __future__ import annotations

import pytest
import sacrebleu

from bem_tasks.eval.metrics import (
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

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the dog"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped over the lazy dog"]


def test_squad_normalisation_cases() -> None:
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  An  apple,   a DAY ") == "apple day"
    assert normalize_answer("the theory") == "theory"  # whole-word articles only
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_f1_token_multiset() -> None:
    # tokens [cat, sat] vs [cat, sat, down]: precision 1, recall 2/3
    assert f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)
    # Counter overlap: one 'cat' matches once, so precision 1/2, recall 1
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0


def test_empty_answers_follow_v2_convention() -> None:
    assert f1_score("", "the") == 1.0  # both normalise to nothing
    assert f1_score("", "cat") == 0.0
    assert f1_score("cat", "") == 0.0
    assert exact_match("", "a") == 1.0


def test_points_take_max_over_references() -> None:
    assert em_f1_points("cat", ["dog", "The cat"]) == (100.0, 100.0)
    em, f1 = em_f1_points("the cat sat", "cat sat down")
    assert (em, f1) == (0.0, pytest.approx(80.0))
    s = squad_scores(["The Cat!", "the cat sat"], ["cat", ["cat sat down"]])
    assert s.n == 2
    assert s.exact_match == pytest.approx(50.0)
    assert s.f1 == pytest.approx(90.0)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        squad_scores(["a", "b"], ["a"])


def test_bleu_and_chrf_match_sacrebleu() -> None:
    bleu = corpus_bleu(HYPS, REFS)
    assert bleu.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert 0.0 < bleu.score < 100.0
    assert "nrefs:1" in bleu.signature and "tok:13a" in bleu.signature
    chrf = corpus_chrf(HYPS, REFS)
    assert chrf.score == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert "nc:6" in chrf.signature
    assert corpus_bleu(REFS, REFS).score == pytest.approx(100.0)


def test_multiple_references_are_transposed_to_streams() -> None:
    refs2 = ["the cat is on the mat", "a fast brown fox jumps over the dog"]
    got = corpus_bleu(HYPS, [[a, b] for a, b in zip(REFS, refs2, strict=True)])
    assert got.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS, refs2]).score)
    assert "nrefs:2" in got.signature
    with pytest.raises(ValueError, match="same number of references"):
        corpus_bleu(HYPS, [["a"], ["b", "c"]])
    with pytest.raises(ValueError, match="2 hypotheses for 1"):
        corpus_chrf(HYPS, REFS[:1])


def test_sentence_level_matches_sacrebleu() -> None:
    s = sentence_bleu(HYPS[0], REFS[0])
    assert s.score == pytest.approx(sacrebleu.sentence_bleu(HYPS[0], [REFS[0]]).score)
    assert "eff:yes" in s.signature
    c = sentence_chrf(HYPS[1], [REFS[1]])
    assert c.score == pytest.approx(sacrebleu.sentence_chrf(HYPS[1], [REFS[1]]).score)
    assert c.signature
