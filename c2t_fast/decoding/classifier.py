"""The C2T classifier: a 3 -> h -> 1 MLP over joint probability, entropy and depth, and the fp32
weights it hands to the fused scoring op. Its training data and training live in ``c2t_fast.training``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

FEATURES = ("P", "H", "d")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "classifier")


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


def load_classifier(spec: str | None):
    """The classifier in directory ``spec`` (None: the shipped one)."""
    return C2TClassifier.from_pretrained(spec)
