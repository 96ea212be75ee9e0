"""BEMLayer external gates at inference: the per-gates solution is computed once and reused,
yet a parameter change, new gates, a grad-enabled forward or streaming windows all see exactly
what a fresh computation gives."""

from __future__ import annotations

import torch
from torch import nn

from bem_tasks.core import BEMLayer


def _layer(trust: float | None = 1.0) -> BEMLayer:
    torch.manual_seed(0)
    layer = BEMLayer(nn.Linear(4, 4), num_experts=3, rank=2, trust_budget=trust).eval()
    nn.init.normal_(layer.bem_U)
    return layer


def _fresh(layer: BEMLayer, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same forward on an uncached copy of the layer."""
    twin = BEMLayer(layer.base, num_experts=3, rank=2, trust_budget=layer.trust_budget).eval()
    twin.load_state_dict(layer.state_dict())
    twin.set_routing(gates)
    with torch.no_grad():
        return twin(x)


def test_cached_external_weights_follow_parameters_and_gates() -> None:
    layer, x = _layer(), torch.randn(2, 1, 4)
    gates = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])  # per row, broadcast
    layer.set_routing(gates)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # reused
        assert torch.equal(first, _fresh(layer, gates, x))
        layer.bem_U.add_(torch.randn_like(layer.bem_U))  # in place: the cache must notice
        second = layer(x)
    assert not torch.equal(second, first)
    assert torch.equal(second, _fresh(layer, gates, x))
    other = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])
    layer.set_routing(other)  # new gates: a new solution
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh(layer, other, x))
    with torch.enable_grad():  # training path: computed fresh, with a gradient
        y = layer(x)
        y.sum().backward()
    assert layer.bem_U.grad is not None and torch.allclose(y.detach(), layer(x).detach())


def test_declared_convex_gates_skip_the_check_not_the_math() -> None:
    layer, x = _layer(), torch.randn(1, 3, 4)
    gates = torch.nn.functional.one_hot(torch.tensor([[2, 2, 0]]), 3).float()
    layer.set_routing(gates)
    with torch.no_grad():
        checked = layer(x)
    layer.set_routing(gates, convex=True)
    with torch.no_grad():
        assert torch.equal(layer(x), checked)
    # gates that are not a convex mix keep their per-row trust bound when checked
    layer.set_routing(2 * gates)
    assert layer._external_convex is False


def test_streaming_windows_of_cached_gates_match_a_full_forward() -> None:
    from bem_tasks.core import bem_streaming

    layer, x = _layer(), torch.randn(1, 6, 4)
    gates = torch.nn.functional.one_hot(torch.tensor([[0, 0, 1, 1, 2, 2]]), 3).float()
    layer.set_routing(gates)
    with torch.no_grad():
        full = layer(x)
        model = nn.Sequential(layer)
        with bem_streaming(model):
            parts = [layer(x[:, :2]), layer(x[:, 2:3]), layer(x[:, 3:])]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-6)


def test_gates_changed_in_place_after_set_routing_do_not_leak_in() -> None:
    layer, x = _layer(), torch.randn(2, 1, 4)
    gates = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]])
    routed = gates.clone()
    layer.set_routing(gates)
    other = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]]])
    with torch.no_grad():
        gates.copy_(other)  # the caller reuses its buffer: before the first forward ...
        assert torch.equal(layer(x), _fresh(layer, routed, x))
        layer.bem_U.add_(1.0)  # ... and after a parameter change (a recomputed solution)
        assert torch.equal(layer(x), _fresh(layer, routed, x))
    layer.set_routing(gates)  # routing the new values takes a new set_routing
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh(layer, other, x))
        assert not torch.equal(layer(x), _fresh(layer, routed, x))
