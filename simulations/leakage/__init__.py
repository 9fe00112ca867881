"""The gradient-leakage lab (``fedhash leakage``): what an honest-but-curious (or model-crafting) server
learns from the exact messages a silo's client code sends, with and without DP.

- :mod:`.victim`: the federation as the server holds it, and one silo's round on chosen images, made by
  ``client.site`` (the ClientApp's own code);
- :mod:`.attacks`: analytic recovery, the trap (crafted model), update matching, image inversion, what the
  statistics say;
- :mod:`.metrics`: Hungarian-matched cosine, re-identification through the silo's FAISS index;
- :mod:`.bounds`: what the run's (ε, δ) allows any attacker;
- :mod:`.study`: the sweep, its table, JSON and plots.

The threat model is in the README ("The gradient-leakage lab").
"""
