"""The chain a draft head grows, computed for a whole cached sequence at once: training-time test for
training (``unrolled_logits``) and the greedy acceptance of the 1st, 2nd, 3rd... drafted token on
held-out target outputs (``chain_acceptance``). Both head kinds: EAGLE-1 (features: the target's
post-norm hidden states ``hidden``) and EAGLE-3 (the fused features ``aux``)."""

from __future__ import annotations

import torch

from ..decoding.drafts import Eagle3DraftHead
from ..hf import adapter as hf


def unrolled_logits(head, ids: torch.Tensor, feats: torch.Tensor, steps: int, rows_from: int = 0) -> list:
    """Training-time test of one sequence: logits of each unrolled step over the head's vocabulary.

    ids int64 ``[n]``; feats ``[n, F]`` (an EAGLE-3 head's fused target features, or an EAGLE-1 head's
    post-norm hidden states). Step 0 covers pair positions t = 0..n-2 and returns logits ``[n-1 - rows_from,
    V_d]`` for t >= rows_from; step i >= 1 runs at t >= rows_from only (rows past the sequence end read a
    padding token and must be masked by the caller). Works for both heads: a step's input feature is the
    previous step's output (EAGLE-1 predicts the next feature, EAGLE-3 feeds its own hidden state back)."""
    m = ids.numel() - 1
    r = m - rows_from
    if r < 1 or steps < 1:
        raise ValueError(f"unrolled_logits: nothing to score (n={ids.numel()}, rows_from={rows_from}, steps={steps})")
    dtype = next(head.parameters()).dtype
    neg = torch.finfo(dtype).min
    dev = feats.device
    cache = hf.new_cache()
    t = torch.arange(m, device=dev)
    rows = t[rows_from:]
    causal = torch.full((m, m), neg, dtype=dtype, device=dev).triu(1)
    out = head.features_forward(ids[None, 1:], feats[None, :-1].to(dtype), t[None], causal[None, None], cache)[0]
    logits = [head._logits(out[rows_from:])]
    prev = out[rows_from:]
    padded = torch.cat([ids, ids.new_zeros(steps)])
    block0 = causal[rows_from:]  # step 0's keys at positions <= t
    eye = torch.full((r, r), neg, dtype=dtype, device=dev).fill_diagonal_(0)
    for i in range(1, steps):
        mask = torch.cat([block0] + [eye] * i, -1)[None, None]
        tokens = padded[rows + 1 + i]
        prev = head.features_forward(tokens[None], prev[None], (rows + i)[None], mask, cache)[0]
        logits.append(head._logits(prev))
    return logits


def chain_targets(seq: dict, steps: int, rows_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets ``[steps, r]`` int64: the target's argmax token the step-i draft at pair t should
    produce, i.e. ``top[t+1+i]``; valid ``[steps, r]`` bool: inside the sequence)."""
    top = seq["top"].long()
    m = top.numel() - 1
    rows = torch.arange(rows_from, m)
    idx = rows[None] + 1 + torch.arange(steps)[:, None]
    valid = idx <= m
    return top[idx.clamp(max=m)], valid


@torch.no_grad()
def chain_acceptance(head, data: list[dict], steps: int = 3) -> dict:
    """Greedy acceptance along a drafted chain on held-out target outputs: ``chain[i]``, the share of
    positions whose first i+1 drafted tokens all equal the target's argmax (their sum is the expected
    accepted length of a chain of ``steps``); ``conditional[i]``, the share of the (i+1)-th given the
    first i (None where none survived). The head reads the data's tokens and its own features; sampled
    replies (``sampled``) are skipped and only positions whose next ``steps`` data tokens are the
    target's argmax count (the chain a greedy draft is verified on).
    Works for EAGLE-1 heads (features: ``hidden``) and EAGLE-3 heads (``aux``); sequences need ``top``
    (the target's argmax), cached with ``feature_layers``."""
    was = head.training
    head.eval()
    ok = torch.zeros(steps)  # positions whose first i+1 drafted tokens were all accepted
    n = 0
    eagle3 = isinstance(head, Eagle3DraftHead)
    for seq in data:
        if seq.get("sampled"):
            continue  # a sampled reply's tokens are not the target's greedy choices
        ids, lf = seq["ids"].long(), seq.get("loss_from", 0)
        feats = (seq["aux"] if eagle3 else seq["hidden"]).float()
        logits = unrolled_logits(head, ids, feats, steps, lf)
        top, valid = chain_targets(seq, steps, lf)
        vocab = head.vocab_ids_on(ids.device)
        # positions whose whole chain lies inside the sequence and whose data follows the target's argmax
        # (a batched greedy generation can tie-break differently from this unbatched pass)
        alive = valid[steps - 1].clone()
        padded = torch.cat([ids, ids.new_zeros(steps)])
        rows = torch.arange(lf, ids.numel() - 1)
        for i in range(1, steps):
            alive &= padded[rows + 1 + i] == top[i - 1]
        n += int(alive.sum())
        for i, lg in enumerate(logits):
            pick = lg.argmax(-1) if vocab is None else vocab[lg.argmax(-1)]
            alive = alive & (pick == top[i])
            ok[i] += alive.sum()
    head.train(was)
    chain = [float(ok[i] / n) if n else None for i in range(steps)]
    cond = [chain[0]] + [float(ok[i] / ok[i - 1]) if ok[i - 1] else None for i in range(1, steps)]
    return {"chain": chain, "conditional": cond, "positions": n, "expected_accepted": sum(c or 0.0 for c in chain)}


