"""What a speculative run measured: accepted tokens and verified tokens per step, and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Metrics:
    """tau: accepted draft tokens per step (bonus excluded); gamma: draft tokens verified (root excluded)."""

    steps: int = 0
    accepted: list = field(default_factory=list)
    draft_tokens: list = field(default_factory=list)
    new_tokens: int = 0
    ngram_nodes: int = 0  # tree nodes added by n-gram lookup (included in draft_tokens)
    source_nodes: dict = field(default_factory=dict)  # tree nodes each training-free source added (by name)
    source_accepted: dict = field(default_factory=dict)  # accepted nodes by source (the draft's as "head")
    plain_steps: int = 0  # steps the cost rule ran as plain decoding (no draft call)
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    total_time: float = 0.0
    baseline_time: float | None = None  # plain autoregressive decoding of the same tokens

    @property
    def tau(self) -> float:
        return sum(self.accepted) / max(1, self.steps)

    @property
    def gamma(self) -> int:
        return sum(self.draft_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_time if self.total_time else 0.0

    @property
    def speedup(self) -> float | None:
        return self.baseline_time / self.total_time if self.baseline_time and self.total_time else None

    def add(self, other: "Metrics") -> "Metrics":
        """Accumulate ``other`` (another generation's measurements) into this one: a benchmark row over many
        prompts is one ``Metrics``. Returns self."""
        self.steps += other.steps
        self.accepted += other.accepted
        self.draft_tokens += other.draft_tokens
        self.new_tokens += other.new_tokens
        self.ngram_nodes += other.ngram_nodes
        for mine, theirs in ((self.source_nodes, other.source_nodes), (self.source_accepted, other.source_accepted)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.plain_steps += other.plain_steps
        self.prefill_time += other.prefill_time
        self.draft_time += other.draft_time
        self.verify_time += other.verify_time
        self.total_time += other.total_time
        if other.baseline_time is not None:
            self.baseline_time = (self.baseline_time or 0.0) + other.baseline_time
        return self

    def summary(self) -> dict:
        return {"steps": self.steps, "tau": round(self.tau, 4), "gamma": self.gamma,
                "gamma_per_step": round(self.gamma / max(1, self.steps), 2), "new_tokens": self.new_tokens,
                "ngram_nodes": self.ngram_nodes, "source_nodes": dict(self.source_nodes),
                "source_accepted": dict(self.source_accepted), "plain_steps": self.plain_steps,
                "draft_time_s": round(self.draft_time, 4), "verify_time_s": round(self.verify_time, 4),
                "total_time_s": round(self.total_time, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "baseline_time_s": None if self.baseline_time is None else round(self.baseline_time, 4),
                "speedup": None if self.speedup is None else round(self.speedup, 3)}


@dataclass
class Generation:
    tokens: list[int]
    metrics: Metrics
