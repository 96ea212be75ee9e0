"""Every BEM layer's trust region solved in one batched call per model forward (training):
the same solutions and gradients as solving each layer alone, once per forward, never stale."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from bem_tasks.core import BEMLayer, attach_bem, bem_layers, build_model, detach_bem
from bem_tasks.core import bem as bem_module
from bem_tasks.core.bem import _solve_experts, bem_parameters, presolve_trust_regions


def _layers() -> list[BEMLayer]:
    """Three sites of different shapes and expert splits, one total rank (6), float64."""
    torch.manual_seed(0)
    layers = [
        BEMLayer(nn.Linear(12, 10), num_experts=2, rank=3, trust_budget=0.5),
        BEMLayer(nn.Linear(20, 10), num_experts=3, rank=2, trust_budget=0.5),
        BEMLayer(nn.Linear(10, 16), num_experts=2, rank=[2, 4], trust_budget=0.5),
    ]
    for layer in layers:
        layer.double()
        with torch.no_grad():
            layer.bem_U.normal_(std=0.5)
            layer.bem_code.uniform_(0.2, 3.0)  # experts inside and outside the budget
    return layers


@pytest.mark.parametrize("exact", [True, False], ids=["eigen-solve", "accelerator-bound"])
def test_batched_solve_equals_each_layer_alone(
    exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bem_module, "_uses_eigen_solver", lambda device: exact)
    layers = _layers()
    params = [p for layer in layers for p in (layer.bem_U, layer.bem_V, layer.bem_code)]
    together = _solve_experts(layers)
    alone = [_solve_experts([layer])[0] for layer in layers]
    scaled = [bool((w.abs().sum(1) < (layer.col_own_scale * layer.bem_code).abs().sum(1)).any())
              for layer, (w, _) in zip(layers, alone, strict=True)]  # fmt: skip
    assert any(scaled)  # the trust region is binding somewhere (the test is not vacuous)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w, _ in alone]

    def grads(solutions: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        loss = sum((w * c).sum() + s.sum() for (w, s), c in zip(solutions, weights, strict=True))
        return torch.autograd.grad(loss, params)

    for (w1, s1), (w2, s2) in zip(together, alone, strict=True):
        torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-14)
    for g1, g2 in zip(grads(together), grads(alone), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def _model() -> nn.Module:
    model = build_model("gpt2", d_model=32, n_layers=2, n_heads=4, max_positions=64, seed=0)
    attach_bem(model, num_experts=2, rank=4, alpha=8.0, chunk_size=4, tau=0.1, seed=0)
    with torch.no_grad():
        for _, layer in bem_layers(model):
            layer.bem_U.normal_(std=0.5)
    return model.train()


def _count_batched_solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes (layers per call) of every _solve_experts call from now on."""
    sizes: list[int] = []
    solve = bem_module._solve_experts

    def counting(layers: Any) -> Any:
        sizes.append(len(layers))
        return solve(layers)

    monkeypatch.setattr(bem_module, "_solve_experts", counting)
    return sizes


def test_a_training_forward_solves_every_layer_once_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    per_layer = copy.deepcopy(model)
    per_layer._forward_pre_hooks.clear()  # the copy solves layer by layer (no presolve hook)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    sizes = _count_batched_solves(monkeypatch)

    for _ in range(2):  # two forwards and backwards without a step (gradient accumulation)
        model(input_ids=ids, labels=ids).loss.backward()
    assert sizes == [4, 4]  # 2 blocks x 2 sites, one call per forward
    assert all(layer._presolved is None for _, layer in bem_layers(model))

    sizes.clear()
    for _ in range(2):
        per_layer(input_ids=ids, labels=ids).loss.backward()
    assert sizes == [1] * 8
    for (name, p), (_, q) in zip(
        model.named_parameters(), per_layer.named_parameters(), strict=True
    ):
        if p.requires_grad:
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)

    sizes.clear()
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert 4 not in sizes  # inference never presolves: each layer caches its own solution


def test_presolved_solutions_do_not_outlive_a_failed_forward() -> None:
    model = _model()
    with pytest.raises(IndexError):
        model(input_ids=torch.full((1, 4), 10_000))  # outside the vocabulary
    assert all(layer._presolved is None for _, layer in bem_layers(model))


def test_a_deep_copy_solves_its_own_layers_and_detach_removes_the_hooks() -> None:
    model = _model()
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    clone(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in bem_parameters(clone) if p.requires_grad)
    assert all(p.grad is None for p in bem_parameters(model))

    detach_bem(clone)
    assert presolve_trust_regions not in clone._forward_pre_hooks.values()
    assert not clone._forward_hooks and not clone._forward_hooks_always_called
    assert presolve_trust_regions in model._forward_pre_hooks.values()  # the original keeps its
