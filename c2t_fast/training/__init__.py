"""The training room. Imports ``kernels``, ``hf`` and ``decoding``.

- ``generator`` / ``prompts`` / ``selfdistill``: the self-distillation generator, what it answers, and the data
  set it grows across sessions (token ids committed, features on local disk: ``feature_store``);
- ``selfdistill_train`` / ``eagle3_head`` / ``unrolled``: the EAGLE-3 head trained on that data (training-time
  test, soft labels, a draft vocabulary);
- ``distill`` / ``draft_head``: the earlier EAGLE-1 head and its self-distilled text;
- ``head_config`` / ``precision``: what every head training run shares (schedule, checkpoints, matmul precision);
- ``tree_dataset`` / ``classifier``: the C2T classifier's training data and training;
- ``datastore_build``: the datastore drafter's corpus; ``sharegpt``: the shipped ShareGPT text.
"""
