"""The offline fit of the gate (``gatemix fit-gate``): features, the game, the family, the report.

It imports the serve-time gate (``gatemix.gate``: mixing, router, posterior,
artifact, registry), never the reverse. Empty on purpose: importing a module of
the fit should not import the whole pipeline (``pipeline.py``).
"""
