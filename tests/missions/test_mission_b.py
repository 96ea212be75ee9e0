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
from bem_tasks.fleet.runs import write_manifest
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


def _non_controller(model) -> dict[str, torch.Tensor]:
    controller = set(trainable(model))
    return {n: t.clone() for n, t in model.state_dict().items() if n not in controller}


def test_stream_engine_changes_only_the_controller(micro_b: MicroB, tmp_path):
    """In process, shadow then online (with the guard and a rollback) over a few chunks: every
    tensor outside the controller (anchor weights and buffers) stays bit-identical."""
    ctx = _ctx(micro_b, "shadow", tmp_path)
    p = mission_b._params(ctx)
    model, codec = mission_b._learner(ctx, p)
    before = _non_controller(model)
    controller_before = _weights(model)
    data = mission_b._stream_data(ctx, codec)
    engine = mission_b.Engine(ctx, p, model, data, learn=True, serve_learner=False)
    for start in range(0, 32, 8):
        engine.chunk(range(start, start + 8))
    canary = p.canary.model_copy(update={"rollback_below": 1.0, "canary_every": 16})
    q = p.model_copy(update={"canary": canary})
    guard = mission_b._make_guard(model, q, data, tmp_path / "last_good")
    online = mission_b.Engine(ctx, q, model, data, learn=True, serve_learner=True, guard=guard)
    guard.last_good.mark(0, model, online.opt)
    for group in online.opt.param_groups:
        group["lr"] = 5.0  # bad updates: the canary fails and rollbacks load weights too
    for start in range(64, 96, 8):
        online.chunk(range(start, start + 8))
    assert guard.last_good.rollbacks  # the rollback path ran too
    after = _non_controller(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not _same(_weights(model), controller_before)  # while the controller learned


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


def _optimizer_state(opt) -> dict:
    state = opt.state_dict()
    tensors = {
        (i, k): v.clone()
        for i, entry in state["state"].items()
        for k, v in entry.items()
        if torch.is_tensor(v)
    }
    return {"tensors": tensors, "groups": copy.deepcopy(state["param_groups"])}


def test_forced_canary_failure_rolls_back_to_the_last_mark(micro_b: MicroB, tmp_path):
    """Two ordinary updates, each followed by a passing canary check (marks at updates 1 and
    2), then a forced bad update that fails the canary: the weights and the optimizer state
    are those of the last mark (update 2), not the promoted ones."""
    p = mission_b._params(_ctx(micro_b, "online", tmp_path))
    canary = p.canary.model_copy(update={"rollback_below": 0.0, "canary_every": 8})
    drift = p.drift.model_copy(update={"kl_max": 1e12, "spectral_norm_max": 1e12})
    engine, guard = _engine(micro_b, tmp_path, canary=canary, drift=drift)
    promoted = _weights(engine.model)
    engine.chunk(range(64, 72))
    engine.chunk(range(72, 80))
    assert guard.last_good.step == 2
    good, good_opt = _weights(engine.model), _optimizer_state(engine.opt)
    assert not _same(good, promoted)
    engine.p = engine.p.model_copy(
        update={"canary": canary.model_copy(update={"rollback_below": 1.0})}
    )
    for group in engine.opt.param_groups:
        group["lr"] = 5.0  # a forced bad update
    events = engine.chunk(range(80, 88))
    assert events["canary_checked"] and events["canary_failed"] and events["rolled_back"]
    assert _same(_weights(engine.model), good)
    restored = _optimizer_state(engine.opt)
    assert restored["groups"] == good_opt["groups"]  # lr 5.0 is gone with the bad step
    assert restored["tensors"].keys() == good_opt["tensors"].keys()
    assert all(torch.equal(restored["tensors"][k], v) for k, v in good_opt["tensors"].items())
    (rollback,) = guard.last_good.rollbacks
    assert rollback.at_step == 3 and rollback.restored_step == 2
    assert [t.monitor for t in rollback.tripped] == ["canary_pass_rate"]
    assert rollback.tripped[0].value < 1.0
    logged = [json.loads(x) for x in guard.last_good.log_path.read_text().splitlines()]
    assert logged[0]["at_step"] == 3 and logged[0]["tripped"][0]["monitor"] == "canary_pass_rate"


def test_probes_after_a_rollback_judge_the_restored_weights(micro_b: MicroB, tmp_path):
    """probe_every == canary_every: the probe result logged at a failed canary check is that of
    the restored weights (which serve on), never of the rolled-back ones. The canary items
    stand in for the probes so that the two weights score differently."""
    p = mission_b._params(_ctx(micro_b, "online", tmp_path))
    canary = p.canary.model_copy(update={"rollback_below": 1.0, "canary_every": 8})
    drift = p.drift.model_copy(update={"kl_max": 1e12, "spectral_norm_max": 1e12})
    stream = p.stream.model_copy(update={"probe_every": 8})
    engine, guard = _engine(micro_b, tmp_path, canary=canary, drift=drift, stream=stream)
    engine.data.probe = engine.data.canary
    for group in engine.opt.param_groups:
        group["lr"] = 5.0  # a forced bad update
    events = engine.chunk(range(64, 72))
    assert events["rolled_back"]
    ok = mission_b.greedy_exact(engine.model, engine.data.probe, engine.data.pad_id)
    assert engine.state["probe_evals"][-1] == [72, len(ok) - sum(ok), len(ok)]
    ((_, bad_rate),) = engine.state["canary"]  # the rolled-back weights on the same items
    assert round((1 - bad_rate) * len(ok)) != len(ok) - sum(ok)


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


def test_micro_online_runs_every_check_with_its_monitors_off(micro_b: MicroB):
    """The micro config's thresholds cannot trip (1e6, rollback_below 0): this checks the
    cadence (updates, canary checks, one drift reading per update), not the calibration."""
    m = micro_b.metrics["online"]
    assert m["activated"] == 1 and m["updates"] == 12 and m["canary_checks"] == 3
    assert m["drift_checks"] == m["updates"] and m["max_kl"] > 0
    assert m["rollbacks"] == 0 and m["drift_trips"] == 0


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
    evals, on_training = [], []
    for step in range(1, 121):
        model.train()
        loss = mission_b._per_example_ce(model, variant, codec.pad_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            for record, examples in ((evals, data.probe), (on_training, variant)):
                ok = mission_b.greedy_exact(model, examples, codec.pad_id)
                record.append(ProbeEval(t0 + step, len(ok) - sum(ok), len(ok)))
    assert all(mission_b.greedy_exact(model, variant, codec.pad_id))  # memorised
    # scored on the training prompts it would count as fixed; on the held-out probes it is not
    assert time_to_fix(on_training, t0, p.fix.window, p.fix.threshold) is not None
    assert time_to_fix(evals, t0, p.fix.window, p.fix.threshold) is None


def test_served_probe_record_is_the_anchor_until_activation():
    """Constructed evaluations (t0 = 0, probes every 100, shadow until 400): a learner that
    fixes the variant during shadow is only served from activation, so the served time_to_fix
    is later than the learner's; not activated, the served record is the anchor's: never fixed."""
    anchor = ProbeEval(0, 10, 10)
    shadow = [ProbeEval(a, f, 10) for a, f in ((100, 9), (200, 1), (300, 0), (400, 0))]
    online = [ProbeEval(a, 0, 10) for a in (500, 600, 700)]
    served, learner = mission_b.probe_records(shadow, online, anchor, activated=True)
    assert [(e.after_prompt, e.failed) for e in served] == [
        (100, 10), (200, 10), (300, 10), (400, 10), (500, 0), (600, 0), (700, 0)
    ]  # fmt: skip
    assert learner == shadow + online
    served_fix = time_to_fix(served, 0, 2, 0.2)
    learner_fix = time_to_fix(learner, 0, 2, 0.2)
    assert learner_fix is not None and served_fix is not None and learner_fix < served_fix
    kept, learner = mission_b.probe_records(shadow, online, anchor, activated=False)
    assert all(e.failed == 10 for e in kept) and len(kept) == 7 and learner == shadow
    assert time_to_fix(kept, 0, 2, 0.2) is None


def test_evaluate_time_to_fix_reads_the_served_probe_evaluations(micro_b: MicroB, tmp_path):
    ctx = _ctx(micro_b, "evaluate", tmp_path)
    p = mission_b._params(ctx)
    anchor, codec = mission_b.load_anchor(ctx, p)
    probe = mission_b._stream_data(ctx, codec).probe
    failed = len(probe) - sum(mission_b.greedy_exact(anchor, probe, codec.pad_id))
    shadow = json.loads((micro_b.dirs["shadow"] / "state.json").read_text())
    online = json.loads((micro_b.dirs["online"] / "state.json").read_text())
    assert all(n == len(probe) for _, _, n in shadow["probe_evals"] + online["probe_evals"])
    served, _ = mission_b.probe_records(
        mission_b._probe_evals(shadow["probe_evals"]),
        mission_b._probe_evals(online["probe_evals"]),
        ProbeEval(0, failed, len(probe)),
        activated=True,
    )
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
    # as if shadow itself had learned the broken controller: inputs must match their manifest
    write_manifest(shadow, config_hash="micro", seed=0)
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
    # latency as in Mission A: a request's total ms, plus ms per decoding step; regular and
    # variant items both timed
    timed = [i for i in ids if "latency_ms" in by[(i, "anchor")].metrics]
    assert len(timed) == p.evaluate.latency_examples
    variant = micro_b.dirs["prepare"] / "variant_test.jsonl"
    variant_ids = {json.loads(x)["id"] for x in variant.read_text().splitlines()}
    assert 0 < len(set(timed) & variant_ids) < len(timed)
    for i in timed:
        for system in ("online", "anchor"):
            r = by[(i, system)].metrics
            assert r["latency_ms"] >= r["ttft_ms"] > 0
            assert 0 < r["latency_per_token_ms"] < r["latency_ms"]


def test_memory_is_the_online_phase_s(micro_b: MicroB):
    online = json.loads((micro_b.dirs["online"] / "state.json").read_text())
    m = micro_b.metrics["evaluate"]
    assert m["memory_usage_mib"] == online["memory"]["rss_peak_mib"] > 0
    assert m["memory_growth_mib"] == online["memory"]["rss_growth_mib"]


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
        (lambda d: d["data"].update(ops=[]), r"ops must name at least one operation"),
        (lambda d: d["fix"].update(threshold=0.95), r"fix\.threshold=0\.95.*min_anchor_probe"),
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


def _experiment(name: str) -> dict:
    import yaml

    from tests.missions.conftest import ROOT

    return yaml.safe_load((ROOT / "experiments" / name).read_text())


def test_own_anchor_is_trained_like_mission_a_base():
    b = _experiment("mission_b_living_model.yml")["params"]
    a = _experiment("mission_a_agentic_planner.yml")["params"]
    assert b["anchor_training"] == a["training"]["pretrain_base"]
    assert b["model"] == a["model"]
    assert b["data"]["anchor_train"] == a["data"]["n_train"]


def test_time_to_fix_target_equals_the_gate_in_every_profile():
    from bem_tasks.gates import load_gates
    from tests.missions.conftest import ROOT

    gates = load_gates(ROOT / "configs" / "gates_bem2.yaml").missions["mission_b"].gates
    (gate,) = [g for g in gates if g.metric == "time_to_fix"]
    doc = _experiment("mission_b_living_model.yml")
    for profile in doc["profiles"]:
        target = (doc["profiles"][profile] or {}).get("params", {}).get("targets", {})
        value = target.get("time_to_fix", doc["params"]["targets"]["time_to_fix"])
        assert value == gate.threshold, profile


def test_drift_kl_in_batches_equals_one_batch_and_is_zero_at_the_anchor(micro_b: MicroB, tmp_path):
    from bem_tasks.core import bem_disabled
    from bem_tasks.missions.living import probe_kl
    from bem_tasks.missions.planner import make_batch

    ctx, p, model, codec = _promoted(micro_b, tmp_path)
    data = mission_b._stream_data(ctx, codec)
    whole = make_batch(data.drift, codec.pad_id, loss_on_prompt=False)
    parts = [
        make_batch(data.drift[i : i + 3], codec.pad_id, loss_on_prompt=False)
        for i in range(0, len(data.drift), 3)
    ]
    with torch.no_grad():
        with bem_disabled(model):
            anchor = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask).logits
        learner = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask).logits
    expected = probe_kl(anchor, learner, whole.attention_mask)
    assert expected > 0
    assert mission_b.drift_kl(model, parts) == pytest.approx(expected, rel=1e-4)
    fresh = mission_b.attach_controller(mission_b.load_anchor(ctx, p)[0], p, 0)  # U = 0
    assert mission_b.drift_kl(fresh, parts) == pytest.approx(0.0, abs=1e-9)


def test_own_anchor_fingerprint_ignores_stream_sizes():
    p = MissionBParams.model_validate(MICRO_B)
    fp = mission_b.anchor_fingerprint(p)
    bigger = copy.deepcopy(MICRO_B)
    bigger["data"].update(n_stream=320, n_heldout=20, n_canary_pool=40)
    assert mission_b.anchor_fingerprint(MissionBParams.model_validate(bigger)) == fp
    other = copy.deepcopy(MICRO_B)
    other["data"]["anchor_train"] = 300
    assert mission_b.anchor_fingerprint(MissionBParams.model_validate(other)) != fp


def test_pretrain_lm_refuses_too_few_positions():
    from bem_tasks.missions.common import pretrain_lm

    p = MissionBParams.model_validate(MICRO_B)
    long = SimpleNamespace(prompt=[1] * 60, target=[2] * 20)
    with pytest.raises(ValueError, match=r"max_positions=96 .*\(104 tokens\)"):
        pretrain_lm(
            None, "anchor", [long], 0, p.model, p.anchor_training, seed=0, fingerprint="x",
            max_new_tokens=24,
        )  # fmt: skip
