"""A Llama-family causal LM run over a fixed number of slots with a preallocated KV cache: the engine of
the self-distillation generator (``training.generator``).

transformers' ``generate()`` on a batch grows its cache by ``torch.cat`` every step, pads every row to
the batch's longest prompt and runs until the batch's longest reply is done; a row that finished keeps
costing. Here every slot holds one conversation at its own length in a static cache
``[layers, slots, kv_heads, capacity, head_dim]``; a finished slot is refilled at once by prefilling
the next prompt into it alone (a long GEMM, at the machine's compute bound), and a decoding step
multiplies all slots' tokens by each weight once. The same pass returns what a draft head is trained
on: the residual streams entering the chosen layers, the post-norm last hidden state and the logits.

The forward is written out (embedding, RMSNorm, fused q/k/v, RoPE from the model's own rotary module,
attention over the slot's cache, fused gate/up MLP, final norm, LM head) from the model's weights,
which it shares (no copy beyond the fused q/k/v and gate/up matrices). Families: Llama, Qwen2 (q/k/v
biases), Mistral without a sliding window; anything else is refused naming what differs. Tested
against the model's own forward on random tiny configs (``tests/test_static_batch.py``).

Batch invariance: a decoding step always multiplies all ``slots`` rows (idle ones included), so every
GEMM has the same shape whatever the other slots hold, and a row's result depends on that row alone.
That is what lets the generator restart an interrupted conversation and write the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import ops
from ..kernels.decode_attention import decode_attention
from .adapter import decoder_of, final_norm, lm_head, text_config, token_embedding

_FAMILIES = ("llama", "qwen2", "mistral")


@dataclass
class _Layer:
    in_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    post_norm: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor


def check_supported(model) -> None:
    """Raise ValueError naming what this forward does not reproduce for ``model``."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in _FAMILIES:
        raise ValueError(f"StaticBatchLM supports {', '.join(_FAMILIES)} models, not model_type={mt!r}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        raise ValueError(f"StaticBatchLM: sliding_window={cfg.sliding_window} is not supported (full attention only)")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"StaticBatchLM: hidden_act={act!r} is not supported (SiLU-gated MLPs only)")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("StaticBatchLM: mlp_bias=True is not supported")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, scaled by ``weight`` in the input's dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


class StaticBatchLM:
    """``model`` (a transformers Llama / Qwen2 / Mistral causal LM on the CPU or one GPU) run over
    ``slots`` sequences of at most ``capacity`` tokens each.

    - ``prefill(slot, ids)``: appends ``ids int64 [n]`` to the slot's sequence (a new conversation after
      ``reset(slot)``, or the next turn of the one it holds) and returns a :class:`Pass` of those n
      positions (logits only at the last one).
    - ``decode(tokens)``: one token ``int64 [slots]`` appended to every slot (idle slots pass anything and
      are ignored by the caller) -> a :class:`Pass` with one row per slot.

    ``feature_layers``: decoder layers whose input residual stream each pass returns, concatenated
    (EAGLE-3's fused features). ``linear``: the decoding step's GEMM per weight kind: "auto" (timed once
    at ``slots`` rows, see ``_choose_linear``), one GEMM for all, or an earlier ``linear_choice()``.
    ``kv_dtype``: the cache's precision (default the model's)."""

    def __init__(self, model, slots: int, capacity: int, feature_layers: tuple = (), linear: str | dict = "auto",
                 kv_dtype: torch.dtype | None = None):
        check_supported(model)
        if slots < 1 or capacity < 2:
            raise ValueError(f"StaticBatchLM: slots must be >= 1 and capacity >= 2, got {slots}, {capacity}")
        if not isinstance(linear, dict) and linear not in ("auto", "torch", "mkl_packed", "skinny"):
            raise ValueError(f"StaticBatchLM: linear must be 'auto', 'torch', 'mkl_packed', 'skinny' or a "
                             f"linear_choice() dict, got {linear!r}")
        cfg = text_config(model)
        dec = decoder_of(model)
        n_layers = len(dec.layers)
        bad = [i for i in feature_layers if not 0 <= int(i) < n_layers]
        if bad:
            raise ValueError(f"StaticBatchLM: feature_layers {bad} outside the model's {n_layers} layers")
        self.slots, self.capacity = slots, capacity
        self.feature_layers = tuple(int(i) for i in feature_layers)
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = dec.rotary_emb
        self.embed = token_embedding(model).weight
        self.norm = final_norm(model).weight
        self.lm = lm_head(model).weight
        self.device, self.dtype = self.lm.device, self.lm.dtype
        self.kv_dtype = kv_dtype or self.dtype
        if self.kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"StaticBatchLM: kv_dtype must be float32, bfloat16 or float16, got {kv_dtype}")
        self.layers = []
        with torch.no_grad():
            for layer in dec.layers:
                at, mlp = layer.self_attn, layer.mlp
                biases = [getattr(at, n).bias for n in ("q_proj", "k_proj", "v_proj")]
                self.layers.append(_Layer(
                    layer.input_layernorm.weight,
                    torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).contiguous(),
                    None if biases[0] is None else torch.cat(biases).contiguous(),
                    at.o_proj.weight, at.o_proj.bias, layer.post_attention_layernorm.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(), mlp.down_proj.weight))
        shape = (n_layers, slots, self.n_kv, capacity, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.lengths = [0] * slots
        self._choice = self._choose_linear(linear)
        self._gemm = self._step_gemms()

    # -- linear layers --------------------------------------------------------------------------
    def _weights(self) -> dict:
        """Each weight of a decoding step by kind: ``{kind: [weights of every layer]}``."""
        return {"qkv": [L.wqkv for L in self.layers], "o": [L.wo for L in self.layers],
                "gate_up": [L.wgu for L in self.layers], "down": [L.wd for L in self.layers], "lm_head": [self.lm]}

    def _choose_linear(self, linear: str) -> dict:
        """``{weight kind: GEMM}`` for the decoding step's ``slots`` rows. On a CPU in fp32 the candidates
        are torch's ``F.linear`` (MKL sgemm, which packs the weight on every call), MKL's sgemm on a weight
        packed once for this row count (``torch.ops.mkl._mkl_linear``; 1.1-1.5x faster at 64-128 rows
        here) and ``c2t_fast.skinny_linear``; "auto" times each on every kind's first weight."""
        kinds = self._weights()
        usable = self.device.type == "cpu" and self.dtype == torch.float32
        if isinstance(linear, dict):  # an earlier run's choice: the same GEMMs give the same bytes
            bad = {k: v for k, v in linear.items() if k not in kinds or v not in _gemm_candidates()}
            if bad or set(linear) != set(kinds) or (not usable and set(linear.values()) != {"torch"}):
                raise ValueError(f"StaticBatchLM: linear={linear} is not a usable choice here "
                                 f"(kinds {sorted(kinds)}, GEMMs {_gemm_candidates()})")
            return dict(linear)
        if linear == "torch" or not usable:
            return {k: "torch" for k in kinds}
        if linear != "auto":
            if linear not in _gemm_candidates():
                raise ValueError(f"StaticBatchLM: linear={linear!r} is not available in this torch build")
            return {k: linear for k in kinds}
        import time

        choice = {}
        for kind, ws in kinds.items():
            w = ws[0]
            x = torch.randn(self.slots, w.shape[1], dtype=w.dtype)
            best = {}
            for name in _gemm_candidates():
                fn = _gemm(name, w, self.slots)
                fn(x)
                t = time.perf_counter()
                for _ in range(3):
                    fn(x)
                best[name] = time.perf_counter() - t
            choice[kind] = min(best, key=best.get)
        return choice

    def linear_choice(self) -> dict:
        """``{weight kind: "torch" | "mkl_packed" | "skinny"}``: the GEMM of a decoding step per weight."""
        return dict(self._choice)

    def _step_gemms(self) -> dict:
        """``{id(weight): x -> x @ weight.T}`` for every weight of a decoding step, by the chosen GEMM."""
        return {id(w): _gemm(self._choice[kind], w, self.slots) for kind, ws in self._weights().items() for w in ws}

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, step=False):
        y = self._gemm[id(w)](x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], w.shape[0]) if step else F.linear(x, w)
        return y if b is None else y + b

    # -- slots ------------------------------------------------------------------------------------
    def reserve(self, slots: int, capacity: int) -> None:
        """At least ``slots`` slots of ``capacity`` tokens, every slot emptied (the cache reallocated only when it
        grows; the fused weights are kept)."""
        if slots < 1 or capacity < 2:
            raise ValueError(f"StaticBatchLM: slots must be >= 1 and capacity >= 2, got {slots}, {capacity}")
        if slots > self.slots or capacity > self.capacity:
            if slots != self.slots and "mkl_packed" in self._choice.values():
                raise ValueError("StaticBatchLM: a cache with MKL weights packed for its row count keeps its slots")
            self.slots, self.capacity = max(slots, self.slots), max(capacity, self.capacity)
            shape = (len(self.layers), self.slots, self.n_kv, self.capacity, self.head_dim)
            self.k = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            self._gemm = self._step_gemms()
        self.lengths = [0] * self.slots

    def reset(self, slot: int) -> None:
        """Empty ``slot`` (its cache rows are overwritten by the next prefill)."""
        self._check_slot(slot)
        self.lengths[slot] = 0

    def _check_slot(self, slot) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise ValueError(f"slot must be an int in [0, {self.slots}), got {slot!r}")

    # -- passes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor, logits_at: torch.Tensor | None = None) -> "Pass":
        """Append ``ids int64 [n]`` to ``slot``: features ``[n, ...]`` of those positions, fp32 logits of
        the last one ``[1, V]``, or of the positions ``logits_at`` (int64 indices into ids) ``[m, V]``."""
        self._check_slot(slot)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.dtype != torch.int64:
            raise ValueError("ids must be a non-empty int64 tensor [n]")
        start, n = self.lengths[slot], ids.numel()
        if start + n > self.capacity:
            raise ValueError(f"slot {slot}: {start} + {n} tokens exceed the capacity {self.capacity}")
        pos = torch.arange(start, start + n, device=self.device)
        x = self.embed[ids.to(self.device)][None]  # [1, n, H]
        # query i sees keys 0 .. start + i
        mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
        out = self._forward(x, pos[None], slice(slot, slot + 1), [start], mask, step=False)
        self.lengths[slot] = start + n
        out.logits = F.linear(out.hidden[-1:] if logits_at is None else out.hidden[logits_at], self.lm).float()
        return out

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: list[bool] | None = None) -> "Pass":
        """Append one token per slot (``int64 [slots]``); rows of slots not ``active`` are computed (the
        GEMMs keep their shape) but their cache length does not advance."""
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (self.slots,) or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [{self.slots}]")
        active = [True] * self.slots if active is None else list(active)
        if len(active) != self.slots:
            raise ValueError(f"active must have {self.slots} entries")
        lengths = [min(n, self.capacity - 1) for n in self.lengths]
        for s, a in enumerate(active):
            if a and self.lengths[s] >= self.capacity:
                raise ValueError(f"slot {s} is full ({self.capacity} tokens)")
        pos = torch.tensor(lengths, device=self.device)[:, None]  # [S, 1]
        x = self.embed[tokens.to(self.device)][:, None]  # [S, 1, H]
        out = self._forward(x, pos, slice(0, self.slots), lengths, None, step=True)
        for s, a in enumerate(active):
            if a:
                self.lengths[s] += 1
        out.logits = self._linear(out.hidden, self.lm, step=True).float()
        return out

    @torch.no_grad()
    def tree_pass(self, rows: list[int], tokens: torch.Tensor, depth: torch.Tensor, visible: torch.Tensor) -> "Pass":
        """One pass over a tree per slot of ``rows`` (b distinct slots): ``tokens int64 [b, T]`` (a row's
        tree padded to T with any token), ``depth int64 [b, T]`` (node positions are the slot's length +
        depth), ``visible bool [b, T, T]`` (node i sees tree node j: j is i or an ancestor; a padding node
        should see itself). The tree's keys are written after each slot's sequence without advancing it
        (``keep`` then commits the accepted path). Returns hidden ``[b, T, H]``, features ``[b, T, F * H]``
        and fp32 logits ``[b, T, V]``."""
        b = len(rows)
        if b == 0 or len(set(rows)) != b:
            raise ValueError(f"rows must be distinct slots, got {rows!r}")
        for r in rows:
            self._check_slot(r)
        if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[0] == b
                and tokens.dtype == torch.int64 and tokens.shape[1] > 0):
            raise ValueError(f"tokens must be int64 [{b}, T] with T >= 1")
        T = tokens.shape[1]
        if not (isinstance(depth, torch.Tensor) and depth.shape == (b, T) and depth.dtype == torch.int64):
            raise ValueError(f"depth must be int64 [{b}, {T}]")
        if not (isinstance(visible, torch.Tensor) and visible.shape == (b, T, T) and visible.dtype == torch.bool):
            raise ValueError(f"visible must be bool [{b}, {T}, {T}]")
        starts = [self.lengths[r] for r in rows]
        for r, s in zip(rows, starts):
            if s + T > self.capacity:
                raise ValueError(f"slot {r}: {s} + a tree of {T} nodes exceed the capacity {self.capacity}")
        dev = self.device
        st = torch.tensor(starts, device=dev)
        kv_len = max(starts) + T
        key = torch.arange(kv_len, device=dev)[None, None, :]  # [1, 1, K]
        rel = key - st[:, None, None]  # a key's index in its row's tree
        in_tree = (rel >= 0) & (rel < T)
        seen = visible.to(dev).gather(2, rel.clamp(0, T - 1).expand(b, T, kv_len)) & in_tree
        mask = ((key < st[:, None, None]) | seen)[:, None]  # [b, 1, T, K]
        pos = st[:, None] + depth.to(dev)
        out = self._forward(self.embed[tokens.to(dev)], pos, list(rows), starts, mask, step=False)
        out.logits = F.linear(out.hidden, self.lm).float()
        return out

    def keep(self, slot: int, nodes: list[int]) -> None:
        """Commit tree nodes ``nodes`` (indices into the slot's last ``tree_pass``, root first, in path order)
        as the slot's next positions."""
        self._check_slot(slot)
        start = self.lengths[slot]
        if not nodes or start + max(nodes) >= self.capacity or min(nodes) < 0:
            raise ValueError(f"nodes must be tree indices of slot {slot}'s last pass, got {nodes!r}")
        src = torch.tensor(nodes, device=self.device) + start
        n = len(nodes)
        self.k[:, slot, :, start:start + n] = self.k[:, slot, :, src]  # the gather copies before the write
        self.v[:, slot, :, start:start + n] = self.v[:, slot, :, src]
        self.lengths[slot] = start + n

    def _forward(self, x, pos, rows, starts: list[int], mask, step: bool) -> "Pass":
        """x ``[b, n, H]`` at positions ``pos [b, n]`` of cache rows ``rows``, each row's new keys written
        at ``starts[i]``; ``mask [n, starts[0] + n]`` (one row, prefill), None (n = 1 per row) or, with
        ``rows`` a list of slots (trees), ``[b, 1, n, max(starts) + n]``."""
        b, n, _ = x.shape
        trees = isinstance(rows, list)
        run = at = None
        one_node = False
        if trees:
            if rows == list(range(rows[0], rows[0] + len(rows))):
                run = slice(rows[0], rows[0] + len(rows))
            at = (torch.tensor(rows, device=self.device)[:, None], slice(None),
                  torch.tensor(starts, device=self.device)[:, None] + torch.arange(n, device=self.device))
            # a tree of one node per row is a decoding step: the decode kernel over the rows' own caches
            one_node = n == 1 and run is not None and self.device.type == "cpu"
        Hq, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        G = Hq // Hkv
        cos, sin = self.rotary(x, pos)  # [b, n, D]
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        kv_len = max(starts) + n
        idx = torch.tensor(starts, device=self.device)
        keep = None
        if step and self.device.type != "cpu":  # SDPA: row i sees its keys 0 .. starts[i]
            keep = (torch.arange(kv_len, device=self.device)[None, :] <= idx[:, None])[:, None, None, :]
        feats = {}
        h = x
        for li, L in enumerate(self.layers):
            if li in self.feature_layers:
                feats[li] = h
            a = rms_norm(h, L.in_norm, self.eps)
            qkv = self._linear(a, L.wqkv, L.bqkv, step)
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
            q = _rotate(q.view(b, n, Hq, D).transpose(1, 2), cos, sin)  # [b, Hq, n, D]
            k = _rotate(k.view(b, n, Hkv, D).transpose(1, 2), cos, sin)  # [b, Hkv, n, D]
            v = v.view(b, n, Hkv, D).transpose(1, 2)
            if trees:  # each row's tree after its own sequence; consecutive slots read as views, others gathered
                self.k[li][at] = k.transpose(1, 2).to(self.kv_dtype)
                self.v[li][at] = v.transpose(1, 2).to(self.kv_dtype)
                kc, vc = (self.k[li, run], self.v[li, run]) if run is not None else (self.k[li, rows, :, :kv_len],
                                                                                     self.v[li, rows, :, :kv_len])
            else:
                kc, vc = self.k[li, rows], self.v[li, rows]  # [b, Hkv, C, D] views
            if step:
                kc[torch.arange(b), :, idx] = k[:, :, 0].to(self.kv_dtype)
                vc[torch.arange(b), :, idx] = v[:, :, 0].to(self.kv_dtype)
            elif not trees:
                kc[0, :, starts[0]:starts[0] + n] = k[0].to(self.kv_dtype)
                vc[0, :, starts[0]:starts[0] + n] = v[0].to(self.kv_dtype)
            if (step or one_node) and keep is None:  # the CPU kernel reads each row's own cache once
                o = decode_attention(q[:, :, 0], kc, vc, idx + 1, 1.0 / math.sqrt(D)).reshape(b, 1, Hq * D)
            else:
                K, V = kc[:, :, :kv_len].to(q.dtype), vc[:, :, :kv_len].to(q.dtype)
                o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask if keep is None else keep,
                                                   enable_gqa=G > 1)
                o = o.transpose(1, 2).reshape(b, n, Hq * D)
            h = h + self._linear(o, L.wo, L.bo, step)
            a = rms_norm(h, L.post_norm, self.eps)
            gu = self._linear(a, L.wgu, None, step)
            g, u = gu.chunk(2, -1)
            h = h + self._linear(F.silu(g) * u, L.wd, None, step)
        hidden = rms_norm(h, self.norm, self.eps)
        fl = torch.cat([feats[i] for i in self.feature_layers], -1) if self.feature_layers else None
        if trees:
            return Pass(hidden, fl, None)
        if step:
            return Pass(hidden[:, 0], None if fl is None else fl[:, 0], None)
        return Pass(hidden[0], None if fl is None else fl[0], None)


@dataclass
class Pass:
    """What one pass returns: ``hidden [m, H]`` (post-norm last hidden state), ``features [m, F * H]``
    (the residual streams entering the feature layers, or None), ``logits`` fp32 ``[m', V]`` (every row
    of a decoding step, the last position of a prefill)."""
    hidden: torch.Tensor
    features: torch.Tensor | None
    logits: torch.Tensor | None


def _gemm_candidates() -> tuple:
    mkl = getattr(torch.ops, "mkl", None)
    packed = torch._C.has_mkl and mkl is not None and hasattr(mkl, "_mkl_reorder_linear_weight")
    return ("torch", "mkl_packed", "skinny") if packed else ("torch", "skinny")


def _gemm(name: str, w: torch.Tensor, rows: int):
    """``x [rows, K] -> x @ w.T`` by the named GEMM (the packed one is packed here, once)."""
    if name == "skinny":
        return lambda x: ops.skinny_linear(x, w)
    if name == "mkl_packed":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, rows)
    return lambda x: F.linear(x, w)
