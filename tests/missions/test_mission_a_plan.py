"""The macro-policy router is trained at horizon-locked states too, so the plan it chooses with
the lock off (evaluate's gated plan_length_unconstrained) is a trained output: known answers on
constructed decision points, and the plan gate on both outcomes."""

from __future__ import annotations

import torch

from bem_tasks.gates import evaluate_gates, load_gates
from bem_tasks.missions.planner import (
    ChunkData,
    MacroRouter,
    bc_loss,
    closed_loop_accuracy,
    hysteresis_logits,
    policy_logits,
)
from tests.missions.conftest import ROOT

D, K, HORIZON, TAU, CHUNKS = 8, 3, 3, 0.1, 8


def _decision_points(*, locked_label: str, n: int = 60, seed: int = 0) -> ChunkData:
    """Per example, 8 chunks of the oracle plan 0 -> 1 -> 2 (2 + 2 chunks, then 2 to the end)
    with a start that rotates the experts. The hidden state names an expert: the oracle's at
    every state before the horizon is used up; after it (3 segments used), another one. There
    the label is the current expert (``locked_label="stay"``: the oracle, whose plans never
    exceed the horizon) or the expert the hidden state names (``"switch"``)."""
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {k: [] for k in ("h", "emb", "label", "prev", "segs", "example")}
    labels = []
    for ex in range(n):
        plan = [(ex + s) % K for s in (0, 0, 1, 1, 2, 2, 2, 2)]
        prev, segs = -1, 0
        for lab in plan:
            if segs >= HORIZON:  # locked: the hidden state points away from the current expert
                named = (prev + 1 + int(torch.randint(2, (1,), generator=gen))) % K
                lab = prev if locked_label == "stay" else named
            else:
                named = lab
            h = 0.1 * torch.randn(D, generator=gen)
            h[named] += 3.0
            rows["h"].append(h)
            rows["emb"].append(torch.randn(D, generator=gen))
            rows["label"].append(lab)
            rows["prev"].append(prev)
            rows["segs"].append(segs)
            rows["example"].append(ex)
            segs += lab != prev
            prev = lab
        labels.append(rows["label"][-CHUNKS:])
    return ChunkData(
        h=torch.stack(rows["h"]),
        emb=torch.stack(rows["emb"]),
        label=torch.tensor(rows["label"]),
        prev=torch.tensor(rows["prev"]),
        segs=torch.tensor(rows["segs"]),
        example=torch.tensor(rows["example"]),
        token_skills=labels,  # one token per chunk
    )


def _clone(data: ChunkData) -> MacroRouter:
    """Behavioural cloning of ``data`` (full batch, Adam)."""
    torch.manual_seed(0)
    router = MacroRouter(D, num_experts=K, horizon=HORIZON, hidden=32)
    opt = torch.optim.Adam(router.parameters(), lr=0.01)
    idx = torch.arange(len(data))
    for _ in range(200):
        loss, _ = bc_loss(router, data, idx, tau=TAU, step_penalty=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return router.eval()


def _unconstrained_plans(router: MacroRouter, data: ChunkData) -> list[float]:
    """Per example: segments of the greedy plan with the lock off (a horizon no plan reaches),
    the segment feature capped at the router's "horizon used" column, as evaluate decodes."""
    out = []
    for ex, skills in enumerate(data.token_skills):
        rows = data.example == ex
        one = ChunkData(data.h[rows], data.emb[rows], data.label[rows], data.prev[rows],
                        data.segs[rows], torch.zeros(CHUNKS, dtype=torch.long), [skills])  # fmt: skip
        free = closed_loop_accuracy(router, one, 1, tau=TAU, horizon=10 * CHUNKS)
        out.append(float(free["plan_length_max"]))
    return out


def _plan_gate(values: list[float]) -> str:
    decision = evaluate_gates(
        "mission_a", load_gates(ROOT / "configs" / "gates_bem2.yaml"), [],
        {"plan_length_unconstrained": values},
    )  # fmt: skip
    return {o.gate: o for o in decision.gates}["plan_length"].status


def test_cloned_router_stays_within_the_horizon_without_the_lock() -> None:
    data = _decision_points(locked_label="stay")
    router = _clone(data)
    # at locked states the hidden state names another expert; the router learned to stay
    locked = data.segs >= HORIZON
    feats = router.features(data.h, data.emb, data.prev, data.segs)
    with torch.no_grad():
        wants = hysteresis_logits(router(feats), data.prev, TAU).argmax(-1)
    assert bool((wants[locked] == data.prev[locked]).all())
    test = _decision_points(locked_label="stay", n=30, seed=1)  # held-out decision points
    plans = _unconstrained_plans(router, test)
    assert plans == [3.0] * 30  # the oracle's plan length, on every example
    assert _plan_gate(plans) == "passed"


def test_a_router_cloned_to_switch_after_the_horizon_fails_the_plan_gate() -> None:
    router = _clone(_decision_points(locked_label="switch"))
    plans = _unconstrained_plans(router, _decision_points(locked_label="stay", n=30, seed=1))
    assert min(plans) >= 4.0  # it wants a new segment after the third
    assert _plan_gate(plans) == "failed"
    # the lock hides it: the acting policy cannot leave the current expert at a locked state
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    acting = policy_logits(logits, torch.tensor([2]), torch.tensor([HORIZON]), TAU, HORIZON)
    assert acting.softmax(-1)[0].tolist() == [0.0, 0.0, 1.0]


def test_bc_trains_locked_states_and_the_acting_policy_masks_them() -> None:
    """The gradient reaches the router at a locked state (masked logits would give none)."""
    data = _decision_points(locked_label="stay", n=4)
    router = MacroRouter(D, num_experts=K, horizon=HORIZON, hidden=32)
    locked = torch.nonzero(data.segs >= HORIZON)[:, 0]
    loss, _ = bc_loss(router, data, locked, tau=TAU, step_penalty=0.0)
    loss.backward()
    assert float(loss.detach()) > 0.0
    assert any(float(q.grad.abs().sum()) > 0.0 for q in router.parameters())
