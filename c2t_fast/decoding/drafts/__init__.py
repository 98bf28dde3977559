"""The drafts room: everything that proposes a step's tokens.

- ``base``: ``DraftProtocol`` (what the engine calls) and ``Draft`` (the shared cache, mask, positions,
  commit and extend of our drafts);
- ``heads``: ``FeatureHead`` and ``EagleDraftHead`` (EAGLE-1/2, ours and published); ``eagle3``:
  ``Eagle3DraftHead``; ``hub``: reading published heads by their layout;
- ``causal_lm``: ``DraftLM``, a small causal LM sharing the target's tokenizer;
- the training-free sources grafted beside a draft's nodes: ``sources`` (``StepTree``, ``Proposal``, one
  source class per kind), ``ngram`` (prompt lookup), ``datastore`` (a suffix index of the target's own
  text), ``recycling`` (Token Recycling's table of verified top-k);
- ``loading``: drafts and sources from command-line style specifications.

Adding a draft: subclass ``Draft`` (feed with ``_slots`` and implement ``_feed``/``prefill``/``root``/
``layer_logits``) or implement ``DraftProtocol`` directly. Adding a source: a class in ``sources`` with
``start``/``propose``/``observe``/``extend`` and a kind in ``SOURCE_NAMES``.
"""

from .base import Draft, DraftProtocol, check_draft, read_config
from .causal_lm import DraftLM
from .eagle3 import Eagle3DraftHead, eagle3_feature_layers
from .heads import EagleDraftHead, FeatureHead

__all__ = ["Draft", "DraftLM", "DraftProtocol", "Eagle3DraftHead", "EagleDraftHead", "FeatureHead", "check_draft",
           "eagle3_feature_layers", "read_config"]
