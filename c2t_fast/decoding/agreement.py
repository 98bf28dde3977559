"""Decisions a tensor-parallel target's ranks must take together.

Every rank of a tensor-parallel target runs the whole engine: the same draft, the same tree ops, and the
target's forward, whose collectives pair the ranks' calls one to one. Whatever a rank decides from its
own clock or its own randomness can differ between ranks -- the cost profile (measured or cached), each
step's drafting and step time (which size the tree and pick plain steps), ``seed=None`` -- and a
different tree on one rank makes the next collective hang or mix shapes. ``RankAgreement`` takes those
decisions on rank 0 and shares them; everything else (the draft, n-gram / datastore / recycling
lookups, the acceptance, seeded sampling) is a function of identical inputs and agrees by itself.

The same collectives carry failure: each agreement point is an all-gather of (status, values); a rank
that failed in its own part of a step (drafting, sizing, bookkeeping, bad input) joins it with its
status set, and every rank raises ``RankFailure``. A rank that died or stopped answering makes the
others raise within ``timeout_s``. A failure inside the target's forward is the process group's: its
own collectives time out after the group's ``timeout`` (``init_process_group(timeout=...)``).

``Agreement`` is the single-process case: nothing to share, no collective.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import timedelta

import torch


class RankFailure(RuntimeError):
    """Another rank failed, left, or runs a different generation."""


class Agreement:
    """One process: its own decisions stand (no collective)."""

    world = 1
    rank = 0

    def check_same(self, what: str, value) -> None:
        """Every rank runs the same ``value`` (JSON-able) -- trivially true here."""

    def share(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank."""
        return list(values)

    def fail(self, err: BaseException) -> None:
        """This rank failed at an agreement point: tell the others (nothing to tell here)."""

    def seed(self, seed: int | None) -> int | None:
        """The seed every rank samples with (``None``: fresh randomness, rank 0's)."""
        return seed

    def costs(self, target, load):
        """The cost profile every rank sizes trees with: ``load(target)`` here."""
        return load(target)


def tensor_parallel_group(model):
    """The process group of a model whose parameters are DTensors over a mesh of several ranks (transformers'
    ``tp_plan``), else None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh.size() > 1:
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else mesh.get_group(0)
    return None


class RankAgreement(Agreement):
    """Rank 0 decides for ``group`` (a tensor-parallel target's ranks). ``timeout_s``: how long an agreement
    point waits for the other ranks before it raises."""

    _WIDTH = 8  # values per agreement point beyond the status (more are split over several points)

    def __init__(self, group=None, timeout_s: float = 120.0):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("RankAgreement needs an initialised torch.distributed process group")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.dist, self.group, self.timeout_s = dist, group, float(timeout_s)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def _gather(self, status: float, values: list[float]) -> list[list[float]]:
        """All ranks' (status, values) at one agreement point; raises ``RankFailure`` where any rank failed."""
        if len(values) > self._WIDTH:
            raise ValueError(f"at most {self._WIDTH} values per agreement point")
        mine = torch.zeros(1 + self._WIDTH, dtype=torch.float64, device=self.device)
        mine[0] = status
        if values:
            mine[1:1 + len(values)] = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            work = self.dist.all_gather(out, mine, group=self.group, async_op=True)
            if not work.wait(timeout=timedelta(seconds=self.timeout_s)):
                raise RankFailure(f"rank {self.rank}: the other ranks did not reach the agreement point within "
                                  f"{self.timeout_s:g} s")
        except RankFailure:
            raise
        except RuntimeError as err:  # gloo/nccl: a peer closed its connection or the wait timed out
            raise RankFailure(f"rank {self.rank}: another rank left or stopped answering ({err})") from err
        rows = [t.tolist() for t in out]
        bad = [r for r, row in enumerate(rows) if row[0] != 0 and r != self.rank]
        if bad:
            raise RankFailure(f"rank {self.rank}: rank(s) {bad} failed; see their error")
        return [row[1:1 + len(values)] for row in rows]

    def check_same(self, what: str, value) -> None:
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
        words = [float(int.from_bytes(digest[i:i + 4], "little")) for i in range(0, 24, 4)]  # exact in float64
        rows = self._gather(0.0, words)
        differ = [r for r, row in enumerate(rows) if row != rows[0]]
        if differ:
            raise RankFailure(f"rank {self.rank}: rank(s) {differ} run a different {what} than rank 0; every rank "
                              "of a tensor-parallel target must generate the same thing")

    def share(self, values: list[float]) -> list[float]:
        out = []
        for i in range(0, max(len(values), 1), self._WIDTH):
            out += self._gather(0.0, list(values[i:i + self._WIDTH]))[0]
        return out[:len(values)]

    def fail(self, err: BaseException) -> None:
        if isinstance(err, RankFailure):
            return  # the others know already (or told us)
        try:
            self._gather(1.0, [])
        except RankFailure:
            pass  # the point is to raise err on this rank and RankFailure on the others

    def seed(self, seed: int | None) -> int | None:
        if seed is not None:
            return seed
        return int(self.share([float(random.SystemRandom().getrandbits(52))])[0])

    def costs(self, target, load):
        """Rank 0's profile: where its cache has one, rank 0 loads it and the others take its numbers; else
        every rank measures (the measurement's forwards are collectives: all ranks run them) and rank 0's
        numbers stand."""
        from .cost.profile import CostProfile, cached_costs, measure_costs

        lead = self.rank == 0
        cached = cached_costs(target) if lead else None
        if self.share([1.0 if cached is not None else 0.0])[0]:
            prof = cached  # None off rank 0: it takes rank 0's numbers below
        else:
            prof = load(target, refresh=True) if lead else measure_costs(target)
        n, context = (int(x) for x in self.share([len(prof.lengths), prof.context] if lead else [0.0, 0.0]))
        lengths = [int(x) for x in self.share([float(x) for x in prof.lengths] if lead else [0.0] * n)]
        verify_s = self.share(list(prof.verify_s) if lead else [0.0] * n)
        if lead:
            return prof
        return CostProfile(lengths, verify_s, context, hardware="rank 0's", key=prof.key if prof is not None else "")


def agreement_for(target, agreement=None) -> Agreement:
    """``agreement`` as given, else a ``RankAgreement`` over the target's tensor-parallel group when it has one,
    else the single-process ``Agreement``."""
    if agreement is not None:
        if not isinstance(agreement, Agreement):
            raise TypeError(f"agreement must be a c2t_fast.decoding.agreement.Agreement, got {type(agreement).__name__}")
        return agreement
    group = tensor_parallel_group(target)
    return RankAgreement(group) if group is not None else Agreement()
