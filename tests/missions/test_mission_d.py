"""Mission D on its micro run (conftest_d.py): scramblers as permutations on the whole corpus,
the consistency KL, pt2 == pt1 at invariance weight 0, OOD data never in pretraining, records,
and the gates deciding on the run (and failing on a constructed candidate)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bem_tasks.config.loader import validate
from bem_tasks.data.suites.scramble import (
    ID_VOCAB,
    PUNCT,
    entity_mapping,
    read_scramble,
    relabel_tokens,
    scramble_item,
    unrelabel_tokens,
)
from bem_tasks.eval.records import read_records
from bem_tasks.fleet.phases import execute
from bem_tasks.fleet.promotion import gate_results, validate_results
from bem_tasks.missions import mission_d
from bem_tasks.missions.mission_d import (
    BIJECTIVE,
    SepLoss,
    WordVocab,
    consistency_kl,
    encode,
    logits_of,
    make_batch,
    scramble_permutation,
    thaw_factor,
)
from tests.missions import conftest_d
from tests.missions.conftest_d import (
    MICRO_D,
    VARIANTS,
    MicroD,
    load_d_config,
    write_micro_d_project,
)

micro_d = conftest_d.micro_d  # the module's micro run (a fixture)

ROOT = Path(__file__).resolve().parents[2]
ALL_SPLITS = ("train", "dev", "test", "ood_synonym", "ood_entity", "ood_template")


def _rows(run: MicroD, split: str) -> list:
    return read_scramble(run.run / "prepare" / f"{split}.jsonl")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model" / "model.safetensors"))


def test_prepare_splits_are_disjoint_and_id_splits_hold_no_ood_word(micro_d: MicroD) -> None:
    m = micro_d.metrics["prepare"]
    assert m["n_train"] == 240 and m["n_test"] == 40
    rows = {s: _rows(micro_d, s) for s in ALL_SPLITS}
    keys = [mission_d.content_key(it) for items in rows.values() for it in items]
    assert len(keys) == len(set(keys))
    ood = mission_d.ood_words()
    for s in ("train", "dev", "test"):
        assert all(not set(it.prompt.split()) & ood for it in rows[s])
    # each OOD split does carry unseen forms
    for s in ("ood_synonym", "ood_entity", "ood_template"):
        assert all(set(it.prompt.split()) & ood for it in rows[s]), s


def test_bijective_scramblers_are_permutations_and_invertible_on_the_whole_corpus(
    micro_d: MicroD,
) -> None:
    vocab = WordVocab.load(micro_d.run / "prepare" / "vocab.json")
    items = [it for s in ("train", "dev", "test") for it in _rows(micro_d, s)]
    for seed in (0, 7):
        perms = {s: scramble_permutation(vocab, s, seed) for s in BIJECTIVE}
        inv_entity = {v: k for k, v in entity_mapping(seed).items()}
        for it in items:
            text = it.prompt.rstrip("\n")
            # relabel then its inverse is the identity; entity renaming likewise
            assert unrelabel_tokens(relabel_tokens(text, seed), seed) == text
            renamed = scramble_item(it, "entity", seed).prompt.rstrip("\n").split(" ")
            assert [inv_entity.get(w, w) for w in renamed] == text.split(" ")
            ids = torch.tensor(vocab.prompt_ids(it.prompt) + vocab.target_ids(it.target))
            for s, perm in perms.items():
                scr = scramble_item(it, s, seed)
                want = vocab.prompt_ids(scr.prompt) + vocab.target_ids(scr.target)
                assert perm[ids].tolist() == want, (s, it.id)
                assert torch.equal(torch.argsort(perm)[perm[ids]], ids)  # P^-1 P = identity


def test_consistency_kl_is_zero_for_the_identity_and_positive_for_a_scrambler(
    micro_d: MicroD,
) -> None:
    vocab = WordVocab.load(micro_d.run / "prepare" / "vocab.json")
    from bem_tasks.core import load_model

    model = load_model(micro_d.run / "pretrain" / "pt1" / "seed_0" / "model")
    b = make_batch(encode(_rows(micro_d, "test")[:8], vocab), vocab.pad_id)
    with torch.no_grad():
        clean = logits_of(model, b)
        assert consistency_kl(clean, logits_of(model, b), None, b).item() == 0.0
        ident = torch.arange(len(vocab))
        assert consistency_kl(clean, clean.clone(), ident, b).item() == 0.0
        perm = scramble_permutation(vocab, "relabel", 3)
        scr = logits_of(model, b.with_ids(perm[b.ids]))
        assert consistency_kl(clean, scr, perm, b).item() > 1e-3


def test_thaw_schedule() -> None:
    assert [thaw_factor(s, 10, 20) for s in (0, 9, 10, 15, 20, 30)] == [0, 0, 0, 0.5, 1, 1]
    assert thaw_factor(5, 5, 5) == 1.0 and thaw_factor(4, 5, 5) == 0.0


def test_invariance_weight_zero_gives_pt1_bit_for_bit(micro_d: MicroD, tmp_path: Path) -> None:
    params = copy.deepcopy(MICRO_D)
    params["invariance"]["variants"]["pt2"] = {"relabel": 0.0}
    # and pt3 at full weight but thawed only after the last step: no extra forward either
    params["invariance"]["variants"]["pt3"] = {"shuffle": 1.0}
    params["invariance"].update(thaw_start=1000, thaw_end=1000)
    cfg = load_d_config(tmp_path / "project", params)
    pt1 = _weights(micro_d.run / "pretrain" / "pt1" / "seed_0")
    for v in ("pt2", "pt3"):
        out = tmp_path / v
        execute(micro_d.ctx("pretrain", out, variant=v, cfg=cfg), config_hash="w0")
        got = _weights(out)
        assert got.keys() == pt1.keys()
        assert all(torch.equal(got[k], pt1[k]) for k in pt1), v
    # with weight > 0 after thawing, pt2 really differs from pt1
    pt2 = _weights(micro_d.run / "pretrain" / "pt2" / "seed_0")
    assert not all(torch.equal(pt2[k], pt1[k]) for k in pt1)
    assert micro_d.metrics["pretrain/pt2"]["final_kl"] > 0


def test_ood_items_and_words_never_reach_pretraining(micro_d: MicroD) -> None:
    """Every sequence pt4's loss feeds the model over all steps, clean and scrambled, holds ID
    vocabulary only, and none starts with an OOD (or test) prompt."""
    p = micro_d.cfg.params["mission_d"]
    vocab = WordVocab.load(micro_d.run / "prepare" / "vocab.json")
    train = _rows(micro_d, "train")
    from bem_tasks.core import load_model

    inner = load_model(micro_d.run / "pretrain" / "pt1" / "seed_0" / "model")
    seen: list[list[int]] = []

    class Recorder(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN201
            for row, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
                seen.append(row[: sum(m)])
            return inner(input_ids=input_ids, attention_mask=attention_mask)

    loss = SepLoss(
        Recorder(), encode(train, vocab), train, vocab, dict(p.invariance.variants["pt4"]), p, 0
    )
    with torch.no_grad():
        for step in range(p.pretraining.steps):
            loss(step)
    views = 1 + (1 if loss.bijective else 0) + 1  # clean + bijective + shuffle after thawing
    assert len(seen) > p.pretraining.steps * p.pretraining.batch_size * 1.5
    assert len(seen) <= p.pretraining.steps * p.pretraining.batch_size * views
    allowed = set(vocab.ids([*ID_VOCAB, *PUNCT])) | {vocab.pad_id, vocab.eos_id, vocab.nl_id}
    assert {t for row in seen for t in row} <= allowed
    held = {
        tuple(vocab.prompt_ids(it.prompt))
        for s in ("test", "ood_synonym", "ood_entity", "ood_template")
        for it in _rows(micro_d, s)
    }
    starts = {tuple(row[: row.index(vocab.nl_id) + 1]) for row in seen}
    assert not starts & held


def test_records_metrics_and_signatures(micro_d: MicroD) -> None:
    m = micro_d.metrics["ood_evaluation"]
    records = read_records(micro_d.run / "ood_evaluation" / "records.jsonl")
    assert {r.system for r in records} == set(VARIANTS)
    gated = [r for r in records if "slice_b" in r.slices]
    assert len(gated) == 4 * m["n_test"]
    for r in gated:
        assert {"accuracy", "ldc", "rrs", "bleu", "chrf"} <= set(r.metrics)
        assert 0 <= r.metrics["rrs"] <= 1 and 0 <= r.metrics["bleu"] <= 100
    for split in ("ood_synonym", "ood_entity", "ood_template"):
        assert len([r for r in records if split in r.slices]) == 4 * m[f"n_{split}"]
    assert "nrefs:1" in m["bleu_signature"] and "nc:6" in m["chrf_signature"]
    per = m["variants"]
    for v in VARIANTS:
        got = [r for r in gated if r.system == v]
        assert per[v]["ldc"] == pytest.approx(np.mean([r.metrics["ldc"] for r in got]))
        assert per[v]["accuracy"] == pytest.approx(np.mean([r.metrics["accuracy"] for r in got]))
        for s in ("relabel", "shuffle", "synonym", "entity"):
            assert per[v][f"surface_dependence_{s}"] == pytest.approx(
                per[v]["accuracy"] - per[v][f"acc_{s}"]
            )
    assert m["rrs_change"] == pytest.approx(per["pt4"]["rrs"] - per["pt1"]["rrs"])
    assert (micro_d.run / "ood_evaluation" / "ood.png").stat().st_size > 0
    assert (micro_d.run / "pretrain" / "pt4" / "seed_0" / "pretrain.png").stat().st_size > 0


def test_ood_suite_option_limits_the_splits(micro_d: MicroD, tmp_path: Path) -> None:
    ctx = micro_d.ctx("ood_evaluation", tmp_path / "ev")
    ctx.options = {"ood_splits": ["ood_entity"]}
    execute(ctx, config_hash="micro")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["ood_splits"] == ["ood_entity"] and "n_ood_synonym" not in m
    manifest = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert manifest["config_hash"] != "micro" and manifest["options"] == ctx.options


def _results(tmp: Path, eval_dir: Path) -> Path:
    doc = {
        "mission": "mission_d", "profile": "smoke", "dag_id": "t", "run_id": "r",
        "config_hash": "micro", "final_phase": "ood_evaluation",
        "phases": {"ood_evaluation": {"seed_0": {"dir": str(eval_dir), "metrics": {}}}},
    }  # fmt: skip
    path = tmp / "mission_d" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    return path


def _decide(tmp: Path, eval_dir: Path) -> dict:
    gates = ROOT / "configs" / "gates_bem2.yaml"
    validate_results(
        [_results(tmp, eval_dir)], gates_path=gates, out_path=tmp / "stats.json",
        confidence=0.95, n_resamples=500,
    )  # fmt: skip
    report = gate_results(
        tmp / "stats.json", gates_path=gates, out_dir=tmp, registry_path=tmp / "reg.json",
        register=False,
    )  # fmt: skip
    (decision,) = report["decisions"]
    return decision  # type: ignore[no-any-return]


def test_gates_decide_on_the_micro_run(micro_d: MicroD, tmp_path: Path) -> None:
    d = _decide(tmp_path, micro_d.run / "ood_evaluation")
    assert d["mission"] == "mission_d" and not d.get("error")
    assert {g["gate"] for g in d["gates"]} == {"rrs_up", "ldc_down", "bleu_loss", "chrf_loss"}


@pytest.mark.parametrize("gate", ["rrs_up", "ldc_down", "bleu_loss", "chrf_loss"])
def test_each_gate_fails_on_a_constructed_candidate(
    micro_d: MicroD, tmp_path: Path, gate: str
) -> None:
    """pt4 records rewritten to be worse than pt1 on the gate's metric: the gate fails."""
    from bem_tasks.eval.records import ExampleRecord, write_records

    records = read_records(micro_d.run / "ood_evaluation" / "records.jsonl")
    metric = {"rrs_up": "rrs", "ldc_down": "ldc", "bleu_loss": "bleu", "chrf_loss": "chrf"}[gate]
    base = {r.example_id: r.metrics for r in records if r.system == "pt1" and "slice_b" in r.slices}
    worse = {"rrs": -0.3, "ldc": 2.0, "bleu": -30.0, "chrf": -30.0}[metric]
    out = []
    for r in records:
        if r.system == "pt4" and "slice_b" in r.slices:
            metrics = dict(r.metrics) | {metric: base[r.example_id][metric] + worse}
            r = ExampleRecord(r.example_id, r.system, r.seed, metrics, r.slices)
        out.append(r)
    (tmp_path / "ev").mkdir()
    write_records(tmp_path / "ev" / "records.jsonl", out)
    d = _decide(tmp_path, tmp_path / "ev")
    status = {g["gate"]: g["status"] for g in d["gates"]}
    assert status[gate] != "pass" and d["decision"] != "PROMOTED"


def test_variants_must_match_the_mapped_phase(tmp_path: Path) -> None:
    params = copy.deepcopy(MICRO_D)
    params["invariance"]["variants"]["pt5"] = {"shuffle": 1.0}  # overlays merge: add, not drop
    arch = write_micro_d_project(tmp_path, params)
    problems = validate(arch)
    assert any(
        "mission_d_sep.yml:profiles.smoke.params" in p and "phases.pretrain.variants" in p
        for p in problems
    ), problems
    params = copy.deepcopy(MICRO_D)
    params["invariance"]["variants"]["pt4"] = {"rotate": 1.0}
    problems = validate(write_micro_d_project(tmp_path / "b", params))
    assert any("invariance.variants.pt4.rotate" in p for p in problems), problems


def test_pretrain_resumes_from_its_checkpoint_to_the_same_weights(
    micro_d: MicroD, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pt4 killed after step 25 (checkpoint at 20) and rerun: resumes at 20 and ends with the
    unbroken run's weights bit for bit (batches and views are functions of seed and step)."""
    out = tmp_path / "pt4"
    real = SepLoss.__call__

    def crash(self: SepLoss, step: int) -> torch.Tensor:
        if step == 25:
            raise RuntimeError("killed")
        return real(self, step)

    monkeypatch.setattr(SepLoss, "__call__", crash)
    with pytest.raises(RuntimeError, match="killed"):
        execute(micro_d.ctx("pretrain", out, variant="pt4"), config_hash="micro")
    monkeypatch.setattr(SepLoss, "__call__", real)
    execute(micro_d.ctx("pretrain", out, variant="pt4"), config_hash="micro")
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 20
    want = _weights(micro_d.run / "pretrain" / "pt4" / "seed_0")
    got = _weights(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
