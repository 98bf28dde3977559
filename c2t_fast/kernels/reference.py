"""Pure-torch references of the c2t_fast ops.

They define the semantics the compiled kernels are tested against, and are the explicit fallback
when a CUDA kernel is not compiled. They are written in plain tensor code as EAGLE does (vectorised
where the computation allows), not tuned.
"""

from __future__ import annotations

import math

import torch


def _check_parents(parents: torch.Tensor, op: str) -> None:
    T = parents.numel()
    if T < 1:
        raise ValueError(f"{op}: parents is empty; the tree needs at least the root node")
    p = parents.to(torch.int64).cpu()
    if p[0].item() != -1:
        raise ValueError(f"{op}: node 0 must be the root (parents[0] == -1), got parents[0] = {p[0].item()}")
    idx = torch.arange(T)
    bad = ((p < 0) | (p >= idx))[1:].nonzero()
    if bad.numel():
        i = bad[0].item() + 1
        raise ValueError(
            f"{op}: parents[{i}] = {p[i].item()} is invalid; every non-root node needs a parent with a "
            "smaller index (topological order, root at node 0, no cycles)"
        )


def build_tree(parents: torch.Tensor, prefix_len: int):
    """parents int32[T] -> (depth int32[T], ancestor_bits int64[T, W], position_ids int64[T],
    retrieve_indices int64[L, max_depth+1], leaves int64[L])."""
    _check_parents(parents, "build_tree")
    T = parents.numel()
    if prefix_len < 0:
        raise ValueError(f"build_tree: prefix_len must be >= 0, got {prefix_len}")
    if prefix_len > 2 ** 63 - 1 - T:
        raise ValueError(f"build_tree: prefix_len {prefix_len} is too large: positions prefix_len + depth (T = {T} "
                         "nodes) would overflow int64")
    dev = parents.device
    p = parents.to(torch.int64)
    # Ancestor matrix by pointer doubling over the parent chain: anc[i, j] iff j is i or above i.
    anc = torch.eye(T, dtype=torch.bool, device=dev)
    depth = torch.zeros(T, dtype=torch.int64, device=dev)
    hop = p.clone()
    while True:
        alive = hop >= 0
        if not bool(alive.any()):
            break
        rows = alive.nonzero().squeeze(1)
        anc[rows, hop[rows]] = True
        depth += alive.to(torch.int64)
        hop = torch.where(alive, p[hop.clamp(min=0)], hop)
    W = (T + 63) // 64
    padded = torch.zeros(T, W * 64, dtype=torch.int64, device=dev)
    padded[:, :T] = anc.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64, device=dev) << torch.arange(64, device=dev)
    bits = (padded.view(T, W, 64) * weights).sum(-1)  # wraps to int64 two's complement for bit 63
    has_child = torch.zeros(T, dtype=torch.bool, device=dev)
    has_child[p[1:]] = True
    leaves = (~has_child).nonzero().squeeze(1)
    max_depth = int(depth.max().item())
    retrieve = torch.full((leaves.numel(), max_depth + 1), -1, dtype=torch.int64, device=dev)
    # For leaf l, node j is on its path iff anc[leaf, j]; it sits at column depth[j].
    on_path = anc[leaves]
    li, nj = on_path.nonzero(as_tuple=True)
    retrieve[li, depth[nj]] = nj
    return depth.to(torch.int32), bits, depth + prefix_len, retrieve, leaves


def _ordered(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """candidates sorted by (score desc, index asc), NaN last."""
    s = torch.nan_to_num(score[candidates].to(torch.float64), nan=float("-inf"))
    # stable sort on -score keeps index order among ties
    order = torch.sort(-s, stable=True).indices
    return candidates[order]


def prune_tree(tree_tokens, tree_parents, tree_logp, cand_parent, cand_token, cand_logp, cand_conf,
               cand_keep, max_keep: int):
    """C2T's second pruning: keep at most max_keep of the kept candidates by confidence (ties by
    index), append them in candidate order. max_keep < 0 keeps every kept candidate."""
    T = tree_tokens.numel()
    if cand_parent.numel() and (cand_parent.min() < 0 or cand_parent.max() >= T):
        raise ValueError(f"prune_tree: cand_parent holds a node that is not in the {T}-node tree")
    _check_parents(tree_parents, "prune_tree")
    kept = cand_keep.nonzero().squeeze(1)
    if max_keep >= 0 and kept.numel() > max_keep:
        kept = torch.sort(_ordered(cand_conf, kept)[:max_keep]).values
    tokens = torch.cat([tree_tokens, cand_token[kept]])
    parents = torch.cat([tree_parents, cand_parent[kept].to(torch.int32)])
    logp = torch.cat([tree_logp, cand_logp[kept]])
    frontier = torch.arange(T, T + kept.numel(), dtype=torch.int64, device=tree_tokens.device)
    return tokens, parents, logp, frontier, kept


def rerank_tree(tokens, parents, logp, total_tokens: int):
    """EAGLE-2 rerank: the root plus the top (total_tokens - 1) nodes by joint log-prob (ties by
    index), closed under parents, renumbered in topological order."""
    if total_tokens < 1:
        raise ValueError(f"rerank_tree: total_tokens counts the root and must be >= 1, got {total_tokens}")
    _check_parents(parents, "rerank_tree")
    T = tokens.numel()
    p = parents.tolist()
    order = _ordered(logp, torch.arange(1, T, device=tokens.device)).tolist()
    chosen = [False] * T
    chosen[0] = True
    count = 1
    for idx in order:
        if count >= total_tokens:
            break
        missing = []
        j = idx
        while j != -1 and not chosen[j]:
            missing.append(j)
            j = p[j]
        if not missing or count + len(missing) > total_tokens:
            continue
        for j in missing:
            chosen[j] = True
        count += len(missing)
    selected = torch.tensor([i for i in range(T) if chosen[i]], dtype=torch.int64, device=tokens.device)
    renum = torch.full((T,), -1, dtype=torch.int64, device=tokens.device)
    renum[selected] = torch.arange(selected.numel(), device=tokens.device)
    sel_par = parents.to(torch.int64)[selected]
    new_parents = torch.where(sel_par >= 0, renum[sel_par.clamp(min=0)], sel_par).to(torch.int32)
    return tokens[selected], new_parents, logp[selected], selected


def _depths(p: list[int]) -> list[int]:
    d = [0] * len(p)
    for i in range(1, len(p)):
        d[i] = d[p[i]] + 1
    return d


def verify_greedy(tokens, parents, target):
    """Greedy acceptance: node i is accepted iff its parent is and tokens[i] == argmax(target[parent]).
    The deepest accepted node (lowest index on ties) ends the path; bonus = argmax at that node."""
    _check_parents(parents, "verify_greedy")
    pred = target if target.dtype == torch.int64 else target.argmax(-1)
    p = parents.to(torch.int64)
    match = tokens == pred[p.clamp(min=0)]
    match[0] = True
    # accepted = every node on the root->i path matched; propagate down the tree in depth order.
    accepted = match.clone()
    depth = torch.tensor(_depths(parents.tolist()), device=tokens.device)
    for d in range(1, int(depth.max().item()) + 1):
        at = depth == d
        accepted[at] &= accepted[p[at]]
    key = torch.where(accepted, depth, torch.full_like(depth, -1))
    best = int(torch.argmax(key).item())  # first maximum: lowest index among the deepest
    path = []
    j = best
    plist = parents.tolist()
    while j != -1:
        path.append(j)
        j = plist[j]
    path_t = torch.tensor(path[::-1], dtype=torch.int64, device=tokens.device)
    return path_t, pred[best].clone()


def verify_sample(tokens, parents, probs, uniforms):
    """Lossless multi-candidate sampling acceptance (SpecInfer / EAGLE with q = 1): at each accepted
    node try its children in index order, accept child x iff u[x] * mass < p(x); on rejection zero
    p(x) and renormalise (mass -= p(x)); the bonus token is drawn from the residual with u[0]."""
    _check_parents(parents, "verify_sample")
    bad_u = ~((uniforms >= 0) & (uniforms < 1))
    if bool(bad_u.any()):
        i = int(bad_u.to(torch.int32).argmax())
        raise ValueError(f"verify_sample: uniforms[{i}] = {float(uniforms[i])} is outside [0, 1)")
    T = tokens.numel()
    plist = parents.tolist()
    tok = tokens.tolist()
    u = uniforms.to(torch.float64).tolist()
    kids: list[list[int]] = [[] for _ in range(T)]
    for i in range(1, T):
        kids[plist[i]].append(i)
    path = [0]
    cur = 0
    while True:
        row = probs[cur].to(torch.float64).clone()
        mass = float(row.sum().item())
        # rows the walk reads must be measures; rows it never reads cannot change the verdict
        if not (math.isfinite(mass) and mass > 0 and bool((row >= 0).all())):
            raise ValueError(f"verify_sample: probs[{cur}] is not a probability row (every entry must be finite "
                             "and >= 0, and the row must have positive mass)")
        nxt = -1
        for c in kids[cur]:
            px = float(row[tok[c]].item())
            if u[c] * mass < px:
                nxt = c
                break
            mass -= px
            row[tok[c]] = 0.0
        if nxt < 0:
            break
        path.append(nxt)
        cur = nxt
    cdf = torch.cumsum(row, 0)
    hit = (cdf > u[0] * mass) & (row > 0)
    if bool(hit.any()):
        bonus = int(hit.nonzero()[0].item())
    else:
        positive = (row > 0).nonzero()
        bonus = int(positive[-1].item()) if positive.numel() else 0
    return (torch.tensor(path, dtype=torch.int64, device=tokens.device),
            torch.tensor(bonus, dtype=torch.int64, device=tokens.device))


def compact_kv(caches, prefix_len: int, accepted):
    """Move rows prefix_len + accepted[i] to prefix_len + i of every cache [B, H, S, D], in place."""
    acc = accepted.to(torch.int64)
    n = acc.numel()
    S = caches[0].shape[2]
    filled = [c for c in caches if c.numel()]  # an empty tensor has no memory to share
    if len({c.data_ptr() for c in filled}) != len(filled) or any(
            c.stride(d) == 0 and c.shape[d] > 1 for c in filled for d in range(3)):
        raise ValueError("compact_kv: caches must be separate tensors with no expanded (stride-0) dimension")
    if n and (acc.min() < 0 or acc.max() >= S - prefix_len or bool((acc[1:] <= acc[:-1]).any())):
        raise ValueError("compact_kv: accepted must be strictly increasing tree slots inside the cache")
    src = acc + prefix_len
    for c in caches:
        c[:, :, prefix_len:prefix_len + n] = c[:, :, src].clone()


def ancestor_mask(ancestor_bits: torch.Tensor, T: int) -> torch.Tensor:
    """bool [..., T, T] from int64 bits [..., T, W]: entry [i, j] iff j is i or an ancestor of i."""
    j = torch.arange(T, device=ancestor_bits.device)
    words = ancestor_bits[..., j // 64]  # [..., T, T]
    return ((words >> (j % 64)) & 1).bool()


def tree_attention(q, k, v, ancestor_bits, prefix_len: int, scale: float):
    """Dense reference: q [B, Hq, T, D], k/v [B, Hkv, prefix_len + T, D], bits [T, W] or [B, T, W]
    -> out [B, T, Hq, D]. fp32 math, GQA by repeating K/V, a dense [T, S] boolean mask."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bits = ancestor_bits if ancestor_bits.dim() == 3 else ancestor_bits.unsqueeze(0)
    tree = ancestor_mask(bits, T)  # [B or 1, T, T]
    mask = torch.cat([torch.ones(tree.shape[0], T, prefix_len, dtype=torch.bool, device=q.device), tree], -1)
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.softmax(scores, -1) @ vf
    return out.transpose(1, 2).to(q.dtype)


def score_children(logits, top_values, top_indices, parent_logp, depth: int, k: int, w1, b1, w2, b2,
                   beta: float, log_p: bool):
    """Unfused reference of one C2T layer: full log-softmax, gather the top-M log-probs, entropy,
    children, features, MLP, sigmoid, threshold."""
    logp = torch.log_softmax(logits.float(), -1)
    top_lp = logp.gather(-1, top_indices)
    p = top_lp.exp()
    entropy = -torch.where(p > 0, p * top_lp, torch.zeros_like(p)).sum(-1)
    child_lp = parent_logp.float()[:, None] + top_lp[:, :k]
    feats = torch.stack([child_lp if log_p else child_lp.exp(), entropy[:, None].expand_as(child_lp),
                         torch.full_like(child_lp, float(depth))], -1)
    z = torch.relu(feats @ w1.float().T + b1.float()) @ w2.float().T + b2.float()
    conf = torch.sigmoid(z[..., 0])
    return conf, conf >= beta, top_indices[:, :k].clone(), child_lp, entropy


def skinny_linear(x, weight, bias=None):
    """``x [M, K] @ weight[N, K].T (+ bias [N])``, accumulated in float64, returned as float32."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def decode_attention(q, k, v, lengths, scale: float):
    """One query per sequence over its first ``lengths[b]`` cached keys: q ``[B, Hq, D]``, k/v
    ``[B, Hkv, C, D]`` (any of fp32/bf16/fp16; computed in fp32), lengths int64 ``[B]`` -> ``[B, Hq, D]``
    in q's dtype. Query head h reads KV head ``h // (Hq / Hkv)``."""
    B, Hq, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = k.float().repeat_interleave(G, dim=1)  # [B, Hq, C, D]
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhd,bhcd->bhc", q.float(), kf) * scale
    keep = torch.arange(C, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, C]
    s = s.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bhc,bhcd->bhd", torch.softmax(s, -1), vf).to(q.dtype)


def datastore_lookup(tokens, order, context, key_len: int, depth: int, max_nodes: int, min_match: int,
                     max_occurrences: int):
    """Brute-force reference of the datastore's lookup: tokens uint16 ``[N]`` (SEP = 65535 between documents),
    order int32 ``[N]`` (positions sorted by their first ``key_len`` tokens' bytes), context a list of ids ->
    int64 ``[3 + 3 * max_nodes]``: (match, occurrences, nodes), then tokens, parents, counts (``max_nodes``
    each; -1 / -1 / 0 past the tree). Every suffix length is tried from the longest down against every
    sorted position; the trie is a dict."""
    sep = 0xFFFF
    out = torch.full((3 + 3 * max_nodes,), -1, dtype=torch.int64)
    out[:3] = 0
    out[3 + 2 * max_nodes:] = 0
    ctx = list(context)[-key_len:]
    if any(t < 0 for t in ctx):
        raise ValueError("datastore_lookup: context holds a negative token id")
    corpus = tokens.to(torch.int64).tolist()
    N = len(corpus)
    if len(ctx) < min_match or any(t >= sep for t in ctx) or N == 0:
        return out
    pos = order.to(torch.int64).tolist()

    def text(p, m):
        return [corpus[p + j] if p + j < N else sep for j in range(m)]

    for m in range(len(ctx), min_match - 1, -1):
        hits = [i for i, p in enumerate(pos) if text(p, m) == ctx[len(ctx) - m:]]
        if hits:
            break
    else:
        return out
    a, n = hits[0], len(hits)
    assert hits == list(range(a, a + n)), "a query's matches are one range of a sorted index"
    picks = list(range(a, a + n)) if n <= max_occurrences else [a + (r * n) // max_occurrences
                                                                 for r in range(max_occurrences)]
    node, parent, token, count, level = {}, [], [], [], []
    for i in picks:
        at = -1
        for t in text(pos[i] + m, depth):
            if t == sep:
                break
            if (at, t) not in node:
                node[(at, t)] = len(token)
                parent.append(at), token.append(t), count.append(0), level.append(level[at] + 1 if at >= 0 else 1)
            at = node[(at, t)]
            count[at] += 1
    if not token:
        return out
    chosen = sorted(range(len(token)), key=lambda i: (-count[i], level[i], i))[:max_nodes]
    chosen.sort(key=lambda i: (level[i], -count[i], i))
    where = {i: j for j, i in enumerate(chosen)}
    for j, i in enumerate(chosen):
        out[3 + j], out[3 + 2 * max_nodes + j] = token[i], count[i]
        out[3 + max_nodes + j] = where[parent[i]] if parent[i] >= 0 else -1
    out[:3] = torch.tensor([m, n, len(chosen)])
    return out
