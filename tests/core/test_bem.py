"""BEMLayer: forward math, routing (hard at eval, chunk-sticky, hysteresis), trust region,
gradients, statistics, external routing and the fused single-expert mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from bem_tasks.core import BEMLayer, hysteresis_decisions
from bem_tasks.core import bem as bem_module
from bem_tasks.core.bem import (
    RoutingStats,
    _hysteresis_scan,
    bem_parameters,
    spectral_upper_bound,
)


def _hand_built_layer(base: nn.Module) -> BEMLayer:
    """d_in=3, d_out=2, expert 0 rank 1, expert 1 rank 2, alpha=2, known factors."""
    layer = BEMLayer(base, num_experts=2, rank=[1, 2], alpha=2.0, trust_budget=None)
    with torch.no_grad():
        layer.bem_V.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, -1.0]]))
        layer.bem_U.copy_(torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 1.0]]))
        layer.bem_code.copy_(torch.tensor([3.0, 1.0, 2.0]))
    return layer


def _linear(w0: torch.Tensor, b0: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    return lin


W0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
B0 = torch.tensor([0.1, -0.2])


def _expected(x: torch.Tensor, g: tuple[float, float]) -> torch.Tensor:
    """The formula y = W0 x + b + sum_k g_k (alpha/r_k) U_k diag(c_k) V_k^T x, spelled out."""
    v = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, -1.0]])
    u = torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 1.0]])
    c = torch.tensor([3.0, 1.0, 2.0])
    u0, v0, c0 = u[:, :1], v[:, :1], c[:1]
    u1, v1, c1 = u[:, 1:], v[:, 1:], c[1:]
    delta0 = (2.0 / 1) * u0 @ torch.diag(c0) @ v0.T
    delta1 = (2.0 / 2) * u1 @ torch.diag(c1) @ v1.T
    return x @ W0.T + B0 + x @ (g[0] * delta0 + g[1] * delta1).T


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_matches_formula(kind: str) -> None:
    if kind == "linear":
        base: nn.Module = _linear(W0, B0)
    else:
        base = Conv1D(nf=2, nx=3)  # GPT-2 layout: weight [in, out]
        with torch.no_grad():
            base.weight.copy_(W0.T)
            base.bias.copy_(B0)
    layer = _hand_built_layer(base)
    x = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]])
    layer.set_routing(torch.tensor([[0.25, 0.75]]))
    y = layer(x)
    assert torch.allclose(y, _expected(x, (0.25, 0.75)), atol=1e-5)
    # Hand-computed value for the first token, independent of the helper above.
    # V^T x = [4, 7, -2]; w = [0.25*2*3, 0.75*1*1, 0.75*1*2] = [1.5, 0.75, 1.5];
    # w * V^T x = [6, 5.25, -3]; U (w * V^T x) = [8.625, 3.75]; W0 x + b = [4.6, -0.2].
    assert torch.allclose(y[0, 0], torch.tensor([13.225, 3.55]), atol=1e-5)


def test_zero_init_equals_base_and_base_is_frozen() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = BEMLayer(base, num_experts=3, rank=2)
    x = torch.randn(2, 10, 8)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert all(p.requires_grad for p in bem_parameters(layer))


def _routing_layer(tau: float, chunk: int = 4) -> BEMLayer:
    """d_in=2, K=2, router = identity, so a chunk-first token x = sqrt(2)(cos t, sin t) (RMS 1)
    has logits exactly x and the margin of expert 1 over expert 0 is 2 sin(t - pi/4)."""
    torch.manual_seed(0)
    layer = BEMLayer(nn.Linear(2, 3), num_experts=2, rank=1, chunk_size=chunk, tau=tau)
    assert layer.router is not None
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
        layer.router.bias.zero_()
        layer.bem_U.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        layer.bem_V.copy_(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    return layer.eval()


def _routing_input(margins: list[float], chunk: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, chunk * len(margins), 2, generator=gen) * 3.0
    for c, m in enumerate(margins):
        t = math.pi / 4 + math.asin(m / 2)
        x[0, c * chunk] = math.sqrt(2) * torch.tensor([math.cos(t), math.sin(t)])
    return x


MARGINS = [-2.0, 0.2, 0.8, -0.3]  # expert 1's margin over expert 0 at each chunk start


def test_hysteresis_function_constructed() -> None:
    logits = torch.tensor([[[1.0, 0.0], [1.0, 1.25], [0.0, 0.8], [0.3, 0.0]]])
    assert hysteresis_decisions(logits, 0.5).tolist() == [[0, 0, 1, 1]]
    assert hysteresis_decisions(logits, 0.0).tolist() == [[0, 1, 1, 0]]
    # A tie never switches; a margin of exactly tau does not switch either.
    assert hysteresis_decisions(torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]), 0.0).tolist() == [[0, 0]]
    assert hysteresis_decisions(logits, 0.25).tolist() == [[0, 0, 1, 0]]
    # Carried-over expert (streaming): kept unless beaten by more than tau.
    start = torch.tensor([1])
    assert hysteresis_decisions(torch.tensor([[[1.0, 0.75]]]), 0.5, start).tolist() == [[1]]
    assert hysteresis_decisions(torch.tensor([[[1.0, 0.25]]]), 0.5, start).tolist() == [[0]]


def _reference_hysteresis(logits: torch.Tensor, tau: float, initial: list[int] | None) -> list:
    """The rule written as the obvious sequential loop."""
    out = []
    for b in range(logits.shape[0]):
        cur, row = (None if initial is None else initial[b]), []
        for c in range(logits.shape[1]):
            lc = logits[b, c].tolist()
            cand = max(range(len(lc)), key=lambda i: (lc[i], -i))  # first maximum
            if cur is None or lc[cand] - lc[cur] > tau:
                cur = cand
            row.append(cur)
        out.append(row)
    return out


def test_hysteresis_scan_matches_sequential_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    for chunks in (1, 2, 5, 12):
        logits = torch.randint(-3, 4, (16, chunks, 3), generator=gen).float() / 2  # many ties
        init = torch.randint(0, 3, (16,), generator=gen)
        for tau in (0.0, 0.5, 1.0):
            want = _reference_hysteresis(logits, tau, None)
            want_init = _reference_hysteresis(logits, tau, init.tolist())
            # numpy loop (CPU) and the prefix scan over chunk maps (accelerators)
            assert hysteresis_decisions(logits, tau).tolist() == want
            assert hysteresis_decisions(logits, tau, init).tolist() == want_init
            assert _hysteresis_scan(logits, tau, None).tolist() == want
            assert _hysteresis_scan(logits, tau, init).tolist() == want_init


@pytest.mark.parametrize(("tau", "expected"), [(0.5, [0, 0, 1, 1]), (0.0, [0, 1, 1, 0])])
def test_layer_hysteresis_and_hard_eval(tau: float, expected: list[int]) -> None:
    layer = _routing_layer(tau)
    x = _routing_input(MARGINS)
    y = layer(x)
    assert layer.last_decisions is not None
    assert layer.last_decisions.tolist() == [expected]
    # Hard routing: each token's delta is exactly its chunk expert's delta.
    for t in range(x.shape[1]):
        k = expected[t // 4]
        gates = torch.nn.functional.one_hot(torch.tensor(k), 2).float()
        want = layer.base(x[0, t]) + layer.delta_weight(gates) @ x[0, t]
        assert torch.allclose(y[0, t], want, atol=1e-5)


def test_chunk_sticky_one_decision_per_chunk() -> None:
    layer = _routing_layer(0.0)
    x = _routing_input(MARGINS)
    layer(x)
    assert layer.last_decisions is not None
    first = layer.last_decisions.clone()
    assert first.shape == (1, 4)  # 16 tokens, chunk 4 -> 4 decisions
    # Tokens that do not start a chunk cannot change any decision...
    x2 = x.clone()
    for c in range(4):
        x2[0, c * 4 + 1 : c * 4 + 4] = torch.randn(3, 2) * 10
    layer(x2)
    assert torch.equal(layer.last_decisions, first)
    # ...while the chunk-start token does.
    x3 = x.clone()
    x3[0, 4] = x[0, 8]  # chunk 1 now starts like chunk 2 (margin 0.8)
    layer(x3)
    assert layer.last_decisions.tolist() == [[0, 1, 1, 0]]


def test_stats_known_values() -> None:
    layer = _routing_layer(0.5)
    layer(_routing_input(MARGINS))
    stats = layer.stats()
    assert stats["flip_rate"] == pytest.approx(1 / 3)
    assert stats["utilisation"] == pytest.approx([0.5, 0.5])
    entropies = []
    for m in MARGINS:
        p1 = 1 / (1 + math.exp(-m))
        entropies.append(-(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)))
    assert stats["gate_entropy"] == pytest.approx(sum(entropies) / 4, rel=1e-5)
    assert stats["routing_units"] == 4
    # Accumulates across forward passes (and across the batched folds of the records).
    for _ in range(RoutingStats.fold_every + 5):
        layer(_routing_input(MARGINS))
    stats = layer.stats()
    assert stats["routing_units"] == 4 * (RoutingStats.fold_every + 6)
    assert stats["flip_rate"] == pytest.approx(1 / 3)
    assert stats["gate_entropy"] == pytest.approx(sum(entropies) / 4, rel=1e-5)
    layer.reset_stats()
    assert layer.stats()["routing_units"] == 0


def test_streaming_matches_full_forward() -> None:
    torch.manual_seed(0)
    layer = BEMLayer(nn.Linear(6, 5), num_experts=3, rank=2, chunk_size=4, tau=0.1).eval()
    nn.init.normal_(layer.bem_U)
    x = torch.randn(2, 23, 6)
    full = layer(x)
    decisions = layer.last_decisions
    layer.reset_stats()
    layer.streaming = True
    outs = [layer(x[:, a:b]) for a, b in [(0, 5), (5, 6), (6, 7), (7, 17), (17, 23)]]
    layer.streaming = False
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-6)
    assert decisions is not None and decisions.shape == (2, 6)
    assert layer.stats()["routing_units"] == 12


def _trust_layer(routing: str = "soft", budget: float = 0.5, fro: float | None = None) -> BEMLayer:
    torch.manual_seed(3)
    layer = BEMLayer(
        nn.Linear(16, 12),
        num_experts=3,
        rank=[2, 3, 4],
        alpha=8.0,
        chunk_size=5,
        trust_budget=budget,
        trust_budget_fro=fro,
        routing=routing,  # type: ignore[arg-type]
    )
    with torch.no_grad():
        nn.init.normal_(layer.bem_U, std=1.0)
        nn.init.normal_(layer.bem_V, std=1.0)
    return layer


@pytest.mark.parametrize(
    ("mode", "budget", "fro"),
    [
        ("train", 0.5, None),
        ("eval", 0.5, None),
        ("train", 2.0, 0.7),
        ("external", 0.5, None),
        ("external_unnormalised", 0.5, None),
    ],
)
def test_trust_region_bounds_effective_delta(mode: str, budget: float, fro: float | None) -> None:
    layer = _trust_layer(budget=budget, fro=fro)
    layer.train(mode == "train")
    x = torch.randn(2, 15, 16)
    if mode == "external":
        layer.set_routing(torch.softmax(torch.randn(2, 15, 3) * 3, -1))
    if mode == "external_unnormalised":  # not a convex mix: every expert at full weight
        layer.set_routing(torch.ones(2, 1, 3))
    y = layer(x)
    w = layer.last_weights
    assert w is not None
    rows = w.reshape(-1, layer.total_rank)
    fro_budget = budget if fro is None else fro
    raw_norms = []
    for row in rows:
        delta = (layer.bem_U * row) @ layer.bem_V.T  # materialised [d_out, d_in]
        assert torch.linalg.matrix_norm(delta, ord=2) <= budget * (1 + 1e-4)
        assert torch.linalg.matrix_norm(delta, ord="fro") <= fro_budget * (1 + 1e-4)
    # Without the trust region these deltas are far outside the budget (the test is not vacuous).
    with torch.no_grad():
        for g in torch.softmax(torch.randn(5, 3), -1):
            raw = g.index_select(0, layer.col_expert) * layer.col_scale * layer.bem_code
            raw_delta = (layer.bem_U * raw) @ layer.bem_V.T
            raw_norms.append(float(torch.linalg.matrix_norm(raw_delta, 2)))
    assert min(raw_norms) > 3 * budget
    # The stored weights are what the forward pass used.
    per_token = w if mode.startswith("external") else w.repeat_interleave(5, dim=1)
    want = layer.base(x) + ((x @ layer.bem_V) * per_token) @ layer.bem_U.T
    assert torch.allclose(y, want, atol=1e-4)


def test_trust_region_spectral_then_frobenius_is_tight() -> None:
    layer = _trust_layer(budget=0.5).eval()
    with torch.no_grad():
        delta = layer.delta_weight(torch.tensor([0.0, 1.0, 0.0]))
    # A delta far outside the budget is scaled onto its boundary (Frobenius binds last).
    assert float(torch.linalg.matrix_norm(delta, "fro")) == pytest.approx(0.5, rel=1e-3)


def test_spectral_budget_alone_is_nearly_tight() -> None:
    layer = _trust_layer(budget=0.5, fro=100.0).eval()
    with torch.no_grad():
        for k in range(3):
            delta = layer.delta_weight(torch.nn.functional.one_hot(torch.tensor(k), 3).float())
            sigma = float(torch.linalg.matrix_norm(delta, 2))
            assert 0.5 * 0.99 <= sigma <= 0.5 * (1 + 1e-4)


def test_spectral_upper_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(32, 12, 30, generator=gen)
    core = a @ a.transpose(1, 2)
    true = torch.linalg.eigvalsh(core)[:, -1]
    bound = spectral_upper_bound(core)
    assert (bound >= true).all() and (bound <= true * 1.011).all()
    rank_one = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))[None]
    assert float(spectral_upper_bound(rank_one)) == pytest.approx(30.0, rel=1e-4)
    zero = spectral_upper_bound(torch.zeros(2, 4, 4), floor=1e-12)
    assert torch.isfinite(zero).all() and (zero >= 0).all() and (zero < 1e-9).all()


def test_gradients_reach_router_and_stay_finite() -> None:
    for routing in ("soft", "straight_through", "gumbel"):
        layer = _trust_layer(routing=routing, budget=0.5).train()
        x = torch.randn(2, 15, 16, requires_grad=True)
        loss = (layer(x) ** 2).mean()
        loss.backward()
        assert layer.router is not None and layer.router.weight.grad is not None
        assert float(layer.router.weight.grad.abs().sum()) > 0, routing
        for p in bem_parameters(layer):
            assert p.grad is not None and torch.isfinite(p.grad).all(), routing
        assert layer.base.weight.grad is None


def test_zero_delta_trust_region_gradients_are_finite() -> None:
    layer = BEMLayer(nn.Linear(8, 8), num_experts=2, rank=2, chunk_size=2, trust_budget=0.1)
    (layer(torch.randn(1, 6, 8)).sum()).backward()
    for p in bem_parameters(layer):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_external_routing_per_segment_and_errors() -> None:
    torch.manual_seed(0)
    layer = BEMLayer(nn.Linear(4, 4), num_experts=3, rank=2, trust_budget=None).eval()
    nn.init.normal_(layer.bem_U)
    x = torch.randn(1, 6, 4)
    ids = torch.tensor([[2, 2, 0, 0, 0, 1]])  # a planner's expert per segment
    layer.set_routing(ids)
    y = layer(x)
    for t, k in enumerate(ids[0].tolist()):
        g = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        assert torch.allclose(y[0, t], layer.base(x[0, t]) + layer.delta_weight(g) @ x[0, t])
    assert layer.stats()["flip_rate"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="seq length 6"):
        layer(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match=r"\[batch, seq, 3\]"):
        layer.set_routing(torch.ones(1, 6, 2))
    layer.set_routing(torch.tensor([[0.0, 0.0, 1.0]]))  # [B, K]: one row for every position
    g = torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(layer(x)[0], layer.base(x[0]) + x[0] @ layer.delta_weight(g).T)
    layer.set_routing(None)
    layer(torch.randn(1, 5, 4))  # controller again


def test_fused_single_expert_parameter_parity() -> None:
    fused = BEMLayer(nn.Linear(64, 64), num_experts=1, rank=16)
    mixed = BEMLayer(nn.Linear(64, 64), num_experts=4, rank=4)
    assert fused.router is None
    n_fused = sum(p.numel() for p in bem_parameters(fused))
    n_mixed = sum(p.numel() for p in bem_parameters(mixed))
    assert n_fused == (64 + 64) * 16 + 16
    assert n_mixed == n_fused + 64 * 4 + 4  # the router is the only difference
    x = torch.randn(2, 9, 64)
    nn.init.normal_(fused.bem_U, std=0.01)
    fused.train()
    y = fused(x)
    w = fused.last_weights
    assert w is not None and w.shape == (1, 1, 16)
    want = fused.base(x) + ((x @ fused.bem_V) * w) @ fused.bem_U.T
    assert torch.allclose(y, want, atol=1e-6)
    assert fused.stats()["utilisation"] == [1.0]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="routing"):
        BEMLayer(nn.Linear(4, 4), routing="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trust_budget"):
        BEMLayer(nn.Linear(4, 4), trust_budget=0.0)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        BEMLayer(nn.Conv2d(3, 3, 1))


def _reference_trust_scale(layer: BEMLayer, w: Tensor, exact: bool) -> Tensor:
    """The trust-region scale written as plain autograd ops (what the closed-form backward of
    ``_CoreSpectrum`` must reproduce)."""
    u, v = layer.bem_U, layer.bem_V
    gram_u, gram_v = u.t() @ u, v.t() @ v
    jitter = 1e-6 * gram_v.diagonal().mean().detach() + 1e-12
    chol = torch.linalg.cholesky(gram_v + jitter * torch.eye(v.shape[1], dtype=v.dtype))
    lw = w[:, :, None] * chol
    core = lw.transpose(1, 2) @ gram_u @ lw
    scale = torch.ones(w.shape[0], dtype=w.dtype)
    if layer.trust_budget is not None:
        b = layer.trust_budget
        if exact:
            lam = torch.linalg.eigvalsh(core)[:, -1] * (1.0 + 1e-5)
        else:
            lam = spectral_upper_bound(core, floor=1e-12 * b * b)
        scale = b / torch.sqrt(torch.clamp(lam, min=b * b))
    if layer.trust_budget_fro is not None:
        bf = layer.trust_budget_fro
        fro2 = core.diagonal(dim1=1, dim2=2).sum(-1) * scale * scale
        scale = scale * bf / torch.sqrt(torch.clamp(fro2, min=bf * bf))
    return scale


@pytest.mark.parametrize("exact", [True, False], ids=["eigen-solve", "accelerator-bound"])
@pytest.mark.parametrize("budget,fro", [(0.5, 100.0), (None, 0.3), (0.5, None)])
def test_trust_scale_closed_form_gradient_matches_autograd(
    exact: bool, budget: float | None, fro: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trust scale's values and gradients for w, U and V equal autograd through the plain
    ops, with rows inside and outside the budget, on the eigen-solve (CPU) path and on the
    spectral-bound (accelerator) path, whose training backward is hand-written.
    Budgets: the spectral norm binds (Frobenius 100), only Frobenius, both at 0.5 (the
    Frobenius then binds and the spectral scale cancels out of the result)."""
    monkeypatch.setattr(bem_module, "_uses_eigen_solver", lambda device: exact)
    torch.manual_seed(0)
    layer = BEMLayer(
        nn.Linear(12, 10), num_experts=3, rank=3, trust_budget=budget, trust_budget_fro=fro
    ).double()
    with torch.no_grad():
        layer.bem_U.normal_(std=0.3)
    # Rows far inside, near and far outside the budgets: the clamps act on some, not all.
    w = torch.rand(4, 9, dtype=torch.float64) * torch.tensor([0.01, 0.3, 1.0, 5.0])[:, None]
    w.requires_grad_(True)
    cotangent = torch.randn(4, dtype=torch.float64)
    params = (w, layer.bem_U, layer.bem_V)

    got = layer.trust_scale(w)
    want = _reference_trust_scale(layer, w, exact)
    assert bool((got < 1).any()) and bool((got == 1).any())  # both regimes are exercised
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got_grads = torch.autograd.grad(got, params, cotangent)
    want_grads = torch.autograd.grad(want, params, cotangent)
    for name, g, r in zip(("w", "U", "V"), got_grads, want_grads, strict=True):
        assert float(r.abs().max()) > 1e-3, name  # the gradient is not vacuously zero
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)


def test_soft_training_on_an_accelerator_leaves_decisions_to_the_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Soft routing in training on an accelerator: the forward pass makes no hard decisions
    (the device scan is spared), the statistics decide them on the host when read, and they
    come out as those the forward pass decides on CPU: whole chunks and a ragged last chunk,
    two sequence lengths, more records than one fold, the same output and gradients."""
    layers = {}
    for on_host in (True, False):
        torch.manual_seed(0)
        layer = BEMLayer(nn.Linear(6, 5), num_experts=3, rank=2, chunk_size=4, tau=0.2)
        nn.init.normal_(layer.bem_U)
        layers[on_host] = layer.train()
    torch.manual_seed(1)
    inputs = [torch.randn(3, n, 6) for n in (16, 23)] * (RoutingStats.fold_every // 2 + 3)
    outs, grads = {}, {}
    for on_host, layer in layers.items():
        monkeypatch.setattr(bem_module, "_decides_on_host", lambda device, h=on_host: h)
        outs[on_host] = [layer(x) for x in inputs]
        assert (layer.last_decisions is None) == (not on_host)
        sum(o.square().sum() for o in outs[on_host]).backward()
        grads[on_host] = [p.grad for p in layer.parameters() if p.requires_grad]
    host, device = layers[True].stats(), layers[False].stats()
    assert device == host
    assert 0.05 < host["flip_rate"] < 0.95  # decisions that differ, so the rule matters
    for a, b in zip(outs[True] + grads[True], outs[False] + grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_undecided_routing_units_need_their_logits() -> None:
    stats = RoutingStats(2)
    with pytest.raises(ValueError, match="logits, temperature and tau"):
        stats.add(None, [4], None, torch.zeros(1, 1, 2), 1.0)  # no tau
    with pytest.raises(ValueError, match="logits, temperature and tau"):
        stats.add(None, [4], torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2), 1.0, 0.1)
