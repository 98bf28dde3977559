"""The decoding room. Imports ``kernels`` and ``hf``, never ``training``.

- ``engine``: ``SpeculativeGenerator``, the lossless step loop (draft -> size -> verify -> commit);
- ``batch``: ``BatchSpeculativeGenerator``, a tree per sequence of a batch, all verified in one pass;
- ``step``: the step's named objects (``DraftBacklog``, ``Sampler``, ``Verifier`` -> ``Verified``);
- ``tree``: the step's tree on one device and the draft fed with it;
- ``strategies``: Chain, EAGLE-2, C2T and the other tree growers behind one interface;
- ``classifier``: the C2T classifier model (and the shipped one);
- ``cost``: the hardware profile (``cost.profile``) and the online rule that sizes trees (``cost.rule``);
- ``drafts``: every draft source behind ``DraftProtocol`` (our heads, published formats, causal-LM drafts,
  n-gram, datastore and recycling branches, loading, export);
- ``processors``: transformers' logits processors along a tree;
- ``agreement``: the decisions a tensor-parallel target's ranks take together;
- ``defaults``: the main job's settings, defined once; ``main_job``: ``c2t-fast generate`` (one streamed reply);
  ``front_door``: ``model.generate(custom_generate=...)``;
- ``metrics``: what a run measured.
"""
