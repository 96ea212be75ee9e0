"""A windowed causal LM streamed in chunks, with an optional compressive memory (Mission E).

Every position ``p`` sees exactly the tokens ``[s - window, p]``, where ``s`` is the start of
its chunk (``s = p - p % chunk``): a chunk is processed together with the ``window`` tokens
before it, from token ids, with no hidden state carried over from earlier chunks. So what a
position sees is fixed by its absolute position (teacher forcing equals greedy decoding), and
a token more than ``window`` tokens before its chunk can reach the model only through memory.

The memory is ``RecallMemory``: associative recall over (context -> next token) pairs, keys
from a short causal convolution over its own embeddings (H3 / Based). Its window part sees only
the window; the memory system also keeps a fixed number of slots with the most salient pairs
that fell out of the window (write gate ``beta``). The read is the input of a BEM layer whose
base map is zero: its router (the controller) routes on the read and its experts write it into
the residual stream. The KV-only baseline is the same module reading the window only.

Peak memory is bounded by the window: a stream holds ``window`` token ids, the pairs of the
last ``window / chunk`` chunks (not yet evicted) and the slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bem_tasks.core.bem import BEMLayer


@dataclass(frozen=True)
class WindowLMConfig:
    vocab_size: int
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    window: int = 256
    chunk: int = 128
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if self.chunk < 1 or self.window < self.chunk or self.window % self.chunk:
            raise ValueError(
                f"window={self.window} must be a positive multiple of chunk={self.chunk}"
            )


def _rope(x: Tensor, theta: float) -> Tensor:
    """Rotary embedding over the sequence axis of ``x`` [N, H, S, Dh] (positions 0..S-1)."""
    s, dh = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh)
    ang = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: WindowLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head, self.theta = cfg.n_head, cfg.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def heads(self, x: Tensor) -> Tensor:
        n, s, d = x.shape
        return x.view(n, s, self.n_head, d // self.n_head).transpose(1, 2)

    def forward(self, x: Tensor, queries: int) -> Tensor:
        """Causal attention over the window ``x`` [N, S, d] for its last ``queries`` positions."""
        q = _rope(self.heads(self.q_proj(x)), self.theta)[:, :, -queries:]
        k = _rope(self.heads(self.k_proj(x)), self.theta)
        v = self.heads(self.v_proj(x))
        s = x.shape[1]
        mask = torch.ones(queries, s, dtype=torch.bool, device=x.device).tril(s - queries)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], queries, -1))


class Block(nn.Module):
    def __init__(self, cfg: WindowLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.RMSNorm(d)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class RecallMemory(nn.Module):
    """Associative recall over (context -> next token) pairs: the window part and, when
    ``use_memory``, a fixed number of slots holding the most salient pairs that fell out of the
    window.

    Pair ``u`` has key ``k(u - 1)`` (a causal short convolution over the memory's own token
    embeddings, as in H3 / Based) and value ``v(x_u)`` (the token that followed). A query at
    position ``p`` reads ``sum_u beta_u (q_p . k_u) v_u`` over the pairs it may see: window pairs
    ``u`` in ``(s - window, p]``, recomputed from the window's token ids with the convolution
    zero-padded at the window's start (so nothing before the window leaks in), and, with memory,
    a softmax read of the memory's ``slots`` pairs (logits ``mem_scale (q_p . k_j) + log
    beta_j`` next to a null slot of logit 0 and value 0): when a chunk's pairs fall out of the
    window they compete with the kept ones and the ``slots`` with the largest write gate ``beta``
    stay.
    A chunk's pairs are evicted when the chunk falls wholly out of the window, so the one pair
    whose key is the last token before the window and whose value is its first token is in
    neither part for that chunk (1 pair in ``chunk``).
    The write gate is trained by the window part too (it weighs every read), so what is worth
    keeping is learned on pairs the window sees. A sum over every evicted pair (a linear-attention
    matrix, as in Infini-attention) was tried first, then the window's linear read over the
    slots: the noise of both grows with length (docs/mission_e.md).
    """

    def __init__(
        self, cfg: WindowLMConfig, *, d_mem: int, kernel: int, slots: int, use_memory: bool
    ) -> None:
        super().__init__()
        self.use_memory = use_memory
        self.slots = slots
        self.kernel = kernel
        self.window, self.chunk = cfg.window, cfg.chunk
        self.embed = nn.Embedding(cfg.vocab_size, d_mem)
        self.conv = nn.Conv1d(d_mem, d_mem, kernel, groups=d_mem, bias=False)
        self.q_proj = nn.Linear(d_mem, d_mem, bias=False)
        self.k_proj = nn.Linear(d_mem, d_mem, bias=False)
        self.value = nn.Embedding(cfg.vocab_size, d_mem)
        self.write_gate = nn.Linear(d_mem, 1)
        # Sharpness of the slot read (q, k are unit vectors); learned. The KV-only system has
        # it too, unused, so both systems count the same parameters.
        self.mem_scale = nn.Parameter(torch.tensor(8.0))
        # A BEM layer around a zero map (see attach_recall): the read reaches the model only
        # through its experts, routed on the read itself.
        zero = nn.Linear(d_mem, cfg.d_model, bias=False)
        nn.init.zeros_(zero.weight)
        self.out: nn.Module = zero

    def features(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For a window of ids [B, S]: queries [B, S, D], pair keys / gates / values for pairs
        u = 1..S-1 ([B, S-1, D], [B, S-1, 1], [B, S-1, D])."""
        e = self.embed(ids).transpose(1, 2)
        u = self.conv(F.pad(e, (self.kernel - 1, 0))).transpose(1, 2)  # causal, zero-padded
        q = F.normalize(self.q_proj(u), dim=-1)
        k = F.normalize(self.k_proj(u[:, :-1]), dim=-1)
        beta = torch.sigmoid(self.write_gate(u[:, :-1]))
        return q, k, beta, self.value(ids[:, 1:])

    def write_gates(self, ids: Tensor) -> Tensor:
        """beta of every pair of a sequence [B, T] -> [B, T-1, 1]."""
        return self.features(ids)[2]

    def step(self, state: StreamState, window_ids: Tensor, queries: int) -> Tensor:
        """The read [B, queries, d_model] for the chunk ending ``window_ids``; with memory, the
        chunk's pairs wait in ``state.pending`` until they fall out of the window, then compete
        for the memory's slots."""
        read, pairs = self.read(window_ids, queries, state.slots)
        if self.use_memory:
            state.pending.append(pairs)
            while len(state.pending) > self.window // self.chunk:
                state.slots = self._keep(state.slots, state.pending.pop(0))
        return read

    def _keep(self, slots: Pairs | None, evicted: Pairs) -> Pairs:
        """The ``slots`` pairs with the largest write gates among the kept and the evicted."""
        k, v, beta = (
            evicted
            if slots is None
            else (torch.cat(x, 1) for x in zip(slots, evicted, strict=True))
        )
        if k.shape[1] <= self.slots:
            return k, v, beta
        top = beta[..., 0].topk(self.slots, dim=1).indices.sort(dim=1).values  # keep time order
        return tuple(x.gather(1, top[..., None].expand(-1, -1, x.shape[-1])) for x in (k, v, beta))  # type: ignore[return-value]

    def read(self, ids: Tensor, queries: int, slots: Pairs | None) -> tuple[Tensor, Pairs]:
        """(read [B, queries, d_model], the chunk's own pairs (k, v, beta)) for a window of ids."""
        q, k, beta, v = self.features(ids)
        s = ids.shape[1]
        qc = q[:, -queries:]
        # pair j (= u - 1) is visible to query position i when u = j + 1 <= i
        pos = torch.arange(s - queries, s, device=ids.device)[:, None]
        visible = torch.arange(1, s, device=ids.device)[None] <= pos
        r = ((qc @ (beta * k).transpose(1, 2)) * visible) @ v
        if self.use_memory and slots is not None:
            # Softmax over the slots and a null slot (logit 0, value 0): the read is a convex
            # mix of kept values, so its size does not grow with how salient the kept pairs
            # are (which rises with length: the slots keep the top of ever more pairs), and a
            # query that matches no slot reads (nearly) nothing.
            mk, mv, mb = slots
            logits = self.mem_scale * (qc @ mk.transpose(1, 2)) + torch.log(mb).transpose(1, 2)
            att = torch.softmax(torch.cat([logits, torch.zeros_like(logits[..., :1])], -1), -1)
            r = r + att[..., :-1] @ mv
        # the chunk's own pairs: u in the last `queries` positions of the window
        return self.out(r), (k[:, -queries:], v[:, -queries:], beta[:, -queries:])


Pairs = tuple[Tensor, Tensor, Tensor]  # keys [B, N, D], values [B, N, D], write gates [B, N, 1]


@dataclass
class StreamState:
    """What a stream keeps between chunks: bounded by the window, whatever the length."""

    tail: Tensor  # [B, <= window] the last token ids
    pending: list[Pairs] = field(default_factory=list)  # chunks' pairs still inside the window
    slots: Pairs | None = None  # the kept pairs of those that fell out of the window

    def memory_bytes(self) -> int:
        """Bytes the memory keeps: its slots and the pairs waiting to be evicted into them."""
        held = [*self.pending, *([self.slots] if self.slots is not None else [])]
        return sum(t.numel() * t.element_size() for pairs in held for t in pairs)


class WindowLM(nn.Module):
    """The backbone (see the module docstring); ``recall`` is attached by ``attach_recall``."""

    def __init__(self, cfg: WindowLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.recall: RecallMemory | None = None
        nn.init.normal_(self.embed.weight, std=0.02)

    def new_stream(self, batch: int) -> StreamState:
        dev = self.embed.weight.device
        return StreamState(tail=torch.zeros(batch, 0, dtype=torch.long, device=dev))

    def step(self, state: StreamState, chunk_ids: Tensor) -> Tensor:
        """Logits [B, C, V] for one chunk [B, C <= chunk]; advances ``state``."""
        window_ids = torch.cat([state.tail, chunk_ids], dim=1)
        x = self.backbone(window_ids, chunk_ids.shape[1])
        if self.recall is not None:
            x = x + self.recall.step(state, window_ids, chunk_ids.shape[1])
        state.tail = window_ids[:, -self.cfg.window :]
        return self.head(self.norm(x))  # type: ignore[no-any-return]

    def backbone(self, window_ids: Tensor, queries: int) -> Tensor:
        """The frozen path: final residual [B, queries, d] for the last positions of a window."""
        x = self.embed(window_ids)
        for i, block in enumerate(self.blocks):
            q = queries if i == len(self.blocks) - 1 else x.shape[1]
            y = x[:, -q:] + block.attn(block.norm1(x), q)  # type: ignore[operator]
            x = y + block.mlp(block.norm2(y))  # type: ignore[operator]
        return x

    def chunks(self, ids: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """(window ids, chunk ids) of every chunk of ``ids`` [B, T], as ``step`` sees them."""
        w, c = self.cfg.window, self.cfg.chunk
        for s in range(0, ids.shape[1], c):
            yield ids[:, max(s - w, 0) : s + c], ids[:, s : s + c]

    def forward(self, ids: Tensor) -> Tensor:
        """Logits [B, T, V] for token ids [B, T], streamed chunk by chunk."""
        state = self.new_stream(ids.shape[0])
        return torch.cat([self.step(state, c) for _, c in self.chunks(ids)], dim=1)

    @torch.no_grad()
    def backbone_states(self, ids: Tensor) -> Tensor:
        """The frozen path's residual [B, T, d] for every position (cached while the recall
        module trains: nothing trainable comes before it)."""
        return torch.cat([self.backbone(w, c.shape[1]) for w, c in self.chunks(ids)], dim=1)

    def recalled(self, ids: Tensor, states: Tensor) -> Tensor:
        """``states + reads``: the final residual of ``forward(ids)`` from cached
        ``backbone_states(ids)``, running only the recall module (the logits are
        ``head(norm(.))`` of it)."""
        if self.recall is None:
            return states
        state = self.new_stream(ids.shape[0])
        reads = [self.recall.step(state, w, c.shape[1]) for w, c in self.chunks(ids)]
        return states + torch.cat(reads, dim=1)

    def window_start(self, position: int) -> int:
        """The first absolute position that ``position`` sees without memory."""
        return max(position - position % self.cfg.chunk - self.cfg.window, 0)


def attach_recall(
    model: WindowLM,
    *,
    use_memory: bool,
    d_mem: int,
    kernel: int,
    slots: int,
    seed: int,
    **bem_kwargs: Any,
) -> BEMLayer:
    """Freeze the backbone and attach the recall module and its BEM layer; returns the layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        recall = RecallMemory(
            model.cfg, d_mem=d_mem, kernel=kernel, slots=slots, use_memory=use_memory
        )
        layer = BEMLayer(recall.out, **bem_kwargs)
    layer.site_name = "recall.out"
    recall.out = layer
    model.recall = recall.to(model.embed.weight.device)
    return layer


def param_count(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def kv_bytes(cfg: WindowLMConfig, bytes_per_value: int = 4) -> int:
    """Keys and values of every layer over one window plus one chunk: what a position's
    attention holds (recomputed per chunk, the same for any length)."""
    return 2 * cfg.n_layer * (cfg.window + cfg.chunk) * cfg.d_model * bytes_per_value
