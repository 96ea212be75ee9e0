"""Mission C on its micro run (tests/missions/conftest_c.py): the safety basis's orthogonality
(checked with scipy's principal angles), dual ascent, the knob at 0, records and gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.linalg import subspace_angles

from bem_tasks.core import bem_layers
from bem_tasks.data.suites.safety import CATEGORIES, RED_TEAM_TEMPLATES, TEMPLATES
from bem_tasks.eval.records import ExampleRecord, read_records, write_records
from bem_tasks.fleet.promotion import gate_results, validate_results
from bem_tasks.missions import mission_c
from bem_tasks.missions.mission_c_params import ALL_CATEGORIES, MissionCParams
from bem_tasks.missions.planner import make_batch
from tests.missions.conftest import ROOT
from tests.missions.conftest_c import MICRO_C, MicroC, load_c_config, micro_c  # noqa: F401

GATES = ROOT / "configs" / "gates_bem2.yaml"


def _system(run: MicroC, train_dir: Path | None = None):
    inputs = {"train_safety_basis": train_dir} if train_dir else None
    ctx = run.ctx("safety_evaluation", run.tmp / "unused", inputs=inputs)
    p = mission_c._params(ctx)
    model, codec = mission_c._load_system(ctx, p)
    return ctx, p, model, codec, mission_c._load_basis(ctx, p, model)


def _scipy_orthogonality(model, basis) -> float:
    worst = 0.0
    for site, layer in bem_layers(model):
        key = mission_c._key(site)
        for task, own in ((layer.bem_U, basis.U[key]), (layer.bem_V, basis.V[key])):
            angles = subspace_angles(task.detach().double().numpy(), own.detach().double().numpy())
            worst = max(worst, float(np.cos(angles.min())))
    return 1.0 - worst


def test_categories_in_step_with_the_suite() -> None:
    assert tuple(CATEGORIES) == ALL_CATEGORIES


def test_phases_ran_and_wrote_records(micro_c: MicroC) -> None:  # noqa: F811
    base = micro_c.metrics["pretrain_base"]
    assert base["dev_violation"] > 0.5  # the unsafe base really complies: a dense baseline
    records = read_records(micro_c.dirs["safety_evaluation"] / "records.jsonl")
    assert {r.system for r in records} == {"safety", "base"}
    harmful = [r for r in records if "violation" in r.metrics]
    benign = [r for r in records if "em" in r.metrics]
    assert harmful and benign and all("over_refusal" in r.metrics for r in benign)
    red = [r for r in records if "red_team" in r.slices]
    assert red and all("slice_b" not in r.slices for r in red)
    (run_rec,) = [r for r in records if r.example_id == "run"]
    assert run_rec.system == "safety" and set(run_rec.metrics) == {"orthogonality"}
    timed = [r for r in records if "latency_ms" in r.metrics]
    assert len(timed) == 2 * MICRO_C["evaluate"]["latency_examples"]
    # knob_sweep carries the evaluation's records (the mission's final phase)
    assert read_records(micro_c.dirs["knob_sweep"] / "records.jsonl") == records
    sweep = micro_c.metrics["knob_sweep"]
    assert [c["knob"] for c in sweep["curve"]] == MICRO_C["knob_sweep"]["knob_values"]
    assert (micro_c.dirs["knob_sweep"] / "knob_curve.png").stat().st_size > 0
    assert (micro_c.dirs["train_safety_basis"] / "training.png").stat().st_size > 0


def test_orthogonality_holds_after_training(micro_c: MicroC) -> None:  # noqa: F811
    _, _, model, _, basis = _system(micro_c)
    independent = _scipy_orthogonality(model, basis)
    recorded = micro_c.metrics["safety_evaluation"]["orthogonality"]
    assert independent == pytest.approx(recorded, abs=1e-6)
    assert independent >= 0.95
    # the basis was trained: not an untouched (zero) U
    assert all(float(basis.U[mission_c._key(s)].abs().max()) > 0 for s, _ in bem_layers(model))


def test_dual_ascent_follows_the_violation(micro_c: MicroC, tmp_path: Path) -> None:  # noqa: F811
    """lambda rises while v > epsilon and falls once v < epsilon (epsilon between the first
    and the last v of the micro run)."""
    params = json.loads(json.dumps(MICRO_C))
    params["safety"]["epsilon"] = 0.75
    cfg = load_c_config(tmp_path / "project", params)
    out = tmp_path / "train"
    micro_c.run("train_safety_basis", out, cfg=cfg)
    rows = json.loads((out / "dual_trace.json").read_text())["rows"]
    eps, lr = 0.75, params["safety"]["dual_lr"]
    ups = downs = 0
    for (_, v, lam, _, _), nxt in zip(rows, rows[1:], strict=False):
        assert nxt[2] == pytest.approx(max(0.0, lam + lr * (v - eps)))
        if v > eps:
            assert nxt[2] > lam
            ups += 1
        elif lam > 0:
            assert nxt[2] < lam
            downs += 1
    assert ups and downs


def test_knob_zero_is_the_base_model_bit_for_bit(micro_c: MicroC) -> None:  # noqa: F811
    ctx, p, model, codec, basis = _system(micro_c)
    items = mission_c._read(ctx, "test")[:8]
    ex = mission_c._encode(items, codec, lambda it: it.target)
    b = make_batch(ex, codec.pad_id, loss_on_prompt=False)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits

    plain = logits()  # no basis attached at all
    basis.set_knob(model, 1.0)
    on = logits()
    basis.set_knob(model, 0.0)
    assert not torch.equal(on, plain)
    assert torch.equal(logits(), plain)
    dec0 = mission_c._decoder(model, basis, 0.0, p, codec, ctx)
    plain_dec = mission_c.RoutedDecoder(
        model, eos_id=codec.eos_id, max_new_tokens=p.evaluate.max_new_tokens, device="cpu"
    )
    assert [d.tokens for d in mission_c.decode_all(dec0, ex, 4)] == [
        d.tokens for d in mission_c.decode_all(plain_dec, ex, 4)
    ]


def test_violation_proxy_is_small_only_for_a_certain_refusal() -> None:
    labels = torch.tensor([[-100, 1, 2]])
    sure = torch.full((1, 3, 4), -30.0)
    sure[0, 0, 1] = sure[0, 1, 2] = 30.0
    assert float(mission_c.violation_proxy(sure, labels)) < 1e-6
    wrong = torch.zeros(1, 3, 4)
    v = mission_c.violation_proxy(wrong.requires_grad_(), labels)
    assert 0.5 < float(v.detach()) < 1.0
    v.backward()
    assert wrong.grad is not None and float(wrong.grad.abs().sum()) > 0


def _results(tmp: Path, eval_dir: Path) -> Path:
    doc = {
        "mission": "mission_c", "profile": "smoke", "dag_id": "t", "run_id": "r",
        "config_hash": "micro", "final_phase": "knob_sweep",
        "phases": {"knob_sweep": {"seed_0": {"dir": str(eval_dir), "metrics": {}}}},
    }  # fmt: skip
    path = tmp / "mission_c" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _decide(tmp: Path, eval_dir: Path) -> dict:
    validate_results(
        [_results(tmp, eval_dir)], gates_path=GATES, out_path=tmp / "stats.json",
        confidence=0.95, n_resamples=300,
    )  # fmt: skip
    report = gate_results(
        tmp / "stats.json", gates_path=GATES, out_dir=tmp, registry_path=tmp / "reg.json",
        register=False,
    )  # fmt: skip
    (decision,) = report["decisions"]
    return decision  # type: ignore[no-any-return]


def _gate(d: dict, name: str) -> dict:
    return next(g for g in d["gates"] if g["gate"] == name)


def test_gates_decide_on_the_micro_run(micro_c: MicroC, tmp_path: Path) -> None:  # noqa: F811
    d = _decide(tmp_path, micro_c.dirs["knob_sweep"])
    assert d["mission"] == "mission_c" and not d.get("error")
    assert {g["gate"] for g in d["gates"]} == {
        "violation_reduction", "em_drop", "f1_drop", "latency", "orthogonality"
    }  # fmt: skip
    assert _gate(d, "orthogonality")["status"] == "passed"


def _rewrite(src: Path, dst: Path, fn) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    write_records(dst / "records.jsonl", [fn(r) for r in read_records(src / "records.jsonl")])
    return dst


def test_sparse_baseline_does_not_crash_the_statistics(
    micro_c: MicroC,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A base that almost never violates (one violation in the slice) or never does: the
    violation gate is decided or reported missing, never an error."""
    first = {"done": False}

    def sparse(r: ExampleRecord) -> ExampleRecord:
        if "violation" not in r.metrics:
            return r
        v = 0.0
        if r.system == "base" and "slice_b" in r.slices and not first["done"]:
            first["done"], v = True, 1.0
        return ExampleRecord(r.example_id, r.system, r.seed, {"violation": v}, r.slices)

    d = _decide(tmp_path / "a", _rewrite(micro_c.dirs["knob_sweep"], tmp_path / "a_in", sparse))
    assert not d.get("error") and d["decision"] != "PROMOTED"
    first["done"] = True  # now every base value is 0
    d = _decide(tmp_path / "b", _rewrite(micro_c.dirs["knob_sweep"], tmp_path / "b_in", sparse))
    assert not d.get("error") and _gate(d, "violation_reduction")["status"] == "missing"


def test_orthogonality_gate_fails_for_a_basis_inside_the_task_subspace(
    micro_c: MicroC,  # noqa: F811
    tmp_path: Path,
) -> None:
    """No penalty and a start inside the experts' input span: the gate fails, not PROMOTED."""
    params = json.loads(json.dumps(MICRO_C))
    params["safety"] |= {"orthogonality_weight": 0.0, "init": "task_subspace"}
    cfg = load_c_config(tmp_path / "project", params)
    train = tmp_path / "train"
    m = micro_c.run("train_safety_basis", train, cfg=cfg)
    assert m["orthogonality"] < 0.95
    _, _, model, _, basis = _system(micro_c, train)
    assert _scipy_orthogonality(model, basis) == pytest.approx(m["orthogonality"], abs=1e-6)

    def ortho(r: ExampleRecord) -> ExampleRecord:
        if r.example_id != "run":
            return r
        return ExampleRecord(
            "run", r.system, r.seed, {"orthogonality": m["orthogonality"]}, r.slices
        )

    d = _decide(tmp_path, _rewrite(micro_c.dirs["knob_sweep"], tmp_path / "in", ortho))
    assert _gate(d, "orthogonality")["status"] == "failed"
    assert d["decision"] != "PROMOTED"


def _constructed(tmp: Path, worse: str | None, n: int = 60) -> Path:
    """Records of a candidate that clears every gate (no violation where the base always
    violates, the same answers, +2% latency, orthogonality 0.99), made worse on one gate's
    metric when ``worse`` names it. Enough examples for every gate to decide."""
    rec = []
    for i in range(n):
        base_lat = 10.0 + 0.1 * (i % 7)
        em = 100.0 * (i % 2)
        safe = {
            "violation": 1.0 if worse == "violation_reduction" else 0.0,
            "em": 0.0 if worse == "em_drop" else em,
            "f1": 0.0 if worse == "f1_drop" else em,
            "latency_per_token_ms": base_lat * (1.5 if worse == "latency" else 1.02),
        }
        rec += [
            ExampleRecord(f"h{i}", "base", 0, {"violation": 1.0}, ("slice_b",)),
            ExampleRecord(f"h{i}", "safety", 0, {"violation": safe["violation"]}, ("slice_b",)),
        ]
        base_b = {"em": em, "f1": em, "latency_per_token_ms": base_lat}
        safe_b = {k: safe[k] for k in base_b}
        rec += [
            ExampleRecord(f"b{i}", "base", 0, base_b, ("slice_b",)),
            ExampleRecord(f"b{i}", "safety", 0, safe_b, ("slice_b",)),
        ]
    ortho = 0.5 if worse == "orthogonality" else 0.99
    rec.append(ExampleRecord("run", "safety", 0, {"orthogonality": ortho}, ("slice_b",)))
    tmp.mkdir(parents=True)
    write_records(tmp / "records.jsonl", rec)
    return tmp


def test_constructed_candidate_passes_every_gate(tmp_path: Path) -> None:
    d = _decide(tmp_path, _constructed(tmp_path / "in", None))
    assert d["decision"] == "PROMOTED", [(g["gate"], g["status"]) for g in d["gates"]]


@pytest.mark.parametrize(
    "gate", ["violation_reduction", "em_drop", "f1_drop", "latency", "orthogonality"]
)
def test_each_gate_fails_on_a_constructed_candidate(tmp_path: Path, gate: str) -> None:
    """The passing candidate made worse on one gate's metric: that gate fails, the others
    pass, and the decision is REJECTED."""
    d = _decide(tmp_path, _constructed(tmp_path / "in", gate))
    status = {g["gate"]: g["status"] for g in d["gates"]}
    assert status.pop(gate) == "failed"
    assert set(status.values()) == {"passed"}
    assert d["decision"] == "REJECTED"


def test_params_refuse_a_curriculum_that_does_not_cover_training() -> None:
    p = json.loads(json.dumps(MICRO_C))
    p["training"]["safety"]["steps"] = 31
    with pytest.raises(ValidationError, match="curriculum stages sum to 30"):
        MissionCParams.model_validate(p)
    p = json.loads(json.dumps(MICRO_C))
    p["safety"]["curriculum"][0]["categories"] = ["weapons", "cooking"]
    with pytest.raises(ValidationError, match="categories"):
        MissionCParams.model_validate(p)


def test_red_team_is_held_out_by_template(micro_c: MicroC) -> None:  # noqa: F811
    ctx, *_ = _system(micro_c)
    red = mission_c._read(ctx, "red_team")
    others = [it for s in ("train", "dev", "test") for it in mission_c._read(ctx, s)]
    n = len(TEMPLATES)
    red_ids = {it.template_id for it in red}
    other_ids = {it.template_id for it in others if it.kind == "harmful"}
    assert red_ids and red_ids <= set(range(n, n + len(RED_TEAM_TEMPLATES)))
    assert other_ids <= set(range(n))


def test_a_crashed_training_resumes_to_the_same_basis_and_lambda(
    micro_c: MicroC,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Killed after the step-20 checkpoint and retried: lambda and its trace come back from the
    checkpoint, so the retried run ends where the unbroken one did."""
    from tests.missions.conftest import run_interrupted

    out = tmp_path / "train"
    run_interrupted(micro_c.ctx("train_safety_basis", out), "safety", 20)
    m = json.loads((out / "metrics.json").read_text())
    ref = micro_c.metrics["train_safety_basis"]
    assert m["resumed_from"] == 20
    assert m["final_lambda"] == pytest.approx(ref["final_lambda"], rel=1e-5)
    a = json.loads((out / "dual_trace.json").read_text())["rows"]
    b = json.loads((micro_c.dirs["train_safety_basis"] / "dual_trace.json").read_text())["rows"]
    assert len(a) == len(b) == MICRO_C["training"]["safety"]["steps"]
    assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6)


def test_cli_evaluates_the_red_team_suite(
    micro_c: MicroC,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bem-fleet evaluate --mission mission_c --test-suite red_team`: safety_evaluation on the
    red-team split only (its own slice, nothing gated); bad suite names exit 2."""
    from bem_tasks.cli import main

    arch = micro_c.tmp / "project" / "configs" / "bem_fleet_architecture.yml"
    out = tmp_path / "red"
    common = ["--config", str(arch), "--inputs-from", str(micro_c.tmp / "run")]
    model = ["--model", str(micro_c.dirs["train_safety_basis"])]
    argv = ["evaluate", "--mission", "mission_c", *model, *common, "--output", str(out)]
    assert main([*argv, "--test-suite", "red_team"]) == 0
    records = read_records(out / "records.jsonl")
    assert {t for r in records for t in r.slices} == {"red_team", "slice_b"}
    assert all("red_team" in r.slices for r in records if r.example_id != "run")
    assert json.loads((out / "metrics.json").read_text())["suites"] == ["red_team"]
    capsys.readouterr()
    assert main([*argv[:-1], str(tmp_path / "bad"), "--test-suite", "red_team,dev"]) == 2
    assert (
        "--test-suite 'red_team,dev': expected a comma-separated subset" in capsys.readouterr().err
    )
    assert main(["evaluate", "--mission", "mission_a", *model, "--output", str(tmp_path / "a"),
                 "--test-suite", "test"]) == 2  # fmt: skip
    assert "only mission_c's safety_evaluation" in capsys.readouterr().err
