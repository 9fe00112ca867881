"""Differential privacy for CroVCA, split by idea (the only package that imports Opacus):

* :mod:`~hashing.privacy.head`: the DP-valid head (the ``dp`` kind of hash function) and the check
  that refuses a module which couples the samples of a batch;
* :mod:`~hashing.privacy.release`: the one accounted release of feature moments and what follows from it;
* :mod:`~hashing.privacy.objective`: CroVCA as a sum of per-image terms;
* :mod:`~hashing.privacy.accountant`: plans (a target ε into noise multipliers) and ε (Opacus RDP);
* :mod:`~hashing.privacy.dpsgd`: the one door to DP-SGD, Opacus's ``make_private`` around the training loop;
* :mod:`~hashing.privacy.baselines`: LSH and DP-ITQ at the same ε.

No Flower here; the client and the server call these functions.
"""
