"""The C2T classifier (a 3 -> h -> 1 MLP over joint probability, entropy and depth) and the tree
dataset it is trained on.

Tree-dataset format (a directory, written by ``TreeRecorder``, read by ``open_tree_dataset``):

- ``rows.bin``: little-endian fixed-size records, numpy dtype ``ROW_DTYPE`` =
  ``P float32`` (joint probability of the root->node path), ``H float32`` (top-M entropy of the
  parent's distribution, nats), ``d int16`` (depth, root's children 0), ``label uint8`` (1 iff the
  target accepted the node), ``tree int64`` (id of the tree / verification step).
- ``meta.json``: ``{"format": "c2t-tree-rows", "version": 1, "dtype": ..., "rows": N, "trees": n,
  "positives": p, ...writer's metadata}``, rewritten on every flush.

Appending is streaming (rows go to disk in chunks; millions of rows never sit in memory), and the
reader memory-maps the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

FEATURES = ("P", "H", "d")
ROW_DTYPE = np.dtype([("P", "<f4"), ("H", "<f4"), ("d", "<i2"), ("label", "u1"), ("tree", "<i8")])
DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "data", "classifier")


@dataclass
class ClassifierConfig:
    hidden: int = 48
    features: list[str] = field(default_factory=lambda: list(FEATURES))  # any subset of P, H, d
    log_p: bool = False  # feed log P instead of P (an extension; the paper feeds P)

    def validate(self) -> None:
        if not 1 <= self.hidden <= 64:
            raise ValueError(f"classifier hidden size must be in 1..64, got {self.hidden}")
        if not self.features or any(f not in FEATURES for f in self.features) or len(set(self.features)) != len(
                self.features):
            raise ValueError(f"classifier features must be a non-empty subset of {FEATURES}, got {self.features}")


class C2TClassifier(nn.Module):
    """C = sigmoid(W2 relu(W1 x + b1) + b2) with x = the configured features of (P or log P, H, d).

    ``forward(x)`` takes the full feature triple ``[..., 3]`` (P, H, d in that order) and returns the
    logit; unused features are ignored, so every ablation uses the same calling code.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        self.config.validate()
        self.fc1 = nn.Linear(len(self.config.features), self.config.hidden)
        self.fc2 = nn.Linear(self.config.hidden, 1)
        self.register_buffer("_cols", torch.tensor([FEATURES.index(f) for f in self.config.features]),
                             persistent=False)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.config.log_p:
            x = torch.cat([x[..., :1].clamp_min(1e-30).log(), x[..., 1:]], -1)
        return x.index_select(-1, self._cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [..., 3] = (P, H, d) -> logit [...]."""
        return self.fc2(torch.relu(self.fc1(self.inputs(x))))[..., 0]

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))

    def kernel_weights(self, device=None) -> tuple[torch.Tensor, ...]:
        """(W1 [h, 3], b1, W2 [1, h], b2) fp32 for ``ops.score_children``: unused feature columns are
        zero, so the fused kernel always reads the full (P-or-logP, H, d) triple."""
        h = self.config.hidden
        w1 = torch.zeros(h, 3, dtype=torch.float32, device=self.fc1.weight.device)
        w1[:, self._cols] = self.fc1.weight.detach().float()
        out = (w1, self.fc1.bias.detach().float(), self.fc2.weight.detach().float(), self.fc2.bias.detach().float())
        return tuple(t.to(device).contiguous() for t in out) if device is not None else tuple(t.contiguous() for t in out)

    # -- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "c2t_classifier", **asdict(self.config)}, f, indent=2)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(path, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | None = None) -> "C2TClassifier":
        """Load from a directory written by ``save_pretrained``; no argument loads the shipped default."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = path or DEFAULT_DIR
        cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        if not os.path.isfile(cfg_file) or not os.path.isfile(weights):
            hint = (" No default classifier is shipped in this build yet: train one with "
                    "`c2t-fast train-classifier`." if path == DEFAULT_DIR else "")
            raise FileNotFoundError(f"no C2T classifier at {path} (needs config.json and model.safetensors).{hint}")
        try:
            with open(cfg_file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from exc
        if raw.pop("model_type", None) != "c2t_classifier":
            raise ValueError(f"{cfg_file} does not describe a c2t_classifier")
        model = cls(ClassifierConfig(**raw))
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            raise ValueError(f"{weights} does not match its config (hidden {model.config.hidden}, features "
                             f"{model.config.features}): expected tensors {expected}, found {got}")
        model.load_state_dict(state)
        return model.eval()


# ------------------------------------------------------------------------------------------------
# Tree dataset


class TreeRecorder:
    """Streams (P, H, d, label, tree) rows to a tree-dataset directory.

    ``add_tree(P, H, d, label)`` appends one tree (any array-likes of equal length) under a fresh
    tree id; rows are buffered and written in chunks of ``chunk_rows``. Use as a context manager or
    call ``close()``. Opening an existing directory appends (tree ids continue).
    """

    def __init__(self, path: str, metadata: dict | None = None, chunk_rows: int = 1 << 16):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.chunk_rows = chunk_rows
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.meta = {"format": "c2t-tree-rows", "version": 1, "dtype": ROW_DTYPE.descr, "rows": 0, "trees": 0,
                     "positives": 0}
        meta_file = os.path.join(path, "meta.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                self.meta.update(json.load(f))
        self.meta.update(metadata or {})
        self._file = open(os.path.join(path, "rows.bin"), "ab")

    def add_tree(self, P, H, d, label) -> int:
        cols = [np.asarray(torch.as_tensor(x).cpu()) for x in (P, H, d, label)]
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise ValueError(f"add_tree: P, H, d, label must have equal lengths, got {[len(c) for c in cols]}")
        rows = np.empty(n, ROW_DTYPE)
        rows["P"], rows["H"], rows["d"], rows["label"] = cols
        tree_id = self.meta["trees"]
        rows["tree"] = tree_id
        self._buf.append(rows)
        self._buffered += n
        self.meta["trees"] += 1
        self.meta["rows"] += n
        self.meta["positives"] += int(rows["label"].sum())
        if self._buffered >= self.chunk_rows:
            self.flush()
        return tree_id

    def flush(self) -> None:
        if self._buf:
            np.concatenate(self._buf).tofile(self._file)
            self._buf, self._buffered = [], 0
        self._file.flush()
        with open(os.path.join(self.path, "meta.json"), "w") as f:
            json.dump(self.meta, f, indent=2)

    def close(self) -> None:
        self.flush()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_tree_dataset(path: str) -> np.ndarray:
    """Memory-mapped structured array (``ROW_DTYPE``) of a tree-dataset directory."""
    meta_file, rows_file = os.path.join(path, "meta.json"), os.path.join(path, "rows.bin")
    if not os.path.isfile(meta_file) or not os.path.isfile(rows_file):
        raise FileNotFoundError(f"{path} is not a tree dataset (needs meta.json and rows.bin)")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format") != "c2t-tree-rows" or np.dtype([tuple(x) for x in meta["dtype"]]) != ROW_DTYPE:
        raise ValueError(f"{path}: unknown tree-dataset format {meta.get('format')!r} / dtype")
    size = os.path.getsize(rows_file)
    if size % ROW_DTYPE.itemsize:
        raise ValueError(f"{rows_file} is truncated ({size} bytes is not a multiple of {ROW_DTYPE.itemsize})")
    if size == 0:
        return np.empty(0, ROW_DTYPE)
    return np.memmap(rows_file, dtype=ROW_DTYPE, mode="r")
