"""The per-step rule that sizes each tree by the measured cost (``cost.profile``).

``CostRule``: each step, after the strategy has grown its tree, every drafted node gets an estimate of
the probability that it is accepted (its whole path, that is). With C2T, the classifier's confidence
(a path-level score) mapped through an online calibration against what verification accepted (binned
counts with a prior at the raw score). With the other strategies, the product along the path of each
node's calibrated chance of acceptance given its parent's, from the draft's conditional probability
of the node (EAGLE-2's joint probability, calibrated factor by factor: a deep node's factors are
shallow nodes' scores, which verification keeps observing). n-gram nodes by their own per-depth rate.
The step verifies the m most probable nodes (closed under parents) for the m that maximises expected
tokens per second, (1 + sum of their probabilities) / (draft time + t_verify(1 + m)), m = 0 included.
When the best expected rate of a speculative step falls below a plain decoding step's (1 / t_verify(1)),
the engine runs plain steps (no draft call) for a while, then probes again. The probes are charged to
their own account: every speculative step's gain or loss against a plain step's measured time is
summed, and while the losses exceed ``loss_share`` (3%) of the time so far only plain steps run, so a
draft that never pays costs at most that share (and one step). With training-free sources beside the
draft, a step can also skip the draft call and verify the sources' tree alone: the rule keeps the realized
rate (emitted tokens per second) of each kind of step and, while the draft's steps emit more slowly than
the sources' alone, runs sources steps, probing the draft after 4, 8, ... of them (a head that does not pay
costs its probes, not every step); these rates outlive a generation, as the calibration does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels import ops
from ..drafts.sources import StepTree
from .profile import CostProfile


# score bins of the calibration: finer near 0 and 1, where most nodes are
_EDGES = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0 + 1e-6)


@dataclass
class Calibrator:
    """Online P(accepted | raw score) in score bins; each bin starts as ``prior`` pseudo-observations at
    its centre (the raw score taken at its word), then counts what verification accepted."""

    prior: float = 4.0
    accepted: list = field(default_factory=lambda: [0.0] * (len(_EDGES) - 1))
    seen: list = field(default_factory=lambda: [0.0] * (len(_EDGES) - 1))

    def _bins(self, scores: torch.Tensor) -> torch.Tensor:
        edges = torch.tensor(_EDGES, dtype=scores.dtype, device=scores.device)
        return (torch.bucketize(scores.clamp(0, 1), edges, right=True) - 1).clamp(0, len(_EDGES) - 2)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities of ``scores`` (float ``[n]`` in [0, 1], any device)."""
        b = self._bins(scores).cpu()
        centre = torch.tensor([(a + c) / 2 for a, c in zip(_EDGES, _EDGES[1:])]).clamp(max=1.0)
        acc, seen = torch.tensor(self.accepted), torch.tensor(self.seen)
        p = (acc + self.prior * centre) / (seen + self.prior)
        return p[b].to(scores.device, scores.dtype)

    def update(self, scores: torch.Tensor, accepted: torch.Tensor) -> None:
        b = self._bins(scores.float()).cpu().tolist()
        for i, a in zip(b, accepted.cpu().tolist()):
            self.seen[i] += 1
            self.accepted[i] += float(a)


@dataclass
class SizedTree:
    """A step's tree cut to the nodes that pay (``step``: what is verified, with each node's source) and, per
    verified node (root included), what the rule learns from once verification has decided: the draft's
    ``scores`` (path-level when ``path_scores``, C2T's confidence; else each node's probability given its
    parent), ``parents`` and ``depth``; ``rate``: the expected tokens per second the cut promised."""

    step: StepTree
    scores: torch.Tensor
    path_scores: bool
    parents: list
    depth: torch.Tensor
    rate: float


@dataclass
class CostRule:
    """Per-step tree sizing by measured cost (see the module doc). ``profile``: the target's
    ``CostProfile``; ``probe_every``: plain steps before the first probe after a losing speculative
    step (doubling while probes keep losing, up to ``max_plain``); ``draft_cost``: seconds charged for
    a step's drafting instead of the time it took (None: the measured time), for sizing that does not
    depend on the machine's load, as in tests or when comparing runs."""

    profile: CostProfile
    probe_every: int = 4
    max_plain: int = 32
    margin: float = 1.0  # a speculative step must promise margin x the plain rate
    path: Calibrator = field(default_factory=Calibrator)  # path-level scores (C2T's confidence)
    conditional: Calibrator = field(default_factory=Calibrator)  # P(node | parent accepted) from q(node | parent)
    ngram_hits: list = field(default_factory=list)  # per depth: [accepted, seen]
    sources: list = field(default_factory=list)  # per training-free source kind: its own Calibrator
    draft_cost: float | None = None
    # speculative steps may lose at most this share of the generation's time against plain steps: their
    # own account (what each gained or lost against a plain step's measured time) pays for the probes
    loss_share: float = 0.03

    def __post_init__(self):
        if self.probe_every < 1 or self.max_plain < self.probe_every or self.margin <= 0:
            raise ValueError("CostRule needs probe_every >= 1, max_plain >= probe_every and margin > 0")
        if not 0 <= self.loss_share < 1:
            raise ValueError(f"CostRule needs loss_share in [0, 1), got {self.loss_share!r}")
        if self.draft_cost is not None and not self.draft_cost >= 0:
            raise ValueError(f"CostRule needs draft_cost >= 0 or None, got {self.draft_cost!r}")
        self.reset()

    def reset(self) -> None:
        """Fresh per-generation state. Kept across generations: the calibration, and the realized rates of
        draft and sources steps with the draft's probing schedule; they are the draft's worth beside the
        free branches, not the prompt's, and a generation of 128 tokens is too short to learn them again
        (re-learning them made every prompt pay the draft's probes from the start)."""
        self.plain_left = 0
        self.wait = self.probe_every
        self.account = 0.0  # seconds speculative steps gained (+) or lost (-) against plain steps
        self.elapsed = 0.0  # seconds of every step so far
        self.plain_s = None  # a plain step's measured time (running mean), None before the first
        if not hasattr(self, "rate"):
            self.rate = {"draft": None, "sources": None}  # realized tokens/s of each kind of step (running mean)
            self.sources_left = 0  # sources steps before the draft's next probe
            self.draft_wait = self.probe_every

    def settle(self, step_s: float, emitted: int, plain: bool, verified: int = 1, mode: str | None = None,
               rows: int = 1) -> None:
        """A step took ``step_s`` seconds, verified ``verified`` tree tokens and emitted ``emitted``: the
        account and the plain step's measured time follow. With ``draft_cost`` set, the step is charged
        what the profile says it costs instead (machine-independent, like the sizing; a sources step is
        charged no drafting). ``mode``: the step's kind (``step_mode``), whose realized rate decides
        between draft and sources steps. ``rows``: sequences in the step (a batch's pass); a plain step then
        emits one token per row, and the plain step's time is kept per emitted token."""
        if self.draft_cost is not None:
            drafting = self.draft_cost if mode != "sources" else 0.0
            step_s = self.profile.verify(rows) if plain else drafting + self.profile.verify(verified)
        if mode in self.rate and step_s > 0:  # an empty tree too: that is what such steps delivered
            old, r = self.rate[mode], emitted / step_s
            self.rate[mode] = r if old is None else 0.7 * old + 0.3 * r
            if mode == "draft" and self.rate["sources"] is not None:
                if self.rate["draft"] < self.rate["sources"]:  # the draft's steps lose to the free branches
                    self.sources_left = self.draft_wait
                    self.draft_wait = min(2 * self.draft_wait, self.max_plain)
                else:
                    self.draft_wait = self.probe_every
        self.elapsed += step_s
        if plain:
            per = step_s / rows
            self.plain_s = per if self.plain_s is None else 0.8 * self.plain_s + 0.2 * per
        else:
            plain_s = self.plain_s if self.plain_s is not None else self.profile.verify(rows) / rows
            self.account += emitted * plain_s - step_s

    def in_debt(self) -> bool:
        """Whether speculative steps have lost more than ``loss_share`` of the time so far (then only plain
        steps run, until the time that has passed pays for the next probe)."""
        return self.account < -self.loss_share * self.elapsed

    @property
    def plain_rate(self) -> float:
        return self.plain_rate_of(1)

    def plain_rate_of(self, rows: int) -> float:
        """Tokens per second of a plain step over ``rows`` sequences."""
        return rows / self.profile.verify(rows)

    def ngram_p(self, depth: torch.Tensor) -> torch.Tensor:
        """Acceptance estimate of n-gram nodes at these depths (prior: 0.5 at depth 1, x0.8 per level)."""
        out = []
        for d in depth.tolist():
            acc, seen = self.ngram_hits[d] if d < len(self.ngram_hits) else (0.0, 0.0)
            prior = 0.5 * 0.8 ** max(d - 1, 0)
            out.append((acc + 4 * prior) / (seen + 4))
        return torch.tensor(out, dtype=torch.float32, device=depth.device)

    def choose(self, probs: torch.Tensor, draft_s: float) -> tuple[int, float]:
        """(m, expected tokens/s): verify the m most probable nodes (``probs [n]``, the drafted nodes'
        calibrated acceptance, root excluded); ``draft_s``: this step's drafting time (``draft_cost``
        replaces it when set)."""
        if self.draft_cost is not None:
            draft_s = self.draft_cost
        p = torch.sort(probs.float().cpu(), descending=True).values
        gain = torch.cat([torch.zeros(1), torch.cumsum(p, 0)]) + 1.0
        cost = torch.tensor([draft_s + self.profile.verify(1 + m) for m in range(p.numel() + 1)])
        rate = gain / cost
        m = int(rate.argmax())
        return m, float(rate[m])

    def after_step(self, expected_rate: float, rows: int = 1) -> None:
        """A speculative step promised ``expected_rate``: go plain for a while when it loses to plain decoding."""
        if expected_rate < self.margin * self.plain_rate_of(rows):
            self.plain_left = self.wait
            self.wait = min(2 * self.wait, self.max_plain)
        else:
            self.wait = self.probe_every

    def take_plain_step(self) -> bool:
        """Whether the next step runs without the draft (``step_mode`` with no training-free sources)."""
        return self.step_mode(True, False) != "draft"

    def step_mode(self, draft: bool, sources: bool) -> str:
        """The next step's kind: "draft" (the draft grows a tree, the sources join it), "sources" (no draft
        call: the training-free sources' tree alone, sized like any other) or "plain". The draft's own
        backoff (``after_step``) turns draft steps into sources steps, not into plain ones: a head that does
        not pay leaves the free branches in place, and so does a draft whose steps emit more slowly than the
        sources' alone (``settle``); the account (``in_debt``) stops all speculation."""
        if self.in_debt():
            return "plain"
        if self.plain_left > 0 or not draft:
            self.plain_left = max(self.plain_left - 1, 0) if draft else self.plain_left
            return "sources" if sources else "plain"
        if sources and self.rate["draft"] is not None and self.rate["sources"] is None:
            return "sources"  # one step of the free branches alone, so the two kinds can be compared
        if sources and self.sources_left > 0:
            self.sources_left -= 1
            return "sources"
        return "draft"

    def estimate(self, scores: torch.Tensor, path_scores: bool, parents: list, source: torch.Tensor,
                 source_score: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Acceptance probability of every node's path (``[n]``, root 1), never above its parent's.
        ``scores``: the draft's path-level scores when ``path_scores`` (C2T), else each node's conditional
        draft probability given its parent. ``source`` (``decoding.sources``: 0 the draft, 1 n-gram, 2
        datastore, 3 recycling) and ``source_score`` (a training-free node's own estimate given its parent):
        n-gram nodes by their per-depth rate, datastore and recycling nodes by their score, calibrated per
        source, times the parent's."""
        draft_p = (self.path if path_scores else self.conditional)(scores).tolist()
        ngram_p = self.ngram_p(depth).tolist()
        own_p = {k: self._source_calibrator(k)(source_score).tolist() for k in set(source.tolist()) - {0, 1}}
        src = source.tolist()
        p = [1.0] * len(parents)
        for i in range(1, len(parents)):  # topological order
            up = p[parents[i]]
            if src[i] == 1:
                p[i] = min(ngram_p[i], up)
            elif src[i] > 1:
                p[i] = own_p[src[i]][i] * up
            elif path_scores:
                p[i] = min(draft_p[i], up)
            else:
                p[i] = draft_p[i] * up
        return torch.tensor(p)

    def _source_calibrator(self, kind: int) -> Calibrator:
        while len(self.sources) <= kind:
            self.sources.append(Calibrator())
        return self.sources[kind]

    def _estimated(self, st: StepTree, path_scores: torch.Tensor | None) -> tuple:
        """(acceptance estimate of every node ``[n]``, the draft's scores, depth, parents) of a step tree."""
        tree = st.tree
        n = tree.tokens.numel()
        parents = tree.parents.tolist()
        depth = ops.build_tree(tree.parents.cpu()).depth.long()
        if path_scores is not None:
            scores = torch.cat([path_scores.float().cpu(), torch.zeros(n - path_scores.numel())])
        else:  # the draft's probability of each node given its parent
            logp = tree.logp.float().cpu()
            scores = (logp - logp[torch.tensor([max(q, 0) for q in parents])]).exp()
            scores[0] = 1.0
        return self.estimate(scores, path_scores is not None, parents, st.source, st.score, depth), scores, depth, parents

    @staticmethod
    def _cut(st: StepTree, estimated: tuple, keep: int, path_scores: bool, rate: float) -> SizedTree:
        """``st`` cut to its ``keep`` most probable nodes after the root (closed under parents)."""
        p, scores, depth, parents = estimated
        tree = st.tree
        if keep < tree.tokens.numel() - 1:
            scored = ops.Tree(tree.tokens, tree.parents, p.clamp(min=1e-30).log().to(tree.logp.device))
            sub, sel = ops.rerank_tree(scored, keep + 1)
            sel = sel.cpu()
            st = StepTree(ops.Tree(sub.tokens, sub.parents, tree.logp[sel.to(tree.logp.device)]), st.source[sel],
                          st.score[sel], st.added)
            scores, depth, parents = scores[sel], depth[sel], st.tree.parents.tolist()
        return SizedTree(st, scores, path_scores, parents, depth, rate)

    def size(self, st: StepTree, path_scores: torch.Tensor | None, draft_s: float, backoff: bool = True) -> SizedTree:
        """This step's tree cut to what pays. ``path_scores``: the draft's path-level scores of its nodes
        (C2T's classifier; they come first in ``st``), None to use the draft's probabilities (``st``'s joint
        log-probabilities). ``draft_s``: the seconds drafting took. ``backoff``: a draft step's promised rate
        decides the draft's next steps (``after_step``)."""
        est = self._estimated(st, path_scores)
        keep, rate = self.choose(est[0][1:], draft_s)
        if backoff:
            self.after_step(rate)
        return self._cut(st, est, keep, path_scores is not None, rate)

    def size_batch(self, sts: list, path_scores: list, draft_s: float, backoff: bool = True) -> list:
        """A batch's trees (one ``StepTree`` per sequence, verified together in one pass of ``b x T`` tokens,
        every tree padded to the longest) cut to a common T: the T that maximises the batch's expected tokens
        per second, (b + sum over rows of their T - 1 most probable nodes) / (draft_s + t_verify(b * T)),
        T = 1 (every row a plain step) included. The pass's cost is the profile's at b * T tokens: its GEMMs
        multiply b * T rows by each weight once, as one sequence's T * b tree tokens would."""
        b = len(sts)
        ests = [self._estimated(st, ps) for st, ps in zip(sts, path_scores)]
        if self.draft_cost is not None:
            draft_s = self.draft_cost
        longest = max(e[0].numel() for e in ests)
        gain = torch.full((longest,), float(b))  # gain[m]: expected tokens with m nodes after each root
        for e in ests:
            p = torch.sort(e[0][1:].float(), descending=True).values
            c = torch.cumsum(p, 0)
            gain[1:1 + c.numel()] += c
            gain[1 + c.numel():] += c[-1] if c.numel() else 0.0
        cost = torch.tensor([draft_s + self.profile.verify(b * (1 + m)) for m in range(longest)])
        rate = gain / cost
        m = int(rate.argmax())
        if backoff:
            self.after_step(float(rate[m]), rows=b)
        return [self._cut(st, e, m, ps is not None, float(rate[m])) for st, e, ps in zip(sts, ests, path_scores)]

    def learn(self, sized: SizedTree, path: torch.Tensor) -> None:
        """Verification accepted ``path`` (node indices of ``sized.step``, root first): calibrate on it."""
        accepted = torch.zeros(sized.step.tree.tokens.numel(), dtype=torch.bool)
        accepted[path.cpu()] = True
        scores, parents, source, source_score, depth = (sized.scores, sized.parents, sized.step.source,
                                                        sized.step.score, sized.depth)
        acc = accepted.tolist()
        parent_ok = torch.tensor([False] + [acc[q] for q in parents[1:]])
        draft = source == 0
        draft[0] = False
        if sized.path_scores:
            self.path.update(scores[draft], accepted[draft])
        else:  # a node's conditional chance is observed only where its parent was accepted
            seen = draft & parent_ok
            self.conditional.update(scores[seen], accepted[seen])
        for kind in set(source.tolist()) - {0, 1}:
            seen = (source == kind) & parent_ok
            self._source_calibrator(kind).update(source_score[seen], accepted[seen])
        ng = source == 1
        for d, a in zip(depth[ng].tolist(), accepted[ng].tolist()):
            while len(self.ngram_hits) <= d:
                self.ngram_hits.append([0.0, 0.0])
            self.ngram_hits[d][0] += float(a)
            self.ngram_hits[d][1] += 1
