"""BEMLayer's inference fast paths (issue 17): the cached expert solution, the in-place delta,
the folded decoding statistics and the merged path (W0 + D_k per expert) give the outputs of
the plain formula, and every cache follows in-place parameter changes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from bem_tasks.core import BEMLayer, attach_bem, bem_layers, bem_streaming, build_model
from bem_tasks.core import bem as bem_module

# Merged weights change the summation order (x @ (W0 + D) vs x @ W0 + (x @ V) w U^T), so the
# two paths agree to float32 rounding, not bit for bit: within 1e-5 of the output's scale.
MERGED_RTOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, scale_tol: float) -> bool:
    return bool(torch.allclose(a, b, rtol=0.0, atol=scale_tol * float(b.abs().max())))


def _layer(base: nn.Module, experts: int = 3, chunk: int = 4, seed: int = 0) -> BEMLayer:
    torch.manual_seed(seed)
    layer = BEMLayer(base, num_experts=experts, rank=2, alpha=8.0, chunk_size=chunk, tau=0.1)
    with torch.no_grad():
        layer.bem_U.normal_()  # far outside the trust budget: the scaling does real work
    return layer.eval()


def _reference(layer: BEMLayer, x: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """The slow way: each token gets its chunk expert's materialised delta_weight(one-hot)."""
    n, k = layer.chunk_size, layer.num_experts
    out = torch.empty(*x.shape[:-1], layer.out_features)
    with torch.no_grad():
        deltas = [layer.delta_weight(F.one_hot(torch.tensor(j), k).float()) for j in range(k)]
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                d = deltas[int(decisions[b, t // n])]
                out[b, t] = layer.base(x[b, t]) + d @ x[b, t]
    return out


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[Any]:
    """Wrap ``cls.name`` so every call appends its result to the returned list."""
    seen: list[Any] = []
    original: Callable[..., Any] = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(cls, name, wrapper)
    return seen


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_eval_forward_matches_the_slow_formula(kind: str, mode: str) -> None:
    base: nn.Module = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = _layer(base)
    x = torch.randn(3, 22, 12)  # 22 = 5 whole chunks of 4 + a partial one
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        y = layer(x)
    assert layer.last_decisions is not None and layer.last_decisions.shape == (3, 6)
    assert len(set(layer.last_decisions.flatten().tolist())) > 1  # several experts in play
    assert _close(y, _reference(layer, x, layer.last_decisions), 1e-6)


def test_expert_solution_is_solved_once_per_parameter_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    solves: list[Any] = []
    solve = bem_module._solve_experts
    monkeypatch.setattr(bem_module, "_solve_experts", lambda ls: solves.append(1) or solve(ls))
    layer = _layer(nn.Linear(12, 10))
    layer.merge_experts = True
    x = torch.randn(2, 16, 12)
    with torch.inference_mode():
        first = layer(x)
        for _ in range(4):
            assert torch.equal(layer(x), first)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert len(solves) == 1  # 8 forwards, in and out of inference_mode, one solve
    merged_before = torch.stack(layer._merged_weights())

    # An optimizer step changes the parameters in place: the next forward solves again and
    # the merged weights are rebuilt from the new factors.
    opt = torch.optim.SGD([layer.bem_U, layer.bem_code], lr=0.5)
    layer.train()
    (layer(x) ** 2).mean().backward()
    opt.step()
    layer.eval()
    n_train = len(solves)  # the training forward solves with gradient (no cache)
    with torch.inference_mode():
        merged = layer(x)
        layer.merge_experts = False
        unmerged = layer(x)
    assert len(solves) == n_train + 1
    assert not torch.equal(torch.stack(layer._merged_weights()), merged_before)
    assert not _close(merged, first, 1e-3)
    assert _close(merged, unmerged, MERGED_RTOL)
    assert layer.last_decisions is not None
    assert _close(unmerged, _reference(layer, x, layer.last_decisions), 1e-6)


def test_merged_weights_follow_the_base_weight() -> None:
    layer = _layer(Conv1D(10, 12), experts=2)
    layer.merge_experts = True
    x = torch.randn(1, 8, 12)
    with torch.no_grad():
        layer(x)
        layer.get_parameter("base.weight").mul_(2.0)  # in place: merged copies must notice
        merged = layer(x)
        layer.merge_experts = False
        assert _close(merged, layer(x), MERGED_RTOL)


def _merge_layer(decide: list[int], length: int) -> tuple[BEMLayer, torch.Tensor]:
    """A 2-expert layer whose router sends chunk c to expert decide[c] (chunk-first tokens
    carry the sign of the wanted margin in feature 0)."""
    layer = _layer(nn.Linear(8, 6), experts=2, chunk=4)
    assert layer.router is not None
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 10.0
        layer.router.bias.zero_()
    x = torch.randn(1, length, 8)
    for c, k in enumerate(decide):
        x[0, c * 4, 0] = 3.0 if k else -3.0
    return layer, x


@pytest.mark.parametrize(("minority", "merges"), [(0, True), (0.25, True), (0.5, False)])
def test_merged_prefill_corrects_the_minority_rows(minority: float, merges: bool) -> None:
    chunks = 80  # 320 tokens: above merge_min_tokens
    n_min = int(chunks * minority)
    decide = [1] * n_min + [0] * (chunks - n_min)
    layer, x = _merge_layer(decide, 4 * chunks)
    with torch.inference_mode():
        unmerged = layer(x)
        assert layer.last_decisions is not None
        assert layer.last_decisions[0].tolist() == decide
        layer.merge_experts = True
        merged = layer(x)
    plan = layer._plan_cache[2] if layer._plan_cache is not None else None
    assert (plan is not None) == merges
    if plan is not None:
        major, rows, _ = plan
        assert major == 0
        assert (rows is None) == (n_min == 0)
        assert rows is None or rows.numel() == 4 * n_min
    assert _close(merged, unmerged, MERGED_RTOL)
    assert _close(unmerged, _reference(layer, x, layer.last_decisions), 1e-6)


def _gpt2_with_bem(merge: bool) -> nn.Module:
    model = build_model("gpt2", d_model=32, n_layers=2, n_heads=4, max_positions=64, seed=0)
    attach_bem(model, num_experts=2, rank=4, chunk_size=4, tau=0.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in bem_layers(model):
            layer.bem_U.copy_(torch.randn(layer.bem_U.shape, generator=gen) * 0.5)
            layer.merge_experts = merge
    return model.eval()


def _decode(model: nn.Module, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Teacher-forced incremental decoding with the K/V cache: logits of every position."""
    with torch.inference_mode(), bem_streaming(model):
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, cache=cache)
            logits.append(out.logits)
            cache = out.cache
    return torch.cat(logits, 1)


def test_merged_decoding_matches_unmerged_and_falls_back_on_mixed_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = _count_calls(monkeypatch, BEMLayer, "_make_merge_plan")
    unmerged, merged = _gpt2_with_bem(False), _gpt2_with_bem(True)
    ids = torch.randint(0, 260, (4, 19), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = unmerged(input_ids=ids).logits
    # Prompt of 6 (mid-chunk), then 13 steps across the chunk boundaries at 8, 12 and 16.
    want = _decode(unmerged, ids, 6)
    got = _decode(merged, ids, 6)
    assert _close(want, full, 1e-5)
    assert _close(got, want, MERGED_RTOL)
    uniform = [p for p in plans if p is not None and p[1] is None]
    fallback = [p for p in plans if p is None]
    assert uniform and fallback  # some chunks merged, mixed-row chunks used the plain path
    # One plan per layer per routing decision, not per decoding step: 13 steps, 4 layers.
    assert len(plans) < 4 * 13

    # Batch 1: each decoding step has one expert per layer and merges; only the 6-token
    # prompt (two chunks, maybe two experts, too short for a correction) may not.
    plans.clear()
    assert _close(_decode(merged, ids[:1], 6), _decode(unmerged, ids[:1], 6), MERGED_RTOL)
    assert sum(p is None for p in plans) <= 4
    assert sum(p is not None and p[1] is None for p in plans) >= 4 * 3  # boundaries 8, 12, 16


@pytest.mark.parametrize("merge", [False, True])
def test_chunk_start_steps_give_the_general_paths_outputs_and_statistics(
    monkeypatch: pytest.MonkeyPatch, merge: bool
) -> None:
    """A decoding step at a chunk's first token runs _chunk_start_step (route, plan, step);
    with it switched off the general path runs. Same logits bit for bit, same routing
    statistics, and the fast path really ran at every boundary (8, 12, 16) of every layer."""
    model = _gpt2_with_bem(merge)
    ids = torch.randint(0, 260, (3, 19), generator=torch.Generator().manual_seed(4))
    starts = _count_calls(monkeypatch, BEMLayer, "_chunk_start_step")
    fast = _decode(model, ids, 6)
    fast_stats = [layer.stats() for _, layer in bem_layers(model)]
    assert sum(s is not None for s in starts) == 3 * len(fast_stats)
    for _, layer in bem_layers(model):
        layer.reset_stats()
    monkeypatch.setattr(BEMLayer, "_chunk_start_step", lambda self, x, xb: None)
    general = _decode(model, ids, 6)
    assert torch.equal(fast, general)
    assert [layer.stats() for _, layer in bem_layers(model)] == fast_stats
    assert any(s["flip_rate"] > 0 for s in fast_stats)  # tau 0: the routing really changes


def test_one_token_steps_match_the_full_forward_and_fold_their_statistics() -> None:
    layer = _layer(nn.Linear(6, 5), experts=3, chunk=4)
    x = torch.randn(2, 23, 6)
    with torch.no_grad():
        y = layer(x)
    full = layer.stats()
    layer.reset_stats()
    layer.streaming = True
    with torch.no_grad():
        steps = [layer(x[:, t : t + 1]) for t in range(23)]  # the one-token decoding path
    layer.streaming = False
    assert _close(torch.cat(steps, 1), y, 1e-6)
    assert len(layer.routing_stats._pending) < 23  # mid-chunk steps share a record
    stream = layer.stats()
    assert stream["utilisation"] == pytest.approx(full["utilisation"])
    assert stream["flip_rate"] == pytest.approx(full["flip_rate"])
    assert stream["routing_units"] == full["routing_units"] == 12


def test_in_place_delta_leaves_a_hooked_base_output_alone() -> None:
    layer = _layer(nn.Linear(6, 5))
    kept: list[torch.Tensor] = []
    layer.base.register_forward_hook(lambda _m, _i, out: kept.append(out))
    x = torch.randn(1, 8, 6)
    with torch.inference_mode():
        y = layer(x)
        assert torch.equal(kept[0], layer.base(x))  # not overwritten by the delta
    assert not torch.equal(y, kept[0])


def test_merged_path_is_inference_only() -> None:
    layer = _layer(nn.Linear(6, 5))
    layer.merge_experts = True
    x = torch.randn(1, 8, 6)
    ref = copy.deepcopy(layer)
    ref.merge_experts = False
    y = layer(x)  # eval but with gradient recorded: the plain path, differentiable
    assert y.requires_grad and layer._merged_cache is None
    assert torch.equal(y, ref(x))


@pytest.mark.parametrize("routing", ["soft", "straight_through"])
def test_fused_route_rows_give_the_gradients_of_plain_slicing(
    routing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training: x @ V and the router's chunk-first rows come from one autograd node; the
    gradients equal those of the plain ops (slice + matmul) up to float32 rounding."""
    torch.manual_seed(0)
    layer = BEMLayer(nn.Linear(12, 10), num_experts=3, rank=2, chunk_size=4, routing=routing)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.bem_U.normal_()
    x0 = torch.randn(2, 22, 12)

    def grads(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(BEMLayer, "_routes_by_controller", lambda self: fused)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        (layer(x) ** 2).sum().backward()
        assert x.grad is not None
        return x.grad, [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    gx, gp = grads(True)
    rx, rp = grads(False)
    assert _close(gx, rx, 1e-6)
    assert len(gp) == len(rp) == 5  # V, U, code, router weight and bias
    for a, b in zip(gp, rp, strict=True):
        assert _close(a, b, 1e-6)
    assert layer.router is not None and float(rp[-1].abs().sum()) > 0
