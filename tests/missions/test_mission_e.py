"""Mission E: the window rule and the memory on hand-built models, the micro run (conftest_e.py)
end to end, resume, parity, and the gates deciding on the run and failing on constructed
candidates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bem_tasks.cli import _token_counts, main
from bem_tasks.core.long_memory import WindowLM, WindowLMConfig, attach_recall
from bem_tasks.core.tokenizer import ByteTokenizer
from bem_tasks.data.suites.long_context import make_long_context, read_long_context
from bem_tasks.eval.records import ExampleRecord, read_records, write_records
from bem_tasks.fleet.promotion import gate_results, validate_results
from bem_tasks.missions import mission_e
from bem_tasks.missions.mission_e import encode, stream_score, where
from tests.missions import conftest_e
from tests.missions.conftest import run_interrupted
from tests.missions.conftest_e import MICRO_E, MicroE, write_micro_e_project

micro_e = conftest_e.micro_e  # the module's micro run (a fixture)

ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()


def _model(use_memory: bool, *, window: int = 64, chunk: int = 32, slots: int = 4096) -> WindowLM:
    """A random backbone with a recall module whose BEM experts are not zero (U starts at zero,
    which would hide the read), so the read reaches the logits; by default the memory has room
    for every evicted pair."""
    cfg = WindowLMConfig(
        TOK.vocab_size, d_model=32, n_layer=2, n_head=2, window=window, chunk=chunk
    )
    torch.manual_seed(0)
    model = WindowLM(cfg)
    layer = attach_recall(
        model, use_memory=use_memory, d_mem=16, kernel=8, slots=slots, seed=1, num_experts=2, rank=2,
        alpha=16.0, chunk_size=1, trust_budget=None,
    )  # fmt: skip
    with torch.no_grad():
        layer.bem_U.normal_(0, 1.0)
    return model.eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, n), generator=g)


# ============================================================================ the model
@pytest.mark.parametrize("use_memory", [True, False])
def test_streaming_and_cached_backbone_states_give_the_same_logits(use_memory: bool) -> None:
    m = _model(use_memory)
    ids = _ids(300)
    with torch.no_grad():
        full = m(ids)
        state = m.new_stream(2)
        steps = torch.cat([m.step(state, ids[:, s : s + 32]) for s in range(0, 300, 32)], 1)
        cached = m.head(m.norm(m.recalled(ids, m.backbone_states(ids))))
    assert torch.equal(full, steps)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_the_memory_keeps_the_pairs_with_the_largest_write_gates() -> None:
    m = _model(True, slots=8)
    assert m.recall is not None
    with torch.no_grad():
        m(_ids(300))  # warm: nothing to check yet
        state = m.new_stream(2)
        ids = _ids(300, seed=1)
        for w, c in m.chunks(ids):
            m.recall.step(state, w, c.shape[1])
        beta = m.recall.write_gates(ids)[..., 0]  # [B, T-1], pair u at index u - 1
    assert state.slots is not None
    kept = state.slots[2][..., 0]
    # after the last chunk (288) the chunks 256 and 288 wait; chunks 0..224 (pairs u = 1..255,
    # write gates 0..254) were evicted into the slots
    want = beta[:, :255].topk(8, dim=1).values.sort(dim=1).values
    torch.testing.assert_close(kept.sort(dim=1).values, want)
    # batch 2 x (pending: a whole chunk and the last 12 tokens' pairs, + 8 slots) x 33 floats
    assert state.memory_bytes() == 2 * (32 + 12 + 8) * (16 + 16 + 1) * 4


def test_window_rule() -> None:
    m = _model(False, window=64, chunk=32)
    assert [m.window_start(p) for p in (0, 31, 32, 95, 96, 130)] == [0, 0, 0, 0, 32, 64]


def test_kv_only_never_sees_a_token_before_the_window_and_memory_does() -> None:
    """Every token before the window of positions 200.. replaced: kv_only's logits there are bit
    for bit the same; the memory system's change (it reads them back from memory)."""
    ids = _ids(260)
    start = 192  # chunk [192, 224) sees [128, 224): positions < 128 are beyond its window
    changed = ids.clone()
    changed[:, :128] = (ids[:, :128] + 7) % 256
    for use_memory, same in ((False, True), (True, False)):
        m = _model(use_memory)
        assert m.window_start(start) == 128
        with torch.no_grad():
            a, b = m(ids)[:, start:], m(changed)[:, start:]
        assert torch.equal(a, b) is same


def test_a_needle_beyond_the_window_is_unreachable_for_kv_only() -> None:
    """A real Suite E item whose needle `where` calls beyond: changing the needle's code in the
    token ids leaves kv_only's answer logits bit for bit equal, and changes the memory system's."""
    items = make_long_context(
        seed=3, train_lengths=(512,), eval_lengths=(1024,), depths=(0.1,), kinds=("single",),
        n_train_per_cell=1, n_dev_per_cell=1, n_test_per_cell=2, n_keys=20, n_distractors=1,
    )["test"]  # fmt: skip
    item = items[0]
    e = encode(item, TOK)
    kv, mem = _model(False), _model(True)
    assert where(item, kv, e.answer_at) == "beyond"
    (needle,) = [n for n in item.needles if n.role == "target"]
    code_at = needle.offset + 1 + needle.text.index(item.answer)  # +1: <bos>
    ids = torch.tensor([e.ids])
    other = ids.clone()
    other[0, code_at : code_at + 4] = torch.tensor(
        TOK.encode("0000" if item.answer != "0000" else "1111")
    )
    span = slice(e.answer_at, e.answer_at + 4)
    with torch.no_grad():
        assert torch.equal(kv(ids)[0, span], kv(other)[0, span])
        assert not torch.equal(mem(ids)[0, span], mem(other)[0, span])


def test_teacher_forced_scoring_equals_greedy_decoding() -> None:
    """stream_score's answer (argmax under teacher forcing) is what greedy decoding generates:
    what a position sees depends only on its absolute position."""
    item = make_long_context(
        seed=1, train_lengths=(512,), eval_lengths=(700,), depths=(0.5,), kinds=("single",),
        n_train_per_cell=1, n_dev_per_cell=1, n_test_per_cell=1, n_keys=20, n_distractors=1,
    )["test"][0]  # fmt: skip
    e = encode(item, TOK)
    m = _model(True)
    prompt = e.ids[: e.answer_at + 1]
    with torch.no_grad():
        for _ in range(4):
            prompt.append(int(m(torch.tensor([prompt]))[0, -1].argmax()))
    generated = prompt[e.answer_at + 1 :]
    gold = e.ids[e.answer_at + 1 : e.answer_at + 5]
    sc = stream_score(m, e)
    hits = [a == b for a, b in zip(generated, gold, strict=True)]
    assert sc.correct == all(hits) and sc.digit_accuracy == sum(hits) / 4


# ============================================================================ micro run
def test_prepare_writes_disjoint_splits_at_every_length_and_depth(micro_e: MicroE) -> None:
    rows = {
        s: read_long_context(micro_e.run / "prepare" / f"{s}.jsonl")
        for s in ("train", "dev", "test")
    }
    keys = {s: {it.key for it in r} for s, r in rows.items()}
    assert not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    d = MICRO_E["data"]
    cells = {(it.length, it.depth, it.kind) for it in rows["test"]}
    assert cells == {
        (n, x, k) for n in d["eval_lengths"] for x in d["depths"] for k in ("single", "multihop")
    }
    assert {it.length for it in rows["train"]} == set(d["train_lengths"])


def test_context_lengths_option_sets_the_evaluation_lengths(
    micro_e: MicroE, tmp_path: Path
) -> None:
    from bem_tasks.fleet.phases import execute

    execute(micro_e.ctx("prepare", tmp_path / "p", {"context_lengths": [300]}), config_hash="micro")
    assert {it.length for it in read_long_context(tmp_path / "p" / "test.jsonl")} == {300}
    assert _token_counts("1024, 128k") == [1024, 131072]
    with pytest.raises(ValueError, match="--context-lengths"):
        _token_counts("12q")


def test_training_parity_and_weights(micro_e: MicroE) -> None:
    m = micro_e.metrics["train_memory_coupling"]
    assert m["memory_trainable_parameters"] == m["kv_only_trainable_parameters"]
    assert m["parameter_parity"] == 0.0
    d = micro_e.run / "train_memory_coupling"
    mem, kv = load_file(d / "memory.safetensors"), load_file(d / "kv_only.safetensors")
    assert mem.keys() == kv.keys() and all(k.startswith("recall.") for k in mem)
    assert (d / "training.png").stat().st_size > 0


def test_parity_is_checked(
    micro_e: MicroE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory system with 10% more trainable parameters than kv_only is refused."""
    from bem_tasks.fleet.phases import execute

    real = mission_e.coupled

    def bigger(p, backbone, system, seed):  # type: ignore[no-untyped-def]
        model = real(p, backbone, system, seed)
        if system == "memory":
            n = sum(q.numel() for q in model.parameters() if q.requires_grad)
            model.register_parameter("extra", torch.nn.Parameter(torch.zeros(n // 10 + 1)))
        return model

    monkeypatch.setattr(mission_e, "coupled", bigger)
    with pytest.raises(ValueError, match="parameter parity"):
        execute(micro_e.ctx("train_memory_coupling", tmp_path / "t"), config_hash="micro")


def test_training_resumes_from_its_checkpoint_bit_for_bit(micro_e: MicroE, tmp_path: Path) -> None:
    """A crash after the memory system's step 15 (checkpoint at 10) and a rerun: the same
    weights as the unbroken run, bit for bit (batches are functions of seed and step)."""
    out = tmp_path / "t"
    run_interrupted(micro_e.ctx("train_memory_coupling", out), "memory", 15)
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"] == {"pretrain": 10, "memory": 10, "kv_only": 0}
    for name in ("backbone", "memory", "kv_only"):
        want = load_file(micro_e.run / "train_memory_coupling" / f"{name}.safetensors")
        got = load_file(out / f"{name}.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_evaluation_records_heatmap_and_metrics(micro_e: MicroE) -> None:
    d = micro_e.run / "long_context_evaluation"
    m = micro_e.metrics["long_context_evaluation"]
    records = read_records(d / "records.jsonl")
    test = read_long_context(micro_e.run / "prepare" / "test.jsonl")
    per_item = [r for r in records if r.example_id != "run"]
    assert len(per_item) == 2 * len(test)
    beyond = [r for r in per_item if "accuracy_beyond_window" in r.metrics]
    assert len(beyond) == 2 * m["n_beyond_window"] > 0
    assert {r.system for r in records if r.example_id == "run"} == {"memory"}
    assert (d / "accuracy_heatmap.png").stat().st_size > 0
    for system in ("memory", "kv_only"):
        s = m["systems"][system]
        assert len(s["accuracy_grid"]) == 2 and len(s["accuracy_grid"][0]) == 2
        assert s["perplexity_spike"] == pytest.approx(
            s["perplexity"]["512"] / s["perplexity"]["256"]
        )
    # kept by the memory: window/chunk = 2 chunks of 32 pending pairs and 8 slots, each pair a
    # key and a value of 16 floats and a write gate (fp32)
    assert 0 < m["memory_state_bytes"] <= (2 * 32 + 8) * (16 + 16 + 1) * 4
    assert m["systems"]["kv_only"]["memory_state_bytes"] == 0


def test_inside_window_items_score_the_same_with_and_without_memory(micro_e: MicroE) -> None:
    """On items whose needles lie inside the window, switching the trained memory system's
    memory off changes its digit accuracy by nothing beyond the 95% CI."""
    r = micro_e.metrics["long_context_evaluation"]["inside_window_memory_on_minus_off"]
    assert r["n"] > 0
    low, high = r["ci"]
    assert low <= 0.0 <= high


def test_long_context_suite_option(micro_e: MicroE, tmp_path: Path) -> None:
    """`bem-fleet evaluate --long-context-suite FILE`: that file's items, not prepare's test."""
    from bem_tasks.fleet.phases import execute

    rows = read_long_context(micro_e.run / "prepare" / "test.jsonl")[:3]
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(r.model_dump_json() + "\n" for r in rows))
    out = tmp_path / "ev"
    execute(micro_e.ctx("long_context_evaluation", out, {"suite": str(suite)}), config_hash="micro")
    assert json.loads((out / "metrics.json").read_text())["n_items"] == 3


def test_cli_refuses_the_options_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = write_micro_e_project(tmp_path / "project")
    code = main(["train", "mission_d", "--phase", "prepare", "--context-lengths", "128k",
                 "--config", str(arch), "--output", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "only mission_e's prepare" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    code = main(["evaluate", "--mission", "mission_e", "--model", str(tmp_path), "--config",
                 str(arch), "--long-context-suite", str(bad), "--output", str(tmp_path / "e")])  # fmt: skip
    assert code == 2 and f"{bad}:1" in capsys.readouterr().err


# ============================================================================ gates
def _decide(tmp: Path, eval_dir: Path) -> dict:
    doc = {
        "mission": "mission_e", "profile": "smoke", "dag_id": "t", "run_id": "r",
        "config_hash": "micro", "final_phase": "long_context_evaluation",
        "phases": {"long_context_evaluation": {"seed_0": {"dir": str(eval_dir), "metrics": {}}}},
    }  # fmt: skip
    results = tmp / "mission_e" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps(doc))
    gates = ROOT / "configs" / "gates_bem2.yaml"
    validate_results(
        [results], gates_path=gates, out_path=tmp / "stats.json", confidence=0.95,
        n_resamples=500,
    )  # fmt: skip
    report = gate_results(
        tmp / "stats.json", gates_path=gates, out_dir=tmp, registry_path=tmp / "reg.json",
        register=False,
    )  # fmt: skip
    (decision,) = report["decisions"]
    return decision  # type: ignore[no-any-return]


def test_gates_decide_on_the_micro_run(micro_e: MicroE, tmp_path: Path) -> None:
    d = _decide(tmp_path, micro_e.run / "long_context_evaluation")
    assert d["mission"] == "mission_e" and not d.get("error")
    assert {g["gate"] for g in d["gates"]} == {"beyond_window", "perplexity_spike", "latency"}


def _passing(records: list[ExampleRecord]) -> list[ExampleRecord]:
    """The micro run's records made to pass every gate: memory right beyond the window where
    kv_only is wrong, no perplexity spike, equal latency (60 beyond-window items)."""
    out = []
    for i in range(60):
        for system, acc in (("memory", 1.0), ("kv_only", 0.0)):
            metrics = {"accuracy": acc, "accuracy_beyond_window": acc, "latency_ms": 10.0 + i % 3}
            out.append(ExampleRecord(f"e{i}", system, 0, metrics, ("slice_b",)))
    out.append(ExampleRecord("run", "memory", 0, {"perplexity_spike": 1.0}, ("slice_b",)))
    return out


@pytest.mark.parametrize("gate", [None, "beyond_window", "perplexity_spike", "latency"])
def test_each_gate_fails_on_a_constructed_candidate(tmp_path: Path, gate: str | None) -> None:
    """A candidate built to pass everything is PROMOTED; worsened on one gate's metric, that
    gate fails and the candidate is not promoted."""
    records = _passing([])
    worse = []
    for r in records:
        m = dict(r.metrics)
        if r.system == "memory":
            if gate == "beyond_window" and "accuracy_beyond_window" in m:
                m["accuracy_beyond_window"] = m["accuracy"] = 0.0
            elif gate == "perplexity_spike" and r.example_id == "run":
                m["perplexity_spike"] = 1.5
            elif gate == "latency" and "latency_ms" in m:
                m["latency_ms"] *= 1.5
        worse.append(ExampleRecord(r.example_id, r.system, r.seed, m, r.slices))
    (tmp_path / "ev").mkdir()
    write_records(tmp_path / "ev" / "records.jsonl", worse)
    d = _decide(tmp_path, tmp_path / "ev")
    status = {g["gate"]: g["status"] for g in d["gates"]}
    if gate is None:
        assert d["decision"] == "PROMOTED", status
    else:
        assert status[gate] != "pass" and d["decision"] != "PROMOTED", status


def test_micro_params_are_valid() -> None:
    from bem_tasks.missions.mission_e_params import MissionEParams

    p = MissionEParams.model_validate(copy.deepcopy(MICRO_E))
    assert p.backbone.window == 64
    bad = copy.deepcopy(MICRO_E)
    bad["data"]["train_lengths"] = [64]
    with pytest.raises(ValueError, match="must exceed backbone.window"):
        MissionEParams.model_validate(bad)
    assert np.isfinite(p.recall.lm_weight)
