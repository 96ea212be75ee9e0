"""Attach BEM layers to cache-safe sites of a Hugging Face model (peft-style module replacement).

Cache-safe means the site's output never feeds a K/V projection of the same layer (attention
output projection, MLP down projection; for SSMs the mixer output projection, after the
recurrent state). Sites that produce keys, values or recurrent state are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bem_tasks.core.bem import (
    BEMLayer,
    RoutingMode,
    base_dims,
    bem_layers,
    bem_parameters,
    clear_presolved,
    count_bem_parameters,
    presolve_trust_regions,
)

# Default cache-safe sites per `config.model_type`.
DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "mamba": ("mixer.out_proj",),
}

# Module names whose outputs become the K/V cache (or an SSM's recurrent state).
CACHE_PRODUCING_NAMES: frozenset[str] = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "kv_proj",
        "c_attn",
        "q_attn",
        "query_key_value",
        "W_pack",
        "Wqkv",
        "query",
        "key",
        "value",
        "in_proj",
        "x_proj",
        "dt_proj",
        "conv1d",
    }
)


@dataclass
class AttachReport:
    count: int
    names: list[str] = field(default_factory=list)
    sites: tuple[str, ...] = ()
    bem_parameters: int = 0

    def __int__(self) -> int:
        return self.count


def default_sites(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_SITES:
        raise ValueError(
            f"no default BEM sites for model_type={model_type!r} ({type(model).__name__}); "
            f"pass sites=... explicitly (known types: {sorted(DEFAULT_SITES)})"
        )
    return DEFAULT_SITES[str(model_type)]


def _refuse_unsafe(name: str, what: str) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in CACHE_PRODUCING_NAMES:
        raise ValueError(
            f"refusing to attach BEM to {what} {name!r}: '{leaf}' produces the K/V cache "
            "(or an SSM's recurrent state), so a delta there would change cached keys/values. "
            "Use cache-safe sites such as o_proj / down_proj (Llama) or attn.c_proj / "
            "mlp.c_proj (GPT-2)."
        )


def _matches(name: str, site: str) -> bool:
    return name == site or name.endswith("." + site)


def _site_list(model: nn.Module, sites: Sequence[str] | None) -> tuple[str, ...]:
    site_list = tuple(sites) if sites is not None else default_sites(model)
    if not site_list:
        raise ValueError("attach_bem: sites is empty")
    for site in site_list:
        _refuse_unsafe(site, "site")
    return site_list


def _resolve_targets(model: nn.Module, site_list: tuple[str, ...]) -> list[str]:
    targets = [n for n, _ in model.named_modules() if n and any(_matches(n, s) for s in site_list)]
    if not targets:
        linear = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
        ]
        raise ValueError(
            f"attach_bem: no module of {type(model).__name__} matched sites {list(site_list)}; "
            f"linear modules include {linear[:12]}"
        )
    for name in targets:
        _refuse_unsafe(name, "module")
    return targets


def fused_rank_for_parity(
    model: nn.Module,
    sites: Sequence[str] | None = None,
    *,
    num_experts: int,
    rank: int | Sequence[int],
) -> int:
    """Rank of a single fused expert (num_experts=1) whose BEM parameter count is closest to
    ``num_experts`` routed experts of ``rank`` on the same sites (the monolithic baseline)."""
    total_rank = rank * num_experts if isinstance(rank, int) else sum(rank)
    mixed = per_rank = 0
    for name in _resolve_targets(model, _site_list(model, sites)):
        d_in, d_out = base_dims(model.get_submodule(name))
        per_rank += d_in + d_out + 1  # one column of V and U plus one code entry
        mixed += (d_in + d_out + 1) * total_rank + (d_in + 1) * num_experts * (num_experts > 1)
    return max(1, round(mixed / per_rank))


def attach_bem(
    model: nn.Module,
    sites: Sequence[str] | None = None,
    *,
    num_experts: int = 2,
    rank: int | Sequence[int] = 8,
    alpha: float = 16.0,
    chunk_size: int = 32,
    tau: float = 0.0,
    trust_budget: float | None = 1.0,
    trust_budget_fro: float | None = None,
    routing: RoutingMode = "soft",
    temperature: float = 1.0,
    freeze_base: bool = True,
    seed: int | None = None,
) -> AttachReport:
    """Wrap every module whose name ends with one of ``sites`` in a ``BEMLayer``.

    ``sites`` defaults to the architecture's cache-safe sites. With ``freeze_base`` every
    non-BEM parameter of the model is frozen so the BEM parameters are the only trainable ones.
    ``seed`` makes the expert initialisation reproducible without touching the global RNG.
    Raises ValueError for K/V-producing sites and when nothing matched.
    """
    site_list = _site_list(model, sites)
    if bem_layers(model):
        raise ValueError(f"{type(model).__name__} already has BEM layers; detach_bem first")

    targets = _resolve_targets(model, site_list)

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
            layer = BEMLayer(
                base,
                num_experts=num_experts,
                rank=rank,
                alpha=alpha,
                chunk_size=chunk_size,
                tau=tau,
                trust_budget=trust_budget,
                trust_budget_fro=trust_budget_fro,
                routing=routing,
                temperature=temperature,
            )
            layer.site_name = name
            layer.train(base.training)
            setattr(parent, child, layer)

    if freeze_base:
        bem_ids = {id(p) for p in bem_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in bem_ids)
    # Every training forward of the model solves all trust regions in one batched call.
    model.register_forward_pre_hook(presolve_trust_regions)
    model.register_forward_hook(clear_presolved, always_call=True)
    return AttachReport(
        count=len(targets),
        names=targets,
        sites=site_list,
        bem_parameters=count_bem_parameters(model),
    )


def detach_bem(model: nn.Module) -> int:
    """Put every wrapped base module back in place; returns how many were removed.
    Parameters frozen by ``attach_bem`` stay frozen."""
    layers = bem_layers(model)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    _remove_hooks(model)
    return len(layers)


def _remove_hooks(model: nn.Module) -> None:
    # By function, not by handle: a deep copy of the model shares the handle's dict reference.
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [
            k for k, fn in hooks.items() if fn in (presolve_trust_regions, clear_presolved)
        ]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
