"""Bolt-on Expert Modules: a frozen linear map plus K routed low-rank experts under a trust region.

    y = W0 x + sum_k g_k(x) * (alpha / r_k) * U_k diag(c_k) V_k^T x

All experts are stored concatenated along the rank axis (``bem_V``: [d_in, R], ``bem_U``:
[d_out, R], ``bem_code``: [R], R = sum r_k), so the delta costs two thin matmuls whatever K is:
``((x @ V) * w) @ U^T`` where ``w`` [.., R] holds gate * alpha/r_k * c_k for every rank column.

Routing is chunk-sticky and causal: the controller decides once per chunk of ``chunk_size``
tokens from the hidden state of the chunk's first token, so no token is routed on information
from a later token. A hard decision switches expert only when the new expert's logit beats the
current one by more than ``tau`` (hysteresis). Training uses soft, straight-through or
Gumbel-straight-through gates; eval mode is always hard.

Trust region, enforced in every forward pass: each expert's delta D_k is scaled so that
||D_k||_2 <= trust_budget and then ||D_k||_F <= trust_budget_fro. Norms are convex, so the
summed delta of any convex gate mix (soft, straight-through, Gumbel, hard) is inside the same
budgets; external gates that are not a convex mix are additionally bounded row by row. Norms
come from an R x R core with the non-zero spectrum of D^T D, never a d x d matrix: an exact
eigen-solve on CPU, a sync-free upper bound by repeated squaring on accelerators.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

RoutingMode = Literal["soft", "straight_through", "gumbel"]
ROUTING_MODES: tuple[str, ...] = ("soft", "straight_through", "gumbel")


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight [in, out])."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    # Conv1D is recognised by shape so this module never needs to import transformers.
    if type(base).__name__ == "Conv1D" and hasattr(base, "nx") and hasattr(base, "nf"):
        return int(cast(int, base.nx)), int(cast(int, base.nf))
    raise TypeError(
        f"BEM can wrap nn.Linear or transformers Conv1D, got {type(base).__name__}; "
        "choose a linear projection site"
    )


def hysteresis_decisions(logits: Tensor, tau: float, initial: Tensor | None = None) -> Tensor:
    """Hard expert per chunk with hysteresis. ``logits`` [B, C, K] -> decisions [B, C] (long).

    The first chunk takes its argmax (or, given ``initial`` [B], keeps that expert unless
    beaten by more than tau); a later chunk switches to its argmax only if that beats the
    current expert's logit by more than tau.

    On accelerators each chunk is a map "current expert -> next expert"; composing maps is
    associative, so the sequential rule runs as a prefix scan in log2(C) batched gathers, with
    no loop over chunks and no host synchronisation. On CPU a numpy loop does it.
    """
    batch, chunks, k = logits.shape
    if chunks == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=logits.device)
    if _decides_on_host(logits.device):
        # Tiny tensors: numpy avoids torch's thread pool, whose wake-ups cost milliseconds per
        # op when other processes share the cores (an Airflow worker running several tasks).
        init = None if initial is None else initial.numpy()
        return torch.from_numpy(_hysteresis_numpy(logits.detach().float().numpy(), tau, init))
    return _hysteresis_scan(logits, tau, initial)


def _hysteresis_scan(logits: Tensor, tau: float, initial: Tensor | None) -> Tensor:
    batch, chunks, k = logits.shape
    cand_logit, cand = logits.max(dim=-1)  # [B, C]
    stay = torch.arange(k, device=logits.device).expand(batch, chunks, k)
    maps = torch.where(cand_logit[..., None] - logits > tau, cand[..., None], stay)  # [B, C, K]
    if initial is None:
        maps[:, 0] = cand[:, :1]
        initial = torch.zeros(batch, dtype=torch.long, device=logits.device)
    step = 1
    while step < chunks:  # inclusive scan: maps[c] <- maps[c] o maps[c - step]
        composed = maps[:, step:].gather(-1, maps[:, :-step])
        maps = torch.cat([maps[:, :step], composed], dim=1)
        step *= 2
    start = initial.to(logits.device)[:, None, None].expand(batch, chunks, 1)
    return maps.gather(-1, start)[..., 0]


def _hysteresis_numpy(logits: np.ndarray, tau: float, initial: np.ndarray | None) -> np.ndarray:
    """The same rule as a plain loop over chunks (CPU)."""
    batch, chunks, _ = logits.shape
    cand = logits.argmax(-1)
    rows = np.arange(batch)
    out = np.empty((batch, chunks), dtype=np.int64)
    cur = cand[:, 0] if initial is None else initial
    for c in range(chunks):
        lc = logits[:, c]
        cur = np.where(lc[rows, cand[:, c]] - lc[rows, cur] > tau, cand[:, c], cur)
        out[:, c] = cur
    return out


def _host_array(tensors: list[Tensor], *, stack: bool) -> np.ndarray:
    """Stack / concatenate small tensors into one host array: numpy views on CPU (no torch
    kernels), a single device-to-host copy otherwise."""
    half = (torch.float16, torch.bfloat16)  # numpy has no bfloat16
    if tensors[0].device.type == "cpu":
        arrays = [(t.float() if t.dtype in half else t).detach().numpy() for t in tensors]
        return np.stack(arrays) if stack else np.concatenate(arrays)
    joined = (torch.stack(tensors) if stack else torch.cat(tensors)).detach()
    return (joined.float() if joined.dtype in half else joined).cpu().numpy()


def spectral_upper_bound(
    core: Tensor, *, squarings: int = 8, floor: float = 1e-30, powers: list[Tensor] | None = None
) -> Tensor:
    """Upper bound on the largest eigenvalue of each PSD matrix in ``core`` [n, R, R].

    lambda_max <= trace(S^p)^(1/p) for p = 2^squarings, within a factor R^(1/p) of the truth
    (< 1.1% for R <= 16). Repeated squaring of the trace-normalised matrix needs only batched
    matmuls: no eigen-solver, so no host synchronisation on a GPU and a stable gradient.
    ``powers``: receives the normalised S^(2^j), j < squarings (their product is S^(p-1) up to
    a factor: the bound's gradient direction).
    """
    c = core.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(floor)
    traces, a = [c], core
    for _ in range(squarings):
        a = a / c[:, None, None]
        if powers is not None:
            powers.append(a)
        a = a @ a
        # trace(A^2) >= 1/R^2 for a trace-1 PSD A, so the clamp only acts on an all-zero core.
        c = a.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
        traces.append(c)
    # log bound = log c_0 + sum_j 2^-j log c_j (one op for the sum, not three per squaring)
    weights = torch.logspace(
        0, -squarings, squarings + 1, 2.0, device=core.device, dtype=core.dtype
    )
    log_bound = torch.stack(traces, -1).log() @ weights
    # float32 rounding can put the bound a few ulps under the truth; keep it an upper bound.
    return torch.exp(log_bound) * (1.0 + 1e-5)


def _decides_on_host(device: torch.device) -> bool:
    """Hysteresis in a numpy loop on CPU; elsewhere the sync-free scan (bench/op_count.py
    switches it to count a GPU's ops on CPU)."""
    return device.type == "cpu"


def _uses_eigen_solver(device: torch.device) -> bool:
    """Exact spectral norms on CPU; elsewhere an eigen-solver would synchronise with the host
    on every call, so the sync-free upper bound is used."""
    return device.type == "cpu"


def _per_row(t: Tensor, counts: Sequence[int]) -> Tensor:
    """Per-site matrices t [S, R, R] repeated for each site's rows: [sum(counts), R, R]. One
    site's t is [R, R] (the caller broadcasts it), so a single layer pays for no stacking."""
    if t.dim() == 2:
        return t
    return torch.cat([t[i].expand(k, *t.shape[1:]) for i, k in enumerate(counts)])


def _grams(factors: Sequence[Tensor]) -> Tensor:
    grams = [f.t() @ f for f in factors]
    return grams[0] if len(grams) == 1 else torch.stack(grams)


def _per_site_sum(t: Tensor, counts: Sequence[int]) -> list[Tensor]:
    """Rows [N, ...] summed per site (``counts`` consecutive rows each)."""
    return [part.sum(0) for part in torch.split(t, list(counts))]


def _core_spectrum(
    w: Tensor,
    counts: Sequence[int],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    exact: bool | None,
    floor: float,
    powers: list[Tensor] | None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(largest eigenvalue [n] with a 1e-5 margin, trace [n], (U^T U, V^T V + jitter and its
    Cholesky factor L per site, the cores)) of core_n = L^T diag(w_n) U^T U diag(w_n) L, which
    has the non-zero eigenvalues of D_n^T D_n for D_n = U diag(w_n) V^T: R x R, never d x d.
    Rows ``w`` [n, R] belong to the sites (U, V) in ``us``/``vs``, ``counts`` rows each, so
    one call solves every site of a model. ``exact``: an eigen-solve (True), the sync-free
    upper bound (False, its normalised powers appended to ``powers``) or no spectral norm
    (None: zeros)."""
    gram_u, gram_v = _grams(us), _grams(vs)  # [S, R, R], or [R, R] for one site
    # V is random-initialised so its Gram is positive definite; the jitter only makes the
    # computed norms a hair larger than the true ones (the bound stays safe).
    eye = torch.eye(w.shape[-1], device=w.device, dtype=gram_v.dtype)
    jitter = 1e-6 * gram_v.diagonal(dim1=-2, dim2=-1).mean(-1).detach() + 1e-12
    gram_v = gram_v + jitter[..., None, None] * eye
    chol = torch.linalg.cholesky_ex(gram_v).L  # no host sync on GPU
    lw = w[:, :, None] * _per_row(chol, counts)  # diag(w) L
    core = lw.transpose(1, 2) @ _per_row(gram_u, counts) @ lw
    fro2 = core.diagonal(dim1=1, dim2=2).sum(-1)
    if exact is None:
        lam = torch.zeros_like(fro2)
    elif exact:
        lam = torch.linalg.eigvalsh(core)[:, -1] * (1.0 + 1e-5)
    else:
        lam = spectral_upper_bound(core, floor=floor, powers=powers)
    return lam, fro2, (gram_u, gram_v, chol, core)


class _BoundedSpectrum(torch.autograd.Function):
    """``_core_spectrum`` on the spectral-bound path with a closed-form backward: a dozen
    R x R products instead of autograd through the Gram matrices, the Cholesky factor and the
    eight squarings (about 150 small ops per site and training step, on a GPU a kernel launch
    each; the eigen-solve's own backward is already short).

    With M_n = diag(w_n) U^T U diag(w_n) and G = V^T V + jitter (a constant), core_n is similar
    to M_n G, so a spectral function F of it has dF = tr(X dM_n) + tr(Y dG) with X = L S L^T
    and Y = L^-T core S L^-1, where S = dF/dcore; for the bound trace(core^p)^(1/p),
    S = bound core^(p-1) / trace(core^p); the trace adds G to X and M_n to Y.
    Inputs: w [n, R], floor, the sites' row counts, then every site's U, then every site's V.
    """

    @staticmethod
    def forward(
        ctx: Any, w: Tensor, floor: float, counts: tuple[int, ...], *factors: Tensor
    ) -> tuple[Tensor, Tensor]:
        us, vs = factors[: len(counts)], factors[len(counts) :]
        powers: list[Tensor] = []
        lam, fro2, parts = _core_spectrum(w, counts, us, vs, False, floor, powers)
        ctx.counts = counts
        ctx.save_for_backward(w, lam, *parts, *powers, *factors)
        return lam, fro2

    @staticmethod
    def backward(ctx: Any, grad_lam: Tensor, grad_fro2: Tensor) -> tuple[Tensor | None, ...]:
        counts, sites = ctx.counts, len(ctx.counts)
        w, lam, gram_u, gram_v, chol, core, *rest = ctx.saved_tensors
        powers, us, vs = rest[: -2 * sites], rest[-2 * sites : -sites], rest[-sites:]
        p = powers[0]  # the product of the normalised powers: core^(p-1) up to a factor
        for a in powers[1:]:
            p = p @ a
        p_core = core @ p
        k = grad_lam * lam / p_core.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
        s, s_core = p * k[:, None, None], p_core * k[:, None, None]
        eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        chol_rows, chol_inv_rows = _per_row(chol, counts), _per_row(chol_inv, counts)
        gram_u_rows, fro = _per_row(gram_u, counts), grad_fro2[:, None, None]
        ww = w[:, :, None] * w[:, None, :]
        x = chol_rows @ s @ chol_rows.transpose(-1, -2) + fro * _per_row(gram_v, counts)
        x = x + x.transpose(1, 2)  # dM = dW G_U W + W G_U dW + W dG_U W, dG_U = dU^T U + U^T dU
        y = chol_inv_rows.transpose(-1, -2) @ s_core @ chol_inv_rows + fro * ww * gram_u_rows
        grad_w = (gram_u_rows * w[:, None, :] * x).sum(-1)
        grad_us = [u @ m for u, m in zip(us, _per_site_sum(ww * x, counts), strict=True)]
        grad_vs = [v @ (m + m.t()) for v, m in zip(vs, _per_site_sum(y, counts), strict=True)]
        return grad_w, None, None, *grad_us, *grad_vs


def _trust_scales(
    w: Tensor,
    counts: Sequence[int],
    us: Sequence[Tensor],
    vs: Sequence[Tensor],
    budget: float | None,
    budget_fro: float | None,
) -> Tensor:
    """Scale in (0, 1] per row of column weights ``w`` [n, R] (float32 or wider) that puts
    D = U diag(w) V^T inside the trust region (spectral norm first, then Frobenius); rows are
    ``counts[i]`` rows of site i, whose factors are us[i], vs[i] (in w's dtype)."""
    exact = None if budget is None else _uses_eigen_solver(w.device)
    floor = 1e-12 * (budget or 1.0) ** 2
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (w, *us, *vs))
    if exact is False and grad:
        lam, fro2 = _BoundedSpectrum.apply(w, floor, tuple(counts), *us, *vs)
    else:
        lam, fro2, _ = _core_spectrum(w, counts, us, vs, exact, floor, None)
    scale = None
    if budget is not None:
        # Compare squares so sqrt never sees 0 (its gradient there is inf -> NaN).
        scale = budget / torch.sqrt(torch.clamp(lam, min=budget * budget))
    if budget_fro is not None:
        if scale is not None:
            fro2 = fro2 * scale * scale
        fro_scale = budget_fro / torch.sqrt(torch.clamp(fro2, min=budget_fro * budget_fro))
        scale = fro_scale if scale is None else scale * fro_scale
    assert scale is not None  # callers return early when there is no budget
    return scale


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any hook (its own or a global one)."""
    g = _torch_module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


def _versions(tensors: tuple[Tensor, ...]) -> tuple[int, ...]:
    return tuple([t._version for t in tensors])


class _StepPlan(NamedTuple):
    """A decoding chunk's one-token step, prepared at its first step (BEMLayer._mid_chunk_step):
    valid while ``dec`` is the stream's decision, ``merge`` the layer's flag and ``tensors``
    (U, V, codes, base weight) keep ``versions`` (an in-place change makes a new plan)."""

    dec: Tensor
    merge: bool
    tensors: tuple[Tensor, ...]
    versions: tuple[int, ...]
    kind: str | None
    linear: bool  # nn.Linear (weight [out, in]) or Conv1D (weight [in, out])
    weight: Tensor  # the base weight, or the chunk expert's merged weight
    bias: Tensor | None
    v: Tensor
    u_t: Tensor
    w_rows: Tensor  # [B, R]


class _CodeAndRouteRows(torch.autograd.Function):
    """``(x @ V, x[:, first::n])`` as one autograd node.

    The router reads every chunk's first token, and a strided slice's backward materialises
    a zero gradient of x's full size that the engine then adds to x's other gradients: two
    extra passes over the activations per site (about 5% of a 6 x 256 GPT-2 training step in
    a one-thread A/B). Here the
    rows' gradient is added in place into the rows of ``grad_h @ V^T``, which is computed
    anyway; the result differs from the plain ops only by the order of one addition on the
    chunk-first rows.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, v: Tensor, first: int, n: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, v)
        ctx.first, ctx.n = first, n
        return x @ v, x[:, first::n].contiguous()

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        x, v = ctx.saved_tensors
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ v.t()
            if grad_rows is not None and grad_rows.numel():
                grad_x[:, ctx.first :: ctx.n] += grad_rows
        if ctx.needs_input_grad[1]:
            grad_v = x.reshape(-1, x.shape[-1]).t() @ grad_h.reshape(-1, grad_h.shape[-1])
        return grad_x, grad_v, None, None


class RoutingStats:
    """Flip rate, gate entropy and utilisation of one layer's routing.

    A forward pass only appends references to small detached tensors; the arithmetic runs in
    numpy, batched, when the stats are read (or every ``fold_every`` records), so logging
    costs the forward pass next to nothing.
    """

    fold_every = 128

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        # (decisions or None, lengths, prev, gates, temperature, tau): see add
        self._pending: list[
            tuple[
                Tensor | None,
                list[int] | None,
                Tensor | None,
                Tensor | None,
                float | None,
                float | None,
            ]
        ] = []
        self.flips = 0
        self.transitions = 0
        self.entropy_sum = 0.0
        self.units = 0
        self.util = np.zeros(self.num_experts)

    def add(
        self,
        decisions: Tensor | None,
        lengths: list[int] | None = None,
        prev: Tensor | None = None,
        gates: Tensor | None = None,
        temperature: float | None = None,
        tau: float | None = None,
    ) -> None:
        """decisions [B, C]: hard expert per routing unit; lengths: tokens per unit (None: 1);
        prev [B]: the unit before this call's first one (streaming); gates [.., K]: the gate
        distribution of every new decision, as logits when ``temperature`` is given.
        ``decisions`` None: decided here from the logits ``gates`` [B, C, K] by the hysteresis
        rule with ``tau`` (no ``prev``) when the statistics are read, on the host."""
        if decisions is None and (
            gates is None or temperature is None or tau is None or prev is not None
        ):
            raise ValueError(
                "undecided routing units need their logits, temperature and tau, and no prev"
            )
        if prev is None and gates is None and lengths is not None and len(lengths) == 1:
            # Decoding: every mid-chunk step records the chunk's (same) decisions tensor for
            # one more token; fold it into the previous record instead of a new one.
            last = self._pending[-1] if self._pending else None
            if (
                last is not None
                and last[0] is decisions
                and last[2] is None
                and last[3] is None
                and last[1] is not None
                and len(last[1]) == 1
            ):
                last[1][0] += lengths[0]
                return
        self._pending.append((decisions, lengths, prev, gates, temperature, tau))
        if len(self._pending) >= self.fold_every:
            self._fold()

    def _decide(self) -> None:
        """Decide the pending records added without decisions: the logits of each shape and
        tau go to the host in one copy, and the numpy hysteresis rule decides them (what the
        forward pass's rule would have given)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (decisions, _, _, gates, _, tau) in enumerate(self._pending):
            if decisions is None:  # add checked that its logits came with it
                groups.setdefault((tuple(cast(Tensor, gates).shape), tau), []).append(i)
        for (shape, tau), idx in groups.items():
            logits = _host_array([cast(Tensor, self._pending[i][3]) for i in idx], stack=True)
            decided = _hysteresis_numpy(logits.reshape(-1, *shape[-2:]), cast(float, tau), None)
            decided = decided.reshape(len(idx), *shape[:-1])
            for j, i in enumerate(idx):
                self._pending[i] = (torch.from_numpy(decided[j]), *self._pending[i][1:])

    def _fold(self) -> None:
        self._decide()
        pending, self._pending = self._pending, []
        k = self.num_experts
        groups: dict[tuple[Any, ...], list[tuple[Tensor, Tensor | None]]] = {}
        dists: dict[float | None, list[Tensor]] = {}
        for decisions, lengths, prev, gates, temperature, _ in pending:
            assert decisions is not None  # _decide decided them
            key = (tuple(decisions.shape), tuple(lengths or ()), prev is None, decisions.device)
            groups.setdefault(key, []).append((decisions, prev))
            if gates is not None:
                dists.setdefault(temperature, []).append(gates.reshape(-1, k))
        for (_, lengths, no_prev, _), items in groups.items():
            dec = _host_array([d for d, _ in items], stack=True).astype(np.int64)  # [N, B, C]
            seq = dec
            if not no_prev:
                prevs = _host_array([q for _, q in items if q is not None], stack=True)
                prevs = prevs.astype(np.int64)
                seq = np.concatenate([prevs[..., None], dec], axis=-1)
            self.flips += int((seq[..., 1:] != seq[..., :-1]).sum())
            self.transitions += seq[..., 1:].size
            weights = np.broadcast_to(np.asarray(lengths or (1,), dtype=np.float64), dec.shape)
            self.util += np.bincount(dec.ravel(), weights=weights.ravel(), minlength=k)
        for temperature, parts in dists.items():
            g = _host_array(parts, stack=False).astype(np.float64)
            if temperature is not None:  # logits -> softmax
                g = np.exp((g - g.max(-1, keepdims=True)) / temperature)
            p = g / np.clip(g.sum(-1, keepdims=True), 1e-12, None)
            self.entropy_sum += float(-(p * np.log(np.clip(p, 1e-12, None))).sum())
            self.units += p.shape[0]

    def summary(self) -> dict[str, Any]:
        self._fold()
        total = float(self.util.sum())
        return {
            "flip_rate": self.flips / self.transitions if self.transitions else 0.0,
            "gate_entropy": self.entropy_sum / self.units if self.units else 0.0,
            "utilisation": (self.util / total).tolist() if total else [0.0] * self.num_experts,
            "routing_units": self.units,
        }


class BEMLayer(nn.Module):
    """A frozen base projection plus K routed low-rank experts (see module docstring)."""

    col_expert: Tensor  # [R] expert that owns each rank column
    col_scale: Tensor  # [R] alpha / r_k of that expert
    col_own_scale: Tensor  # [K, R] alpha / r_k on each expert's own columns, else 0

    def __init__(
        self,
        base: nn.Module,
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
    ) -> None:
        super().__init__()
        d_in, d_out = base_dims(base)
        ranks = [int(rank)] * num_experts if isinstance(rank, int) else [int(r) for r in rank]
        if num_experts < 1 or len(ranks) != num_experts or min(ranks) < 1:
            raise ValueError(
                f"BEMLayer needs num_experts >= 1 and one rank >= 1 per expert, "
                f"got num_experts={num_experts}, rank={rank!r}"
            )
        if chunk_size < 1:
            raise ValueError(f"BEMLayer chunk_size must be >= 1, got {chunk_size}")
        if routing not in ROUTING_MODES:
            raise ValueError(f"BEMLayer routing must be one of {ROUTING_MODES}, got {routing!r}")
        for name, budget in (
            ("trust_budget", trust_budget),
            ("trust_budget_fro", trust_budget_fro),
        ):
            if budget is not None and not budget > 0:
                raise ValueError(f"BEMLayer {name} must be > 0 or None, got {budget}")
        if temperature <= 0:
            raise ValueError(f"BEMLayer temperature must be > 0, got {temperature}")

        self.base = base
        # Exactly nn.Linear or transformers' Conv1D: forward is known, so the layer may run
        # it itself (no module call) or with merged weights. Subclasses keep their forward.
        self._plain_base = type(base) is nn.Linear or (
            type(base).__name__ == "Conv1D"
            and type(base).__module__ == "transformers.pytorch_utils"
        )
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.num_experts = num_experts
        self.ranks = ranks
        self.total_rank = sum(ranks)
        self.alpha = float(alpha)
        self.chunk_size = int(chunk_size)
        self.tau = float(tau)
        self.trust_budget = trust_budget
        self.trust_budget_fro = trust_budget if trust_budget_fro is None else trust_budget_fro
        self.routing: RoutingMode = routing
        self.temperature = float(temperature)
        self.site_name = ""  # set by attach_bem, used in error messages
        self.enabled = True
        self.streaming = False

        weight = next(base.parameters())
        dev = weight.device
        rr = self.total_rank
        self.bem_V = nn.Parameter(torch.empty(d_in, rr, device=dev))
        # U starts at zero so an attached model computes exactly what its base computes.
        self.bem_U = nn.Parameter(torch.zeros(d_out, rr, device=dev))
        self.bem_code = nn.Parameter(torch.ones(rr, device=dev))
        bound = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.bem_V, -bound, bound)
        self.router: nn.Linear | None = None
        if num_experts > 1:
            self.router = nn.Linear(d_in, num_experts, device=dev)
        col_expert = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(ranks))
        col_scale = torch.tensor([self.alpha / ranks[int(k)] for k in col_expert])
        self.register_buffer("col_expert", col_expert.to(dev), persistent=False)
        self.register_buffer("col_scale", col_scale.to(dev), persistent=False)
        # alpha / r_k on expert k's own columns, zero elsewhere [K, R]: the codes times this
        # are the experts' raw column weights (one op per solve instead of four).
        own = torch.eye(num_experts).index_select(-1, col_expert) * col_scale
        self.register_buffer("col_own_scale", own.to(dev), persistent=False)

        self._external: Tensor | None = None
        self._stream_pos = 0
        # The last routing unit's expert [B, 1] and column weights [B, 1, R], carried to the
        # next streaming call (the same objects for every step of a decoding chunk).
        self._stream_dec: Tensor | None = None
        self._stream_w: Tensor | None = None
        # Merged inference (hard routing, no gradient): W0 + D_k per expert, materialised once
        # per parameter version; K extra copies of the base weight, hence off by default.
        # A forward whose units mostly pick one expert k runs the base matmul with W0 + D_k and
        # corrects the other rows with a low-rank D_j - D_k; that pays off while those rows are
        # at most ``merge_max_minority`` of the units and the call has at least
        # ``merge_min_tokens`` tokens (below, the correction's fixed op cost beats its saving);
        # a call whose rows all pick one expert (decoding inside a chunk) always merges.
        self.merge_experts = False
        self.merge_min_tokens = 256
        self.merge_max_minority = 0.3
        self._step_plan: _StepPlan | None = None
        self._merged_cache: tuple[tuple[Tensor, Tensor], tuple[int, int], list[Tensor]] | None = (
            None
        )
        self._plan_cache: (
            tuple[Tensor, int, tuple[int, Tensor | None, Tensor | None] | None] | None
        ) = None
        self._eval_cache: tuple[tuple[Any, ...], tuple[Tensor, Tensor]] | None = None
        # This forward's expert solution, solved with every other layer of the model in one
        # batched call (presolve_trust_regions); None outside a model forward with gradients.
        self._presolved: tuple[Tensor, Tensor] | None = None
        self._external_convex = False
        # (expert solution, weights, decisions, gates) of the current external gates at
        # inference: a decoder sets gates once per segment and runs one token per forward.
        self._external_cache: tuple[tuple[Tensor, Tensor], Tensor, Tensor, Tensor] | None = None
        self.last_decisions: Tensor | None = None
        self.last_weights: Tensor | None = None
        self.reset_stats()

    # ------------------------------------------------------------------ public controls
    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"ranks={self.ranks}, alpha={self.alpha}, chunk={self.chunk_size}, tau={self.tau}, "
            f"trust=({self.trust_budget}, {self.trust_budget_fro}), routing={self.routing}"
        )

    def set_routing(self, gates: Tensor | None, *, convex: bool | None = None) -> None:
        """Override the controller with external gates (None restores the controller).

        Accepted: float [B, T, K] (T == seq len, T == 1 to broadcast, or in streaming mode
        T covering every absolute position), float [B, K], or integer expert ids [B, T] / [B].
        ``convex``: whether every gate row is a convex mix (non-negative, summing to <= 1);
        None checks it. A caller that builds one-hot or zero rows may say so and save the
        check (a decoder re-routes once per plan segment).
        """
        self._external_cache = None
        if gates is None:
            self._external = None
            return
        k = self.num_experts
        if not torch.is_floating_point(gates):
            if gates.dim() not in (1, 2) or (gates.numel() and int(gates.max()) >= k):
                raise ValueError(
                    f"BEM {self.site_name}: integer gates must be expert ids in [0, {k}) "
                    f"of shape [B] or [B, T], got shape {tuple(gates.shape)}"
                )
            gates = F.one_hot(gates.long(), k).float()
        if gates.dim() == 2:
            gates = gates[:, None, :]
        if gates.dim() != 3 or gates.shape[-1] != k:
            raise ValueError(
                f"BEM {self.site_name}: external gates must have shape [batch, seq, {k}] or "
                f"[batch, {k}], got {tuple(gates.shape)}"
            )
        # A copy, not an alias: the inference cache below is keyed on this call, so a caller
        # changing its gates tensor in place afterwards must not change what is routed.
        self._external = gates.to(self.bem_V.device, copy=True)
        # Convex mixes of in-budget experts are in budget; other gates get a per-row bound.
        if convex is None:
            g = self._external
            convex = bool((g >= 0).all() & (g.sum(-1) <= 1 + 1e-6).all())
        self._external_convex = convex

    def reset_stream(self) -> None:
        self._stream_pos = 0
        self._stream_dec = None
        self._stream_w = None
        self._plan_cache = None
        self._step_plan = None

    def reset_stats(self) -> None:
        self.routing_stats = RoutingStats(self.num_experts)

    def stats(self) -> dict[str, Any]:
        """Routing statistics accumulated since the last ``reset_stats``.

        flip_rate: share of consecutive routing units (chunks; tokens under external gates)
        whose hard expert differs. gate_entropy: mean entropy (nats) of the gate distribution
        per routing decision. utilisation: share of tokens routed (hard) to each expert.
        routing_units: number of routing decisions with a gate distribution.
        """
        return self.routing_stats.summary()

    def expert_weights(self) -> Tensor:
        """Column weights [K, R] of each expert alone: alpha/r_k * c_k on its own columns,
        scaled so that expert's delta is inside the trust region. Cached at inference.

        Norms are convex, so any convex mix of in-budget experts (soft, straight-through,
        Gumbel or hard gates: non-negative, summing to at most one) is in budget too.
        """
        return self._expert_solution()[0]

    def _expert_solution(self) -> tuple[Tensor, Tensor]:
        """(expert_weights [K, R], their column-wise sum [R]). With gradients: this model
        forward's batched solution (presolve_trust_regions) or a solve of this layer alone;
        without: cached while no parameter has changed."""
        if torch.is_grad_enabled():
            presolved = self._presolved
            return presolved if presolved is not None else _solve_experts([self])[0]
        u, v, c = self.bem_U, self.bem_V, self.bem_code  # spelled out: runs every forward
        key: tuple[Any, ...] = (u._version, v._version, c._version, u.data_ptr(), v.data_ptr())
        key += (c.data_ptr(), self.trust_budget, self.trust_budget_fro)
        cached = self._eval_cache
        if cached is None or cached[0] != key:
            cached = self._eval_cache = (key, _solve_experts([self])[0])
        return cached[1]

    def column_weights(self, gates: Tensor, *, row_trust: bool = True) -> Tensor:
        """Gates [..., K] -> per-rank-column weights [..., R] inside the trust region.

        ``row_trust`` also bounds each row's mixed delta directly, which matters only for
        gates that are not a convex mix (e.g. external gates summing to more than one).
        """
        gates = gates.to(self.bem_V.dtype)
        w = gates.index_select(-1, self.col_expert) * self._expert_solution()[1]
        if not row_trust or (self.trust_budget is None and self.trust_budget_fro is None):
            return w
        flat = w.reshape(-1, self.total_rank)
        return (flat * self.trust_scale(flat)[:, None]).reshape(w.shape)

    def delta_weight(self, gates: Tensor) -> Tensor:
        """Materialised effective delta [d_out, d_in] for one gate vector [K] (tests, analysis)."""
        w = self.column_weights(gates.to(self.bem_V)[None])[0]
        return (self.bem_U * w) @ self.bem_V.t()

    def trust_scale(self, w: Tensor) -> Tensor:
        """Scale in (0, 1] per row of column weights ``w`` [n, R] that puts D = U diag(w) V^T
        inside the trust region (spectral norm first, then Frobenius)."""
        if self.trust_budget is None and self.trust_budget_fro is None:
            return torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
        return _layer_trust_scales([self], w, [w.shape[0]])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        if x.dim() == 3:
            xb = x
        else:
            xb = x[None] if x.dim() == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])
        if self.streaming and self._routes_by_controller():
            step = self._mid_chunk_step(x, xb)
            if step is None:
                step = self._chunk_start_step(x, xb)
            if step is not None:
                return step
        code: Tensor | None = None
        rows: Tensor | None = None
        v = self.bem_V
        if x.requires_grad and torch.is_grad_enabled() and self._routes_by_controller():
            pos0 = self._stream_pos if self.streaming else 0
            xc = xb if xb.dtype == v.dtype else xb.to(v.dtype)
            code, rows = _CodeAndRouteRows.apply(xc, v, (-pos0) % self.chunk_size, self.chunk_size)
        w, dec = self._token_weights(xb, rows)
        if self.merge_experts and dec is not None and not torch.is_grad_enabled():
            merged = self._merged_forward(x, xb, w, dec)
            if merged is not None:
                return merged
        return self._delta_forward(x, xb, w, code)

    def _mid_chunk_step(self, x: Tensor, xb: Tensor) -> Tensor | None:
        """Decoding inside a chunk whose expert is decided: the decision's [B, 1] views were
        made at the chunk boundary, so bookkeeping adds no tensor op, and the statistics fold
        the chunk's steps into one record. None: not such a step (the general path)."""
        pos0, n, length = self._stream_pos, self.chunk_size, xb.shape[1]
        w_col, dec_col = self._stream_w, self._stream_dec
        if pos0 % n == 0 or (-pos0) % n < length or w_col is None or dec_col is None:
            return None
        if dec_col.shape[0] != xb.shape[0]:
            return None  # the general path raises the error
        # Plain attributes: nn.Module.__setattr__ costs microseconds per call (type checks).
        state = self.__dict__
        state["_stream_pos"] = pos0 + length
        self.routing_stats.add(dec_col, [length])
        state["last_decisions"], state["last_weights"] = dec_col, w_col
        if torch.is_grad_enabled():
            return self._delta_forward(x, xb, w_col, None)
        sp = self._step_plan
        if (
            sp is None
            or sp.dec is not dec_col
            or sp.merge != self.merge_experts
            or sp.versions != _versions(sp.tensors)
        ):
            sp = state["_step_plan"] = self._make_step_plan(x, w_col, dec_col)
        return self._planned_step(x, xb, sp)

    def _chunk_start_step(self, x: Tensor, xb: Tensor) -> Tensor | None:
        """Decoding at a chunk's first token (one step in ``chunk_size``): route the chunk on
        this token, then prepare the chunk's step plan and run this step with it, as every
        later step of the chunk will. The same decisions, statistics and output as the
        general path, with a handful of ops instead of its bookkeeping (which cost a
        decoding boundary step several times a mid-chunk one). None: not such a step."""
        pos0, batch = self._stream_pos, xb.shape[0]
        prev_col = self._stream_dec
        if (
            pos0 % self.chunk_size != 0
            or xb.shape[1] != 1
            or self.training
            or torch.is_grad_enabled()
            or (prev_col is not None and prev_col.shape[0] != batch)
        ):
            return None  # the general path (which also raises the errors)
        prev = None if prev_col is None else prev_col[:, 0]
        logits = self._router_logits(xb)  # [B, 1, K]: the chunk's first token is this one
        dec = hysteresis_decisions(logits, self.tau, prev)  # [B, 1]
        w = self.expert_weights()[dec]  # [B, 1, R]
        self.routing_stats.add(dec, [1], prev, logits, self.temperature)
        # Plain attributes: nn.Module.__setattr__ costs microseconds per call (type checks).
        state = self.__dict__
        state["_stream_pos"] = pos0 + 1
        state["last_decisions"], state["last_weights"] = dec, w
        state["_stream_dec"], state["_stream_w"] = dec, w
        sp = state["_step_plan"] = self._make_step_plan(x, w, dec)
        return self._planned_step(x, xb, sp)

    def _planned_step(self, x: Tensor, xb: Tensor, sp: _StepPlan) -> Tensor:
        """One decoding step of a routed chunk with its step plan (the chunk's decisions
        [B, 1] are ``sp.dec``, its weights [B, 1, R] the stream's ``_stream_w``)."""
        w_col, dec_col = cast(Tensor, self._stream_w), sp.dec
        if sp.kind is None or xb.shape[1] != 1 or not x.is_contiguous():
            if self.merge_experts:
                merged = self._merged_forward(x, xb, w_col, dec_col)
                if merged is not None:
                    return merged
            return self._delta_forward(x, xb, w_col, None)
        # One token per row, every op prepared at the chunk's first step: the merged matmul,
        # or the unmerged path's ops on [B, d] with h scaled in place.
        flat = x.view(-1, self.in_features)
        if sp.linear:
            out = F.linear(flat, sp.weight, sp.bias)
        else:
            out = flat @ sp.weight if sp.bias is None else torch.addmm(sp.bias, flat, sp.weight)
        if sp.kind == "delta":
            out.addmm_((flat @ sp.v).mul_(sp.w_rows), sp.u_t)
        return out.view(*x.shape[:-1], self.out_features)

    def _make_step_plan(self, x: Tensor, w_col: Tensor, dec_col: Tensor) -> _StepPlan:
        """What every one-token step of this chunk computes (see _mid_chunk_step): kind
        "merged" (one matmul with the chunk's expert merged into the base weight), "delta"
        (base matmul + low-rank delta) or None (the general paths)."""
        u, v, c = self.bem_U, self.bem_V, self.bem_code
        w0, bias = cast(Tensor, self.base.weight), cast(Tensor | None, self.base.bias)
        w_rows = w_col[:, 0]  # [B, R]: one token per row
        ok = self._may_replace_base(x)
        kind: str | None = None
        weight = w0
        if ok and self.merge_experts:
            plan = self._merge_plan(w_col, dec_col, 1)
            if plan is not None and plan[1] is None:  # every row on one expert
                kind, weight = "merged", self._merged_weights()[plan[0]]
        if ok and kind is None and w_rows.dtype == v.dtype:
            kind = "delta"
        tensors = (u, v, c, w0)
        return _StepPlan(
            dec_col,
            self.merge_experts,
            tensors,
            _versions(tensors),
            kind,
            isinstance(self.base, nn.Linear),
            weight,
            bias,
            v,
            u.t(),
            w_rows,
        )

    def _delta_forward(self, x: Tensor, xb: Tensor, w: Tensor, code: Tensor | None) -> Tensor:
        """The base output plus ((x @ V) * w) @ U^T (the unmerged path)."""
        out, private = self._base_forward(x)
        h = self._weighted_code(xb, w, code).reshape(-1, self.total_rank)
        flat_out = out.reshape(-1, self.out_features)
        if out.dtype != h.dtype:
            return out + (h @ self.bem_U.t()).view(out.shape).to(out.dtype)
        if private and not torch.is_grad_enabled():
            # Inference: accumulate into the base output in place (one copy of it fewer).
            return flat_out.addmm_(h, self.bem_U.t()).view(out.shape)
        # One fused add+matmul: the cheapest way to put the delta on the base output.
        return torch.addmm(flat_out, h, self.bem_U.t()).view(out.shape)

    def _base_forward(self, x: Tensor) -> tuple[Tensor, bool]:
        """(base output, whether nobody else can hold it). A plain Linear / Conv1D without
        hooks is computed here with the ops its forward runs (same result, no module call)."""
        base = self.base
        if self._plain_base and not _has_hooks(base):
            return self._linear(x, cast(Tensor, base.weight)), True
        # A forward hook may keep the base output; never change a tensor somebody else holds.
        return base(x), not _has_hooks(base)

    def _may_replace_base(self, x: Tensor) -> bool:
        """Whether the base layer's matmul may be run with another weight (merged, or beside
        prepared delta operands): a plain Linear / Conv1D without hooks (a subclass or a hooked
        base must run its own forward) and one dtype for x, the base weight and the experts."""
        base = self.base
        weight = cast(Tensor, base.weight)
        return (
            self._plain_base
            and not _has_hooks(base)
            and x.dtype == weight.dtype == self.bem_V.dtype
        )

    def _linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's own computation with ``weight`` (its weight, or a merged one)."""
        bias = cast(Tensor | None, self.base.bias)
        if isinstance(self.base, nn.Linear):  # weight [out, in]
            return F.linear(x, weight, bias)
        # Conv1D, weight [in, out]: what Conv1D.forward computes
        flat = x.view(-1, x.shape[-1])
        mm = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return mm.view(*x.shape[:-1], self.out_features)

    def _routes_by_controller(self) -> bool:
        return self._external is None and self.num_experts > 1

    def _weighted_code(self, x: Tensor, w: Tensor, code: Tensor | None = None) -> Tensor:
        """(x @ V) scaled per rank column by gates, alpha/r_k, codes and the trust factor;
        ``code``: x @ V when already computed."""
        v = self.bem_V
        h = code if code is not None else (x if x.dtype == v.dtype else x.to(v.dtype)) @ v
        batch, length, rr = h.shape
        n = self.chunk_size
        if w.dtype != h.dtype:
            w = w.to(h.dtype)
        if w.shape[1] * n == length and w.shape[1] > 1:
            # One weight row per whole chunk: broadcast instead of gathering per token.
            return (h.view(batch, -1, n, rr) * w[:, :, None]).view(batch, length, rr)
        return h * w

    def _token_weights(self, x: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Column weights per routing unit [B, U, R] (U = 1: every token; U * chunk == T:
        one row per whole chunk; else one row per token) and, under controller routing, the
        expert of each unit [B, U] (None for external gates, and for soft routing in training
        on an accelerator, where the statistics decide them). ``rows``: the router's
        input rows (every chunk's first token), when already taken from x."""
        batch, length, _ = x.shape
        pos0 = self._stream_pos if self.streaming else 0
        prev = self._stream_dec
        if self.streaming and prev is not None and prev.shape[0] != batch:
            raise ValueError(
                f"BEM {self.site_name}: streaming batch size changed from "
                f"{prev.shape[0]} to {batch}; call reset_stream() between sequences"
            )
        dec: Tensor | None
        if self._external is not None:
            w, dec = self._external_weights(x, pos0), None
        elif self.num_experts == 1:
            w, dec = self._fused_weights(batch, length)
        else:
            w, dec = self._controller_weights(x, pos0, rows)
        if self.streaming:
            self.__dict__["_stream_pos"] = pos0 + length  # see _mid_chunk_step
        return w, dec

    def _fused_weights(self, batch: int, length: int) -> tuple[Tensor, Tensor]:
        w = self.expert_weights()[0].view(1, 1, -1)
        decisions = torch.zeros(batch, 1, dtype=torch.long, device=w.device)
        self.routing_stats.add(decisions, [length])
        if self.streaming:
            self._stream_dec = decisions
        self.last_decisions = decisions
        self.last_weights = w.detach()
        return w, decisions

    def _router_logits(self, h: Tensor) -> Tensor:
        assert self.router is not None
        # RMS-normalised input keeps routing independent of the residual stream's scale.
        h = F.rms_norm(h.to(self.router.weight.dtype), (h.shape[-1],), eps=1e-6)
        return self.router(h)

    def _controller_weights(
        self, x: Tensor, pos0: int, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        batch, length, _ = x.shape
        n = self.chunk_size
        carry = pos0 % n != 0
        prev_w, prev_dec = self._stream_w, self._stream_dec  # [B, 1, R], [B, 1]
        if carry and (prev_w is None or prev_dec is None):
            raise RuntimeError(
                f"BEM {self.site_name}: streaming resumed mid-chunk without routing state; "
                "enter bem_streaming() before the first token"
            )
        first = (-pos0) % n
        # A step inside a decided chunk never gets here: forward hands it to _mid_chunk_step.
        assert not (carry and first >= length), "mid-chunk step outside _mid_chunk_step"

        # Causal: each chunk is routed on the hidden state of its own first token.
        logits = self._router_logits(x[:, first::n] if rows is None else rows)  # [B, C_new, K]
        if self.training and self.routing == "gumbel":
            u = torch.rand_like(logits).clamp_(1e-9, 1.0 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        prev = prev_dec[:, 0] if self.streaming and prev_dec is not None else None
        stats_logits, temp = logits.detach(), self.temperature
        decisions: Tensor | None = None
        if self.training and self.routing == "soft":
            # The hard decisions only feed the statistics here. On an accelerator they are
            # left to the statistics, which decide them on the host when read, sparing the
            # device the scan (about 20 small kernels per site and step for 64 chunks);
            # last_decisions is None then.
            if self.streaming or _decides_on_host(logits.device):
                decisions = hysteresis_decisions(stats_logits, self.tau, prev)
            soft = torch.softmax(logits / self.temperature, dim=-1)
            w_new = self.column_weights(soft, row_trust=False)  # convex mix: in budget
        else:
            decisions = hysteresis_decisions(stats_logits, self.tau, prev)
            if not self.training:
                w_new = self.expert_weights()[decisions]
            else:  # straight-through (Gumbel or not): hard value, soft gradient
                soft = torch.softmax(logits / self.temperature, dim=-1)
                # Not F.one_hot: it checks the ids' range, a host sync per call on a GPU.
                hard = torch.zeros_like(soft).scatter_(-1, decisions[..., None], 1.0)
                w_new = self.column_weights(hard + soft - soft.detach(), row_trust=False)
        lengths = [min(n, length - s) for s in range(first, length, n)]
        all_dec: Tensor | None
        if carry:
            assert prev_w is not None and prev_dec is not None and decisions is not None
            w_chunks = torch.cat([prev_w.to(w_new.dtype), w_new], dim=1)
            all_dec = torch.cat([prev_dec, decisions], dim=1)
            self.routing_stats.add(all_dec, [first, *lengths], None, stats_logits, temp)
        else:
            w_chunks, all_dec = w_new, decisions
            self.routing_stats.add(all_dec, lengths, prev, stats_logits, temp, self.tau)
        self.last_decisions = all_dec
        self.last_weights = w_chunks.detach()
        if self.streaming:
            assert all_dec is not None  # decided above when streaming
            self._set_stream_state(all_dec, w_chunks.detach())
        if not carry and (length % n == 0 or length < n):
            # Whole chunks (_weighted_code broadcasts them) or one chunk's start (a decoding
            # step at a chunk boundary): no per-token gather.
            return w_chunks, all_dec
        # Chunk index of every token, relative to the chunk that holds position pos0.
        rel = (torch.arange(length, device=x.device) + pos0) // n - pos0 // n
        return w_chunks[:, rel], None if all_dec is None else all_dec[:, rel]

    def _set_stream_state(self, dec: Tensor, w: Tensor) -> None:
        """Carry the last routing unit's expert [B, U] and weights [B, U, R] to the next call."""
        self._stream_dec, self._stream_w = dec[:, -1:], w[:, -1:]

    # ------------------------------------------------------------------ merged inference
    def _merged_forward(self, x: Tensor, xb: Tensor, w: Tensor, dec: Tensor) -> Tensor | None:
        """Hard routing at inference on merged weights W0 + D_k (see ``merge_experts``): the
        base matmul with the majority expert's merged weight, plus a low-rank correction
        D_j - D_k on the rows routed elsewhere. None: use the unmerged path."""
        if not self._may_replace_base(x):
            return None
        plan = self._merge_plan(w, dec, xb.shape[1])
        if plan is None:
            return None
        major, rows, w_diff = plan
        out = self._linear(x, self._merged_weights()[major])
        if rows is None or w_diff is None:
            return out
        flat_out = out.view(-1, self.out_features)
        h = (xb.reshape(-1, self.in_features).index_select(0, rows) @ self.bem_V) * w_diff
        return flat_out.index_add_(0, rows, h @ self.bem_U.t()).view(out.shape)

    def _merge_plan(
        self, w: Tensor, dec: Tensor, length: int
    ) -> tuple[int, Tensor | None, Tensor | None] | None:
        """(majority expert, rows [n] routed elsewhere, their weights minus the majority's
        [n, R]), or None when the unmerged path is cheaper. Decoding steps inside a chunk pass
        the same ``dec`` object, so the plan is made once per chunk."""
        cached = self._plan_cache
        if cached is not None and cached[0] is dec and cached[1] == length:
            return cached[2]
        plan = self._make_merge_plan(w, dec, length)
        self._plan_cache = (dec, length, plan)
        return plan

    def _make_merge_plan(
        self, w: Tensor, dec: Tensor, length: int
    ) -> tuple[int, Tensor | None, Tensor | None] | None:
        if self.num_experts == 1:
            return 0, None, None
        counts = torch.bincount(dec.reshape(-1), minlength=self.num_experts).tolist()
        major = max(range(self.num_experts), key=counts.__getitem__)
        minority = dec.numel() - counts[major]
        if minority == 0:
            return major, None, None
        batch, units = dec.shape
        if (
            batch * length < self.merge_min_tokens
            or minority > self.merge_max_minority * dec.numel()
        ):
            return None
        n, rr = self.chunk_size, self.total_rank
        if units == 1:
            tok_dec, tok_w = dec.expand(batch, length), w.expand(batch, length, rr)
        elif units * n == length and units > 1:
            tok_dec, tok_w = dec.repeat_interleave(n, 1), w.repeat_interleave(n, 1)
        else:
            tok_dec, tok_w = dec, w
        rows = (tok_dec.reshape(-1) != major).nonzero().squeeze(1)
        w_diff = tok_w.reshape(-1, rr).index_select(0, rows) - self.expert_weights()[major]
        return major, rows, w_diff

    def _merged_weights(self) -> list[Tensor]:
        """W0 + D_k for every expert k (K tensors shaped like the base weight), cached with the expert
        solution (so, like it, rebuilt when a BEM parameter changes) and the base weight's
        version and storage."""
        sol = self._expert_solution()
        weight = cast(Tensor, self.base.weight)
        key = (weight._version, weight.data_ptr())
        cached = self._merged_cache
        if cached is None or cached[0] is not sol or cached[1] != key:
            u, v = self.bem_U, self.bem_V
            if isinstance(self.base, nn.Linear):
                deltas = [(u * wk) @ v.t() for wk in sol[0]]  # [out, in]
            else:
                deltas = [(v * wk) @ u.t() for wk in sol[0]]  # Conv1D: [in, out]
            merged = [weight + d.to(weight.dtype) for d in deltas]
            cached = (sol, key, merged)
            self._merged_cache = cached
        return cached[2]

    def _external_weights(self, x: Tensor, pos0: int) -> Tensor:
        batch, length, _ = x.shape
        g = self._external
        assert g is not None
        k = self.num_experts
        if g.shape[0] != batch:
            raise ValueError(
                f"BEM {self.site_name}: external gates have batch {g.shape[0]}, input has {batch}"
            )
        span = g.shape[1]
        window = None
        if span == 1:
            pass  # one gate row for every position: weights broadcast over the sequence
        elif self.streaming:
            if span < pos0 + length:
                raise ValueError(
                    f"BEM {self.site_name}: external gates cover {span} positions, streaming "
                    f"forward needs positions {pos0}..{pos0 + length - 1}"
                )
            window = slice(pos0, pos0 + length)
        elif span != length:
            raise ValueError(
                f"BEM {self.site_name}: external gates have seq length {span}, input has {length}"
            )
        if torch.is_grad_enabled() or g.requires_grad:
            w, decisions, g = self._external_solution(g if window is None else g[:, window])
        else:
            # Inference: solve once per gates (and parameters), not once per forward.
            sol = self._expert_solution()
            cached = self._external_cache
            if cached is None or cached[0] is not sol:
                cached = (sol, *self._external_solution(g))
                self._external_cache = cached
            _, w, decisions, g = cached
            if window is not None:
                w, decisions, g = w[:, window], decisions[:, window], g[:, window]
        if decisions.shape[1] != length:
            decisions = decisions.expand(batch, length)
            g = g.expand(batch, length, k)
        prev = self._stream_dec[:, 0] if self.streaming and self._stream_dec is not None else None
        self.routing_stats.add(decisions, None, prev, g)
        self.last_decisions = decisions
        self.last_weights = w.detach()
        if self.streaming:
            self._set_stream_state(decisions, w.detach())
        return w

    def _external_solution(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """External gates [B, T, K] -> (column weights [B, T, R], hard decisions [B, T],
        non-negative detached gates for the statistics [B, T, K])."""
        g = g.to(self.bem_V.dtype)
        flat = g.reshape(-1, self.num_experts)
        if self._external_convex:
            w = self.column_weights(flat, row_trust=False)
        elif flat.requires_grad:
            w = self.column_weights(flat)
        else:
            # A planner's gates repeat across a segment: one trust-region solve per distinct row.
            rows, inverse = torch.unique(flat, dim=0, return_inverse=True)
            w = self.column_weights(rows)[inverse]
        w = w.reshape(*g.shape[:2], self.total_rank)
        return w, g.argmax(-1), g.detach().clamp_min(0)


# ---------------------------------------------------------------------- batched trust regions
def _solve_experts(layers: Sequence[BEMLayer]) -> list[tuple[Tensor, Tensor]]:
    """Every layer's (expert weights [K, R] inside its trust region, their column sum [R]),
    the layers of one trust-region setting (total rank, budgets, device, dtype) solved in one
    batched call: the same small ops once for all of them instead of once per layer."""
    ws = [layer.col_own_scale * layer.bem_code for layer in layers]  # [K, R] each
    if layers[0].trust_budget is not None or layers[0].trust_budget_fro is not None:
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        counts = [layer.num_experts for layer in layers]
        w = w * _layer_trust_scales(layers, w, counts)[:, None]
        ws = [w] if len(ws) == 1 else list(torch.split(w, counts))
    # Experts own disjoint columns: the sum is each column's weight.
    return [(wk, wk.sum(0)) for wk in ws]


def _layer_trust_scales(layers: Sequence[BEMLayer], w: Tensor, counts: Sequence[int]) -> Tensor:
    """``_trust_scales`` of rows ``w`` of ``layers`` (one trust-region setting, ``counts``
    rows each), solved in float32 or wider whatever the layers' dtype or autocast."""
    wide = w.dtype if w.dtype == torch.float64 else torch.float32  # half: not accurate enough
    with torch.autocast(w.device.type, enabled=False):
        us = [layer.bem_U.to(wide) for layer in layers]
        vs = [layer.bem_V.to(wide) for layer in layers]
        budgets = layers[0].trust_budget, layers[0].trust_budget_fro
        return _trust_scales(w.to(wide), counts, us, vs, *budgets).to(w.dtype)


def _trust_setting(layer: BEMLayer) -> tuple[Any, ...]:
    v = layer.bem_V
    return (layer.total_rank, layer.trust_budget, layer.trust_budget_fro, v.device, v.dtype)


def presolve_trust_regions(model: nn.Module, _args: Any = None) -> None:
    """Solve the trust region of every enabled BEM layer of ``model`` for this forward, in one
    batched call per trust-region setting. A forward pre-hook of models with BEM (attach_bem):
    on a GPU a training step is bound by launching small ops, and per layer the solve is most
    of BEM's. Only while gradients are recorded (inference caches each layer's solution)."""
    if not torch.is_grad_enabled():
        return
    groups: dict[tuple[Any, ...], list[BEMLayer]] = {}
    for module in model.modules():
        if isinstance(module, BEMLayer) and module.enabled:
            groups.setdefault(_trust_setting(module), []).append(module)
    for layers in groups.values():
        for layer, solution in zip(layers, _solve_experts(layers), strict=True):
            layer.__dict__["_presolved"] = solution
    model.__dict__["_bem_presolved"] = True


def clear_presolved(model: nn.Module, _args: Any = None, _output: Any = None) -> None:
    """Forward hook (always called, also when the forward raised): the presolved solutions
    belong to that forward's autograd graph only. Free when nothing was presolved (a decoding
    step walks no modules)."""
    if not model.__dict__.pop("_bem_presolved", False):
        return
    for module in model.modules():
        if isinstance(module, BEMLayer):
            module.__dict__["_presolved"] = None


# ---------------------------------------------------------------------- model-level helpers
def bem_layers(model: nn.Module) -> list[tuple[str, BEMLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BEMLayer)]


def _require_layers(model: nn.Module) -> list[BEMLayer]:
    layers = [m for _, m in bem_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BEM layers; call attach_bem first")
    return layers


def set_bem_routing(model: nn.Module, gates: Tensor | None) -> None:
    """Set (or clear with None) external gates on every BEM layer of ``model``."""
    for layer in _require_layers(model):
        layer.set_routing(gates)


@contextmanager
def bem_routing(model: nn.Module, gates: Tensor) -> Iterator[nn.Module]:
    """Route every BEM layer by externally chosen gates (e.g. a macro-policy planner)."""
    set_bem_routing(model, gates)
    try:
        yield model
    finally:
        set_bem_routing(model, None)


@contextmanager
def bem_streaming(model: nn.Module) -> Iterator[nn.Module]:
    """Incremental decoding: chunk positions and the current expert carry across forward
    calls (use with a K/V cache); state is reset on entry and exit."""
    layers = _require_layers(model)
    for layer in layers:
        layer.reset_stream()
        layer.streaming = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.streaming = False
            layer.reset_stream()


@contextmanager
def bem_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Compute the base model only (every delta switched off)."""
    layers = _require_layers(model)
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def bem_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """BEM parameters (factors, codes, router) of every layer; never the base weights."""
    for _, layer in bem_layers(model):
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                yield p


def count_bem_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in bem_parameters(model) if p.requires_grad or not trainable_only)


def reset_bem_stats(model: nn.Module) -> None:
    for _, layer in bem_layers(model):
        layer.reset_stats()


def collect_bem_stats(model: nn.Module, *, reset: bool = False) -> dict[str, Any]:
    """Mean flip rate / gate entropy over layers plus per-layer stats."""
    per_layer = {name: layer.stats() for name, layer in bem_layers(model)}
    if reset:
        reset_bem_stats(model)
    n = max(len(per_layer), 1)
    return {
        "flip_rate": sum(s["flip_rate"] for s in per_layer.values()) / n,
        "gate_entropy": sum(s["gate_entropy"] for s in per_layer.values()) / n,
        "layers": per_layer,
    }
