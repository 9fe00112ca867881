"""fedhash.hashing: the hash function and everything about codes. Never imports flwr.

The main doors, one per idea (each module's docstring says more)::

    from hashing.backbones import create_backbone      # timm backbone with offline weights
    from hashing.data import load_dataset, make_splits # data sets and deterministic splits
    from hashing.features import cached_features       # backbone features of views, cached on disk
    from hashing.train import TrainConfig, train_head, encode
    from hashing.loss import crovca_loss               # the CroVCA objective
    from hashing.metrics import retrieval_metrics      # mAP@k, P@k, P@r, PR curves
    from hashing.baselines import fit_baseline         # LSH, PCA, ITQ
    from hashing.index import SiloIndex                # a silo's FAISS binary index
    from hashing.lora import wrap_lora, trainable_state, load_trainable_state
"""
