"""fedhash.hashing: the hash function and everything about codes, usable alone as a centralized CroVCA
library. Never imports flwr (``hashing/federated/`` is the Flower-free vocabulary both sides of a
federation share; ``hashing/privacy/`` is the only package that imports Opacus).

The main doors, one per idea (each module's docstring says more)::

    from hashing.config import Config                   # every knob, one dataclass
    from hashing.hashers import create_hasher, Inputs   # one door per kind of hash function
    from hashing.train import train, Schedule           # the one training loop
    from hashing.loss import crovca_loss                # the CroVCA objective
    from hashing.backbones import create_backbone       # timm backbone with offline weights
    from hashing.data import load_dataset, make_splits  # data sets and deterministic splits
    from hashing.features import cached_features        # backbone features of views, cached on disk
    from hashing.silos import make_silos                # a data set cut into silos
    from hashing.metrics import retrieval_metrics       # mAP@k, P@k, P@r, PR curves
    from hashing.baselines import fit_baseline          # LSH, PCA, ITQ
    from hashing.index import SiloIndex                 # a silo's FAISS binary index
    from hashing.model import save_model, load_model    # one model file format, one model version
"""

# the built-in kinds of hash function register themselves with hashing.hashers (timm's pattern)
from . import coder as _coder  # noqa: E402,F401  probe
from . import lora as _lora  # noqa: E402,F401  lora
from .privacy import head as _dp_head  # noqa: E402,F401  dp
