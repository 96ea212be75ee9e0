"""Mission B on its micro run (conftest_b.py): known answers for the controller-only learner,
rollbacks, EWC, time_to_fix on probes only, resumption, the canary gate, greedy_exact, and the
checks of prepare and of the params."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from bem_tasks.core import load_weights
from bem_tasks.eval import read_records
from bem_tasks.fleet.phases import execute
from bem_tasks.missions import mission_b
from bem_tasks.missions.living import ProbeEval, ewc_penalty, time_to_fix, trainable
from bem_tasks.missions.mission_b_params import MissionBParams
from bem_tasks.missions.planner import RoutedDecoder
from tests.missions.conftest_b import MICRO_B, MicroB, load_b_config


def _ctx(run: MicroB, phase: str, out: Path, **kw):
    return run.ctx(phase, out, **kw)


def _promoted(run: MicroB, tmp: Path):
    ctx = _ctx(run, "online", tmp / "unused")
    p = mission_b._params(ctx)
    model, codec = mission_b._promoted(ctx, p)
    return ctx, p, model, codec


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: q.detach().clone() for n, q in trainable(model).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- controller only
def test_shadow_trains_only_the_controller_and_the_anchor_serves(micro_b: MicroB, tmp_path):
    ctx = _ctx(micro_b, "shadow", tmp_path)
    p = mission_b._params(ctx)
    anchor, codec = mission_b.load_anchor(ctx, p)
    learner, _ = mission_b._promoted(_ctx(micro_b, "online", tmp_path), p)
    names = {n for n, _ in learner.named_parameters()}
    controller = set(trainable(learner))
    assert controller and all(".bem_" in n or ".router." in n for n in controller)
    # every other parameter of the learner after shadow is the anchor's, bit for bit
    anchor_state = dict(anchor.named_parameters())
    for name, q in learner.named_parameters():
        if name in controller:
            continue
        base_name = name.replace(".base.", ".")
        assert torch.equal(q, anchor_state[base_name]), name
    assert len(names - controller) == len(anchor_state)
    # the controller did learn (U started at zero)
    before = mission_b.attach_controller(mission_b.load_anchor(ctx, p)[0], p, 0)
    assert not _same(_weights(before), _weights(learner))
    # the served answers are the anchor's own on those prompts
    state = json.loads((micro_b.dirs["shadow"] / "state.json").read_text())
    data = mission_b._stream_data(ctx, codec)
    served = [bool(ok) for _, ok in state["served"]]
    assert [t for t, _ in state["served"]] == list(range(p.stream.shadow_until))
    assert served == mission_b.greedy_exact(
        anchor, data.stream[: p.stream.shadow_until], codec.pad_id
    )


def test_greedy_exact_is_greedy_decoding(micro_b: MicroB, tmp_path):
    ctx, p, model, codec = _promoted(micro_b, tmp_path)
    load_weights(micro_b.dirs["online"] / "learner.safetensors", model, trainable_only=True)
    data = mission_b._stream_data(ctx, codec)
    examples = data.canary + data.probe + data.stream[:40]
    exact = mission_b.greedy_exact(model, examples, codec.pad_id, batch_size=7)
    decoder = RoutedDecoder(model, eos_id=codec.eos_id, max_new_tokens=64, device="cpu")
    decoded = [decoder(e.prompt).tokens == e.target for e in examples]
    assert exact == decoded
    assert any(exact) and not all(exact)  # both outcomes are exercised


# ---------------------------------------------------------------------- rollbacks
def _engine(run: MicroB, tmp: Path, **overrides):
    ctx, p, model, codec = _promoted(run, tmp)
    p = p.model_copy(update=overrides)
    data = mission_b._stream_data(ctx, codec)
    guard = mission_b._make_guard(model, p, data, tmp / "last_good")
    engine = mission_b.Engine(ctx, p, model, data, learn=True, serve_learner=True, guard=guard)
    guard.last_good.mark(0, model, engine.opt)
    return engine, guard


def test_forced_canary_failure_rolls_back_bit_identically(micro_b: MicroB, tmp_path):
    p = mission_b._params(_ctx(micro_b, "online", tmp_path))
    canary = p.canary.model_copy(update={"rollback_below": 1.0, "canary_every": 8})
    drift = p.drift.model_copy(update={"kl_max": 1e12, "spectral_norm_max": 1e12})
    engine, guard = _engine(micro_b, tmp_path, canary=canary, drift=drift)
    good = _weights(engine.model)
    for group in engine.opt.param_groups:
        group["lr"] = 5.0  # a forced bad update
    events = engine.chunk(range(64, 72))
    assert events["canary_checked"] and events["canary_failed"] and events["rolled_back"]
    assert _same(_weights(engine.model), good)
    (rollback,) = guard.last_good.rollbacks
    assert rollback.at_step == 1 and rollback.restored_step == 0
    assert [t.monitor for t in rollback.tripped] == ["canary_pass_rate"]
    assert rollback.tripped[0].value < 1.0
    logged = json.loads((tmp_path / "last_good" / "rollbacks.json").read_text())
    assert logged[0]["at_step"] == 1 and logged[0]["tripped"][0]["monitor"] == "canary_pass_rate"


def test_forced_drift_trip_rolls_back(micro_b: MicroB, tmp_path):
    p = mission_b._params(_ctx(micro_b, "online", tmp_path))
    drift = p.drift.model_copy(update={"kl_max": 1e-9})
    canary = p.canary.model_copy(update={"canary_every": 1000})
    engine, guard = _engine(micro_b, tmp_path, drift=drift, canary=canary)
    good = _weights(engine.model)
    events = engine.chunk(range(64, 72))
    assert events["rolled_back"] and not events["canary_checked"]
    assert _same(_weights(engine.model), good)
    (rollback,) = guard.last_good.rollbacks
    assert [t.monitor for t in rollback.tripped] == ["kl"]
    assert rollback.tripped[0].value > 1e-9
    assert engine.state["trips"] == 1 and engine.state["drift_checks"] == 1


def test_ordinary_online_learning_does_not_trip(micro_b: MicroB):
    m = micro_b.metrics["online"]
    assert m["activated"] == 1 and m["updates"] == 12 and m["canary_checks"] == 3
    assert m["rollbacks"] == 0 and m["drift_trips"] == 0 and m["max_kl"] > 0


# ---------------------------------------------------------------------- EWC
def test_ewc_is_zero_at_the_promoted_weights_and_grows_away(micro_b: MicroB, tmp_path):
    ctx, p, model, codec = _promoted(micro_b, tmp_path)
    data = mission_b._stream_data(ctx, codec)
    guard = mission_b._make_guard(model, p, data, tmp_path / "lg")
    assert float(ewc_penalty(model, guard.reference, guard.fisher).detach()) == 0.0
    assert sum(float(f.sum()) for f in guard.fisher.values()) > 0
    values = []
    with torch.no_grad():
        direction = {n: torch.ones_like(q) for n, q in trainable(model).items()}
        for scale in (1e-3, 1e-2, 1e-1):
            for n, q in trainable(model).items():
                q.copy_(guard.reference[n] + scale * direction[n])
            values.append(float(ewc_penalty(model, guard.reference, guard.fisher).detach()))
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(100 * values[1], rel=1e-4)  # quadratic


# ---------------------------------------------------------------------- time_to_fix
def test_probes_are_never_training_prompts(micro_b: MicroB, tmp_path):
    prep = micro_b.dirs["prepare"]
    paths = {n: prep / f"{n}.jsonl" for n in mission_b.DATA_FILES}
    mission_b.check_data(paths, prep / "anchor_train.jsonl")  # passes on the real files
    rows = {n: [json.loads(x) for x in paths[n].read_text().splitlines()] for n in paths}
    assert not {r["id"] for r in rows["probe"]} & {r["id"] for r in rows["stream"]}
    # a probe file that holds a stream prompt is refused, naming both places
    bad = dict(paths)
    bad["probe"] = tmp_path / "probe.jsonl"
    shutil.copy(paths["probe"], bad["probe"])
    with bad["probe"].open("a") as f:
        f.write(json.dumps(rows["stream"][40]) + "\n")
    with pytest.raises(
        ValueError, match=r"probe\.jsonl.*stream\.jsonl|stream\.jsonl.*probe\.jsonl"
    ):
        mission_b.check_data(bad)


def test_memorised_training_prompts_with_failing_probes_are_not_fixed(micro_b: MicroB, tmp_path):
    """A model that memorises the stream's variant prompts (the anchor fine-tuned on them) while
    the held-out probes keep failing: time_to_fix over the probe evaluations says not fixed."""
    ctx = _ctx(micro_b, "online", tmp_path)
    p = mission_b._params(ctx)
    model, codec = mission_b.load_anchor(ctx, p)
    data = mission_b._stream_data(ctx, codec)
    t0 = p.data.inject_at
    variant = [e for e, r in zip(data.stream, data.regular, strict=True) if not r][:4]
    params = list(model.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.003)
    evals = []
    for step in range(1, 121):
        model.train()
        loss = mission_b._per_example_ce(model, variant, codec.pad_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            ok = mission_b.greedy_exact(model, data.probe, codec.pad_id)
            evals.append(ProbeEval(t0 + step, len(ok) - sum(ok), len(ok)))
    assert all(mission_b.greedy_exact(model, variant, codec.pad_id))  # memorised
    assert all(e.failed / e.probes >= p.fix.threshold for e in evals)
    assert time_to_fix(evals, t0, p.fix.window, p.fix.threshold) is None


def test_evaluate_time_to_fix_reads_the_served_probe_evaluations(micro_b: MicroB, tmp_path):
    ctx = _ctx(micro_b, "evaluate", tmp_path)
    p = mission_b._params(ctx)
    anchor, codec = mission_b.load_anchor(ctx, p)
    probe = mission_b._stream_data(ctx, codec).probe
    failed = len(probe) - sum(mission_b.greedy_exact(anchor, probe, codec.pad_id))
    shadow = json.loads((micro_b.dirs["shadow"] / "state.json").read_text())
    online = json.loads((micro_b.dirs["online"] / "state.json").read_text())
    assert all(n == len(probe) for _, _, n in shadow["probe_evals"] + online["probe_evals"])
    served = [ProbeEval(a, failed, len(probe)) for a, _, _ in shadow["probe_evals"]]
    served += [ProbeEval(a, f, n) for a, f, n in online["probe_evals"]]  # activated: learner
    t0 = p.data.inject_at
    fix = time_to_fix(served, t0, p.fix.window, p.fix.threshold)
    m = micro_b.metrics["evaluate"]
    assert m["time_to_fix"] == (fix if fix is not None else p.data.n_stream - t0)
    assert m["time_to_fix_censored"] == int(fix is None)


# ---------------------------------------------------------------------- resume
def test_retried_online_ends_with_the_same_weights(micro_b: MicroB, tmp_path):
    ctx = _ctx(micro_b, "online", tmp_path / "online")
    real = mission_b.progress

    def crash(c, name, at, total, **values):
        real(c, name, at, total, **values)
        if at == 5:
            raise RuntimeError("simulated worker crash")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mission_b, "progress", crash)
        with pytest.raises(RuntimeError, match="simulated worker crash"):
            execute(ctx, config_hash="micro")
    assert not (ctx.out_dir / "manifest.json").exists()
    assert (ctx.out_dir / "ckpt" / "online").is_dir()
    execute(ctx, config_hash="micro")
    fresh = load_file(str(ctx.out_dir / "learner.safetensors"))
    unbroken = load_file(str(micro_b.dirs["online"] / "learner.safetensors"))
    assert _same(fresh, unbroken)
    a = json.loads((ctx.out_dir / "state.json").read_text())
    b = json.loads((micro_b.dirs["online"] / "state.json").read_text())
    assert a["probe_evals"] == b["probe_evals"] and a["losses"] == b["losses"]


# ---------------------------------------------------------------------- canary gate
def test_canary_gate_keeps_the_anchor_and_online_does_not_learn(micro_b: MicroB, tmp_path):
    # a shadow learner whose controller is broken: large random U in every expert
    shadow = tmp_path / "shadow"
    shutil.copytree(micro_b.dirs["shadow"], shadow)
    weights = load_file(str(shadow / "learner.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.endswith("bem_U"):
            weights[name] = 50 * torch.randn(w.shape, generator=gen)
    save_file(weights, str(shadow / "learner.safetensors"))
    params = copy.deepcopy(MICRO_B)
    params["canary"]["activation_threshold"] = 0.75
    params["controller"]["trust_budget"] = 1e4  # let the broken delta through
    cfg = load_b_config(tmp_path / "project", params)
    gate = micro_b.ctx("canary_gate", tmp_path / "gate", cfg=cfg, inputs={"shadow": shadow})
    execute(gate, config_hash="micro")
    decision = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert decision["activated"] is False
    assert decision["canary_pass_rate"] < 0.75 <= decision["anchor_canary_pass_rate"] == 1.0
    online = micro_b.ctx(
        "online",
        tmp_path / "online",
        cfg=cfg,
        inputs={"shadow": shadow, "canary_gate": tmp_path / "gate"},
    )
    execute(online, config_hash="micro")
    m = json.loads((tmp_path / "online" / "metrics.json").read_text())
    assert m["serving"] == "anchor" and m["updates"] == 0 and m["activated"] == 0
    kept = load_file(str(tmp_path / "online" / "learner.safetensors"))
    assert _same(kept, load_file(str(shadow / "learner.safetensors")))
    # served = the anchor: its answers on every online prompt
    ctx = micro_b.ctx("online", tmp_path / "x", cfg=cfg)
    p = mission_b._params(ctx)
    anchor, codec = mission_b.load_anchor(ctx, p)
    data = mission_b._stream_data(ctx, codec)
    state = json.loads((tmp_path / "online" / "state.json").read_text())
    served = [bool(ok) for _, ok in state["served"]]
    assert served == mission_b.greedy_exact(
        anchor, data.stream[p.stream.shadow_until :], codec.pad_id
    )


# ---------------------------------------------------------------------- evaluate
def test_evaluate_records_pair_online_with_anchor(micro_b: MicroB):
    records = read_records(micro_b.dirs["evaluate"] / "records.jsonl")
    p = mission_b._params(micro_b.ctx("evaluate", micro_b.tmp))
    by = {(r.example_id, r.system): r for r in records}
    ids = {r.example_id for r in records if r.example_id != "run"}
    assert len(ids) == p.data.n_heldout + p.data.n_variant_test
    assert all((i, "online") in by and (i, "anchor") in by for i in ids)
    run = by[("run", "online")]
    assert ("run", "anchor") not in by
    m = micro_b.metrics["evaluate"]
    assert run.metrics["time_to_fix"] == m["time_to_fix"]
    assert run.metrics["rollback_count"] == m["rollback_count"] == 0
    # the weighted scores average to the post-t0 mixture's aggregate
    anchor = [by[(i, "anchor")].metrics for i in ids]
    mean = sum(r["aggregate_score"] for r in anchor) / len(anchor)
    rate = p.data.variant_rate
    expected = (1 - rate) * m["anchor_regular_em"] + rate * m["anchor_variant_em"]
    assert mean == pytest.approx(expected)
    assert sum("latency_ms" in r for r in anchor) == p.evaluate.latency_examples


# ---------------------------------------------------------------------- prepare's checks
def test_prepare_refuses_an_anchor_that_already_answers_the_variant(
    micro_b: MicroB, tmp_path, monkeypatch
):
    real = mission_b.make_feedback_stream

    def no_variant(**kw):
        # the "variant" probes are regular items: an anchor that already answers them
        parts = real(**kw)
        parts["probe"] = real(**(kw | {"variant_rate": 1.0, "seed": 99}))["heldout"][
            : len(parts["probe"])
        ]
        return parts

    monkeypatch.setattr(mission_b, "make_feedback_stream", no_variant)
    params = copy.deepcopy(MICRO_B)
    params["model"]["path"] = str(micro_b.dirs["prepare"] / "anchor" / "model")
    params["data"]["n_canary_pool"] = 30
    cfg = load_b_config(tmp_path / "project", params)
    ctx = micro_b.ctx("prepare", tmp_path / "prepare", cfg=cfg)
    with pytest.raises(ValueError, match=r"probe\.jsonl.*failure mode was not injected"):
        mission_b.prepare(ctx)


def test_prepare_refuses_a_mission_a_item_space_that_differs(micro_b: MicroB):
    p = mission_b._params(micro_b.ctx("prepare", micro_b.tmp))
    a_data = SimpleNamespace(**(p.data.model_dump() | {"n_keys": 9, "value_max": 20}))
    ctx = SimpleNamespace(cfg=SimpleNamespace(params={"mission_a": SimpleNamespace(data=a_data)}))
    with pytest.raises(ValueError, match=r"mission_b_living_model\.yml.*n_keys: 9 vs 4"):
        mission_b._check_same_items(ctx, p)


def test_anchor_json_names_the_anchor(micro_b: MicroB):
    info = json.loads((micro_b.dirs["prepare"] / "anchor.json").read_text())
    assert info["source"] == "own" and info["path"] == "anchor/model"
    assert set(info["sha256"]) == {"model.safetensors"}
    assert micro_b.metrics["evaluate"]["anchor_used"] == "own"
    assert micro_b.metrics["prepare"]["anchor_probe_failure"] >= 0.9


# ---------------------------------------------------------------------- params
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["stream"].update(shadow_until=200), r"stream\.shadow_until"),
        (lambda d: d["stream"].update(probe_every=12), r"stream\.probe_every=12"),
        (lambda d: d["canary"].update(canary_every=20), r"canary\.canary_every=20"),
        (lambda d: d["targets"].update(time_to_fix=500), r"targets\.time_to_fix=500"),
        (lambda d: d["data"].update(n_probe=99), r"data\.n_probe must be <= data\.n_probe_pool"),
        (lambda d: d["controller"].update(chunk_size=4), r"chunk_size"),
        (lambda d: d["drift"].update(kl_max=0), r"kl_max"),
        (lambda d: d["online"].update(ewc=1.0), r"ewc"),
    ],
)
def test_params_errors_name_the_key(edit, message):
    doc = copy.deepcopy(MICRO_B)
    edit(doc)
    with pytest.raises(ValidationError, match=message):
        MissionBParams.model_validate(doc)


def test_smoke_params_validate():
    import yaml

    from tests.missions.conftest import ROOT

    doc = yaml.safe_load((ROOT / "experiments" / "mission_b_living_model.yml").read_text())
    p = MissionBParams.model_validate(doc["params"])
    assert p.model.path is None
    full = copy.deepcopy(doc["params"])
    for key, value in doc["profiles"]["full"]["params"].items():
        full[key] = full.get(key, {}) | value if isinstance(value, dict) else value
    assert MissionBParams.model_validate(full).model.path == "/models/anchor"


def test_prepare_anchors_on_mission_a_base_in_the_same_run(micro_b: MicroB, tmp_path):
    base = tmp_path / "mission_a" / "pretrain_base"
    shutil.copytree(micro_b.dirs["prepare"] / "anchor" / "model", base / "model")
    p = mission_b._params(micro_b.ctx("prepare", tmp_path))

    def fake_ctx(a_data):
        return SimpleNamespace(
            layout=SimpleNamespace(
                phase_dir=lambda mission, phase, seed=None: tmp_path / mission / phase
            ),
            cfg=SimpleNamespace(params={"mission_a": SimpleNamespace(data=a_data)}),
            out_dir=tmp_path / "prepare",
            log=micro_b.ctx("prepare", tmp_path).log,
        )

    same = SimpleNamespace(**p.data.model_dump())
    assert mission_b._mission_a_base(fake_ctx(same)) is None  # no manifest: A is not complete
    (base / "manifest.json").write_text("{}")
    info, metrics = mission_b._prepare_anchor(fake_ctx(same), p)
    assert info["source"] == metrics["anchor_source"] == "mission_a"
    assert info["path"] == str((base / "model").resolve())
    saved = json.loads((tmp_path / "prepare" / "anchor.json").read_text())
    own = json.loads((micro_b.dirs["prepare"] / "anchor.json").read_text())
    assert saved["sha256"] == own["sha256"]  # the same weights, read where A left them
    other = SimpleNamespace(**(p.data.model_dump() | {"ops": ["add"]}))
    with pytest.raises(ValueError, match=r"mission_a_agentic_planner\.yml \(ops: \['add'\]"):
        mission_b._prepare_anchor(fake_ctx(other), p)
