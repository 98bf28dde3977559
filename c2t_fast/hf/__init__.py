"""The transformers room: the attention patch (``attention``), the target adapter with every
transformers detail the engine and training use (``adapter``), the draft head's transformers layers
(``layers``), and model loading, shipped models included (``loading``, ``shipped``). Imports only
``c2t_fast.kernels``; no other room imports transformers."""
