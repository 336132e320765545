"""The serve-time gate: what the engine, the server and the distillation teacher import.

``mixing`` (the mixture math), ``router`` (the causal router the engine runs),
``posterior`` (its posterior state), ``artifact`` (the router on disk),
``registry`` (the gate kinds and baselines) and ``token_features`` (what the
experts say about a batch, pure data). The offline fit lives in ``gate/fit/``
(``gatemix.gate.fit``), which imports these modules; none of them imports it.
"""
