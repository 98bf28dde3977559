"""The main job's settings, defined once. ``c2t-fast generate``, ``c2t-fast bench`` (a strategy's row with no
flags), ``c2t_fast.generate`` (transformers' ``custom_generate`` door) and ``SpeculativeGenerator`` all run
these unless told otherwise:

- the C2T strategy with the shipped classifier (its features, joint probability, entropy and depth, are
  the draft's own, so it serves any head);
- trees sized by this machine's measured verification cost, plain steps where no tree pays (``"auto"``);
- n-gram lookup branches of ``NGRAM_TOKENS`` tokens (prompt and reply) grafted onto every tree;
- for the shipped SmolLM2 target, the shipped draft head (another target needs ``c2t_fast.load_draft``),
  and beside the n-gram branches those of the shipped datastore of its own replies and of Token
  Recycling (``DATASTORE``, ``RECYCLING``; another target has neither by default: the datastore is in
  SmolLM2's token ids, and neither was measured on another target).

Why these: measured on this project's CPU against plain decoding and prompt lookup (BENCHMARKS.md, "the main
job's speed"); each default is the setting that ran fastest there.
"""

from __future__ import annotations

STRATEGY = "c2t"
BUDGET = "auto"
NGRAM_TOKENS = 10
DEFAULT = "default"  # an argument left at this means "the main job's setting"
SHIPPED = "shipped"  # the datastore shipped in c2t_fast/data/datastore (the shipped target's replies)
DATASTORE = SHIPPED  # for the shipped target; another target: none
RECYCLING = True  # for the shipped target; another target: off
TREE_K_FLAG = "top_k_tree"  # the tree's K on the command line and in sweeps: --top-k is the target's sampling


def flag_name(param: str) -> str:
    """The command-line / sweep name of strategy parameter ``param``."""
    return TREE_K_FLAG if param == "top_k" else param


def param_name(flag: str) -> str:
    """The strategy parameter a command-line / sweep name sets (the inverse of ``flag_name``)."""
    return "top_k" if flag == TREE_K_FLAG else flag


def describe() -> str:
    """One line naming the defaults (help texts, bench summaries)."""
    return (f"{STRATEGY} with the shipped classifier, budget {BUDGET}, n-gram branches of {NGRAM_TOKENS} tokens; "
            f"for the shipped target also the {DATASTORE} datastore's and Token Recycling's branches")


def is_default_setting(strategy: str, setting: dict) -> bool:
    """Whether a bench row (strategy name and its non-default settings) is what a user gets with no flags."""
    return strategy == STRATEGY and setting == {"ngram": NGRAM_TOKENS, "budget": BUDGET}


def make_strategy(name: str = STRATEGY, classifier_path: str | None = None, params: dict | None = None):
    """Strategy ``name`` with those of ``params`` it takes (None values ignored); the classifier strategies
    load ``classifier_path`` (None: the shipped classifier)."""
    from .classifier import load_classifier
    from .strategies import CLASSIFIER_STRATEGIES, strategy_from_name, strategy_parameters

    own = strategy_parameters(name)
    chosen = {k: v for k, v in (params or {}).items() if k in own and v is not None}
    clf = load_classifier(classifier_path) if name in CLASSIFIER_STRATEGIES else None
    return strategy_from_name(name, classifier=clf, **chosen)


def resolve_ngram(ngram, recording: bool = False):
    """An ``NgramLookup`` or None from ``DEFAULT`` (None while recording classifier trees), None, a token
    count (0: none) or an ``NgramLookup``."""
    from .drafts.ngram import NgramLookup

    if isinstance(ngram, str) and ngram == DEFAULT:
        return None if recording else NgramLookup(num_tokens=NGRAM_TOKENS)
    if ngram is None or isinstance(ngram, NgramLookup):
        return ngram
    if isinstance(ngram, int) and not isinstance(ngram, bool) and ngram >= 0:
        return NgramLookup(num_tokens=ngram) if ngram else None
    raise TypeError(f"ngram must be 'default', None, a token count >= 0 or a c2t_fast.decoding.drafts.ngram.NgramLookup, "
                    f"got {ngram!r}")


def resolve_budget(budget, recording: bool = False):
    """``DEFAULT`` -> ``BUDGET`` (None while recording classifier trees); anything else as given."""
    if isinstance(budget, str) and budget == DEFAULT:
        return None if recording else BUDGET
    return budget


def resolve_datastore(datastore, target, recording: bool = False):
    """A ``Datastore`` or None from ``DEFAULT`` (``DATASTORE`` for the shipped target, else none; none while
    recording classifier trees), None, ``SHIPPED``, a directory or a ``Datastore``."""
    from ..hf.shipped import is_shipped_target
    from .drafts.datastore import Datastore, load_datastore

    if isinstance(datastore, str) and datastore == DEFAULT:
        if recording or not is_shipped_target(target):
            return None
        datastore = DATASTORE
    if datastore is None or isinstance(datastore, Datastore):
        return datastore
    if isinstance(datastore, str) and datastore:
        return load_datastore(None if datastore == SHIPPED else datastore)
    raise TypeError(f"datastore must be 'default', None, 'shipped', a directory or a "
                    f"c2t_fast.decoding.drafts.datastore.Datastore, got {datastore!r}")


def resolve_recycling(recycling, target, recording: bool = False):
    """A ``RecyclingTable`` or None from ``DEFAULT`` (``RECYCLING`` for the shipped target, else off; off while
    recording classifier trees), True / False / None or a ``RecyclingTable``."""
    from ..hf.shipped import is_shipped_target
    from .drafts.recycling import RecyclingTable

    if isinstance(recycling, str) and recycling == DEFAULT:
        recycling = RECYCLING and not recording and is_shipped_target(target)
    if recycling is True:
        from ..hf.adapter import vocab_size

        return RecyclingTable(vocab_size(target))
    if recycling is None or recycling is False or isinstance(recycling, RecyclingTable):
        return recycling or None
    raise TypeError(f"recycling must be 'default', True, False, None or a "
                    f"c2t_fast.decoding.drafts.recycling.RecyclingTable, got {recycling!r}")


def load_sources(datastore: str | None, recycling, target) -> dict:
    """``SpeculativeGenerator``'s training-free source arguments from command-line style specifications:
    ``datastore`` "default" (the main job's: the shipped one for the shipped target, none for another),
    "shipped", a directory or None / "none"; ``recycling`` "default" (on for the shipped target), on or off."""
    if datastore in (None, "none"):
        datastore = None
    elif datastore != DEFAULT:
        datastore = resolve_datastore(datastore, target)
    if not (isinstance(recycling, str) and recycling == DEFAULT):
        recycling = bool(recycling)
    return {"datastore": datastore, "recycling": recycling}
