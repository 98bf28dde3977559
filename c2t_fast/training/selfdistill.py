"""A self-distilled data set grown by the generator (``training.generator``) across sessions: the store
(token-id shards meant for git, features on local disk), the resumable run that grows it, and reading
it back for training.

``generate_data(target, tokenizer, out_dir, config, reply_tokens=N)`` continues the data set in
``out_dir`` until it holds N reply tokens (or the job list ends, or ``time_limit_s`` passes), committing
whole jobs in order; run it again with a larger N in the next session. The job list is fixed by the
config: the held-out ShareGPT conversations first (greedy), then the training conversations with one
Magpie job after every ``magpie_every`` of them. The Magpie prompts are synthesised first (phase 1,
their own resumable file) when ``magpie_prompts`` > 0.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch

from ..decoding.cost import cpu_name
from ..hf import adapter as hf
from ..hf.static_batch import StaticBatchLM
from .feature_store import FeatureStore, write_json
from .generator import Finished, GeneratorConfig, SlotScheduler
from .prompts import Job, PromptFilter, interleave, sharegpt_jobs

FORMAT = "c2t-selfdistill"


def default_features_dir(out_dir: str) -> str:
    from ..hf.shipped import cache_root

    return os.path.join(cache_root(), "features", os.path.basename(os.path.abspath(out_dir)))


def _config_dict(cfg: GeneratorConfig) -> dict:
    d = asdict(cfg)
    d["temperatures"] = list(d["temperatures"])
    return d


class DataStore:
    """The committed part of a data set: ``meta.json`` and ``shard_XXXXX/{tokens.bin, index.jsonl}``. Jobs
    are appended to their shard (job number // ``shard_jobs``) as they finish; ``meta["shards"]`` records
    how many jobs and tokens each shard's files hold (anything past that is an interrupted write, cut
    back on opening) and whether it is sealed (complete and rewritten in job order)."""

    def __init__(self, out_dir: str, cfg: GeneratorConfig, vocab: int, create: bool = True):
        self.dir, self.cfg = out_dir, cfg
        self.dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<i4")
        self.meta_file = os.path.join(out_dir, "meta.json")
        self.meta = {"format": FORMAT, "version": 2, "dtype": self.dtype.str, "config": _config_dict(cfg),
                     "jobs": 0, "tokens": 0, "reply_tokens": 0, "heldout_reply_tokens": 0, "shards": {},
                     "generate_s": 0.0, "sessions": []}
        if os.path.isfile(self.meta_file):
            with open(self.meta_file) as f:
                old = json.load(f)
            if (old.get("format") != FORMAT or old.get("version") != 2 or old.get("config") != _config_dict(cfg)
                    or old.get("dtype") != self.dtype.str):
                raise ValueError(f"{out_dir} holds a data set with other settings ({old.get('config')}) or format "
                                 f"(version {old.get('version')}); continue it with the same settings or use a new "
                                 "directory")
            self.meta = old
        elif create:
            os.makedirs(out_dir, exist_ok=True)
        self._cut_back()

    def shard_of(self, job_number: int) -> tuple[int, int]:
        return divmod(job_number, self.cfg.shard_jobs)

    def _paths(self, shard: int) -> tuple[str, str]:
        d = os.path.join(self.dir, f"shard_{shard:05d}")
        return os.path.join(d, "tokens.bin"), os.path.join(d, "index.jsonl")

    def shard(self, shard: int) -> dict:
        return self.meta["shards"].setdefault(str(shard), {"jobs": 0, "tokens": 0, "sealed": False})

    def _cut_back(self) -> None:
        """Every shard's files back to what the meta records (a run interrupted between a write and the meta),
        and an interrupted seal finished or undone (``seal``'s directory swap)."""
        names = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
        for name in names:
            path = os.path.join(self.dir, name)
            if name.endswith(".new"):
                final = path[:-len(".new")]
                if os.path.isdir(final):
                    shutil.rmtree(path)  # the seal had not swapped yet: the unsealed shard stands
                else:
                    os.replace(path, final)  # swapped halfway: the sealed copy is complete
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            if name.endswith(".old"):
                shutil.rmtree(os.path.join(self.dir, name))
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            if not name.startswith("shard_"):
                continue
            if os.path.isfile(os.path.join(self.dir, name, "SEALED")):
                self.shard(int(name[len("shard_"):]))["sealed"] = True
                continue
            info = self.meta["shards"].get(str(int(name[len("shard_"):])), {"jobs": 0, "tokens": 0})
            tokens, index = self._paths(int(name[len("shard_"):]))
            if os.path.isfile(tokens):
                with open(tokens, "r+b") as f:
                    f.truncate(info["tokens"] * self.dtype.itemsize)
            if os.path.isfile(index):
                with open(index) as f:
                    lines = f.readlines()
                if len(lines) > info["jobs"]:
                    with open(index, "w") as f:
                        f.writelines(lines[:info["jobs"]])

    def committed(self) -> set:
        """The numbers of every committed job."""
        done = set()
        for key, info in self.meta["shards"].items():
            if info["sealed"]:
                k = int(key)
                done.update(range(k * self.cfg.shard_jobs, k * self.cfg.shard_jobs + info["jobs"]))
            elif info["jobs"]:
                with open(self._paths(int(key))[1]) as f:
                    done.update(json.loads(x)["job"] for _, x in zip(range(info["jobs"]), f))
        return done

    def commit(self, fin: Finished) -> tuple[int, dict]:
        """Append a finished job to its shard; returns (shard, the shard's counts before it)."""
        shard, _ = self.shard_of(fin.number)
        info = self.shard(shard)
        if info["sealed"]:
            raise ValueError(f"job {fin.number}: shard {shard} is sealed")
        before = dict(info)
        tokens, index = self._paths(shard)
        os.makedirs(os.path.dirname(tokens), exist_ok=True)
        with open(tokens, "ab") as f:
            f.write(fin.tokens.astype(self.dtype).tobytes())
        row = {"job": fin.number, "kind": fin.job.kind, "source_id": fin.job.source_id, "split": fin.job.split,
               "offset": info["tokens"], "length": int(fin.tokens.size), "replies": fin.spans}
        if fin.skipped:
            row["skipped"] = fin.skipped
        with open(index, "a") as f:
            f.write(json.dumps(row) + "\n")
        reply = sum(b - a for a, b, _ in fin.spans) if fin.job.kind != "magpie_prompt" else 0
        m = self.meta
        m["jobs"] += 1
        m["tokens"] += int(fin.tokens.size)
        info["jobs"] += 1
        info["tokens"] += int(fin.tokens.size)
        m["reply_tokens" if fin.job.split == "train" else "heldout_reply_tokens"] += reply
        return shard, before

    def seal_order(self, shard: int, total_jobs: int) -> list | None:
        """When the shard holds all its jobs (of ``total_jobs`` in the list): the permutation that puts its
        jobs in number order (old position of each new position), else None."""
        info = self.shard(shard)
        expected = min(self.cfg.shard_jobs, total_jobs - shard * self.cfg.shard_jobs)
        if info["sealed"] or info["jobs"] < expected:
            return None
        with open(self._paths(shard)[1]) as f:
            rows = [json.loads(x) for x in f]
        return sorted(range(len(rows)), key=lambda i: rows[i]["job"])

    def seal(self, shard: int, order: list) -> None:
        """Rewrite the shard in job order (``seal_order``): written whole into ``shard_X.new`` (with a
        ``SEALED`` mark), then swapped in; an interruption anywhere leaves the unsealed or the sealed shard
        (``_cut_back`` finishes or undoes the swap)."""
        tokens, index = self._paths(shard)
        with open(index) as f:
            rows = [json.loads(x) for x in f]
        data = np.fromfile(tokens, dtype=self.dtype)
        parts, new_rows, offset = [], [], 0
        for i in order:
            r = rows[i]
            parts.append(data[r["offset"]:r["offset"] + r["length"]])
            new_rows.append({**r, "offset": offset})
            offset += r["length"]
        final = os.path.dirname(tokens)
        new, old = final + ".new", final + ".old"
        shutil.rmtree(new, ignore_errors=True)
        os.makedirs(new)
        with open(os.path.join(new, "tokens.bin"), "wb") as f:
            f.write(np.concatenate(parts).astype(self.dtype).tobytes() if parts else b"")
        with open(os.path.join(new, "index.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new_rows))
        open(os.path.join(new, "SEALED"), "w").close()
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)
        self.shard(shard)["sealed"] = True

    def flush(self) -> None:
        write_json(self.meta_file, self.meta)


def _magpie_prompts(lm, tok, out_dir: str, cfg: GeneratorConfig, progress: bool) -> list[str]:
    """Phase 1: the kept Magpie prompts, in rank order (synthesising the missing ones first). The file
    takes the prompts as they finish; the filter then runs over them in rank order, so the kept set is
    the same whatever the order they finished in (the file is rewritten in rank order with the verdicts)."""
    from tqdm.auto import tqdm

    path = os.path.join(out_dir, "magpie_prompts.jsonl")
    rows = {}
    if os.path.isfile(path):
        with open(path) as f:
            for x in f:
                if x.strip():
                    r = json.loads(x)
                    if r["rank"] < cfg.magpie_prompts:
                        # "ended": whether the user turn closed (older files say so through the reason)
                        rows[r["rank"]] = {"rank": r["rank"], "text": r["text"],
                                           "ended": r.get("ended", r.get("reason") != "unfinished")}
    todo = [(i, Job("magpie_prompt", i)) for i in range(cfg.magpie_prompts) if i not in rows]
    if todo:
        sched = SlotScheduler(lm, tok, cfg, capture=False)
        bar = tqdm(total=cfg.magpie_prompts, initial=len(rows), desc="synthesising Magpie prompts", disable=not progress)
        with open(path, "a") as f:
            for fin in sched.run(todo):
                a, b, _ = fin.spans[0]
                body = [t for t in fin.tokens[a:b].tolist() if t not in sched.stops]
                row = {"rank": fin.number, "text": tok.decode(body).strip(), "ended": bool(fin.tokens[b - 1] in sched.stops)}
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows[row["rank"]] = row
                bar.update(1)
        bar.close()
    filt = PromptFilter()
    out = []
    for r in (rows[i] for i in range(cfg.magpie_prompts)):
        reason = filt.verdict(r["text"]) if r["ended"] else "unfinished"
        r["kept"] = reason is None
        r.pop("reason", None)
        if reason:
            r["reason"] = reason
        if reason is None:
            out.append(r["text"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(rows[i]) + "\n" for i in range(cfg.magpie_prompts)))
    os.replace(tmp, path)
    return out


def job_list(lm, tok, out_dir: str, cfg: GeneratorConfig, progress: bool = True) -> list[Job]:
    """Every job of the data set, in order (synthesising the Magpie prompts when they are missing)."""
    held, train = sharegpt_jobs()
    magpie = []
    if cfg.magpie_prompts:
        magpie = [Job("magpie", i, (t,)) for i, t in enumerate(_magpie_prompts(lm, tok, out_dir, cfg, progress))]
    return held + interleave(train, magpie, cfg.magpie_every)


def generate_data(target, tokenizer, out_dir: str, config: GeneratorConfig | None = None, reply_tokens: int = 5_000_000,
                  features_dir: str | None = None, feature_budget_gb: float = 25.0, capture: bool = True,
                  time_limit_s: float | None = None, max_jobs: int | None = None, jobs: list[Job] | None = None,
                  progress: bool = True) -> dict:
    """Grow the data set in ``out_dir`` until it holds ``reply_tokens`` training reply tokens (or the jobs
    run out, ``time_limit_s`` passes, or ``max_jobs`` jobs were committed by this call); returns the meta.
    ``jobs``: the job list instead of ShareGPT's (tests)."""
    from tqdm.auto import tqdm

    cfg = config or GeneratorConfig()
    cfg.validate()
    vocab = hf.vocab_size(target)
    store = DataStore(out_dir, cfg, vocab)
    if store.meta["reply_tokens"] >= reply_tokens:
        return store.meta
    from ..decoding.drafts import eagle3_feature_layers

    n_layers = hf.text_config(target).num_hidden_layers
    layers = eagle3_feature_layers(n_layers)
    # "auto" is resolved once per machine and kept: a resumed run must multiply with the same GEMMs
    machine = f"{cpu_name()} / {torch.get_num_threads()} threads / torch {torch.__version__}"
    choices = store.meta.setdefault("linear_choice", {})
    linear = choices.get(machine, cfg.linear) if cfg.linear == "auto" else cfg.linear
    lm = StaticBatchLM(target, cfg.slots, cfg.capacity, feature_layers=layers, linear=linear,
                       kv_dtype=getattr(torch, cfg.kv_dtype))
    choices[machine] = lm.linear_choice()
    all_jobs = jobs if jobs is not None else job_list(lm, tokenizer, out_dir, cfg, progress)
    feats = None
    if capture:
        feats = FeatureStore(features_dir or default_features_dir(out_dir), {"config": _config_dict(cfg), "dtype": store.dtype.str},
                             lm.hidden * len(layers), lm.hidden if cfg.store_hidden else 0, cfg.top_logprobs, vocab,
                             feature_budget_gb)
        feats.cut_back()
        feats.meta["feature_layers"] = list(layers)
    committed = store.committed()
    sched = SlotScheduler(lm, tokenizer, cfg, capture=capture)
    start_jobs, start_tokens = store.meta["jobs"], store.meta["reply_tokens"]
    session = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "first_job": start_jobs, "jobs": 0,
               "reply_tokens": 0, "all_reply_tokens": 0, "seconds": 0.0, "linear": lm.linear_choice()}
    store.meta["sessions"].append(session)
    bar = tqdm(total=reply_tokens, initial=min(start_tokens, reply_tokens), desc="generating the target's replies",
               unit="tok", disable=not progress)
    t0 = last_flush = time.perf_counter()
    base_s = store.meta["generate_s"]

    def flush():
        now = time.perf_counter()
        session.update(jobs=store.meta["jobs"] - start_jobs, reply_tokens=store.meta["reply_tokens"] - start_tokens,
                       all_reply_tokens=sched.reply_tokens, seconds=round(now - t0, 1),
                       reply_tokens_per_s=round(sched.reply_tokens / max(now - t0, 1e-9), 1), steps=sched.steps)
        store.meta["generate_s"] = round(base_s + now - t0, 1)
        if feats is not None:
            feats.flush()
        store.flush()

    try:
        out_of_time = (lambda: time.perf_counter() - t0 > time_limit_s) if time_limit_s else None
        todo = ((i, job) for i, job in enumerate(all_jobs) if i not in committed)
        for fin in sched.run(todo, should_stop=out_of_time):
            before = store.meta["reply_tokens"]
            shard, _ = store.commit(fin)
            if feats is not None:
                feats.append(shard, fin.number, fin)
            order = store.seal_order(shard, len(all_jobs))
            if order is not None:  # the shard is complete: rewrite it in job order
                flush()
                store.seal(shard, order)
            bar.update(store.meta["reply_tokens"] - before)
            if time.perf_counter() - last_flush > 30:
                flush()
                last_flush = time.perf_counter()
            if store.meta["reply_tokens"] >= reply_tokens or (max_jobs and store.meta["jobs"] - start_jobs >= max_jobs):
                break
    finally:
        flush()
        bar.close()
    return store.meta


def stored_jobs(out_dir: str, split: str | None = "train", kinds: tuple = ("sharegpt", "magpie")) -> Iterator[dict]:
    """The committed jobs of a data set in job order (a shard still being written holds them in the order
    they finished: sorted here): each index row with ``tokens`` (int64 ``[n]``) and ``shard``; ``split``
    None for every split; skipped jobs and synthesised prompts left out."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    for key in sorted(meta["shards"], key=int):
        info = meta["shards"][key]
        d = os.path.join(out_dir, f"shard_{int(key):05d}")
        if not info["jobs"]:
            continue
        data = np.fromfile(os.path.join(d, "tokens.bin"), dtype=meta["dtype"])
        with open(os.path.join(d, "index.jsonl")) as f:
            rows = [json.loads(x) for _, x in zip(range(info["jobs"]), f)]
        for row in sorted(rows, key=lambda r: r["job"]):
            if row.get("skipped") or row["kind"] not in kinds or (split and row["split"] != split):
                continue
            row["tokens"] = torch.from_numpy(data[row["offset"]:row["offset"] + row["length"]].astype(np.int64))
            row["shard"] = int(key)
            yield row
