"""The training room: the draft head's training (``draft_head``), the classifier's (``classifier``), the
tree dataset it learns from (``tree_dataset``), and ShareGPT text (``sharegpt``). Imports ``kernels``,
``hf`` and ``decoding``."""
