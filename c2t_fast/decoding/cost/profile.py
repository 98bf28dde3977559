"""What verification costs on this machine: ``CostProfile``, the target's tree-verification pass timed
for T = 1..64 tree tokens after a context (medians of interleaved rounds), measured once per machine,
model, dtype, device and thread count in a few seconds and cached as JSON under
``~/.cache/c2t_fast/cost_profiles`` (``C2T_FAST_CACHE`` moves the root, ``C2T_FAST_COST_DIR`` the folder
itself; ``refresh=True`` measures again). The rule that spends it is ``cost.rule``."""


from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass

import torch

from ...hf.shipped import cache_root
from ...kernels import ops

LENGTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hardware(dev: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count torch uses."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_name()} x{torch.get_num_threads()}"


def profile_key(model, device: torch.device) -> str:
    """What the costs depend on: the model's config, dtype, device (and which GPU or CPU), threads,
    torch version, and whether its linear layers run through the skinny kernel."""
    from ...hf.adapter import text_config
    from ...kernels.skinny_linear import fast_linear_installed

    cfg = text_config(model).to_dict() if hasattr(text_config(model), "to_dict") else vars(text_config(model))
    dtype = str(next(model.parameters()).dtype)
    dev = torch.device(device)
    blob = json.dumps({"config": cfg, "dtype": dtype, "device": dev.type, "hw": _hardware(dev),
                       "torch": torch.__version__, "linear": "skinny" if fast_linear_installed(model) else "torch"},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CostProfile:
    """Seconds of one verification pass over T tree tokens, ``verify_s[i]`` for ``lengths[i]``."""

    lengths: list
    verify_s: list
    context: int = 128
    hardware: str = ""
    measured_at: str = ""
    key: str = ""

    def __post_init__(self):
        if (len(self.lengths) != len(self.verify_s) or not self.lengths or self.lengths[0] != 1
                or any(b <= a for a, b in zip(self.lengths, self.lengths[1:]))
                or any(not (isinstance(s, (int, float)) and s > 0) for s in self.verify_s)):
            raise ValueError("CostProfile needs increasing lengths starting at 1 and a positive time for each")
        # more tokens never cost less: a noisy machine can measure T = 24 below T = 16, and the rule must
        # not buy nodes on that noise (computed once: verify() runs per candidate node every step)
        self._envelope = list(itertools.accumulate(self.verify_s, max))

    def verify(self, T: int) -> float:
        """t_verify(T): linear between measured lengths, extended past the last one by its slope, over
        the running maximum of the measurements."""
        L, S = self.lengths, self._envelope
        if T <= 1:
            return S[0]
        for i in range(1, len(L)):
            if T <= L[i]:
                return S[i - 1] + (S[i] - S[i - 1]) * (T - L[i - 1]) / (L[i] - L[i - 1])
        slope = (S[-1] - S[-2]) / (L[-1] - L[-2]) if len(L) > 1 else 0.0
        return S[-1] + max(slope, 0.0) * (T - L[-1])

    def table(self) -> list[tuple[int, float, float]]:
        """(T, seconds, ratio to T = 1) per measured length."""
        return [(t, s, s / self.verify_s[0]) for t, s in zip(self.lengths, self.verify_s)]


def measure_costs(target, lengths=LENGTHS, context: int = 128, repeats: int = 5) -> CostProfile:
    """Time the patched target's verification pass (tree bits, LM head and argmax included) over a
    chain of T tokens after ``context`` tokens; T = 1 as a plain decoding step runs (no tree bits). The
    lengths are timed in interleaved rounds (every T once per round, ``repeats`` rounds after a warm-up
    round), so a drifting machine shifts every T alike; the median per T."""
    from ...hf.adapter import TargetAdapter, crop_cache
    from ...hf.attention import patch

    patch(target)
    adapter = TargetAdapter(target)
    dev = adapter.device
    V = adapter.lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (context,), generator=gen).to(dev)
    cache = adapter.new_cache()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    trees = {T: ops.build_tree(torch.arange(-1, T - 1, dtype=torch.int32, device=dev), context) for T in lengths}
    toks = {T: torch.randint(0, V, (T,), generator=gen).to(dev) for T in lengths}
    times = {T: [] for T in lengths}
    with torch.no_grad():
        adapter.forward(ids, cache)
        for r in range(repeats + 1):
            for T in lengths:
                b = trees[T]
                sync()
                t0 = time.perf_counter()
                if T == 1:  # what a plain step runs: the model's own causal path
                    _, logits = adapter.forward(toks[T], cache)
                else:
                    _, logits = adapter.forward(toks[T], cache, b.position_ids, b.ancestor_bits)
                logits.max(-1).indices.cpu()
                sync()
                if r:  # the first round warms up
                    times[T].append(time.perf_counter() - t0)
                crop_cache(cache, context)
    out = [sorted(times[T])[len(times[T]) // 2] for T in lengths]
    return CostProfile(list(lengths), out, context, _hardware(dev), time.strftime("%Y-%m-%d %H:%M:%S"),
                       profile_key(target, dev))


def _cache_path(target) -> str:
    from ...hf.adapter import device_of

    key = profile_key(target, device_of(target))
    return os.path.join(os.environ.get("C2T_FAST_COST_DIR") or os.path.join(cache_root(), "cost_profiles"),
                        f"{key}.json")


def cached_costs(target) -> CostProfile | None:
    """The target's cached cost profile on its device, or None (none yet, or a damaged file)."""
    path = _cache_path(target)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return CostProfile(**json.load(f))
    except (ValueError, TypeError):
        return None  # a damaged file is measured again


def load_costs(target, refresh: bool = False, progress: bool = True) -> CostProfile:
    """The target's cost profile on its device: the cached one, or measured now (and cached)."""
    if not refresh:
        prof = cached_costs(target)
        if prof is not None:
            return prof
    if progress:
        print("measuring the target's verification cost on this machine (once; cached)...", flush=True)
    prof = measure_costs(target)
    path = _cache_path(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # two first runs at once each write their own
    with open(tmp, "w") as f:
        json.dump(asdict(prof), f, indent=2)
    os.replace(tmp, path)
    return prof
