"""The decoding room: the step's tree on one device (``tree``), strategies, drafts behind
``DraftProtocol``, the C2T classifier model, the engine and its metrics. Imports ``kernels`` and ``hf``."""
